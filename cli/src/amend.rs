//! `quring amend [-f fmt] -o OPTS [-p] [-q] [--force] IMG`: qemu-img amend's options,
//! messages and exit codes on the library's [`quring::image::amend`]: `compat=0.10|1.1`,
//! `lazy_refcounts=on|off`, `refcount_bits=N`, `size=`; `backing_file`/`backing_fmt` only as
//! qemu-img 10 accepts them (both given and equal to the image's: a no-op; otherwise
//! "Cannot amend the backing file", use `rebase`); `data_file=NAME` re-points an image that
//! has an external data file (`data_file=` removes the name) and `data_file_raw=off` clears
//! the raw bit, with qemu-img's rules; creation-only options and the encryption options
//! refused with qemu-img's messages. `-o help` lists them.

use crate::probe::ImageFormat;
use clap::Parser;
use quring::image::{Amend, Image, Options};
use quring::queue::{Queue, QueueOptions, ResizeOptions};
use std::path::PathBuf;

/// Arguments of `quring amend`.
#[derive(Parser)]
pub struct Args {
    /// Image format (qcow2; raw cannot be amended; probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Options to change: compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=N, size=,
    /// data_file=NAME, data_file_raw=on|off (`-o help` lists them).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Allow operations qemu-img guards with --force (accepted; nothing here needs it).
    #[arg(long = "force")]
    _force: bool,
    /// Cache mode (accepted as qemu-img accepts it).
    #[arg(short = 't')]
    cache: Option<String>,
    /// The image (absent with `-o help`).
    image: Option<PathBuf>,
}

/// qemu-img 10's list of the qcow2 options amend takes (`-o help`).
const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size";

/// qcow2 creation options that amend cannot change.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "compression_type",
    "encryption",
    "encrypt.format",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.hash-alg",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.key-secret",
    "extended_l2",
    "preallocation",
    "l2_less",
    "identity",
];

/// Amend's encryption options (qcow2 images without encryption refuse them).
const ENCRYPT_AMEND: &[&str] =
    &["encrypt.iter-time", "encrypt.keyslot", "encrypt.new-secret", "encrypt.old-secret", "encrypt.state"];

fn on_off(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
    }
}

/// Runs it: 0 on success, 1 on any error (qemu-img's codes).
pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    if a.options.is_empty() {
        return Err("Must specify options (-o)\nTry 'quring amend --help' for more info".into());
    }
    if a.options.iter().flat_map(|o| o.split(',')).any(|kv| kv == "help" || kv == "?") {
        if let Some(f) = a.format.as_deref().filter(|f| *f != "qcow2") {
            return Err(format!("Format driver '{f}' does not support option amendment").into());
        }
        println!("{HELP}");
        return Ok(0);
    }
    let Some(image) = a.image.clone() else {
        return Err("Expecting one image file name\nTry 'quring amend --help' for more info".into());
    };
    if let Some(c) = &a.cache
        && !matches!(c.as_str(), "none" | "writeback" | "writethrough" | "directsync" | "unsafe")
    {
        return Err(format!("Invalid cache option: {c}").into());
    }
    let list = crate::util::parse_opts(&a.options)?;
    let fmt = crate::probe::resolve(&image, a.format.as_deref(), true)?;
    if fmt == ImageFormat::Raw {
        return Err("Format driver 'raw' does not support option amendment".into());
    }
    // Option values first, as qemu-img parses them.
    let mut am = Amend::default();
    let mut size = None;
    let (mut backing_file, mut backing_fmt) = (None, None);
    for (k, v) in &list {
        match k.as_str() {
            "compat" => {
                am.compat_v2 = Some(match v.as_str() {
                    "0.10" | "v2" => true,
                    "1.1" | "v3" => false,
                    _ => return Err(format!("Unknown compatibility level {v}").into()),
                })
            }
            "lazy_refcounts" => am.lazy_refcounts = Some(on_off(k, v)?),
            "refcount_bits" => {
                am.refcount_bits =
                    Some(v.parse::<u32>().map_err(|_| {
                        format!("Parameter 'refcount_bits' expects a non-negative number below 2^64\n{v}")
                    })?)
            }
            "size" => {
                size = Some(crate::util::parse_size(v).map_err(|_| {
                    "Parameter 'size' expects a non-negative number below 2^64\n\
                     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                     and exabytes, respectively."
                        .to_string()
                })?)
            }
            "backing_file" => backing_file = Some(v.clone()),
            "backing_fmt" => backing_fmt = Some(v.clone()),
            "data_file" => am.data_file = Some(v.clone()),
            "data_file_raw" => am.data_file_raw = Some(on_off(k, v)?),
            "encrypt.iter-time" | "encrypt.keyslot" | "encrypt.new-secret" | "encrypt.old-secret" | "encrypt.state" => {
            }
            k if CREATE_ONLY.contains(&k) => {
                return Err(format!("Invalid parameter '{k}'\nThis option is only supported for image creation").into());
            }
            k => return Err(format!("Invalid parameter '{k}'").into()),
        }
    }
    let p = image.display().to_string();
    let ro = Options { read_only: true, backing: quring::image::BackingPolicy::Ignore, ..Default::default() };
    let img = Image::open(&image, &ro).map_err(|e| format!("Could not open '{p}': {e}"))?;
    let h = img.header();
    let old_size = img.size();
    drop(img);
    // QEMU's option loop: encryption, the data file options, the refcount width (the
    // refusals that leave the image untouched).
    if list.iter().any(|(k, _)| ENCRYPT_AMEND.contains(&k.as_str())) {
        return Err("Can't amend encryption options - encryption not present".into());
    }
    quring::image::amend::check(&h, &Amend { lazy_refcounts: None, ..am.clone() }).map_err(message)?;
    let progress = a.progress && !a.quiet;
    let mut bar = progress.then(crate::progress::Progress::start);
    let mut report = |f: f64| {
        if let Some(b) = bar.as_mut() {
            b.fraction(f);
        }
    };
    let amend = |am: &Amend, report: &mut dyn FnMut(f64)| -> Result<(), String> {
        if *am == Amend::default() {
            return Ok(());
        }
        let opts = Options { hook: quring::io::hook::from_env(), ..Default::default() };
        quring::image::amend(&image, &opts, am, report).map_err(message)
    };
    // QEMU's order: upgrade, refcount width, the data file's raw bit and name (one header
    // update), then the backing file check, lazy refcounts, the size and the downgrade (an
    // upgrade lets a version 2 image with snapshots be resized; a failed later step leaves
    // the earlier ones done, as in qemu-img).
    let downgrade = am.compat_v2 == Some(true) && h.version != 2;
    let first = Amend {
        compat_v2: am.compat_v2.filter(|&v2| !v2),
        refcount_bits: am.refcount_bits,
        data_file_raw: am.data_file_raw,
        ..Default::default()
    };
    amend(&first, &mut |f| report(f * 0.4))?;
    // The new name is written last, also when a later step fails: QEMU keeps the data file
    // it opened for those steps (a resize grows or shrinks that file), so quring must not
    // reopen the image at a new name in between.
    let rest = (|| -> Result<(), String> {
        // qemu-img 10: the backing file cannot be changed here (a no-op when both name
        // and format are given and equal to the image's).
        if (backing_file.is_some() || backing_fmt.is_some())
            && (backing_file != h.backing_file || backing_fmt != h.backing_format())
        {
            return Err("Cannot amend the backing file\nYou can use 'quring rebase' instead.".into());
        }
        let to_v2 = am.compat_v2.unwrap_or(h.version == 2);
        if to_v2 && am.lazy_refcounts == Some(true) && !h.lazy_refcounts() {
            return Err(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"
                    .into(),
            );
        }
        amend(&Amend { lazy_refcounts: am.lazy_refcounts, ..Default::default() }, &mut |f| report(0.4 + f * 0.1))?;
        // The virtual size (qemu-img amend shrinks without --shrink).
        if let Some(new_size) = size.filter(|&s| s != old_size) {
            if !new_size.is_multiple_of(512) {
                return Err("The new size must be a multiple of 512".into());
            }
            let opts = Options { l1_room: Some(new_size), ..Default::default() };
            let img = Image::open(&image, &opts).map_err(|e| format!("Could not open '{p}': {e}"))?;
            if img.header().version == 2 && !img.snapshots().is_empty() {
                return Err("Can't resize a v2 image which has snapshots".into());
            }
            let mut q = Queue::new(&img, &QueueOptions::default()).map_err(message)?;
            let r = q.resize(new_size, &ResizeOptions { shrink: true, ..Default::default() });
            drop(q);
            let closed = img.close();
            r.map_err(message)?;
            closed.map_err(message)?;
        }
        if downgrade {
            amend(&Amend { compat_v2: Some(true), ..Default::default() }, &mut |f| report(0.5 + f * 0.5))?;
        }
        Ok(())
    })();
    if am.data_file.is_some() {
        amend(&Amend { data_file: am.data_file.clone(), ..Default::default() }, &mut |_| {})?;
    }
    rest?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(0)
}

/// qemu-img's message for an error of the library (its own text where it refuses what
/// qemu-img refuses).
fn message(e: quring::Error) -> String {
    match e {
        quring::Error::InvalidRequest(s) | quring::Error::Unsupported(s) => s,
        e => e.to_string(),
    }
}
