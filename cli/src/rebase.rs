//! `quring rebase [-f fmt] [-F backing_fmt] [-u] [-c] -b BACKING [-p] [-q] IMG`: qemu-img
//! rebase's syntax, messages and exit codes. Safe mode reads every range the image does not
//! allocate itself through its old chain and through the new backing file, and writes the
//! clusters where they differ into the image (reading through the engine); `-u` only
//! changes the header; `-b ""` removes the backing file. The identity extension's backing
//! fields follow the new backing file (docs/identity.md). quring's own addition:
//! `rebase -u --backing-search DIR IMG` (no `-b`) records the path of the image whose GUID
//! the image recorded for its backing file.

use crate::probe::ImageFormat;
use clap::Parser;
use quring::format::identity::Guid;
use quring::image::{BackingPolicy, Image, NewBacking, Options, resolve_backing_path};
use quring::queue::{Queue, QueueOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `quring rebase`.
#[derive(Parser)]
pub struct Args {
    /// Image format (qcow2; probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// The new backing file ("" removes the backing file).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Unsafe mode: only the header changes (the new backing file is not read).
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode of the image (accepted: none, writeback, writethrough, directsync, unsafe).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Cache mode of the backing files (accepted as qemu-img accepts it).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Compress the clusters copied in safe mode (as compressed clusters, where the
    /// image holds nothing of the cluster yet).
    #[arg(short = 'c')]
    compress: bool,
    #[command(flatten)]
    chain: crate::args::ChainArgs,
    /// The image.
    image: PathBuf,
}

/// The new backing file, opened for reading in safe mode.
pub enum Base {
    /// A qcow2 image (with its chain) and a queue on it.
    Qcow2(Arc<Image>, Box<Queue>),
    /// A raw file and its length.
    Raw(std::fs::File, u64),
}

impl Base {
    /// Opens `path` as `fmt` (None: probed) for reading.
    pub fn open(path: &Path, fmt: Option<&str>) -> Result<Base, String> {
        if let Err(e) = std::fs::metadata(path) {
            return Err(format!("Could not open '{}': {}", path.display(), crate::probe::os_text(&e)));
        }
        let fmt = match fmt {
            Some(f) => f.to_string(),
            None => quring::image::probe_format(path).map_err(|e| e.to_string())?,
        };
        match fmt.as_str() {
            "qcow2" => {
                let img = crate::util::open_ro(path, true).map_err(|e| e.to_string())?;
                let q = Queue::new(&img, &QueueOptions::default()).map_err(|e| e.to_string())?;
                Ok(Base::Qcow2(img, Box::new(q)))
            }
            "raw" => {
                let p = path.display();
                let f = std::fs::File::open(path)
                    .map_err(|e| format!("Could not open '{p}': {}", crate::probe::os_text(&e)))?;
                let len = f.metadata().map_err(|e| e.to_string())?.len();
                Ok(Base::Raw(f, len))
            }
            o => Err(format!("Unknown driver '{o}'")),
        }
    }

    /// Its virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Base::Qcow2(img, _) => img.size(),
            Base::Raw(_, len) => *len,
        }
    }

    /// Its GUID (nil: raw, or no identity extension).
    pub fn guid(&self) -> Guid {
        match self {
            Base::Qcow2(img, _) => img.identity().map(|i| i.guid).unwrap_or_default(),
            Base::Raw(..) => Guid::default(),
        }
    }

    /// Reads `buf.len()` bytes at `off` (512-byte aligned); past the end: zeros.
    pub fn read(&mut self, buf: &mut [u8], off: u64) -> Result<(), String> {
        let size = self.size();
        let n = (size.saturating_sub(off) as usize).min(buf.len());
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        match self {
            Base::Qcow2(_, q) => {
                let whole = n.div_ceil(512) * 512;
                if whole <= buf.len() && off + whole as u64 <= size.div_ceil(512) * 512 {
                    q.read_at(&mut buf[..whole], off).map_err(|e| e.to_string())?;
                    buf[n..].fill(0);
                } else {
                    q.read_at(&mut buf[..n], off).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Base::Raw(f, _) => {
                use std::os::unix::fs::FileExt;
                f.read_exact_at(&mut buf[..n], off).map_err(|e| format!("Could not read: {e}"))
            }
        }
    }
}

/// Runs it: 0 on success, 1 on any error (qemu-img's codes).
pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let search = a.unsafe_mode && a.backing.is_none() && !a.chain.backing_search.is_empty();
    if !a.unsafe_mode && a.backing.is_none() {
        return Err(
            "Must specify backing file (-b) or use unsafe mode (-u)\nTry 'quring rebase --help' for more info".into()
        );
    }
    for c in [&a.cache, &a.src_cache].into_iter().flatten() {
        if !matches!(c.as_str(), "none" | "writeback" | "writethrough" | "directsync" | "unsafe") {
            return Err(format!("Invalid cache option: {c}").into());
        }
    }
    let p = a.image.display().to_string();
    let fmt = crate::probe::resolve(&a.image, a.format.as_deref(), true)?;
    let name = a.backing.clone().unwrap_or_default();
    if fmt == ImageFormat::Raw {
        return Err(format!("Could not change the backing file to '{name}': Operation not supported").into());
    }
    if search {
        return record_found(&a);
    }
    if !name.is_empty() && a.unsafe_mode && a.backing_format.is_none() {
        return Err(format!("Could not change the backing file to '{name}': backing format must be specified").into());
    }
    if a.unsafe_mode {
        // qemu-img shows 0% and 100% here too.
        let bar = (a.progress && !a.quiet).then(crate::progress::Progress::start);
        let opts = Options { backing: BackingPolicy::Ignore, hook: quring::io::hook::from_env(), ..Default::default() };
        let img = Image::open(&a.image, &opts).map_err(|e| format!("Could not open '{p}': {e}"))?;
        let new = (!name.is_empty()).then(|| unsafe_identity(&img, &a.image, &name, a.backing_format.as_deref()));
        let r = img.set_backing_file(new.as_ref());
        let closed = img.close();
        r.map_err(|e| format!("Could not change the backing file to '{name}': {e}"))?;
        closed?;
        if let Some(b) = bar {
            b.finish();
        }
        return Ok(0);
    }

    // Safe mode: the image with its old chain, and the new backing file.
    let mut opts = Options { hook: quring::io::hook::from_env(), ..Default::default() };
    a.chain.apply(&mut opts)?;
    let img = Image::open(&a.image, &opts).map_err(|e| format!("Could not open '{p}': {e}"))?;
    let mut base = if name.is_empty() {
        None
    } else {
        let path = resolve_backing_path(&a.image, &name);
        let b = Base::open(&path, a.backing_format.as_deref())
            .map_err(|e| format!("Could not open new backing file '{}': {e}", path.display()))?;
        Some(b)
    };
    if base.is_some() && a.backing_format.is_none() {
        return Err(format!("Could not change the backing file to '{name}': backing format must be specified").into());
    }
    let mut q = Queue::new(&img, &QueueOptions::default())?;
    let bar = (a.progress && !a.quiet).then(crate::progress::Progress::start);
    let r = copy_differences(&img, &mut q, base.as_mut(), a.compress, bar);
    let r = r.and_then(|()| q.flush().map_err(|e| e.to_string()));
    drop(q);
    let new = base.as_ref().map(|b| NewBacking {
        name: name.clone(),
        format: a.backing_format.clone(),
        guid: b.guid(),
        len: b.size(),
    });
    let r = r.and_then(|()| {
        img.set_backing_file(new.as_ref()).map_err(|e| format!("Could not change the backing file to '{name}': {e}"))
    });
    let closed = img.close();
    r?;
    closed?;
    Ok(0)
}

/// Safe mode's copy: every cluster of the image that it does not allocate whole, where what
/// it shows now (through its old chain) differs from what the new backing file (None: zeros)
/// holds in the unallocated part, gets what it shows now written into it.
fn copy_differences(
    img: &Arc<Image>,
    q: &mut Queue,
    mut base: Option<&mut Base>,
    compress: bool,
    mut bar: Option<crate::progress::Progress>,
) -> Result<(), String> {
    let size = img.size();
    let cs = img.geometry().cluster_size();
    let chunk = (1u64 << 20).div_ceil(cs) * cs;
    let mut old = quring::io::AlignedBuf::new(chunk as usize);
    let mut new = quring::io::AlignedBuf::new(chunk as usize);
    let mut off = 0u64;
    while off < size {
        let n = chunk.min(size - off);
        // The ranges of this chunk the image does not allocate itself.
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let mut pos = off;
        while pos < off + n {
            let st = img.block_status(pos, off + n - pos).map_err(|e| e.to_string())?;
            let len = st.len.max(1).min(off + n - pos);
            if !(st.depth == 0 && st.present) {
                holes.push((pos, pos + len));
            }
            pos += len;
        }
        if !holes.is_empty() {
            let nb = n as usize;
            let whole = nb.div_ceil(512) * 512;
            let m = whole.min(old.len());
            q.read_at(&mut old[..m], off).map_err(|e| e.to_string())?;
            match base.as_deref_mut() {
                Some(b) => b.read(&mut new[..nb], off)?,
                None => new[..nb].fill(0),
            }
            // Cluster by cluster: written whole when an unallocated part differs.
            let mut c = off;
            while c < off + n {
                let ce = (c + cs).min(off + n);
                let differs = holes.iter().any(|&(hs, he)| {
                    let (s, e) = (hs.max(c), he.min(ce));
                    s < e && old[(s - off) as usize..(e - off) as usize] != new[(s - off) as usize..(e - off) as usize]
                });
                if differs {
                    let data = &old[(c - off) as usize..(ce - off) as usize];
                    // A cluster the image holds nothing of can be written compressed.
                    let empty = holes.iter().any(|&(hs, he)| hs <= c && ce <= he);
                    if data.iter().all(|&b| b == 0) {
                        q.write_zeroes(c, ce - c, false).map_err(|e| e.to_string())?;
                    } else if compress && empty {
                        q.write_compressed(c, data).map_err(|e| e.to_string())?;
                    } else {
                        q.write_at(data, c).map_err(|e| e.to_string())?;
                    }
                }
                c = ce;
            }
        }
        off += n;
        if let Some(b) = bar.as_mut() {
            b.update(off, size);
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(())
}

/// The backing fields `rebase -u` records for the new backing file `name`: its GUID and
/// length when it can be read (the recorded length when it is the image recorded before: a
/// moved file), else a nil GUID and the image's size (nothing cut off).
fn unsafe_identity(img: &Image, image: &Path, name: &str, fmt: Option<&str>) -> NewBacking {
    let path = resolve_backing_path(image, name);
    let guid = quring::image::header_guid(&path).unwrap_or_default();
    let recorded = img.identity().filter(|_| !img.identity_stale());
    let len = match recorded {
        Some(id) if !guid.is_nil() && id.backing_guid == guid && img.header().backing_file.is_some() => id.backing_len,
        _ => match Base::open(&path, fmt) {
            Ok(b) => b.size(),
            Err(_) => img.size(),
        },
    };
    NewBacking { name: name.to_string(), format: fmt.map(str::to_string), guid, len }
}

/// `rebase -u --backing-search DIR IMG`: the image whose GUID the image recorded for its
/// backing file is looked for in the directories and its path recorded (the file name when
/// it lies in the image's directory, else its absolute path); GUID and length stay.
fn record_found(a: &Args) -> Result<u8, Box<dyn std::error::Error>> {
    let p = a.image.display().to_string();
    let opts = Options { backing: BackingPolicy::Ignore, hook: quring::io::hook::from_env(), ..Default::default() };
    let img = Image::open(&a.image, &opts).map_err(|e| format!("Could not open '{p}': {e}"))?;
    let id = img.identity().filter(|id| !id.backing_guid.is_nil() && !img.identity_stale()).ok_or_else(|| {
        format!(
            "'{p}' records no backing GUID (quring identity extension) to search for: use -b to name the backing file"
        )
    })?;
    let found = quring::image::find_by_guid(&a.chain.backing_search, id.backing_guid)?.ok_or_else(|| {
        let dirs: Vec<String> = a.chain.backing_search.iter().map(|d| format!("'{}'", d.display())).collect();
        format!("no image with GUID {} in {}", id.backing_guid, dirs.join(", "))
    })?;
    let abs = std::fs::canonicalize(&found)?;
    let dir = std::fs::canonicalize(a.image.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    let name = match abs.strip_prefix(&dir) {
        Ok(rel) if rel.components().count() == 1 => rel.display().to_string(),
        _ => abs.display().to_string(),
    };
    let fmt = a.backing_format.clone().unwrap_or_else(|| "qcow2".into());
    let new = NewBacking { name: name.clone(), format: Some(fmt), guid: id.backing_guid, len: id.backing_len };
    let r = img.set_backing_file(Some(&new));
    let closed = img.close();
    r.map_err(|e| format!("Could not change the backing file to '{name}': {e}"))?;
    closed?;
    if !a.quiet {
        eprintln!("quring: backing file of '{p}' set to '{name}' (GUID {})", id.backing_guid);
    }
    Ok(0)
}
