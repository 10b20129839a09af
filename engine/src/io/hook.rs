//! Test hooks on the device I/O path: a [`IoHook`] sees every write, punch and flush the
//! engine issues (data and metadata, through the queues and the synchronous ring), and may
//! make any of them fail. The crash-consistency harness records with it and materializes
//! crash states; the I/O error tests inject EIO/ENOSPC with it. Production images have no
//! hook and pay one branch per I/O.

use std::fmt;
use std::sync::Arc;

/// What a device write is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriteKind {
    /// Guest data (including copy-on-write fills).
    Data,
    /// An L2 table or slice.
    L2,
    /// A refcount block.
    RefBlock,
    /// The refcount table.
    RefTable,
    /// The L1 table.
    L1,
    /// The header (cluster 0).
    Header,
    /// Anything else (image creation, rebuilds, punching freed clusters).
    Other,
}

/// The bytes of a write.
#[derive(Clone, Copy, Debug)]
pub enum WriteData<'a> {
    /// These bytes.
    Bytes(&'a [u8]),
    /// This many zero bytes (a hole punched or a range zeroed).
    Zeros(u64),
}

impl WriteData<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            WriteData::Bytes(b) => b.len() as u64,
            WriteData::Zeros(n) => *n,
        }
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Observes (and may fail) device I/O. Called from any queue's thread.
pub trait IoHook: Send + Sync {
    /// Return `Some(errno)` to make this write fail with that error instead of issuing it.
    fn fail_write(&self, _kind: WriteKind, _off: u64, _len: u64) -> Option<i32> {
        None
    }
    /// Return `Some(errno)` to make this device flush fail.
    fn fail_flush(&self) -> Option<i32> {
        None
    }
    /// A write is issued: its bytes may reach the disk from now on. Returns a token.
    fn issued(&self, kind: WriteKind, off: u64, data: WriteData<'_>) -> u64;
    /// The write with this token completed successfully.
    fn completed(&self, token: u64);
    /// A device flush is issued; returns a token. Writes completed before this call are
    /// durable once the flush completes.
    fn flush_issued(&self) -> u64;
    /// The flush with this token completed (`ok`: without error).
    fn flush_completed(&self, token: u64, ok: bool);
}

/// A shareable hook handle for [`crate::image::Options`].
#[derive(Clone)]
pub struct Hook(pub Arc<dyn IoHook>);

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hook")
    }
}
