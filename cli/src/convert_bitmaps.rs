//! `quring convert --bitmaps [--skip-broken-bitmaps]`: the source's persistent bitmaps
//! copied to the target, as qemu-img does it: checked before anything is created (a qcow2
//! v3 source; an inconsistent bitmap fails the conversion unless skipped), the target
//! checked once it exists (qcow2 v3), and after the data copy each bitmap added to the
//! target with its name, granularity and enabled state, then filled with the source's
//! bits (the copy's own writes are not in it).
//!
//! qemu-img visits the bitmaps in the reverse of their directory order (its in-memory
//! list), which decides which error or warning comes first, and its target directory ends
//! up in the source's order: the checks here run in that reverse order, the bitmaps are
//! added in directory order.

use crate::convert_io::{Source, Target};
use quring::image::{BitmapInfo, Image};

/// Before the target exists: the source can hold bitmaps, and none is inconsistent
/// (unless `skip_broken`).
pub fn check_source(src: &Source, skip_broken: bool) -> Result<(), String> {
    let Source::Qcow2(img) = src else { return Err("Source lacks bitmap support".into()) };
    if img.header().version < 3 {
        return Err("Source lacks bitmap support".into());
    }
    if !skip_broken && let Some(b) = img.bitmaps().iter().rev().find(|b| broken(b)) {
        return Err(format!(
            "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
            b.name
        ));
    }
    Ok(())
}

/// Once the target exists: it can hold bitmaps.
pub fn check_target(dst: &Target, out_format: &str) -> Result<(), String> {
    match dst {
        Target::Qcow2(img) if img.header().version >= 3 => Ok(()),
        _ => Err(format!("Format driver '{out_format}' does not support bitmaps")),
    }
}

/// After the data copy: every consistent bitmap of `src` added to `dst` and filled.
pub fn copy(src: &Source, dst: &Target) -> Result<(), String> {
    let (Source::Qcow2(from), Target::Qcow2(to)) = (src, dst) else { return Ok(()) };
    let list = from.bitmaps();
    let existing: Vec<String> = to.bitmaps().into_iter().map(|b| b.name).collect();
    for b in list.iter().rev() {
        if broken(b) {
            eprintln!("quring: warning: Skipping inconsistent bitmap '{}'", b.name);
        } else if existing.contains(&b.name) {
            return Err(format!("Failed to create bitmap {0}: Bitmap already exists: {0}", b.name));
        }
    }
    for b in list.iter().filter(|b| !broken(b)) {
        add(from, to, b)?;
    }
    Ok(())
}

fn add(from: &Image, to: &Image, b: &BitmapInfo) -> Result<(), String> {
    to.add_bitmap(&b.name, Some(b.granularity), !b.auto)
        .map_err(|e| format!("Failed to create bitmap {}: {e}", b.name))?;
    to.merge_bitmap(&b.name, Some(from), &b.name).map_err(|e| {
        let _ = to.remove_bitmap(&b.name);
        format!("Failed to populate bitmap {}: {e}", b.name)
    })
}

/// Inconsistent: left in use by a writer that did not close the image (the source is
/// open read-only, so no bitmap of it is tracked by this process).
fn broken(b: &BitmapInfo) -> bool {
    b.in_use && !b.tracking
}
