//! `quring snapshot [-f fmt] [-U] [-q] [-l | -a NAME | -c NAME | -d NAME] IMG`: internal
//! snapshots with qemu-img's syntax, list format, messages and exit codes, on the library's
//! [`Image::create_snapshot`], [`Image::apply_snapshot`] and [`Image::delete_snapshot`].

use crate::probe::ImageFormat;
use clap::Parser;
use quring::image::{Image, NewSnapshot, Options};
use std::path::PathBuf;

/// Arguments of `quring snapshot`.
#[derive(Parser)]
pub struct Args {
    /// List the snapshots (the default without -a, -c or -d).
    #[arg(short = 'l')]
    list: bool,
    /// Apply (revert the disk to) a snapshot, by ID or name.
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Create a snapshot with this name.
    #[arg(short = 'c', value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Delete a snapshot, by ID or name.
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Image format (qcow2, or raw: which has no snapshots).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Force share (only with -l).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet (accepted as qemu-img accepts it: the steps print nothing anyway, and -l still
    /// lists).
    #[arg(short = 'q')]
    _quiet: bool,
    /// The image.
    image: PathBuf,
}

enum Action {
    List,
    Apply(String),
    Create(String),
    Delete(String),
}

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let n = a.list as usize + a.apply.is_some() as usize + a.create.is_some() as usize + a.delete.is_some() as usize;
    if n > 1 {
        eprintln!("quring: Cannot mix '-l', '-a', '-c', '-d'\nTry 'quring snapshot --help' for more info");
        return Ok(1);
    }
    let action = if let Some(s) = a.apply.clone() {
        Action::Apply(s)
    } else if let Some(s) = a.create.clone() {
        Action::Create(s)
    } else if let Some(s) = a.delete.clone() {
        Action::Delete(s)
    } else {
        Action::List
    };
    let writing = !matches!(action, Action::List);
    let p = a.image.display().to_string();
    let fmt = crate::probe::resolve(&a.image, a.format.as_deref(), writing)?;
    if writing && a.force_share {
        return Err(format!("Could not open '{p}': force-share=on can only be used with read-only images").into());
    }
    if fmt == ImageFormat::Raw {
        // A raw image has no snapshots: an empty list, and qemu-img's refusals.
        if !a.image.exists() {
            return Err(format!("Could not open '{p}': Could not open '{p}': No such file or directory").into());
        }
        return match action {
            Action::List => Ok(0),
            Action::Create(s) => Err(format!("Could not create snapshot '{s}': Operation not supported").into()),
            Action::Apply(s) => {
                if a.format.is_none() {
                    // qemu-img opens the image a second time to apply, and warns again.
                    eprintln!("{}", crate::probe::probed_raw_warning(&a.image));
                }
                Err(format!("Could not apply snapshot '{s}': Block driver does not support snapshots").into())
            }
            Action::Delete(s) => Err(format!("Could not delete snapshot '{s}': snapshot not found").into()),
        };
    }
    let opts = Options { read_only: !writing, force_share: a.force_share, ..Default::default() };
    let img = Image::open(&a.image, &opts).map_err(|e| format!("Could not open '{p}': {e}"))?;
    match action {
        Action::List => {
            if !img.snapshots().is_empty() {
                print!("{}", crate::info::snapshot_table(&img));
            }
        }
        Action::Create(name) => {
            img.create_snapshot(&NewSnapshot::named(&name))
                .map_err(|e| format!("Could not create snapshot '{name}': {}", errno_text(&e)))?;
        }
        Action::Apply(key) => {
            if quring::format::snapshot::find(&img.snapshots(), &key).is_none() {
                return Err(format!(
                    "Could not apply snapshot '{key}': Failed to load snapshot: No such file or directory"
                )
                .into());
            }
            img.apply_snapshot(&key).map_err(|e| {
                format!("Could not apply snapshot '{key}': Failed to load snapshot: {}", errno_text(&e))
            })?;
        }
        Action::Delete(key) => {
            if quring::format::snapshot::find(&img.snapshots(), &key).is_none() {
                return Err(format!("Could not delete snapshot '{key}': snapshot not found").into());
            }
            img.delete_snapshot(&key).map_err(|e| format!("Could not delete snapshot '{key}': {}", errno_text(&e)))?;
        }
    }
    img.close().map_err(|e| format!("closing '{p}' failed: {e}"))?;
    Ok(0)
}

/// The text qemu-img prints for a failed snapshot operation: strerror of the errno (a
/// refcount the width cannot hold is QEMU's EINVAL, "Invalid argument"); other errors
/// (unsupported, corruption, I/O with its operation) keep quring's text.
fn errno_text(e: &quring::Error) -> String {
    match e {
        quring::Error::InvalidRequest(_) => "Invalid argument".into(),
        _ => e.to_string(),
    }
}
