//! `quring resize`: qemu-img resize's syntax, messages and exit codes, on the library's
//! live resize ([`quring::queue::Queue::resize`]): grow and shrink, with and without a
//! backing file, raw images by truncation.

use clap::Parser;
use quring::format::layout::Preallocation;
use quring::image::{Image, Options};
use quring::queue::{Queue, QueueOptions, ResizeOptions};
use std::path::PathBuf;

/// Arguments of `quring resize`.
#[derive(Parser)]
pub struct Args {
    /// Image format (raw or qcow2; probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Preallocation of the grown range: off, metadata, falloc or full.
    #[arg(long = "preallocation")]
    preallocation: Option<String>,
    /// Allow the image to become smaller (data past the new end is lost).
    #[arg(long = "shrink")]
    shrink: bool,
    /// Quiet: no "Image resized." line.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    chain: crate::args::ChainArgs,
    /// The image.
    image: PathBuf,
    /// The new size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

const SIZE_HELP: &str = "Parameter 'size' expects a non-negative number below 2^64\n\
     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
     and exabytes, respectively.";

const SHRINK_WARNING: &str = "Shrinking an image will delete all data beyond the shrunken image's end. \
     Before performing such an operation, make sure there is no important data there.";

/// Runs it: 0 on success, 1 on any error (qemu-img's codes).
pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let fail = |m: String| {
        eprintln!("quring: {m}");
        Ok(1)
    };
    let (rel, num) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, &a.size[1..]),
        Some(b'-') => (-1i8, &a.size[1..]),
        _ => (0i8, a.size.as_str()),
    };
    let Ok(delta) = crate::util::parse_size(num) else { return fail(SIZE_HELP.into()) };
    let prealloc = match a.preallocation.as_deref() {
        None | Some("off") => Preallocation::Off,
        Some("metadata") => Preallocation::Metadata,
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        Some(o) => return fail(format!("Invalid preallocation mode '{o}'")),
    };
    if prealloc != Preallocation::Off && a.shrink {
        return fail("Preallocation can only be used for growing images".into());
    }
    let fmt = match crate::probe::resolve(&a.image, a.format.as_deref(), true) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let raw = fmt == crate::probe::ImageFormat::Raw;
    let current = if raw {
        match std::fs::metadata(&a.image) {
            Ok(m) => m.len(),
            Err(e) => return fail(format!("Could not open '{}': {}", a.image.display(), crate::probe::os_text(&e))),
        }
    } else {
        let mut ro = Options { read_only: true, force_share: true, ..Default::default() };
        if let Err(e) = a.chain.apply(&mut ro) {
            return fail(e);
        }
        match Image::open(&a.image, &ro) {
            Ok(img) => img.size(),
            Err(e) => return fail(format!("Could not open '{}': {e}", a.image.display())),
        }
    };
    let new_size = match rel {
        0 => Some(delta),
        1 => current.checked_add(delta),
        _ => current.checked_sub(delta),
    };
    let new_size = match new_size {
        Some(n) if n > 0 && n <= i64::MAX as u64 => n,
        _ => return fail("New image size must be positive".into()),
    };
    if new_size < current && !a.shrink {
        eprintln!("quring: Use the --shrink option to perform a shrink operation.");
        eprintln!("quring: warning: {SHRINK_WARNING}");
        return Ok(1);
    }
    if raw {
        let f = std::fs::OpenOptions::new().write(true).open(&a.image)?;
        if let Err(e) = f.set_len(new_size) {
            return fail(format!("Failed to resize: {}", crate::probe::os_text(&e)));
        }
    } else {
        if !new_size.is_multiple_of(512) {
            return fail("The new size must be a multiple of 512".into());
        }
        let mut opts = Options { l1_room: Some(new_size), ..Default::default() };
        if let Err(e) = a.chain.apply(&mut opts) {
            return fail(e);
        }
        let img = match Image::open(&a.image, &opts) {
            Ok(i) => i,
            Err(e) => return fail(format!("Could not open '{}': {e}", a.image.display())),
        };
        let mut q = Queue::new(&img, &QueueOptions::default())?;
        let r = q.resize(new_size, &ResizeOptions { shrink: a.shrink, preallocation: prealloc });
        drop(q);
        let closed = img.close();
        if let Err(e) = r {
            return fail(match e {
                quring::Error::InvalidRequest(s) | quring::Error::Unsupported(s) => s,
                e => format!("{e}"),
            });
        }
        closed?;
    }
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
