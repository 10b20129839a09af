//! # quring: a qcow2 storage engine on io_uring
//!
//! Layers, bottom up (each only calls the one below):
//!
//! * [`format`]: pure on-disk codecs (header, feature bits, extensions, L1/L2 entries,
//!   refcount packing, snapshot table, geometry). No I/O.
//! * [`io`]: the io_uring ring wrapper, O_DIRECT files, aligned buffers, image locks.
//! * [`meta`]: the shared lock-free metadata cache, mapping (guest -> host), refcounts,
//!   allocation.
//! * [`queue`]: the per-thread [`Queue`](queue::Queue) and its request state machines.
//! * [`image`]: the shared [`Image`](image::Image), its options, open and create.
//!
//! Front ends (the `quring` CLI, the fio plugin, the benches) sit on top.

pub mod check;
pub mod counters;
pub mod error;
pub mod format;
pub mod image;
pub mod io;
pub mod meta;
pub mod queue;

pub use error::{Error, Result};
