//! I/O layer: aligned buffers, O_DIRECT files, and a small synchronous io_uring used for
//! administrative reads and writes (opening an image, CLI tools). The per-thread data path
//! lives in [`crate::queue`].

pub mod buf;
pub mod file;
pub mod hook;
pub mod lock;
pub mod sync_ring;

pub use buf::AlignedBuf;
pub use file::ImageFile;
pub use sync_ring::SyncRing;

/// Alignment used for every O_DIRECT buffer, offset and length.
pub const DIRECT_ALIGN: usize = 4096;
/// The smallest O_DIRECT granularity accepted for offsets and lengths (logical block).
pub const SECTOR: u64 = 512;
