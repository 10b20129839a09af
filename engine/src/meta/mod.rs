//! Metadata layer: the shared lock-free cache of L2 slices and refcount blocks, and the
//! guest -> host mapping through L1 and L2.

pub(crate) mod alloc;
pub(crate) mod audit;
pub mod cache;
pub(crate) mod epoch;
pub mod mapping;
pub mod overlap;
pub(crate) mod rebuild;
pub(crate) mod refcount;
pub mod status;
pub(crate) mod writeback;

pub use cache::MetaCache;
