//! A guest image for the tools that read what the guest sees (`compare`, `measure`): a raw
//! file or a qcow2 image with its backing chain, read-only, with block status (what reads
//! as zeros, what holds data) and blocking reads.

use crate::probe::ImageFormat;
use quring::image::Image;
use quring::queue::{Queue, QueueOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// An image opened for reading its guest content.
pub enum Guest {
    /// A qcow2 image and a queue to read it through.
    Qcow2 { img: Arc<Image>, queue: Box<Queue> },
    /// A raw file (QEMU's read lock held on it); its size in whole sectors, as QEMU's.
    Raw { file: File, size: u64, _lock: quring::io::lock::ImageLock },
}

/// The status of a range: how long it is, whether it reads as zeros, whether it holds
/// data in some layer (QEMU's `BDRV_BLOCK_ZERO`, and `DATA` with `ALLOCATED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub zero: bool,
    pub data: bool,
    /// Allocated in some layer (`BDRV_BLOCK_ALLOCATED`: a raw file always is).
    pub allocated: bool,
    /// Has a host offset (`BDRV_BLOCK_OFFSET_VALID`).
    pub offset_valid: bool,
    /// A compressed cluster.
    pub compressed: bool,
}

impl Guest {
    /// Opens `path` in format `fmt` (given or probed). Errors are qemu-img's "Could not
    /// open" texts.
    pub fn open(path: &Path, fmt: Option<&str>, force_share: bool) -> Result<Guest, String> {
        let could_not = |e: String| format!("Could not open '{}': {e}", path.display());
        match crate::probe::resolve(path, fmt, false)? {
            ImageFormat::Qcow2 => {
                let img = crate::util::open_ro(path, force_share).map_err(|e| could_not(e.to_string()))?;
                let queue = Queue::new(&img, &QueueOptions::default()).map_err(|e| could_not(e.to_string()))?;
                Ok(Guest::Qcow2 { img, queue: Box::new(queue) })
            }
            ImageFormat::Raw => {
                let file = File::open(path).map_err(|e| {
                    could_not(format!("Could not open '{}': {}", path.display(), crate::probe::os_text(&e)))
                })?;
                let lock = quring::io::lock::ImageLock::acquire(
                    &file,
                    path,
                    quring::io::lock::LockMode::ReadOnly,
                    force_share,
                )
                .map_err(|e| could_not(e.to_string()))?;
                let size = file.metadata().map_err(|e| could_not(e.to_string()))?.len().div_ceil(512) * 512;
                Ok(Guest::Raw { file, size, _lock: lock })
            }
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Guest::Qcow2 { img, .. } => img.size(),
            Guest::Raw { size, .. } => *size,
        }
    }

    /// Is this a qcow2 image?
    pub fn image(&self) -> Option<&Arc<Image>> {
        match self {
            Guest::Qcow2 { img, .. } => Some(img),
            Guest::Raw { .. } => None,
        }
    }

    /// The status of up to `len` bytes at `off` (through the whole backing chain).
    pub fn status(&self, off: u64, len: u64) -> Result<Extent, String> {
        match self {
            Guest::Raw { file, size, .. } => {
                let (data, n) = crate::probe::raw_extent(file, off, len, *size);
                Ok(Extent {
                    len: n.max(1).min(len),
                    zero: !data,
                    data,
                    allocated: true,
                    offset_valid: true,
                    compressed: false,
                })
            }
            Guest::Qcow2 { img, .. } => {
                let st = img.block_status(off, len).map_err(|e| e.to_string())?;
                Ok(Extent {
                    len: st.len.max(1).min(len),
                    zero: st.zero,
                    data: st.data && !st.zero,
                    allocated: st.present,
                    offset_valid: st.offset.is_some(),
                    compressed: st.compressed,
                })
            }
        }
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        match self {
            Guest::Qcow2 { queue, .. } => queue.read_at(buf, off).map_err(|e| e.to_string()),
            Guest::Raw { file, .. } => {
                let mut done = 0;
                while done < buf.len() {
                    match file.read_at(&mut buf[done..], off + done as u64) {
                        Ok(0) => {
                            buf[done..].fill(0);
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(crate::probe::os_text(&e)),
                    }
                }
                Ok(())
            }
        }
    }
}
