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

/// The environment variable of [`from_env`].
pub const INJECT_ENV: &str = "QURING_INJECT_ERROR";

/// What [`Inject`] makes fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectWhat {
    /// Every device flush (fdatasync); writes go through.
    Flush,
    /// Every device flush and every write of the image's own structures (L2 tables, refcount
    /// blocks and table, L1 table, header); guest data writes and everything else go through.
    Metadata,
}

/// Fails device flushes, or flushes and metadata writes, with one errno.
#[derive(Debug)]
pub struct Inject {
    /// What fails.
    pub what: InjectWhat,
    /// The positive errno returned.
    pub errno: i32,
}

impl IoHook for Inject {
    fn fail_write(&self, kind: WriteKind, _off: u64, _len: u64) -> Option<i32> {
        let meta = matches!(
            kind,
            WriteKind::L2 | WriteKind::RefBlock | WriteKind::RefTable | WriteKind::L1 | WriteKind::Header
        );
        (self.what == InjectWhat::Metadata && meta).then_some(self.errno)
    }
    fn fail_flush(&self) -> Option<i32> {
        Some(self.errno)
    }
    fn issued(&self, _kind: WriteKind, _off: u64, _data: WriteData<'_>) -> u64 {
        0
    }
    fn completed(&self, _token: u64) {}
    fn flush_issued(&self) -> u64 {
        0
    }
    fn flush_completed(&self, _token: u64, _ok: bool) {}
}

/// Fault injection for tests of whole programs (the `quring` tool, the fio plugin), which
/// pass the result to [`crate::image::Options::hook`]: `QURING_INJECT_ERROR=flush:EIO`
/// makes every device flush of the images they open fail, `metadata:EIO` also every write
/// of the images' own structures ([`Inject`]; `ENOSPC` or an errno number work too). In
/// writeback mode guest writes into existing L2 tables then complete, and the flush or
/// close that writes the metadata back fails: the way to see that a program reports a failed
/// final flush or close in its exit status. `None` (no hook, no cost) without the
/// variable; a value of another form is reported on stderr and ignored.
pub fn from_env() -> Option<Hook> {
    let v = std::env::var(INJECT_ENV).ok()?;
    let parsed = v.split_once(':').and_then(|(what, errno)| {
        let what = match what {
            "flush" => InjectWhat::Flush,
            "metadata" => InjectWhat::Metadata,
            _ => return None,
        };
        let errno = match errno {
            "EIO" => libc::EIO,
            "ENOSPC" => libc::ENOSPC,
            n => n.parse::<i32>().ok().filter(|&e| e > 0)?,
        };
        Some(Inject { what, errno })
    });
    match parsed {
        Some(i) => Some(Hook(Arc::new(i))),
        None => {
            eprintln!("quring: ignoring {INJECT_ENV}={v} (expected flush:ERRNO or metadata:ERRNO, e.g. flush:EIO)");
            None
        }
    }
}
