//! `qemu-img check` for qcow2: rebuilds the reference counts of every host cluster from the
//! image's tables (header, active and snapshot L1/L2 tables, data clusters, snapshot table,
//! refcount table and blocks, persistent bitmaps), compares them with the stored refcounts
//! and checks the entries on the way (reserved bits, alignment, COPIED flags, subcluster
//! bitmaps). The counts, messages and output formats follow QEMU 10's
//! `qcow2_co_check_locked()` (block/qcow2-refcount.c, block/qcow2-snapshot.c) and
//! `img_check()` (qemu-img.c).
//!
//! Like QEMU, reads beyond the end of the file return zeros, and the in-memory refcount
//! array is sized from the file length (at most one cluster more, for a semi-allocated last
//! cluster), never from a header field. Nothing here panics on any input.

use crate::format::bytes::{be16, be32, be64};
use crate::format::extension::EXT_BITMAPS;
use crate::format::feature::{AUTOCLEAR_BITMAPS, INCOMPAT_L2LESS};
use crate::format::geometry::{MAX_L1_BYTES, OFFSET_MASK};
use crate::format::header::{Header, MAX_SNAPSHOTS};
use crate::format::l1::{L1_RESERVED, L1Entry};
use crate::format::l2::L2_RESERVED;
use crate::format::l2::{self, ClusterKind, L2_COMPRESSED, L2_COPIED, L2_ZERO, L2Entry};
use crate::format::refcount::REFTABLE_RESERVED as REFT_RESERVED;
use crate::format::{Geometry, refcount, snapshot};
use crate::{Error, Result};

mod rebuild;
mod repair;
use repair::MetaWrite;
mod report;
mod walk;

pub use repair::{RepairOutcome, repair};
pub use report::{CheckReport, MAX_MESSAGES};

#[cfg(test)]
mod tests;

/// Read access to the image file for the checker.
pub trait MetaRead {
    /// Reads up to `buf.len()` bytes at `off`; returns the bytes read (short only at EOF).
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<usize>;
    /// Length of the file in bytes.
    fn len(&self) -> u64;
    /// Is the file empty?
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// [`MetaRead`] over an image file, through a synchronous ring (O_DIRECT reads).
pub struct FileMeta<'a> {
    /// The ring the reads go through.
    pub ring: &'a crate::io::SyncRing,
    /// The image file.
    pub file: &'a crate::io::ImageFile,
    /// The file's length in bytes.
    pub len: u64,
}

impl MetaRead for FileMeta<'_> {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        if off >= self.len {
            return Ok(0);
        }
        let (data, valid) = self.ring.read(self.file.fd(), off, buf.len())?;
        buf.copy_from_slice(&data);
        Ok(valid)
    }
    fn len(&self) -> u64 {
        self.len
    }
}

/// Reads `buf.len()` bytes at `off`, filling whatever lies beyond the end of the file with
/// zeros (QEMU's block layer does the same).
fn read_zero_fill(r: &dyn MetaRead, off: u64, buf: &mut [u8]) -> Result<()> {
    let len = r.len();
    let mut done = 0usize;
    while done < buf.len() {
        let pos = match off.checked_add(done as u64) {
            Some(p) if p < len => p,
            _ => break,
        };
        let want = ((len - pos).min((buf.len() - done) as u64)) as usize;
        let n = r.read_at(pos, &mut buf[done..done + want])?;
        if n == 0 {
            break;
        }
        done += n.min(want);
    }
    buf[done..].fill(0);
    Ok(())
}

/// C's `%#x`: no `0x` prefix for zero.
fn c_alt_hex(v: u64) -> String {
    if v == 0 { "0".into() } else { format!("{v:#x}") }
}

/// Largest snapshot table QEMU reads (bytes).
const MAX_SNAPSHOTS_SIZE: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// Allocation half of an extended L2 bitmap.
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// A snapshot as the checker needs it.
struct Snap {
    id: String,
    name: String,
    l1_offset: u64,
    l1_size: u32,
}

/// Outcome of a stored refcount lookup that did not fail with an I/O error.
enum Stored {
    Value(u64),
    /// The refcount block offset is unaligned (QEMU: -EIO).
    Eio,
}

struct Checker<'a> {
    r: &'a dyn MetaRead,
    file_len: u64,
    g: Geometry,
    cs: u64,
    rep: CheckReport,
    /// Rebuilt refcounts, packed with the image's refcount width.
    refs: Vec<u8>,
    /// Clusters covered by `refs`.
    nb_clusters: u64,
    /// Clusters `refs` may grow to.
    max_clusters: u64,
    reftable: Vec<u64>,
    refblock: Option<(u64, Vec<u8>)>,
    l2: Option<(u64, Vec<u8>)>,
    signaled_corruption: bool,
    /// quring's L2-less ranges are enabled (incompatible bit 61).
    l2less: bool,
    /// Virtual disk size (bounds the extent of the last contiguous range).
    vsize: u64,
    /// The active L1 table (offset, entries).
    l1: (u64, u32),
    /// The refcount structures cannot be repaired in place (QEMU's `rebuild`): a refcount
    /// block is missing, misplaced or shared.
    rebuild: bool,
    /// Problems of the snapshot table (counted once the refcounts are checked, as QEMU).
    snap_corruptions: u64,
    /// Repair what the walk can (`-r all`): L2 entries made zero clusters, into `pending`.
    fix_errors: bool,
    /// Writes the walk decided on, for the repair to make (in order, each durable).
    pending: Vec<MetaWrite>,
}

/// What `check -r` may repair: QEMU's `BDRV_FIX_LEAKS` (`-r leaks`) and `BDRV_FIX_ERRORS`
/// (with leaks: `-r all`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fix {
    /// Lower refcounts that are too high.
    pub leaks: bool,
    /// Raise refcounts that are too low, rebuild broken refcount structures, correct
    /// COPIED flags.
    pub errors: bool,
}

impl Fix {
    /// Nothing is repaired (a plain check).
    pub const NONE: Fix = Fix { leaks: false, errors: false };
    /// `-r leaks`.
    pub const LEAKS: Fix = Fix { leaks: true, errors: false };
    /// `-r all`.
    pub const ALL: Fix = Fix { leaks: true, errors: true };

    fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// A stored refcount that `compare` decided to set to the number of references.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RefFix {
    cluster: u64,
    stored: u64,
    computed: u64,
}

/// Checks a qcow2 image like `qemu-img check` does (without repairing). Fails only when the
/// image cannot be checked at all (unreadable or unsupported header, broken snapshot table,
/// I/O error), which qemu-img reports with exit status 1.
pub fn check(r: &dyn MetaRead) -> Result<CheckReport> {
    let mut c = Checker::calculate(r, false, CheckReport::default())?;
    let (highest, _) = c.compare(Fix::NONE)?;
    c.check_oflag_copied(false)?;
    c.rep.image_end_offset = (highest + 1) * c.cs;
    c.rep.corruptions += c.snap_corruptions;
    Ok(c.rep)
}

/// The reference count of every host cluster as the image's tables (header, active and
/// snapshot L1/L2 tables, data, snapshot table) imply, ignoring the refcount structures
/// themselves: what a refcount rebuild writes. Fails when the tables are inconsistent.
pub fn reference_counts(r: &dyn MetaRead) -> Result<Vec<u64>> {
    let c = Checker::calculate(r, true, CheckReport::default())?;
    let counts = (0..c.nb_clusters).map(|i| c.get_ref(i)).collect();
    let (corruptions, errors) = (c.rep.corruptions + c.snap_corruptions, c.rep.check_errors);
    if corruptions > 0 || errors > 0 {
        return Err(Error::corrupt(
            "L1/L2 tables",
            format!(
                "{} corruption(s) found while counting references; refusing to rebuild refcounts: {}",
                corruptions + errors,
                c.rep.messages.join("; ")
            ),
        ));
    }
    Ok(counts)
}

impl<'a> Checker<'a> {
    /// QEMU's `calculate_refcounts()`: every reference the image's structures make, counted
    /// in `refs` (with `counts_only`, those of the refcount structures and bitmaps left out).
    /// Problem lines and counts go to `rep`, which continues the report it is given.
    fn calculate(r: &'a dyn MetaRead, counts_only: bool, rep: CheckReport) -> Result<Checker<'a>> {
        Self::calculate_fixing(r, counts_only, rep, false)
    }

    /// [`Checker::calculate`], repairing L2 entries on the way with `fix_errors` (the
    /// writes wait in `pending`).
    fn calculate_fixing(
        r: &'a dyn MetaRead,
        counts_only: bool,
        rep: CheckReport,
        fix_errors: bool,
    ) -> Result<Checker<'a>> {
        let file_len = r.len();
        let mut first = [0u8; 512];
        read_zero_fill(r, 0, &mut first)?;
        let cs = Header::peek_cluster_size(&first[..file_len.min(512) as usize])?;
        // QEMU reads cluster 0 (zero-filled past the end of a short file).
        let mut hbuf = vec![0u8; cs as usize];
        read_zero_fill(r, 0, &mut hbuf)?;
        let nb_snapshots = be32(&hbuf, 60);
        let snapshots_offset = be64(&hbuf, 64);
        // In check mode QEMU opens the image without its snapshot table (which the check reads
        // itself), and opening does not compare table offsets with the file length.
        hbuf[60..72].fill(0);
        let h = Header::parse(&hbuf, u64::MAX)?;
        let g = h.geometry();
        let nb = file_len.div_ceil(cs);
        if nb > i32::MAX as u64 {
            return Err(Error::Unsupported(format!("image file of {file_len} bytes has too many clusters to check")));
        }
        let mut c = Checker {
            r,
            file_len,
            g,
            cs,
            rep,
            refs: Vec::new(),
            nb_clusters: nb,
            max_clusters: nb + 1,
            reftable: Vec::new(),
            refblock: None,
            l2: None,
            signaled_corruption: false,
            l2less: h.incompatible_features & INCOMPAT_L2LESS != 0,
            vsize: h.size,
            l1: (h.l1_table_offset.0, h.l1_size),
            fix_errors,
            rebuild: false,
            snap_corruptions: 0,
            pending: Vec::new(),
        };
        // bs->total_sectors is the virtual size in whole sectors.
        c.rep.total_clusters = (h.size / 512 * 512).div_ceil(cs);

        // The refcount table, as QEMU loads it at open.
        let rt_bytes = h.refcount_table_clusters as u64 * cs;
        let mut rt = vec![0u8; rt_bytes as usize];
        read_zero_fill(r, h.refcount_table_offset.0, &mut rt)?;
        c.reftable = refcount::decode_table(&rt).into_iter().map(|e| e.0).collect();

        let snaps = c.read_snapshot_table(nb_snapshots, snapshots_offset)?;
        c.snap_corruptions = snaps.corruptions;

        let bytes = c.refs_bytes(nb + 1)?;
        c.refs
            .try_reserve_exact(bytes)
            .map_err(|_| Error::Unsupported("out of memory for the refcount array".into()))?;
        c.refs.resize(c.refs_bytes(nb)?, 0);

        c.inc(0, cs)?;
        c.check_l1(h.l1_table_offset.0, h.l1_size, true)?;
        for s in &snaps.list {
            if !g.is_cluster_aligned(s.l1_offset) {
                c.rep.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    s.id, s.name, s.l1_offset
                ));
                continue;
            }
            if s.l1_size as u64 > MAX_L1_BYTES / 8 {
                c.rep.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.id, s.name, s.l1_size
                ));
                continue;
            }
            c.check_l1(s.l1_offset, s.l1_size, false)?;
        }
        c.inc(snaps.offset, snaps.size)?;
        if counts_only {
            // A refcount rebuild keeps the persistent bitmaps: their clusters stay in use.
            c.check_bitmaps(&h)?;
            return Ok(c);
        }
        c.inc(h.refcount_table_offset.0, rt_bytes)?;
        c.check_bitmaps(&h)?;
        c.check_refblocks()?;
        Ok(c)
    }

    /// QEMU's `compare_refcounts()`: stored refcounts against the references counted.
    /// Returns the highest cluster in use and the mismatches `fix` allows to repair (counted
    /// as fixed and reported as "Repairing"; the caller writes them). A stored refcount of
    /// zero under references cannot be repaired in place: it asks for a rebuild.
    fn compare(&mut self, fix: Fix) -> Result<(u64, Vec<RefFix>)> {
        let mut highest = 0u64;
        let mut fixes = Vec::new();
        for i in 0..self.nb_clusters {
            let stored = match self.stored_refcount(i)? {
                Stored::Value(v) => v,
                Stored::Eio => {
                    self.rep.note(format!("Can't get refcount for cluster {i}: Input/output error"));
                    self.rep.check_errors += 1;
                    continue;
                }
            };
            let computed = self.get_ref(i);
            if stored > 0 || computed > 0 {
                highest = i;
            }
            if stored == computed {
                continue;
            }
            let fixed = if stored == 0 {
                self.rebuild = true;
                false
            } else if stored > computed {
                fix.leaks
            } else {
                fix.errors
            };
            let what = if fixed {
                "Repairing"
            } else if stored < computed {
                "ERROR"
            } else {
                "Leaked"
            };
            self.rep.note(format!("{what} cluster {i} refcount={stored} reference={computed}"));
            match (fixed, stored < computed) {
                (true, true) => self.rep.corruptions_fixed += 1,
                (true, false) => self.rep.leaks_fixed += 1,
                (false, true) => self.rep.corruptions += 1,
                (false, false) => self.rep.leaks += 1,
            }
            if fixed {
                fixes.push(RefFix { cluster: i, stored, computed });
            }
        }
        Ok((highest, fixes))
    }
}

struct SnapTable {
    list: Vec<Snap>,
    offset: u64,
    size: u64,
    corruptions: u64,
}
