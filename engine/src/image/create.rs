//! Creating an image laid out exactly as `qemu-img create` lays it out.

use crate::io::lock::{ImageLock, LockMode};
use crate::io::{ImageFile, SyncRing};
use crate::{Error, Result};
use std::path::Path;

/// Creates a new qcow2 image at `path` exactly as `qemu-img create` would lay it out
/// ([`crate::format::layout`]), writing through io_uring with O_DIRECT. Fails if the file
/// exists and `overwrite` is false.
///
/// An existing file is truncated only once QEMU's write lock on it is held (as qemu-img
/// does): an image that another process (or another open in this one) uses fails with
/// [`Error::Locked`] ("Failed to get \"write\" lock") and keeps every byte.
pub fn create(path: &Path, o: &crate::format::layout::CreateOptions, overwrite: bool) -> Result<()> {
    use crate::format::layout::{Preallocation, plan_create};
    use std::os::unix::fs::OpenOptionsExt;
    let plan = plan_create(o)?;
    // The external data file first, as qemu-img creates it: an empty file of the virtual
    // size (existing contents dropped), under the write lock meanwhile.
    // With preallocated metadata, qemu-img's preallocation extends it to the end of the
    // last cluster.
    let data_len = if o.data_file_raw || o.preallocation != Preallocation::Off {
        plan.header.size.next_multiple_of(o.cluster_size)
    } else {
        plan.header.size
    };
    let data = match &o.data_file {
        Some(name) => Some(create_data_file(name, data_len)?),
        None => None,
    };
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(true).custom_flags(libc::O_CLOEXEC);
    if overwrite {
        oo.create(true);
    } else {
        oo.create_new(true);
    }
    let f = oo.open(path).map_err(|e| Error::io(format!("Could not create '{}'", path.display()), e))?;
    // Held until the image is written: nobody opens it half made either.
    let _lock = ImageLock::acquire(&f, path, LockMode::ReadWrite, false)?;
    f.set_len(0).map_err(|e| Error::io(format!("Could not truncate '{}'", path.display()), e))?;
    let file = ImageFile::open(path, true)?;
    let sync = SyncRing::new()?;
    for (off, bytes) in &plan.writes {
        sync.write(file.fd(), *off, bytes)?;
    }
    match o.preallocation {
        Preallocation::Falloc => {
            for &(off, len) in &plan.data_ranges {
                sync.fallocate(file.fd(), off, len, 0)?;
            }
        }
        Preallocation::Full => {
            let chunk = crate::io::AlignedBuf::new(8 << 20);
            for &(off, len) in &plan.data_ranges {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(chunk.len() as u64) as usize;
                    sync.write(file.fd(), off + done, &chunk[..n])?;
                    done += n as u64;
                }
            }
        }
        _ => {}
    }
    file.file().set_len(plan.file_len).map_err(|e| Error::io("ftruncate", e))?;
    sync.fdatasync(file.fd())?;
    // With a data file, falloc and full preallocate the data file (its clusters are mapped
    // at their guest offsets by the plan, as for metadata preallocation).
    if let Some((df, _lock)) = &data {
        use std::os::unix::io::AsRawFd;
        let fd = df.as_raw_fd();
        match o.preallocation {
            Preallocation::Falloc => sync.fallocate(fd, 0, data_len, 0)?,
            Preallocation::Full => {
                let chunk = crate::io::AlignedBuf::new(8 << 20);
                let mut done = 0;
                while done < data_len {
                    let n = (data_len - done).min(chunk.len() as u64) as usize;
                    sync.write(fd, done, &chunk[..n])?;
                    done += n as u64;
                }
            }
            _ => {}
        }
        sync.fdatasync(fd)?;
    }
    Ok(())
}

/// Creates (or truncates) the data file `name` (relative to the current directory, as
/// qemu-img creates it and QEMU opens it: see [`super::data_file`]) as an empty file of
/// `size` bytes; returns it and its lock, held until the image is written.
fn create_data_file(name: &str, size: u64) -> Result<(std::fs::File, ImageLock)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = Path::new(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(format!("Could not create data file '{}'", path.display()), e))?;
    let lock = ImageLock::acquire(&f, path, LockMode::ReadWrite, false)?;
    f.set_len(0)
        .and_then(|()| f.set_len(size))
        .map_err(|e| Error::io(format!("Could not resize data file '{}'", path.display()), e))?;
    Ok((f, lock))
}
