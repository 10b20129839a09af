//! `quring create`: new qcow2 images laid out exactly as `qemu-img create` does.

use crate::util::{apply_create_opts, parse_size};
use clap::Parser;
use quring::format::identity::Identity;
use quring::format::layout::{CreateOptions, Preallocation};
use std::path::PathBuf;

/// Arguments of `quring create`.
#[derive(Parser)]
pub struct Args {
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Options: cluster_size=,extended_l2=on|off,refcount_bits=,lazy_refcounts=on|off,
    /// compat=0.10|1.1,preallocation=off|metadata|falloc|full,backing_file=,backing_fmt=,
    /// compression_type=zlib|zstd,l2_less=on|off,
    /// data_file=NAME,data_file_raw=on|off
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Do not open the backing file (the size must then be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The new image.
    image: PathBuf,
    /// Virtual size (k, M, G, T suffixes); defaults to the backing file's size.
    size: Option<String>,
}

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    if a.format != "qcow2" {
        return Err(format!("unsupported format '{}' (quring creates qcow2)", a.format).into());
    }
    // quring's identity extension is on unless `-o identity=off` (docs/identity.md).
    let mut o = CreateOptions { identity: Some(Identity::generate()), ..Default::default() };
    apply_create_opts(&mut o, &a.options)?;
    if let Some(b) = a.backing {
        o.backing_file = Some(b);
    }
    if let Some(f) = a.backing_fmt {
        o.backing_fmt = Some(f);
    }
    if o.backing_file.is_some() && o.backing_fmt.is_none() {
        return Err("Backing file specified without backing format".into());
    }
    // The new image may not be its own backing file: refused before anything is opened.
    let target = |msg: String| format!("{}: {msg}", a.image.display());
    if let Some(b) = &o.backing_file {
        crate::output::check_create_target(&a.image, b, &[]).map_err(target)?;
    }
    // The backing chain is opened (unless -u) for its size and to make sure it opens, and
    // the target may be no file of it.
    let mut backing_size = None;
    if let Some(b) = o.backing_file.clone()
        && !a.unsafe_backing
    {
        let (size, chain) = backing_info(&a.image, &b, o.backing_fmt.as_deref().unwrap_or("raw"))?;
        crate::output::check_create_target(&a.image, &b, &chain).map_err(target)?;
        backing_size = Some(size);
    }
    o.size = match &a.size {
        Some(s) => parse_size(s)?,
        None => backing_size.ok_or("Image creation needs a size parameter")?,
    };
    if let (Some(id), Some(b)) = (o.identity.as_mut(), o.backing_file.as_ref()) {
        let (guid, len) = crate::util::backing_identity(&a.image, b, o.backing_fmt.as_deref());
        id.set_backing(guid, len.or(backing_size).unwrap_or(o.size.div_ceil(512) * 512), b);
    }
    if !a.quiet {
        let mut line = format!("Formatting '{}', fmt=qcow2 cluster_size={}", a.image.display(), o.cluster_size);
        if !o.compat_v2 {
            line += &format!(" extended_l2={}", if o.extended_l2 { "on" } else { "off" });
        }
        line += &format!(" compression_type={}", o.compression.name());
        line += &format!(" size={}", o.size.div_ceil(512) * 512);
        if let Some(b) = &o.backing_file {
            line += &format!(" backing_file={b}");
        }
        if let Some(f) = &o.backing_fmt {
            line += &format!(" backing_fmt={f}");
        }
        if let Some(d) = &o.data_file {
            line += &format!(" data_file={d}");
        }
        if o.data_file_raw {
            line += " data_file_raw=on";
        }
        if o.preallocation != Preallocation::Off {
            line += &format!(" preallocation={}", o.preallocation.name());
        }
        line += &format!(
            " lazy_refcounts={} refcount_bits={}",
            if o.lazy_refcounts { "on" } else { "off" },
            o.refcount_bits
        );
        println!("{line}");
    }
    // The library takes QEMU's write lock before it truncates: an image in use stays whole.
    quring::image::create(&a.image, &o, true).map_err(|e| target(e.to_string()))?;
    Ok(0)
}

/// The size of the backing file `name` of a new image at `image`, and the files of its
/// chain.
fn backing_info(
    image: &std::path::Path,
    name: &str,
    fmt: &str,
) -> Result<(u64, Vec<crate::output::ChainFile>), Box<dyn std::error::Error>> {
    use std::os::unix::fs::MetadataExt;
    let path = quring::image::resolve_backing_path(image, name);
    let open_err = |e: &dyn std::fmt::Display| format!("Could not open backing file '{}': {e}", path.display());
    match fmt {
        "raw" => {
            let m = std::fs::metadata(&path).map_err(|e| open_err(&e))?;
            Ok((m.len(), vec![crate::output::ChainFile { dev: m.dev(), ino: m.ino(), path: path.clone() }]))
        }
        "qcow2" => {
            let img = crate::util::open_ro(&path, true).map_err(|e| open_err(&e))?;
            Ok((img.size(), crate::output::chain_files(&img)))
        }
        f => Err(format!("Unknown backing format '{f}'").into()),
    }
}
