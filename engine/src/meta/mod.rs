//! Metadata layer: the shared lock-free cache of L2 slices and refcount blocks, and the
//! guest -> host mapping through L1 and L2.

pub mod cache;
pub mod mapping;
pub mod status;

pub use cache::MetaCache;
