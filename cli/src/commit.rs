//! `quring commit [-f fmt] [-t cache] [-b base] [-d] [-p] [-q] IMG`: qemu-img commit's
//! syntax, messages and exit codes. Everything the image and the layers above the base
//! allocate (data, and zeros where they say zero) is written into the base (its immediate
//! backing file, or `-b`, a file of its chain; qcow2 or raw, grown to the image's size when
//! smaller), read through the engine; then the image is emptied (every cluster unmapped,
//! as QEMU's `make_empty`) unless `-d` or `-b` (which implies `-d`, as in qemu-img).

use crate::probe::ImageFormat;
use clap::Parser;
use quring::image::{Backing, Image, NewBacking, Options};
use quring::queue::{Queue, QueueOptions, ResizeOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `quring commit`.
#[derive(Parser)]
pub struct Args {
    /// Image format (qcow2; probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Cache mode: none, writeback, writethrough, directsync or unsafe (default writeback;
    /// unsafe skips the final sync of a raw base).
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// The base to commit into (a file of the image's backing chain; implies -d).
    #[arg(short = 'b')]
    base: Option<String>,
    /// Do not empty the image afterwards.
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no "Image committed." line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Rate limit in bytes per second (accepted; not applied).
    #[arg(short = 'r')]
    _rate: Option<String>,
    #[command(flatten)]
    chain: crate::args::ChainArgs,
    /// The image.
    image: PathBuf,
}

/// Where the data goes.
enum Target {
    Qcow2(Arc<Image>, Box<Queue>),
    Raw(std::fs::File, quring::io::lock::ImageLock),
}

/// Runs it: 0 on success, 1 on any error (qemu-img's codes).
pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    if !matches!(a.cache.as_str(), "none" | "writeback" | "writethrough" | "directsync" | "unsafe") {
        return Err(format!("Invalid cache option: {}", a.cache).into());
    }
    let p = a.image.display().to_string();
    let fmt = crate::probe::resolve(&a.image, a.format.as_deref(), true)?;
    if fmt == ImageFormat::Raw {
        return Err("Image does not have a backing file".into());
    }
    // The backing chain is opened without locks (force-share): the base is opened for
    // writing on its own below.
    let mut opts = Options { force_share: true, hook: quring::io::hook::from_env(), ..Default::default() };
    a.chain.apply(&mut opts)?;
    let top = Image::open(&a.image, &opts).map_err(|e| format!("Could not open '{p}': {e}"))?;
    if top.backing().is_none() {
        return Err("Image does not have a backing file".into());
    }
    let chain = crate::output::chain_files(&top);
    let depth = match &a.base {
        None => 1,
        Some(b) => find_in_chain(&a.image, b, &chain)
            .ok_or_else(|| format!("Did not find '{b}' in the backing chain of '{p}'"))?,
    };
    let base_path = chain[depth].path.clone();
    let base_is_qcow2 = layer(&top, depth).is_some();
    let size = top.size();
    let bp = base_path.display().to_string();
    let mut target = if base_is_qcow2 {
        let bopts = Options { l1_room: Some(size), hook: quring::io::hook::from_env(), ..Default::default() };
        let img = Image::open(&base_path, &bopts).map_err(|e| format!("Could not open '{bp}': {e}"))?;
        let mut q = Queue::new(&img, &QueueOptions::default())?;
        if img.size() < size {
            q.resize(size, &ResizeOptions::default()).map_err(|e| format!("Could not resize '{bp}': {e}"))?;
        }
        Target::Qcow2(img, Box::new(q))
    } else {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&base_path)
            .map_err(|e| format!("Could not open '{bp}': {}", crate::probe::os_text(&e)))?;
        let lock = quring::io::lock::ImageLock::acquire(&f, &base_path, quring::io::lock::LockMode::ReadWrite, false)
            .map_err(|e| format!("Could not open '{bp}': {e}"))?;
        if f.metadata()?.len() < size {
            f.set_len(size).map_err(|e| format!("Could not resize '{bp}': {}", crate::probe::os_text(&e)))?;
        }
        Target::Raw(f, lock)
    };
    let mut q = Queue::new(&top, &QueueOptions::default())?;
    let bar = (a.progress && !a.quiet).then(crate::progress::Progress::start);
    copy_above(&top, &mut q, depth, &mut target, bar)?;
    let base_size = match target {
        Target::Qcow2(img, bq) => {
            let s = img.size();
            drop(bq);
            img.close()?;
            s
        }
        Target::Raw(f, _lock) => {
            if a.cache != "unsafe" {
                f.sync_all()?;
            }
            f.metadata()?.len()
        }
    };
    // Empty the image (qemu-img: unless -d; -b implies -d).
    if !a.keep && a.base.is_none() {
        q.full_discard(0, size).map_err(|e| format!("Could not empty {p}: {e}"))?;
        q.flush()?;
        // The recorded backing length must let the committed data show through.
        if let Some(id) = top.identity().filter(|_| !top.identity_stale())
            && id.backing_len < base_size.min(size)
        {
            let h = top.header();
            if let Some(name) = h.backing_file.clone() {
                let nb =
                    NewBacking { name, format: h.backing_format(), guid: id.backing_guid, len: base_size.min(size) };
                top.set_backing_file(Some(&nb))?;
            }
        }
    }
    drop(q);
    top.close()?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// The chain index of the file `b` names (as given, or relative to the image's directory).
fn find_in_chain(image: &Path, b: &str, chain: &[crate::output::ChainFile]) -> Option<usize> {
    use std::os::unix::fs::MetadataExt;
    let candidates = [PathBuf::from(b), quring::image::resolve_backing_path(image, b)];
    for c in candidates {
        if let Ok(m) = std::fs::metadata(&c)
            && let Some(i) = chain.iter().position(|f| f.dev == m.dev() && f.ino == m.ino())
            && i > 0
        {
            return Some(i);
        }
    }
    None
}

/// The qcow2 layer at `depth` of `top`'s chain (None: a raw file or no such layer).
fn layer(top: &Arc<Image>, depth: usize) -> Option<Arc<Image>> {
    let mut cur = top.clone();
    for _ in 0..depth {
        cur = match cur.backing()? {
            Backing::Qcow2(b) => b.clone(),
            Backing::Raw(_) => return None,
        };
    }
    Some(cur)
}

/// Writes into `target` every range that a layer above `depth` answers for: its data, or
/// zeros where it reads as zeros.
fn copy_above(
    top: &Arc<Image>,
    q: &mut Queue,
    depth: usize,
    target: &mut Target,
    mut bar: Option<crate::progress::Progress>,
) -> Result<(), String> {
    const CHUNK: u64 = 1 << 20;
    let size = top.size();
    let mut buf = quring::io::AlignedBuf::new(CHUNK as usize);
    let zeros = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < size {
        let st = top.block_status(pos, (size - pos).min(CHUNK)).map_err(|e| e.to_string())?;
        let n = st.len.clamp(1, (size - pos).min(CHUNK));
        if st.depth < depth {
            let zero = st.zero && !st.data;
            match target {
                Target::Qcow2(_, bq) if zero => bq.write_zeroes(pos, n, false).map_err(|e| e.to_string())?,
                Target::Qcow2(_, bq) => {
                    q.read_at(&mut buf[..n as usize], pos).map_err(|e| e.to_string())?;
                    bq.write_at(&buf[..n as usize], pos).map_err(|e| e.to_string())?;
                }
                Target::Raw(f, _) => {
                    use std::os::unix::fs::FileExt;
                    let data: &[u8] = if zero {
                        &zeros[..n as usize]
                    } else {
                        q.read_at(&mut buf[..n as usize], pos).map_err(|e| e.to_string())?;
                        &buf[..n as usize]
                    };
                    f.write_all_at(data, pos).map_err(|e| format!("Could not write: {e}"))?;
                }
            }
        }
        pos += n;
        if let Some(b) = bar.as_mut() {
            b.update(pos, size);
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(())
}
