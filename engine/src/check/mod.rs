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
use crate::format::{Geometry, refcount, snapshot};
use crate::{Error, Result};
use std::fmt::Write as _;

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

/// The result of a check, with the fields of QEMU's `ImageCheck`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors that may corrupt data (refcount too low, bad entries...).
    pub corruptions: u64,
    /// Clusters whose stored refcount is higher than their references.
    pub leaks: u64,
    /// Errors that kept parts of the check from running.
    pub check_errors: u64,
    /// Guest clusters: ceil(virtual size / cluster size).
    pub total_clusters: u64,
    /// Guest clusters with a host cluster (data, preallocated zero, compressed).
    pub allocated_clusters: u64,
    /// Allocated clusters not following the previous one on the host.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster that is referenced or has a refcount.
    pub image_end_offset: u64,
    /// One line per problem, in QEMU's wording (qemu-img prints these on stderr); at most
    /// [`MAX_MESSAGES`] (a hostile image can hold millions of problems: the counts above
    /// stay exact, the lines past the limit are only counted in `messages_omitted`).
    pub messages: Vec<String>,
    /// Problem lines not kept in `messages`.
    pub messages_omitted: u64,
}

/// The most problem lines a [`CheckReport`] keeps.
pub const MAX_MESSAGES: usize = 10_000;

impl CheckReport {
    /// qemu-img check's exit status: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// What `qemu-img check --output=json` prints on stdout (key order included: QEMU's
    /// QDict hash order), with a trailing newline. Zero-valued optional fields are left out.
    pub fn to_json(&self, filename: &str) -> String {
        enum V<'a> {
            N(u64),
            S(&'a str),
        }
        let opt = |v: u64| if v != 0 { Some(V::N(v)) } else { None };
        let fields: [(&str, Option<V>); 10] = [
            ("image-end-offset", opt(self.image_end_offset)),
            ("compressed-clusters", opt(self.compressed_clusters)),
            ("total-clusters", opt(self.total_clusters)),
            ("corruptions", opt(self.corruptions)),
            ("check-errors", Some(V::N(self.check_errors))),
            ("leaks", opt(self.leaks)),
            ("allocated-clusters", opt(self.allocated_clusters)),
            ("filename", Some(V::S(filename))),
            ("format", Some(V::S("qcow2"))),
            ("fragmented-clusters", opt(self.fragmented_clusters)),
        ];
        let mut out = String::from("{\n");
        let mut first = true;
        for (k, v) in fields {
            let Some(v) = v else { continue };
            if !first {
                out.push_str(",\n");
            }
            first = false;
            let _ = match v {
                V::N(n) => write!(out, "    \"{k}\": {n}"),
                V::S(s) => write!(out, "    \"{k}\": \"{}\"", json_escape(s)),
            };
        }
        out.push_str("\n}\n");
        out
    }

    /// The summary qemu-img check prints on stdout (human format).
    pub fn summary_human(&self) -> String {
        let mut out = String::new();
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            out.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                let _ = write!(
                    out,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                );
            }
            if self.leaks > 0 {
                let _ = write!(
                    out,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                );
            }
            if self.check_errors > 0 {
                let _ = write!(out, "\n{} internal errors have occurred during the check.\n", self.check_errors);
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            let _ = writeln!(
                out,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                a * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / a,
                self.compressed_clusters as f64 * 100.0 / a,
            );
        }
        if self.image_end_offset != 0 {
            let _ = writeln!(out, "Image end offset: {}", self.image_end_offset);
        }
        out
    }

    /// qemu-img check's human output as a terminal shows it (`2>&1`): the problem messages
    /// (stderr, printed during the check) followed by the stdout summary.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        for m in &self.messages {
            out.push_str(m);
            out.push('\n');
        }
        if let Some(l) = self.omitted_line() {
            out.push_str(&l);
            out.push('\n');
        }
        out.push_str(&self.summary_human());
        out
    }

    /// The line that stands for the problem lines not kept, if any.
    pub fn omitted_line(&self) -> Option<String> {
        (self.messages_omitted > 0).then(|| format!("({} more problem lines not shown)", self.messages_omitted))
    }

    /// Records one problem line (bounded, see [`CheckReport::messages`]).
    fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        } else {
            self.messages_omitted += 1;
        }
    }

    fn corrupt(&mut self, msg: String) {
        self.corruptions += 1;
        self.note(msg);
    }
}

/// Escapes a string the way QEMU's JSON writer does.
fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04X}");
                }
            }
            c => out.push(c),
        }
    }
    out
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

/// Reserved bits of a refcount table entry.
const REFT_RESERVED: u64 = 0x1ff;
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
}

/// Checks a qcow2 image like `qemu-img check` does (without repairing). Fails only when the
/// image cannot be checked at all (unreadable or unsupported header, broken snapshot table,
/// I/O error), which qemu-img reports with exit status 1.
pub fn check(r: &dyn MetaRead) -> Result<CheckReport> {
    check_inner(r, false).map(|(rep, _)| rep)
}

/// The reference count of every host cluster as the image's tables (header, active and
/// snapshot L1/L2 tables, data, snapshot table) imply, ignoring the refcount structures
/// themselves: what a refcount rebuild writes. Fails when the tables are inconsistent.
pub fn reference_counts(r: &dyn MetaRead) -> Result<Vec<u64>> {
    let (rep, counts) = check_inner(r, true)?;
    if rep.corruptions > 0 || rep.check_errors > 0 {
        return Err(Error::corrupt(
            "L1/L2 tables",
            format!(
                "{} corruption(s) found while counting references; refusing to rebuild refcounts: {}",
                rep.corruptions + rep.check_errors,
                rep.messages.join("; ")
            ),
        ));
    }
    Ok(counts)
}

fn check_inner(r: &dyn MetaRead, counts_only: bool) -> Result<(CheckReport, Vec<u64>)> {
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
        rep: CheckReport::default(),
        refs: Vec::new(),
        nb_clusters: nb,
        max_clusters: nb + 1,
        reftable: Vec::new(),
        refblock: None,
        l2: None,
        signaled_corruption: false,
        l2less: h.incompatible_features & INCOMPAT_L2LESS != 0,
        vsize: h.size,
    };
    // bs->total_sectors is the virtual size in whole sectors.
    c.rep.total_clusters = (h.size / 512 * 512).div_ceil(cs);

    // The refcount table, as QEMU loads it at open.
    let rt_bytes = h.refcount_table_clusters as u64 * cs;
    let mut rt = vec![0u8; rt_bytes as usize];
    read_zero_fill(r, h.refcount_table_offset.0, &mut rt)?;
    c.reftable = refcount::decode_table(&rt).into_iter().map(|e| e.0).collect();

    let snaps = c.read_snapshot_table(nb_snapshots, snapshots_offset)?;

    let bytes = c.refs_bytes(nb + 1)?;
    c.refs.try_reserve_exact(bytes).map_err(|_| Error::Unsupported("out of memory for the refcount array".into()))?;
    c.refs.resize(c.refs_bytes(nb)?, 0);

    // calculate_refcounts()
    c.inc(0, cs)?;
    let l1_bytes = h.l1_size as u64 * 8;
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
        let counts = (0..c.nb_clusters).map(|i| c.get_ref(i)).collect();
        c.rep.corruptions += snaps.corruptions;
        return Ok((c.rep, counts));
    }
    c.inc(h.refcount_table_offset.0, rt_bytes)?;
    c.check_bitmaps(&h)?;
    c.check_refblocks()?;

    // compare_refcounts()
    let mut highest = 0u64;
    for i in 0..c.nb_clusters {
        let stored = match c.stored_refcount(i)? {
            Stored::Value(v) => v,
            Stored::Eio => {
                c.rep.note(format!("Can't get refcount for cluster {i}: Input/output error"));
                c.rep.check_errors += 1;
                continue;
            }
        };
        let computed = c.get_ref(i);
        if stored > 0 || computed > 0 {
            highest = i;
        }
        if stored != computed {
            let what = if stored < computed { "ERROR" } else { "Leaked" };
            c.rep.note(format!("{what} cluster {i} refcount={stored} reference={computed}"));
            if stored < computed {
                c.rep.corruptions += 1;
            } else {
                c.rep.leaks += 1;
            }
        }
    }

    c.check_oflag_copied(h.l1_table_offset.0, l1_bytes)?;
    c.rep.image_end_offset = (highest + 1) * cs;
    c.rep.corruptions += snaps.corruptions;
    Ok((c.rep, Vec::new()))
}

struct SnapTable {
    list: Vec<Snap>,
    offset: u64,
    size: u64,
    corruptions: u64,
}

impl Checker<'_> {
    fn refs_bytes(&self, clusters: u64) -> Result<usize> {
        let bits = clusters
            .checked_mul(self.g.refcount_bits() as u64)
            .ok_or_else(|| Error::Unsupported("refcount array too large".into()))?;
        usize::try_from(bits.div_ceil(8)).map_err(|_| Error::Unsupported("refcount array too large".into()))
    }

    fn get_ref(&self, k: u64) -> u64 {
        if k >= self.nb_clusters {
            return 0;
        }
        refcount::get(&self.refs, k, self.g.refcount_order)
    }

    /// QEMU's `qcow2_read_snapshots()` in check mode (`qcow2_check_read_snapshot_table()`).
    fn read_snapshot_table(&mut self, nb: u32, offset: u64) -> Result<SnapTable> {
        let mut t = SnapTable { list: Vec::new(), offset, size: 0, corruptions: 0 };
        let mut nb = nb;
        if nb > MAX_SNAPSHOTS {
            self.rep.note(format!("ERROR The snapshot table exceeds the maximum of {MAX_SNAPSHOTS} snapshots"));
            t.corruptions += 1;
            nb = MAX_SNAPSHOTS;
        }
        let table_min = nb as u64 * snapshot::FIXED_LEN as u64;
        if offset.checked_add(table_min).is_none_or(|e| e > i64::MAX as u64) || !self.g.is_cluster_aligned(offset) {
            return Err(Error::corrupt(
                "snapshots_offset",
                format!("the snapshot table offset {offset:#x} is invalid"),
            ));
        }
        let mut pos = offset;
        let mut len = 0u64;
        for i in 0..nb {
            pos =
                pos.checked_next_multiple_of(8).ok_or_else(|| Error::corrupt("snapshot table", "offset overflows"))?;
            len = len.next_multiple_of(8);
            let mut fixed = [0u8; snapshot::FIXED_LEN];
            read_zero_fill(self.r, pos, &mut fixed)?;
            let padded = snapshot::entry_len(&fixed).map_err(|_| {
                Error::corrupt("snapshot table", format!("too much extra metadata in snapshot table entry {i}"))
            })?;
            let mut ent = vec![0u8; padded];
            read_zero_fill(self.r, pos, &mut ent)?;
            let (s, _) = snapshot::parse_entry(&ent)?;
            let unpadded = snapshot::FIXED_LEN as u64
                + be32(&fixed, 36) as u64
                + be16(&fixed, 12) as u64
                + be16(&fixed, 14) as u64;
            pos = pos.checked_add(unpadded).ok_or_else(|| Error::corrupt("snapshot table", "offset overflows"))?;
            len += unpadded;
            if len > MAX_SNAPSHOTS_SIZE {
                return Err(Error::corrupt("snapshot table", "snapshot table is too big"));
            }
            t.list.push(Snap { id: s.id, name: s.name, l1_offset: s.l1_table_offset.0, l1_size: s.l1_size });
        }
        t.size = len;
        Ok(t)
    }

    /// QEMU's `qcow2_inc_refcounts_imrt()`.
    fn inc(&mut self, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let end = match offset.checked_add(size) {
            Some(e) if e <= i64::MAX as u64 && e.saturating_sub(self.file_len) < self.cs => e,
            _ => {
                self.rep.corrupt(format!(
                    "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
                ));
                return Ok(());
            }
        };
        let first = self.g.cluster_index(offset);
        let last = self.g.cluster_index(end - 1);
        let max = self.g.refcount_max();
        for k in first..=last {
            if k >= self.nb_clusters {
                if k >= self.max_clusters {
                    // Cannot happen given the end-of-file test above.
                    self.rep.check_errors += 1;
                    return Ok(());
                }
                self.nb_clusters = k + 1;
                let bytes = self.refs_bytes(self.nb_clusters)?;
                self.refs.resize(bytes, 0);
            }
            let rc = refcount::get(&self.refs, k, self.g.refcount_order);
            if rc == max {
                self.rep.corrupt(format!("ERROR: overflow cluster offset={:#x}", self.g.cluster_bytes(k)));
                self.rep.note(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into(),
                );
                continue;
            }
            refcount::set(&mut self.refs, k, self.g.refcount_order, rc + 1);
        }
        Ok(())
    }

    /// Reads a cluster-sized L2 table at `off` (possibly unaligned), with a one-entry cache.
    fn load_l2(&mut self, off: u64) -> Result<Vec<u8>> {
        if let Some((o, buf)) = &self.l2
            && *o == off
        {
            return Ok(buf.clone());
        }
        let mut buf = vec![0u8; self.cs as usize];
        read_zero_fill(self.r, off, &mut buf)?;
        self.l2 = Some((off, buf.clone()));
        Ok(buf)
    }

    /// QEMU's `check_refcounts_l1()`.
    fn check_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = l1_size as u64 * 8;
        self.inc(l1_offset, bytes)?;
        let mut buf = vec![0u8; bytes as usize];
        read_zero_fill(self.r, l1_offset, &mut buf)?;
        for (i, raw) in buf.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
            if raw == 0 {
                continue;
            }
            let e = L1Entry(raw);
            if self.l2less && e.contiguous() {
                // quring's L2-less range: one extent, every cluster referenced once.
                if e.reserved_bits(true) != 0 {
                    self.rep.corrupt(format!("ERROR found L1 entry with reserved bits set: {raw:x}"));
                }
                let ext = e.l2_offset().0;
                if !self.g.is_cluster_aligned(ext) {
                    self.rep.corrupt(format!("ERROR l1 entry {i}: contiguous extent {ext:#x} is not cluster aligned"));
                    continue;
                }
                let n = self.range_clusters(i as u64);
                self.inc(ext, n * self.cs)?;
                self.rep.allocated_clusters += n;
                continue;
            }
            if raw & L1_RESERVED != 0 {
                self.rep.corrupt(format!("ERROR found L1 entry with reserved bits set: {raw:x}"));
            }
            let l2_offset = e.l2_offset().0;
            self.inc(l2_offset, self.cs)?;
            if !self.g.is_cluster_aligned(l2_offset) {
                self.rep.corrupt(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.check_l2(l2_offset, active)?;
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2()` (without repairs).
    fn check_l2(&mut self, l2_offset: u64, active: bool) -> Result<()> {
        let table = self.load_l2(l2_offset)?;
        let g = self.g;
        let mut next_contiguous = 0u64;
        for i in 0..g.l2_entries() as usize {
            let (entry, bitmap) = l2::read_entry(&g, &table, i);
            let raw = entry.0;
            let bitmap = bitmap.0;
            if raw & L2_COMPRESSED != 0 {
                if raw & L2_COPIED != 0 {
                    self.rep.corrupt(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        entry.compressed_offset_field(&g)
                    ));
                }
                if bitmap != 0 {
                    self.rep.corrupt(format!(
                        "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={:#x}",
                        raw & !L2_COPIED
                    ));
                    continue;
                }
                let ClusterKind::Compressed { host, len } = L2Entry(raw & !L2_COPIED).decode(&g)? else {
                    continue;
                };
                self.inc(host.0, len)?;
                if active {
                    self.rep.allocated_clusters += 1;
                    self.rep.compressed_clusters += 1;
                    self.rep.fragmented_clusters += 1;
                }
                continue;
            }
            if raw & L2_RESERVED != 0 {
                self.rep.corrupt(format!("ERROR found l2 entry with reserved bits set: {raw:x}"));
            }
            let offset = entry.host_offset().0;
            let zero_flag = !g.extended_l2 && raw & L2_ZERO != 0;
            if offset == 0 {
                if !zero_flag && bitmap & BITMAP_ALL_ALLOC != 0 {
                    self.rep.corrupt("ERROR: Unallocated cluster has non-zero subcluster allocation map".into());
                }
                continue;
            }
            // Normal or preallocated zero cluster.
            if (bitmap >> 32) & bitmap != 0 {
                self.rep.corrupt(format!(
                    "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
            }
            if !g.is_cluster_aligned(offset) {
                let contains_data = if g.extended_l2 { bitmap & BITMAP_ALL_ALLOC != 0 } else { !zero_flag };
                self.rep.corrupt(if contains_data {
                    format!("ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")
                } else {
                    format!(
                        "ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                    )
                });
            }
            if active {
                self.rep.allocated_clusters += 1;
                if next_contiguous != 0 && offset != next_contiguous {
                    self.rep.fragmented_clusters += 1;
                }
                next_contiguous = offset + self.cs;
            }
            self.inc(offset, self.cs)?;
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts()`: the bitmap directory, bitmap tables and
    /// bitmap data clusters are referenced when the bitmaps extension is valid.
    fn check_bitmaps(&mut self, h: &Header) -> Result<()> {
        if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = h.extensions.iter().find(|e| e.kind == EXT_BITMAPS) else {
            return Ok(());
        };
        let d = &ext.data;
        let nb_bitmaps = be32(d, 0);
        let dir_size = be64(d, 8);
        let dir_offset = be64(d, 16);
        if d.len() < 24 || nb_bitmaps == 0 {
            return Ok(());
        }
        self.inc(dir_offset, dir_size)?;
        // Limits of QEMU's bitmap_list_load(): 64 MiB directory, cluster-aligned.
        if dir_size > 64 << 20 || !self.g.is_cluster_aligned(dir_offset) {
            self.rep.corruptions += 1;
            return Err(Error::corrupt("bitmap directory", "invalid bitmap directory"));
        }
        let mut dir = vec![0u8; dir_size as usize];
        read_zero_fill(self.r, dir_offset, &mut dir)?;
        let mut pos = 0usize;
        let mut tables = Vec::new();
        for _ in 0..nb_bitmaps {
            if pos + 24 > dir.len() {
                self.rep.corruptions += 1;
                return Err(Error::corrupt("bitmap directory", "truncated"));
            }
            let table_offset = be64(&dir, pos);
            let table_size = be32(&dir, pos + 8);
            let name_size = u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]) as usize;
            let extra = be32(&dir, pos + 20) as usize;
            tables.push((table_offset, table_size));
            pos = (pos + 24 + extra + name_size).next_multiple_of(8);
        }
        for (off, size) in tables {
            let bytes = size as u64 * 8;
            self.inc(off, bytes)?;
            if bytes > MAX_L1_BYTES || !self.g.is_cluster_aligned(off) {
                self.rep.corruptions += 1;
                return Err(Error::corrupt("bitmap table", "invalid bitmap table"));
            }
            let mut t = vec![0u8; bytes as usize];
            read_zero_fill(self.r, off, &mut t)?;
            for e in t.chunks_exact(8).map(|c| be64(c, 0)) {
                let data = e & OFFSET_MASK;
                // check_table_entry(): reserved bits, alignment, "all ones" only without data.
                if e & 0xff00_0000_0000_01fe != 0 || !self.g.is_cluster_aligned(data) || (data != 0 && e & 1 != 0) {
                    self.rep.corruptions += 1;
                    continue;
                }
                if data != 0 {
                    self.inc(data, self.cs)?;
                }
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks()` (without repairs).
    fn check_refblocks(&mut self) -> Result<()> {
        for i in 0..self.reftable.len() {
            let raw = self.reftable[i];
            let offset = raw & !REFT_RESERVED;
            let cluster = self.g.cluster_index(offset);
            if raw & REFT_RESERVED != 0 {
                self.rep.corrupt(format!("ERROR refcount table entry {i} has reserved bits set"));
                continue;
            }
            if !self.g.is_cluster_aligned(offset) {
                self.rep.corrupt(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            if cluster >= self.nb_clusters {
                self.rep.corrupt(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            if offset != 0 {
                self.inc(offset, self.cs)?;
                let rc = self.get_ref(cluster);
                if rc != 1 {
                    self.rep.corrupt(format!("ERROR refcount block {i} refcount={rc}"));
                }
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_get_refcount()`: the refcount stored in the image.
    fn stored_refcount(&mut self, cluster: u64) -> Result<Stored> {
        let idx = self.g.reftable_index(crate::format::HostCluster(cluster));
        let Some(&raw) = usize::try_from(idx).ok().and_then(|i| self.reftable.get(i)) else {
            return Ok(Stored::Value(0));
        };
        let off = raw & !REFT_RESERVED;
        if off == 0 {
            return Ok(Stored::Value(0));
        }
        if !self.g.is_cluster_aligned(off) {
            if !self.signaled_corruption {
                self.signaled_corruption = true;
                self.rep.note(format!(
                    "qcow2: Image is corrupt: Refblock offset {} unaligned (reftable index: {}); further non-fatal corruption events will be suppressed",
                    c_alt_hex(off),
                    c_alt_hex(idx)
                ));
            }
            return Ok(Stored::Eio);
        }
        let hit = matches!(&self.refblock, Some((o, _)) if *o == off);
        if !hit {
            let mut b = vec![0u8; self.cs as usize];
            read_zero_fill(self.r, off, &mut b)?;
            self.refblock = Some((off, b));
        }
        let Some((_, block)) = &self.refblock else {
            return Ok(Stored::Value(0));
        };
        let i = self.g.refblock_index(crate::format::HostCluster(cluster));
        Ok(Stored::Value(refcount::get(block, i, self.g.refcount_order)))
    }

    /// QEMU's `check_oflag_copied()` (without repairs), on the active L1 table.
    /// Clusters of L1 range `i` that lie inside the virtual disk (the extent of an L2-less
    /// range covers exactly these).
    fn range_clusters(&self, i: u64) -> u64 {
        let start = i.saturating_mul(self.g.l1_coverage());
        let end = start.saturating_add(self.g.l1_coverage()).min(self.vsize);
        end.saturating_sub(start).div_ceil(self.cs)
    }

    fn check_oflag_copied(&mut self, l1_offset: u64, l1_bytes: u64) -> Result<()> {
        let mut l1 = vec![0u8; l1_bytes as usize];
        read_zero_fill(self.r, l1_offset, &mut l1)?;
        let g = self.g;
        for (i, l1_entry) in l1.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
            let e = L1Entry(l1_entry);
            let l2_offset = e.l2_offset().0;
            if l2_offset == 0 {
                continue;
            }
            if self.l2less && e.contiguous() {
                // COPIED iff every cluster of the extent has refcount 1.
                let n = self.range_clusters(i as u64);
                let mut all_one = true;
                for k in 0..n {
                    if let Stored::Value(rc) = self.stored_refcount(g.cluster_index(l2_offset) + k)? {
                        all_one &= rc == 1;
                    }
                }
                if all_one != e.copied() {
                    self.rep
                        .corrupt(format!("ERROR OFLAG_COPIED contiguous range: l1_index={i} l1_entry={l1_entry:x}"));
                }
                continue;
            }
            // An unreadable refcount skips the whole L2 table, silently (as QEMU).
            let Stored::Value(rc) = self.stored_refcount(g.cluster_index(l2_offset))? else {
                continue;
            };
            if (rc == 1) != e.copied() {
                self.rep.corrupt(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={rc}"
                ));
            }
            let table = self.load_l2(l2_offset)?;
            for j in 0..g.l2_entries() as usize {
                let (entry, _) = l2::read_entry(&g, &table, j);
                let raw = entry.0;
                let data = entry.host_offset().0;
                if raw & L2_COMPRESSED != 0 || data == 0 {
                    continue;
                }
                if let Stored::Value(rc) = self.stored_refcount(g.cluster_index(data))?
                    && (rc == 1) != entry.copied()
                {
                    self.rep.corrupt(format!("ERROR OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}"));
                }
            }
        }
        Ok(())
    }
}
