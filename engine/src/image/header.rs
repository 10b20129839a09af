//! The header on disk: the engine's one header-update path, and corruption events (the
//! corrupt bit, QEMU's `qcow2_signal_corruption`).

use super::*;
use crate::format::feature;

impl Image {
    /// The engine's one header-update path: applies `f` to a copy of the header, writes it
    /// to cluster 0 and flushes the device, all under the header mutex (so that two updates
    /// never reach the disk in the wrong order), and keeps the copy only when it is on disk.
    pub(crate) fn update_header(&self, cnt: &Counters, f: impl FnOnce(&mut Header)) -> Result<()> {
        let mut cur = self.header.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = cur.clone();
        f(&mut h);
        let n = write_header(&self.sync, self.file.fd(), &mut h)?;
        Counters::add(&cnt.header_writes, 1);
        Counters::add(&cnt.l1_header_write_bytes, n as u64);
        Counters::add(&cnt.device_flushes, 1);
        *cur = h;
        Ok(())
    }

    /// QEMU's `qcow2_signal_corruption` for a fatal event: metadata found on the way to a
    /// write would make that write (or a later one) damage the image. When the image is open
    /// for writing and not marked yet, writes are refused from now on, incompatible bit 1
    /// ("corrupt") is set in the on-disk header through [`Image::update_header`], and the
    /// event is reported on stderr with QEMU's wording; later events are not reported again.
    /// A read-only image is left alone, as QEMU downgrades the event to non-fatal there.
    /// Returns the error for the request, saying whether the image was marked. Errors other
    /// than [`Error::Corrupt`] pass through.
    pub(crate) fn signal_corruption(&self, e: Error) -> Error {
        use std::sync::atomic::Ordering::AcqRel;
        let Error::Corrupt { what, detail } = e else { return e };
        if self.read_only || self.meta.is_none() || self.signaled.swap(true, AcqRel) {
            return Error::Corrupt { what, detail };
        }
        // First: no new write starts (check_writable).
        self.corrupt.store(true, std::sync::atomic::Ordering::Release);
        let marked = if self.version >= 3 {
            let r = self.update_header(&self.counters, |h| h.incompatible_features |= feature::INCOMPAT_CORRUPT);
            if r.is_err() {
                // Keep the bit in memory: any later header write carries it.
                self.header.lock().unwrap_or_else(|e| e.into_inner()).incompatible_features |=
                    feature::INCOMPAT_CORRUPT;
            }
            r
        } else {
            Ok(())
        };
        corruption_event(what, detail, self.version, marked)
    }
}

/// Serializes `h` and writes it to cluster 0, then flushes the device (the header write of
/// every header update). Returns the number of bytes written.
pub(super) fn write_header(sync: &SyncRing, fd: i32, h: &mut Header) -> Result<usize> {
    let bytes = h.serialize()?;
    sync.write_kind(crate::io::hook::WriteKind::Header, fd, 0, &bytes)?;
    sync.fdatasync(fd)?;
    Ok(bytes.len())
}

/// The message of a corruption event: QEMU prints "qcow2: Marking image as corrupt: ...;
/// further corruption events will be suppressed" on stderr, and so does quring (once per
/// image); the returned error says whether the mark reached the disk.
fn corruption_event(what: &'static str, detail: String, version: u32, marked: Result<()>) -> Error {
    eprintln!("qcow2: Marking image as corrupt: {what}: {detail}; further corruption events will be suppressed");
    let detail = match marked {
        Ok(()) if version >= 3 => {
            format!(
                "{detail}; the image has been marked corrupt (incompatible bit 1) and can now only be opened read-only"
            )
        }
        Ok(()) => format!(
            "{detail}; the image is treated as corrupt, but a version 2 header cannot record the corrupt bit on disk"
        ),
        Err(e) => format!("{detail}; writes to the image are refused, but marking it corrupt on disk failed: {e}"),
    };
    Error::Corrupt { what, detail }
}

/// A corruption found while opening an image for writing (before the [`Image`] exists):
/// sets the corrupt bit in the header on disk, like [`Image::signal_corruption`].
pub(super) fn mark_corrupt_at_open(sync: &SyncRing, fd: i32, h: &mut Header, e: Error) -> Error {
    let Error::Corrupt { what, detail } = e else { return e };
    let marked = if h.version >= 3 {
        h.incompatible_features |= feature::INCOMPAT_CORRUPT;
        write_header(sync, fd, h).map(|_| ())
    } else {
        Ok(())
    };
    corruption_event(what, detail, h.version, marked)
}
