//! The engine's error type. Every error names what went wrong: the field and the value
//! for corrupt images, the operation and errno for I/O.

use std::fmt;

/// Errors returned by quring.
#[derive(Debug)]
pub enum Error {
    /// An on-disk structure is malformed. `what` names the field, `detail` the value and rule.
    Corrupt {
        /// The field or structure.
        what: &'static str,
        /// The value and the rule it breaks.
        detail: String,
    },
    /// The image uses something quring does not implement (e.g. encryption, external data).
    Unsupported(String),
    /// A request from the caller is invalid (misaligned, past the end, read-only image...).
    InvalidRequest(String),
    /// An I/O error from the kernel, with the operation that failed.
    Io {
        /// The operation that failed.
        op: String,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// The image is locked by another process.
    Locked(String),
    /// The file is not a qcow2 image (no qcow2 magic): QEMU's "Image is not in qcow2 format".
    NotQcow2,
    /// A backing image is not the one an image was made on (quring's identity extension:
    /// the GUIDs differ); the message names both GUIDs and both paths.
    BackingMismatch(String),
}

/// Result alias used throughout the engine.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds a [`Error::Corrupt`].
    pub fn corrupt(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Corrupt { what, detail: detail.into() }
    }

    /// Builds an [`Error::Io`] from an errno value.
    pub fn errno(op: impl Into<String>, errno: i32) -> Self {
        Error::Io { op: op.into(), source: std::io::Error::from_raw_os_error(errno) }
    }

    /// Builds an [`Error::Io`].
    pub fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { op: op.into(), source }
    }

    /// The positive errno value that best describes this error (for C front ends).
    pub fn raw_os_error(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Corrupt { .. } => libc::EIO,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::InvalidRequest(_) => libc::EINVAL,
            Error::Locked(_) => libc::EAGAIN,
            Error::NotQcow2 => libc::EINVAL,
            Error::BackingMismatch(_) => libc::EINVAL,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Corrupt { what, detail } => write!(f, "corrupt image: {what}: {detail}"),
            Error::Unsupported(s) => write!(f, "unsupported: {s}"),
            Error::InvalidRequest(s) => write!(f, "invalid request: {s}"),
            Error::Io { op, source } => write!(f, "{op}: {source}"),
            Error::Locked(s) => write!(f, "{s}"),
            Error::NotQcow2 => write!(f, "Image is not in qcow2 format"),
            Error::BackingMismatch(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
