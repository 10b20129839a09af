//! Pure on-disk codecs for qcow2 v2/v3 (QEMU's `docs/interop/qcow2.rst`). No I/O here:
//! every function takes bytes and returns values or an [`Error`](crate::Error) naming the
//! offending field.

pub mod bitmap;
pub mod bytes;
pub mod compress;
pub mod data_file;
pub mod extension;
pub mod feature;
pub mod geometry;
pub mod header;
pub mod identity;
pub mod l1;
pub mod l2;
pub mod layout;
pub mod measure;
pub mod refcount;
pub mod snapshot;
pub mod types;

pub use geometry::Geometry;
pub use types::*;
