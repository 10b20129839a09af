//! `quring io`: qemu-io style commands (`read [-P pat] off len`, `write [-P pat] [-z [-u]]
//! off len`, `discard off len`, `flush`; the language is in `io_lang.rs`), with qemu-io's
//! output and exit status (1 when a command failed or a pattern did not verify, or when the
//! image could not be closed cleanly).

use crate::io_extra::{self, Parsed};
use crate::io_lang;
use crate::util::parse_size;
use clap::Parser;
use quring::image::{Image, Options};
use quring::queue::{Queue, QueueOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `quring io`.
#[derive(Parser)]
pub struct Args {
    /// A command to run (repeatable), e.g. -c 'read -P 0xab 0 64k'.
    #[arg(short = 'c', long = "cmd")]
    cmds: Vec<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format (qcow2; raw is probed but not served by the engine).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Force share.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// L2 cache size in bytes (QEMU's l2-cache-size; k/M suffixes).
    #[arg(long = "l2-cache-size")]
    l2_cache_size: Option<String>,
    /// Drop L2 slices unused for this many seconds (QEMU's cache-clean-interval; 0: never).
    #[arg(long = "cache-clean-interval", default_value_t = 600)]
    cache_clean_interval: u64,
    /// Cache mode: writeback (default) or writethrough.
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: String,
    #[command(flatten)]
    chain: crate::args::ChainArgs,
    /// The image.
    image: PathBuf,
}

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    // Every command is parsed before the image is opened (its numbers bounded); one that
    // does not parse is reported when its turn comes and the others run, as in qemu-io.
    let cmds: Vec<Result<Parsed, String>> = a.cmds.iter().map(|c| io_extra::parse(c)).collect();
    let writes = cmds.iter().any(|c| c.as_ref().is_ok_and(Parsed::writes));
    let cache = match a.cache.as_str() {
        "writeback" | "none" => quring::image::CacheMode::Writeback,
        "writethrough" | "directsync" => quring::image::CacheMode::Writethrough,
        c => return Err(format!("Invalid cache mode '{c}'").into()),
    };
    let l2_cache_size = a.l2_cache_size.as_deref().map(parse_size).transpose()?;
    let fmt = crate::probe::resolve(&a.image, a.format.as_deref(), !a.read_only)
        .map_err(|e| format!("can't open device {}: {e}", a.image.display()))?;
    if fmt == crate::probe::ImageFormat::Raw {
        return Err(format!(
            "can't open device {}: quring io serves qcow2 images only (the file is raw)",
            a.image.display()
        )
        .into());
    }
    let mut opts = Options {
        read_only: a.read_only || !writes,
        force_share: a.force_share,
        cache,
        l2_cache_size,
        hook: quring::io::hook::from_env(),
        cache_clean_interval: (a.cache_clean_interval != 0).then(|| Duration::from_secs(a.cache_clean_interval)),
        ..Options::default()
    };
    a.chain.apply(&mut opts)?;
    let img = Image::open(&a.image, &opts).map_err(|e| format!("can't open device {}: {e}", a.image.display()))?;
    let mut q = Queue::new(&img, &QueueOptions::default())?;
    let mut status = 0u8;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    for c in &cmds {
        let ok = match c {
            Ok(Parsed::Core(c)) => io_lang::run(&mut q, img.size(), c, &mut out, &mut err),
            Ok(Parsed::Extra(e)) => io_extra::run(&mut q, e, &mut out, &mut err),
            Err(msg) => {
                // qemu-io: an unknown command or a wrong argument count on stderr, a
                // command's own complaint (options, numbers) on stdout.
                if msg.starts_with("command \"") || msg.starts_with("bad argument count") {
                    let _ = out.flush();
                    eprintln!("{msg}");
                } else {
                    let _ = writeln!(out, "{msg}");
                }
                false
            }
        };
        if !ok {
            status = 1;
        }
    }
    drop(out);
    // Close explicitly: a failure to make the writes durable is this command's failure (a
    // close left to Drop could only print it).
    drop(q);
    if let Err(e) = img.close() {
        eprintln!("quring: closing '{}' failed: {e}", a.image.display());
        status = 1;
    }
    Ok(status)
}
