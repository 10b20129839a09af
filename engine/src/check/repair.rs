//! `qemu-img check -r leaks|all` for qcow2: the repairs of QEMU 10's
//! `qcow2_co_check_locked()` with a fix mode (block/qcow2.c, block/qcow2-refcount.c), with
//! the same problem lines ("Repairing ..."), counts and order:
//!
//! - stored refcounts above the references are lowered (`leaks`), below them raised
//!   (`all`); a refcount of zero under references, or a refcount block that is misplaced or
//!   shared, makes `all` rebuild the whole refcount structure in free clusters (the old one
//!   becomes leaked clusters, freed next) and `leaks` fail with an I/O error;
//! - COPIED flags are set exactly where the refcount is 1 (`all`, or `leaks` when nothing
//!   else is wrong any more);
//! - when nothing is left broken, the dirty and corrupt bits are cleared.
//!
//! Crash safety: refcount increases are written and made durable before any decrease, and
//! a rebuilt structure is durable before the header points at it, so a repair interrupted
//! at any write leaves at worst leaked clusters.

use super::*;
use crate::format::feature::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::io::hook::WriteKind;
use crate::io::{ImageFile, SyncRing};
use std::collections::BTreeMap;

/// One metadata write a repair decided on.
pub(super) struct MetaWrite {
    pub(super) kind: WriteKind,
    pub(super) offset: u64,
    pub(super) bytes: Vec<u8>,
}

/// What a repair did.
#[derive(Clone, Debug, Default)]
pub struct RepairOutcome {
    /// The report of the repairing pass: problem lines (in the order qemu-img prints them
    /// on stderr, "Repairing ..." included), what is left and what was fixed
    /// (`corruptions_fixed`, `leaks_fixed`).
    pub report: CheckReport,
    /// The repair stopped with this error (qemu-img: "Check failed: <strerror>"); the
    /// report's lines up to that point stand.
    pub failed: Option<String>,
}

impl RepairOutcome {
    /// Was anything repaired (qemu-img then checks the image again)?
    pub fn repaired(&self) -> bool {
        self.report.corruptions_fixed > 0 || self.report.leaks_fixed > 0
    }
}

/// Repairs the qcow2 image in `file` (opened writable) as `qemu-img check -r` does with
/// `fix`. Fails only when the image cannot be checked at all or a write fails.
pub fn repair(ring: &SyncRing, file: &ImageFile, fix: Fix) -> Result<RepairOutcome> {
    let meta = FileMeta { ring, file, len: file.len()? };
    let mut c = Checker::calculate_fixing(&meta, false, CheckReport::default(), fix.errors)?;
    // QEMU writes these L2 entries (each synced) as its walk meets them.
    for w in std::mem::take(&mut c.pending) {
        ring.write_kind(w.kind, file.fd(), w.offset, &w.bytes)?;
        ring.fdatasync(file.fd())?;
    }
    let cs = c.cs;
    let g = c.g;
    let pre = c.rep.clone();
    let (mut highest, _) = c.compare(Fix::NONE)?;

    // A second checker over the rebuilt structure, when there is one.
    let meta2;
    let mut rebuilt;
    let c = if c.rebuild && fix.errors {
        c.rep.note("Rebuilding refcount structure".into());
        let old = c.rep.clone();
        let plan = super::rebuild::plan_rebuild(&g, &c.refs, c.nb_clusters)?;
        super::rebuild::write_rebuild(ring, file, &plan, cs)?;
        // The references, counted again over the new structure.
        meta2 = FileMeta { ring, file, len: file.len()? };
        let mut start = old.clone();
        start.corruptions = 0;
        start.leaks = 0;
        rebuilt = Checker::calculate(&meta2, false, start)?;
        let mut fresh_leaks = 0;
        if fix.leaks {
            // The old structure is leaked now: free it (any other leak was made by the
            // rebuild itself).
            let saved = std::mem::take(&mut rebuilt.rep);
            rebuilt.rep.messages = saved.messages.clone();
            rebuilt.rep.messages_omitted = saved.messages_omitted;
            let (h, fixes) = rebuilt.compare(Fix::LEAKS)?;
            highest = h;
            apply_refcount_fixes(ring, file, &rebuilt, &fixes)?;
            if rebuilt.rebuild {
                rebuilt.rep.note("ERROR rebuilt refcount structure is still broken".into());
            }
            fresh_leaks = rebuilt.rep.leaks;
            let (messages, omitted) = (std::mem::take(&mut rebuilt.rep.messages), rebuilt.rep.messages_omitted);
            rebuilt.rep = saved;
            rebuilt.rep.messages = messages;
            rebuilt.rep.messages_omitted = omitted;
        }
        let r = &mut rebuilt.rep;
        if r.corruptions < old.corruptions {
            r.corruptions_fixed += old.corruptions - r.corruptions;
        }
        if r.leaks < old.leaks {
            r.leaks_fixed += old.leaks - r.leaks;
        }
        r.leaks += fresh_leaks;
        rebuilt.refblock = None;
        rebuilt
    } else {
        if fix.any() {
            if c.rebuild {
                c.rep.note("ERROR need to rebuild refcount structures".into());
                c.rep.check_errors += 1;
                return Ok(RepairOutcome { report: c.rep, failed: Some("Input/output error".into()) });
            }
            if c.rep.leaks > 0 || c.rep.corruptions > 0 {
                let messages = std::mem::take(&mut c.rep.messages);
                let omitted = c.rep.messages_omitted;
                c.rep = pre;
                c.rep.messages = messages;
                c.rep.messages_omitted = omitted;
                let (h, fixes) = c.compare(fix)?;
                highest = h;
                apply_refcount_fixes(ring, file, &c, &fixes)?;
                c.refblock = None;
            }
        }
        c
    };
    let mut c = c;

    let repair_copied =
        fix.errors || (fix.leaks && c.rep.check_errors == 0 && c.rep.corruptions == 0 && c.rep.leaks == 0);
    let writes = c.check_oflag_copied(repair_copied)?;
    for w in &writes {
        ring.write_kind(w.kind, file.fd(), w.offset, &w.bytes)?;
    }
    if !writes.is_empty() {
        ring.fdatasync(file.fd())?;
    }
    c.rep.image_end_offset = (highest + 1) * cs;
    c.rep.corruptions += c.snap_corruptions;

    if fix.any() && c.rep.check_errors == 0 && c.rep.corruptions == 0 {
        mark_clean(ring, file)?;
    }
    Ok(RepairOutcome { report: c.rep, failed: None })
}

/// Writes the refcount fixes: every increase first, made durable, then every decrease (a
/// crash in between leaves clusters leaked, never referenced with too low a refcount).
fn apply_refcount_fixes(ring: &SyncRing, file: &ImageFile, c: &Checker<'_>, fixes: &[RefFix]) -> Result<()> {
    for increase in [true, false] {
        let mut blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for f in fixes.iter().filter(|f| (f.computed > f.stored) == increase) {
            let idx = c.g.reftable_index(crate::format::HostCluster(f.cluster));
            let Some(&raw) = usize::try_from(idx).ok().and_then(|i| c.reftable.get(i)) else {
                return Err(Error::corrupt("refcount table", format!("no refcount block for cluster {}", f.cluster)));
            };
            let off = raw & !REFT_RESERVED;
            if off == 0 || !c.g.is_cluster_aligned(off) {
                return Err(Error::corrupt("refcount table", format!("entry {idx} is {raw:#x}")));
            }
            let block = match blocks.entry(off) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let mut b = vec![0u8; c.cs as usize];
                    read_zero_fill(c.r, off, &mut b)?;
                    e.insert(b)
                }
            };
            let i = c.g.refblock_index(crate::format::HostCluster(f.cluster));
            refcount::set(block, i, c.g.refcount_order, f.computed);
        }
        for (off, b) in &blocks {
            ring.write_kind(WriteKind::RefBlock, file.fd(), *off, b)?;
        }
        if !blocks.is_empty() {
            ring.fdatasync(file.fd())?;
        }
    }
    // Freed clusters are discarded, as QEMU discards them (QCOW2_DISCARD_ALWAYS); they are
    // referenced by nothing, and a file system that cannot punch holes just keeps them.
    for f in fixes.iter().filter(|f| f.computed == 0) {
        let _ = ring.punch(WriteKind::Other, file, c.g.cluster_bytes(f.cluster), c.cs);
    }
    Ok(())
}

/// QEMU's `qcow2_mark_clean()` and `qcow2_mark_consistent()`: the dirty and corrupt bits
/// cleared (incompatible features, header bytes 72-79), once everything else is durable.
fn mark_clean(ring: &SyncRing, file: &ImageFile) -> Result<()> {
    let (head, _) = ring.read(file.fd(), 0, 104)?;
    if be32(&head, 4) < 3 {
        return Ok(());
    }
    let features = be64(&head, 72);
    let clean = features & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    if clean != features {
        ring.write_kind(WriteKind::Header, file.fd(), 72, &clean.to_be_bytes())?;
        ring.fdatasync(file.fd())?;
    }
    Ok(())
}
