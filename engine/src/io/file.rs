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
}

impl ImageFile {
    /// Opens `path` with O_DIRECT (falling back to buffered I/O only when the filesystem
    /// refuses O_DIRECT with EINVAL).
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true).write(writable);
        match o.clone().custom_flags(libc::O_DIRECT | libc::O_CLOEXEC).open(path) {
            Ok(file) => Ok(ImageFile { file, path: path.to_path_buf(), direct: true, writable }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let file = o.custom_flags(libc::O_CLOEXEC).open(path).map_err(|e| open_err(path, e))?;
                Ok(ImageFile { file, path: path.to_path_buf(), direct: false, writable })
            }
            Err(e) => Err(open_err(path, e)),
        }
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
