//! Metadata layer: what needs no [`Image`](crate::image::Image): the shared lock-free cache
//! of L2 slices, refcount bookkeeping, the record of metadata clusters (overlap map) and the
//! refcount rebuild of a dirty image.

pub mod cache;
pub mod dirty;
pub mod overlap;
pub(crate) mod rebuild;
pub(crate) mod refcount;
pub mod waiters;

pub use cache::MetaCache;
