//! The walk over the image's tables: every structure's clusters counted as references,
//! and its entries checked on the way (QEMU's `check_refcounts_l1/l2`, `check_refblocks`,
//! `check_oflag_copied`, the snapshot table and bitmap directory checks).

use super::*;

impl Checker<'_> {
    pub(super) fn refs_bytes(&self, clusters: u64) -> Result<usize> {
        let bits = clusters
            .checked_mul(self.g.refcount_bits() as u64)
            .ok_or_else(|| Error::Unsupported("refcount array too large".into()))?;
        usize::try_from(bits.div_ceil(8)).map_err(|_| Error::Unsupported("refcount array too large".into()))
    }

    pub(super) fn get_ref(&self, k: u64) -> u64 {
        if k >= self.nb_clusters {
            return 0;
        }
        refcount::get(&self.refs, k, self.g.refcount_order)
    }

    /// QEMU's `qcow2_read_snapshots()` in check mode (`qcow2_check_read_snapshot_table()`).
    pub(super) fn read_snapshot_table(&mut self, nb: u32, offset: u64) -> Result<SnapTable> {
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
    pub(super) fn inc(&mut self, offset: u64, size: u64) -> Result<()> {
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
    pub(super) fn load_l2(&mut self, off: u64) -> Result<Vec<u8>> {
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
    pub(super) fn check_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool) -> Result<()> {
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
    pub(super) fn check_l2(&mut self, l2_offset: u64, active: bool) -> Result<()> {
        let table = self.load_l2(l2_offset)?;
        let g = self.g;
        let mut next_contiguous = 0u64;
        for i in 0..g.l2_entries() as usize {
            let (entry, bitmap) = l2::read_entry(&g, &table, i);
            let raw = entry.0;
            let bitmap = bitmap.0;
            if raw & L2_COMPRESSED != 0 && g.external_data {
                // QEMU: compressed clusters are not allowed with an external data file.
                self.rep.corrupt(format!("ERROR compressed cluster {i} with data file, entry={raw:#x}"));
                continue;
            }
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
            // With an external data file, offset 0 with COPIED is data at the start of the
            // data file.
            let data_at_zero = g.external_data && entry.copied() && !zero_flag;
            if offset == 0 && !data_at_zero {
                if !zero_flag && bitmap & BITMAP_ALL_ALLOC != 0 {
                    // Not repaired by qemu-img 10 either.
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
                let fix = !contains_data && self.fix_errors && self.l2_writable(l2_offset);
                self.rep.corrupt(if contains_data {
                    format!("ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")
                } else {
                    format!(
                        "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                        if fix { "Repairing" } else { "ERROR" }
                    )
                });
                if fix {
                    // The entry now reads as zeros without a host cluster: nothing to count.
                    self.fix_l2_entry_by_zero(l2_offset, i, bitmap);
                    continue;
                }
            }
            if active {
                self.rep.allocated_clusters += 1;
                if next_contiguous != 0 && offset != next_contiguous {
                    self.rep.fragmented_clusters += 1;
                }
                next_contiguous = offset + self.cs;
            }
            // Data clusters in an external data file have no refcounts here (QEMU's
            // check_refcounts_l2 counts them only without a data file).
            if !g.external_data {
                self.inc(offset, self.cs)?;
            }
        }
        Ok(())
    }

    /// Can a repair write into the L2 table at `l2_offset`? Only a table in its own cluster
    /// inside the file (QEMU refuses writes that would overlap other metadata).
    fn l2_writable(&self, l2_offset: u64) -> bool {
        self.g.is_cluster_aligned(l2_offset) && l2_offset >= self.cs && l2_offset < self.file_len
    }

    /// QEMU's `fix_l2_entry_by_zero()`: entry `i` of the L2 table at `l2_offset` becomes a
    /// zero cluster without a host cluster (extended L2: its allocated subclusters become
    /// zero ones), written at once; counted as fixed.
    fn fix_l2_entry_by_zero(&mut self, l2_offset: u64, i: usize, bitmap: u64) {
        let g = self.g;
        let (entry, bits) =
            if g.extended_l2 { (0, (bitmap | bitmap << 32) & 0xffff_ffff_0000_0000) } else { (L2_ZERO, 0) };
        let mut table = self.load_l2(l2_offset).unwrap_or_default();
        if table.len() == self.cs as usize {
            l2::write_entry(&g, &mut table, i, L2Entry(entry), l2::SubclusterBitmap(bits));
            self.l2 = Some((l2_offset, table));
        }
        let size = g.l2_entry_size();
        let mut bytes = entry.to_be_bytes().to_vec();
        if g.extended_l2 {
            bytes.extend_from_slice(&bits.to_be_bytes());
        }
        self.pending.push(MetaWrite {
            kind: crate::io::hook::WriteKind::L2,
            offset: l2_offset + i as u64 * size,
            bytes,
        });
        self.rep.corruptions -= 1;
        self.rep.corruptions_fixed += 1;
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts()`: the bitmap directory, bitmap tables and
    /// bitmap data clusters are referenced when the bitmaps extension is valid.
    pub(super) fn check_bitmaps(&mut self, h: &Header) -> Result<()> {
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
    pub(super) fn check_refblocks(&mut self) -> Result<()> {
        for i in 0..self.reftable.len() {
            let raw = self.reftable[i];
            let offset = raw & !REFT_RESERVED;
            let cluster = self.g.cluster_index(offset);
            if raw & REFT_RESERVED != 0 {
                self.rep.corrupt(format!("ERROR refcount table entry {i} has reserved bits set"));
                self.rebuild = true;
                continue;
            }
            if !self.g.is_cluster_aligned(offset) {
                self.rep.corrupt(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.rebuild = true;
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
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_get_refcount()`: the refcount stored in the image.
    pub(super) fn stored_refcount(&mut self, cluster: u64) -> Result<Stored> {
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

    /// Clusters of L1 range `i` that lie inside the virtual disk (the extent of an L2-less
    /// range covers exactly these).
    pub(super) fn range_clusters(&self, i: u64) -> u64 {
        let start = i.saturating_mul(self.g.l1_coverage());
        let end = start.saturating_add(self.g.l1_coverage()).min(self.vsize);
        end.saturating_sub(start).div_ceil(self.cs)
    }

    /// QEMU's `check_oflag_copied()` on the active L1 table: COPIED must be set exactly
    /// where the stored refcount is 1. With `repair`, the wrong flags are reported as
    /// "Repairing", counted as fixed and returned as the writes that correct them (an L1
    /// entry, or a whole L2 table), in QEMU's order.
    pub(super) fn check_oflag_copied(&mut self, repair: bool) -> Result<Vec<MetaWrite>> {
        let (l1_offset, l1_size) = self.l1;
        let mut l1 = vec![0u8; l1_size as usize * 8];
        read_zero_fill(self.r, l1_offset, &mut l1)?;
        let g = self.g;
        let verb = if repair { "Repairing" } else { "ERROR" };
        let mut writes = Vec::new();
        for (i, l1_entry) in l1.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
            let e = L1Entry(l1_entry);
            let l2_offset = e.l2_offset().0;
            if l2_offset == 0 {
                continue;
            }
            if self.l2less && e.contiguous() {
                // COPIED iff every cluster of the extent has refcount 1 (never repaired).
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
                self.rep
                    .note(format!("{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={rc}"));
                if repair {
                    let fixed = if rc == 1 { l1_entry | L2_COPIED } else { l1_entry & !L2_COPIED };
                    writes.push(MetaWrite {
                        kind: crate::io::hook::WriteKind::L1,
                        offset: l1_offset + i as u64 * 8,
                        bytes: fixed.to_be_bytes().to_vec(),
                    });
                    self.rep.corruptions_fixed += 1;
                } else {
                    self.rep.corruptions += 1;
                }
            }
            let mut table = self.load_l2(l2_offset)?;
            let mut dirty = 0u64;
            // A misplaced table is never written (its entries are reported, not repaired).
            let repair = repair && g.is_cluster_aligned(l2_offset) && l2_offset < self.file_len;
            let verb = if repair { "Repairing" } else { "ERROR" };
            for j in 0..g.l2_entries() as usize {
                let (entry, bitmap) = l2::read_entry(&g, &table, j);
                let raw = entry.0;
                let data = entry.host_offset().0;
                if raw & L2_COMPRESSED != 0 || data == 0 {
                    continue;
                }
                // An external data file's clusters count as referenced once (QEMU).
                let stored =
                    if g.external_data { Stored::Value(1) } else { self.stored_refcount(g.cluster_index(data))? };
                if let Stored::Value(rc) = stored
                    && (rc == 1) != entry.copied()
                {
                    self.rep.note(format!("{verb} OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}"));
                    if repair {
                        let fixed = if rc == 1 { raw | L2_COPIED } else { raw & !L2_COPIED };
                        l2::write_entry(&g, &mut table, j, L2Entry(fixed), bitmap);
                        dirty += 1;
                    } else {
                        self.rep.corruptions += 1;
                    }
                }
            }
            if dirty > 0 {
                self.rep.corruptions_fixed += dirty;
                self.l2 = Some((l2_offset, table.clone()));
                writes.push(MetaWrite { kind: crate::io::hook::WriteKind::L2, offset: l2_offset, bytes: table });
            }
        }
        Ok(writes)
    }
}
