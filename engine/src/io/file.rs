//! Opening image files with O_DIRECT.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// An image file opened for direct I/O.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
    direct: bool,
    writable: bool,
    /// The file system's block size (`st_blksize`, at least 4096: the page size, which is
    /// what the page cache works in): see [`ImageFile::hole_granule`].
    granule: u64,
}

impl ImageFile {
    /// Opens `path` with O_DIRECT (falling back to buffered I/O only when the filesystem
    /// refuses O_DIRECT with EINVAL).
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true).write(writable);
        match o.clone().custom_flags(libc::O_DIRECT | libc::O_CLOEXEC).open(path) {
            Ok(file) => Ok(Self::new(file, path, true, writable)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let file = o.custom_flags(libc::O_CLOEXEC).open(path).map_err(|e| open_err(path, e))?;
                Ok(Self::new(file, path, false, writable))
            }
            Err(e) => Err(open_err(path, e)),
        }
    }

    fn new(file: File, path: &Path, direct: bool, writable: bool) -> Self {
        use std::os::unix::fs::MetadataExt;
        let blksize = file.metadata().map(|m| m.blksize()).unwrap_or(4096);
        let granule = if blksize.is_power_of_two() { blksize.clamp(4096, 1 << 20) } else { 4096 };
        ImageFile { file, path: path.to_path_buf(), direct, writable, granule }
    }

    /// The unit in which holes are punched without touching the page cache. A punch that
    /// covers part of a file system block makes the file system zero the rest of that block
    /// through the page cache (ext4 and XFS do): a dirty cached page over a block that other
    /// queues write with O_DIRECT at the same time makes the kernel report "Page cache
    /// invalidation failure on direct I/O" and fail the next fdatasync with EIO (found with
    /// 512-byte clusters, where a freed cluster shares its block with live ones). So
    /// [`crate::io::SyncRing::punch`] punches whole granules only and writes zeros, with
    /// O_DIRECT, over the parts of a range that cover a granule partly.
    pub fn hole_granule(&self) -> u64 {
        self.granule
    }

    /// The raw fd for io_uring SQEs.
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Was O_DIRECT accepted?
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Opened for writing?
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Current file length (fstat).
    pub fn len(&self) -> Result<u64> {
        self.file.metadata().map(|m| m.len()).map_err(|e| Error::io(format!("stat {}", self.path.display()), e))
    }

    /// Is the file empty?
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The std file (for locks and fallocate in tools).
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn open_err(path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("Could not open '{}'", path.display()), e)
}
