//! An in-memory replay of QEMU's qcow2 cluster allocator (first-fit search, refcount
//! block allocation, `-EAGAIN` restarts, refcount table growth) over a model of the file.

use super::*;

/// A failed step of the replayed allocator: QEMU's `-EAGAIN` restart, or a real error.
enum SimErr {
    Again,
    Fail(Error),
}

impl From<Error> for SimErr {
    fn from(e: Error) -> Self {
        SimErr::Fail(e)
    }
}

type SimResult<T> = std::result::Result<T, SimErr>;

fn fail<T>(msg: impl Into<String>) -> SimResult<T> {
    Err(SimErr::Fail(invalid(msg)))
}

fn no_again(r: SimResult<u64>) -> Result<u64> {
    match r {
        Ok(v) => Ok(v),
        Err(SimErr::Fail(e)) => Err(e),
        Err(SimErr::Again) => Err(invalid("internal: unexpected allocation restart")),
    }
}

/// In-memory model of QEMU's qcow2 allocator state and of the file contents.
pub(super) struct Sim {
    g: Geometry,
    cb: u32,
    cs: u64,
    rb_bits: u32,
    pub(super) reftable: Vec<u64>,
    pub(super) reftable_offset: u64,
    max_rt_index: u64,
    /// Refcount blocks by host offset (final contents).
    blocks: HashMap<u64, Vec<u8>>,
    free: u64,
    /// Bytes written so far that are not regenerated at the end, by cluster index.
    file: BTreeMap<u64, Vec<u8>>,
    file_end: u64,
    pub(super) l1: Vec<u64>,
    pub(super) l1_offset: u64,
    l2: BTreeMap<u64, Vec<u8>>,
    data_ranges: Vec<(u64, u64)>,
    /// Explicit zeros QEMU writes after the end of the preallocated disk.
    tail_zeros: Option<(u64, u64)>,
    mem: u64,
}

impl Sim {
    pub(super) fn new(g: Geometry) -> Sim {
        let cs = g.cluster_size();
        let mut reftable = vec![0u64; (cs / 8) as usize];
        reftable[0] = 2 * cs;
        let mut s = Sim {
            g,
            cb: g.cluster_bits,
            cs,
            rb_bits: g.refblock_bits(),
            reftable,
            reftable_offset: cs,
            max_rt_index: 0,
            blocks: HashMap::new(),
            free: 0,
            file: BTreeMap::new(),
            file_end: 3 * cs,
            l1: Vec::new(),
            l1_offset: 0,
            l2: BTreeMap::new(),
            data_ranges: Vec::new(),
            tail_zeros: None,
            mem: 3 * cs,
        };
        s.blocks.insert(2 * cs, vec![0u8; cs as usize]);
        s.write(cs, &(2 * cs).to_be_bytes());
        s
    }

    fn charge(&mut self, bytes: u64) -> SimResult<()> {
        self.mem = self.mem.saturating_add(bytes);
        if self.mem > MAX_PLAN_METADATA {
            return fail(format!(
                "the image needs more than {MAX_PLAN_METADATA} bytes of metadata, the planner's limit"
            ));
        }
        Ok(())
    }

    /// Overlays `data` at `off` in the modelled file.
    pub(super) fn write(&mut self, off: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let at = off + pos as u64;
            let ci = at >> self.cb;
            let in_c = (at & (self.cs - 1)) as usize;
            let n = (self.cs as usize - in_c).min(data.len() - pos);
            let c = self.file.entry(ci).or_default();
            if c.len() < in_c + n {
                c.resize(in_c + n, 0);
            }
            c[in_c..in_c + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        self.extend(off + data.len() as u64);
    }

    fn extend(&mut self, end: u64) {
        self.file_end = self.file_end.max(end);
    }

    fn rb_mask(&self) -> u64 {
        (1u64 << self.rb_bits) - 1
    }

    fn get_refcount(&self, ci: u64) -> u64 {
        let ti = ci >> self.rb_bits;
        let Some(&e) = self.reftable.get(ti as usize) else {
            return 0;
        };
        let off = e & !crate::format::refcount::REFTABLE_RESERVED;
        if off == 0 {
            return 0;
        }
        match self.blocks.get(&off) {
            Some(b) => refcount::get(b, ci & self.rb_mask(), self.g.refcount_order),
            None => 0,
        }
    }

    /// QEMU's `alloc_clusters_noref`: first fit from the free cluster index.
    fn alloc_noref(&mut self, size: u64, max: u64) -> SimResult<u64> {
        let nb = size.div_ceil(self.cs);
        let max_index = max >> self.cb;
        'retry: loop {
            for _ in 0..nb {
                let idx = self.free;
                self.free += 1;
                if self.free > max_index.saturating_add(1) {
                    return fail("image file would exceed the largest qcow2 host offset");
                }
                if self.get_refcount(idx) != 0 {
                    continue 'retry;
                }
            }
            break;
        }
        Ok((self.free - nb) << self.cb)
    }

    /// QEMU's `update_refcount` with an addend of +1 or -1.
    fn update_refcount(&mut self, offset: u64, length: u64, decrease: bool) -> SimResult<()> {
        if length == 0 {
            return Ok(());
        }
        let mask = !(self.cs - 1);
        let start = offset & mask;
        let last = (offset + length - 1) & mask;
        let mut old_ti = None;
        let mut block = 0u64;
        let mut co = start;
        while co <= last {
            let ci = co >> self.cb;
            let ti = ci >> self.rb_bits;
            if old_ti != Some(ti) {
                match self.alloc_refcount_block(ci) {
                    Ok(b) => block = b,
                    Err(e) => {
                        if matches!(e, SimErr::Again) && self.free > start >> self.cb {
                            self.free = start >> self.cb;
                        }
                        // Undo what was done, as QEMU does.
                        let _ = self.update_refcount(offset, co - offset, !decrease);
                        return Err(e);
                    }
                }
            }
            old_ti = Some(ti);
            let order = self.g.refcount_order;
            let bi = ci & self.rb_mask();
            let max = self.g.refcount_max();
            let Some(b) = self.blocks.get_mut(&block) else {
                return fail("internal: refcount block missing");
            };
            let r = refcount::get(b, bi, order);
            let n = if decrease { r.checked_sub(1) } else { r.checked_add(1).filter(|&n| n <= max) };
            let Some(n) = n else {
                return fail(format!("internal: refcount of cluster {ci} out of range"));
            };
            refcount::set(b, bi, order, n);
            if n == 0 && ci < self.free {
                self.free = ci;
            }
            co += self.cs;
        }
        Ok(())
    }

    /// QEMU's `alloc_refcount_block`: returns the block for cluster `ci`, or allocates one
    /// (and maybe a new refcount table) and asks the caller to restart.
    fn alloc_refcount_block(&mut self, ci: u64) -> SimResult<u64> {
        let ti = ci >> self.rb_bits;
        if let Some(&e) = self.reftable.get(ti as usize) {
            let off = e & !crate::format::refcount::REFTABLE_RESERVED;
            if off != 0 {
                return Ok(off);
            }
        }
        let new_block = self.alloc_noref(self.cs, i64::MAX as u64)?;
        if new_block == 0 {
            return fail("internal: refcount block allocated at offset 0");
        }
        self.charge(self.cs)?;
        if (new_block >> self.cb) >> self.rb_bits == ti {
            let mut b = vec![0u8; self.cs as usize];
            let bi = (new_block >> self.cb) & self.rb_mask();
            refcount::set(&mut b, bi, self.g.refcount_order, 1);
            self.blocks.insert(new_block, b);
        } else {
            self.update_refcount(new_block, self.cs, false)?;
            self.blocks.insert(new_block, vec![0u8; self.cs as usize]);
        }
        self.extend(new_block + self.cs);
        if (ti as usize) < self.reftable.len() {
            self.reftable[ti as usize] = new_block;
            self.write(self.reftable_offset + ti * 8, &new_block.to_be_bytes());
            self.max_rt_index = self.max_rt_index.max(ti);
            return Err(SimErr::Again);
        }
        let rb_entries = 1u64 << self.rb_bits;
        let blocks_used = (ci + 1).max((new_block >> self.cb) + 1).div_ceil(rb_entries);
        let meta_offset = blocks_used
            .checked_mul(rb_entries)
            .and_then(|v| v.checked_mul(self.cs))
            .ok_or_else(|| invalid("image file too large"))?;
        self.refcount_area(meta_offset, 0, false, ti, new_block)?;
        Err(SimErr::Again)
    }

    /// QEMU's `qcow2_refcount_metadata_size`: refcount blocks needed for `clusters`.
    fn refblocks_for(&self, mut clusters: u64, mut generous: bool) -> SimResult<u64> {
        let per_table = self.cs / 8;
        let per_block = 1u64 << self.rb_bits;
        let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
        loop {
            let last = n;
            let total = clusters
                .checked_add(table)
                .and_then(|v| v.checked_add(blocks))
                .ok_or_else(|| invalid("image file too large"))?;
            blocks = total.div_ceil(per_block);
            table = blocks.div_ceil(per_table);
            n = clusters + blocks + table;
            if n == last && generous {
                clusters += table.div_ceil(2);
                n = 0;
                generous = false;
            }
            if n == last {
                return Ok(blocks);
            }
        }
    }

    /// QEMU's `qcow2_refcount_area`: writes new refcount blocks and a new refcount table
    /// at `start` (covering `additional` more clusters), switches to it and frees the old
    /// table. Returns the end of the new structures.
    fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_idx: u64,
        new_off: u64,
    ) -> SimResult<u64> {
        let cs = self.cs;
        let total = self.refblocks_for(start / cs + additional, !exact)?;
        if total > MAX_REFTABLE_SIZE {
            return fail("Could not resize image: File too large (refcount table)");
        }
        let area_idx = (start / cs) >> self.rb_bits;
        let mut table_size = if exact { total } else { total + total.div_ceil(2) };
        table_size = table_size.next_multiple_of(cs / 8);
        let table_clusters = table_size * 8 / cs;
        if table_size > MAX_REFTABLE_SIZE {
            return fail("Could not resize image: File too large (refcount table)");
        }
        self.charge(table_size * 8)?;
        let mut table = vec![0u64; table_size as usize];
        let keep = if table_size > self.max_rt_index { self.max_rt_index + 1 } else { table_size } as usize;
        let keep = keep.min(self.reftable.len());
        table[..keep].copy_from_slice(&self.reftable[..keep]);
        if new_off != 0 {
            if new_idx >= total {
                return fail("internal: new refcount block outside the new table");
            }
            table[new_idx as usize] = new_off;
        }
        let missing = (area_idx..total).filter(|&i| table[i as usize] == 0).count() as u64;
        let table_offset = start + missing * cs;
        let end_offset = table_offset + table_clusters * cs;
        self.charge(missing * cs)?;
        let mut block_offset = start;
        let rb_entries = 1u64 << self.rb_bits;
        for i in area_idx..total {
            let off = if table[i as usize] != 0 {
                table[i as usize]
            } else {
                let off = block_offset;
                self.blocks.insert(off, vec![0u8; cs as usize]);
                table[i as usize] = off;
                block_offset += cs;
                off
            };
            let first = i * rb_entries * cs;
            if first < end_offset {
                let j0 = if first < start { (start - first) / cs } else { 0 };
                let j1 = ((end_offset - first) / cs).min(rb_entries);
                let order = self.g.refcount_order;
                let Some(b) = self.blocks.get_mut(&off) else {
                    return fail("internal: refcount block missing");
                };
                for j in j0..j1 {
                    if refcount::get(b, j, order) != 0 {
                        return fail("internal: refcount area overlaps used clusters");
                    }
                    refcount::set(b, j, order, 1);
                }
            }
        }
        self.extend(table_offset);
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write(table_offset, &bytes);
        let old_off = self.reftable_offset;
        let old_len = self.reftable.len() as u64;
        self.reftable = table;
        self.reftable_offset = table_offset;
        self.max_rt_index = self.reftable.iter().rposition(|&e| e != 0).unwrap_or(0) as u64;
        // QEMU ignores a failure to free the old table (it only leaks).
        let _ = self.update_refcount(old_off, old_len * 8, true);
        Ok(end_offset)
    }

    /// QEMU's `qcow2_alloc_clusters`.
    pub(super) fn alloc_clusters(&mut self, size: u64) -> Result<u64> {
        loop {
            let off = match self.alloc_noref(size, MAX_CLUSTER_OFFSET) {
                Ok(o) => o,
                Err(e) => return no_again(Err(e)),
            };
            match self.update_refcount(off, size, false) {
                Ok(()) => return Ok(off),
                Err(SimErr::Again) => continue,
                Err(SimErr::Fail(e)) => return Err(e),
            }
        }
    }

    /// QEMU's `qcow2_alloc_clusters_at`: allocates up to `nb` free clusters at `offset`.
    fn alloc_clusters_at(&mut self, offset: u64, nb: u64) -> Result<u64> {
        if nb == 0 {
            return Ok(0);
        }
        loop {
            let ci = offset >> self.cb;
            let mut i = 0;
            while i < nb && self.get_refcount(ci + i) == 0 {
                i += 1;
            }
            match self.update_refcount(offset, i << self.cb, false) {
                Ok(()) => return Ok(i),
                Err(SimErr::Again) => continue,
                Err(SimErr::Fail(e)) => return Err(e),
            }
        }
    }

    /// `qcow2_grow_l1_table` from an empty table to `entries` entries.
    pub(super) fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        let bytes = entries * 8;
        no_again(self.charge(bytes).map(|_| 0))?;
        let off = self.alloc_clusters(bytes)?;
        self.extend(off + bytes);
        self.l1 = vec![0; entries as usize];
        self.l1_offset = off;
        Ok(())
    }

    /// `get_cluster_table`: the L2 table for guest offset `guest`, allocated if missing.
    fn l2_table(&mut self, guest: u64) -> Result<u64> {
        let idx = (guest >> (self.cb + self.g.l2_bits())) as usize;
        if idx >= self.l1.len() {
            return Err(invalid("internal: guest offset beyond the L1 table"));
        }
        if self.l1[idx] & L1_COPIED == 0 {
            no_again(self.charge(self.cs).map(|_| 0))?;
            let off = self.alloc_clusters(self.cs)?;
            self.l2.insert(off, vec![0u8; self.cs as usize]);
            self.extend(off + self.cs);
            self.l1[idx] = off | L1_COPIED;
        }
        Ok(self.l1[idx] & OFFSET_MASK)
    }

    /// `qcow2_alloc_cluster_link_l2` for a preallocated run.
    fn link(&mut self, guest: u64, host: u64, nb: u64) -> Result<()> {
        let table = self.l2_table(guest)?;
        let first = (guest >> self.cb) & (self.g.l2_entries() - 1);
        let g = self.g;
        let Some(t) = self.l2.get_mut(&table) else {
            return Err(invalid("internal: L2 table missing"));
        };
        for i in 0..nb {
            let e = L2Entry::normal(HostOffset(host + (i << self.cb)), true);
            l2::write_entry(&g, t, (first + i) as usize, e, SubclusterBitmap(0));
        }
        Ok(())
    }

    /// `preallocate_co` with an external data file: every cluster mapped at its guest
    /// offset in the data file (QEMU's `do_alloc_cluster_offset`), only L2 tables
    /// allocated here.
    pub(super) fn preallocate_external(&mut self, size: u64) -> Result<()> {
        let cs = self.cs;
        let mut start = 0u64;
        while start < size {
            self.l2_table(start)?;
            let l2_index = (start >> self.cb) & (self.g.l2_entries() - 1);
            let nb = (size - start).div_ceil(cs).min(self.g.l2_entries() - l2_index);
            self.link(start, start, nb)?;
            start += nb * cs;
        }
        Ok(())
    }

    /// `preallocate_co` (preallocation=metadata).
    pub(super) fn preallocate_metadata(&mut self, size: u64) -> Result<()> {
        let cs = self.cs;
        let chunk_max = (i32::MAX as u64) & !(cs - 1);
        let mut offset = 0u64;
        let mut bytes = size;
        let mut end = 0u64;
        while bytes > 0 {
            let cur = bytes.min(chunk_max);
            // qcow2_alloc_host_offset(offset, cur)
            let mut start = offset;
            let mut remaining = cur;
            let mut cont: Option<u64> = None; // next contiguous host offset
            let mut first_host: Option<u64> = None;
            let mut runs = Vec::new();
            while remaining > 0 {
                // handle_copied: loads (and allocates) the L2 table; nothing is allocated.
                self.l2_table(start)?;
                // handle_alloc
                let l2_index = (start >> self.cb) & (self.g.l2_entries() - 1);
                let nb = remaining.div_ceil(cs).min(self.g.l2_entries() - l2_index).min(REQUEST_MAX_BYTES >> self.cb);
                let (host, nb) = match cont {
                    None => (self.alloc_clusters(nb * cs)?, nb),
                    Some(c) => (c, self.alloc_clusters_at(c, nb)?),
                };
                if nb == 0 {
                    break;
                }
                first_host.get_or_insert(host);
                runs.push((start, host, nb));
                let done = (nb * cs).min(remaining);
                start += done;
                remaining -= done;
                cont = Some(host + nb * cs);
            }
            for (g, h, n) in runs {
                self.link(g, h, n)?;
            }
            let covered = cur - remaining;
            if let Some(h) = first_host {
                end = h + covered;
            }
            bytes -= covered;
            offset += covered;
        }
        // QEMU extends the file to the end of the virtual disk, then the rest of the last
        // cluster is written with zeros (allocated, not a hole).
        let tail = end.next_multiple_of(cs);
        if tail > end {
            self.tail_zeros = Some((end, tail - end));
        }
        self.extend(tail);
        Ok(())
    }

    /// The falloc/full branch of `qcow2_co_truncate`.
    pub(super) fn preallocate_data(&mut self, size: u64) -> Result<()> {
        let cs = self.cs;
        let mut last = self.file_end.div_ceil(cs);
        while last > 0 && self.get_refcount(last - 1) == 0 {
            last -= 1;
        }
        if last == 0 {
            return Err(invalid("internal: no references in the refcount table"));
        }
        let old_file_size = last * cs;
        let nb_data = size.next_multiple_of(cs) >> self.cb;
        let nb_l2 = nb_data.div_ceil(self.g.l2_entries()) + 1;
        let start = no_again(self.refcount_area(old_file_size, nb_data + nb_l2, true, 0, 0))?;
        let got = self.alloc_clusters_at(start, nb_data)?;
        if got != nb_data {
            return Err(invalid("internal: preallocated data area is not free"));
        }
        let data_len = nb_data * cs;
        self.extend(start + data_len);
        if data_len > 0 {
            self.data_ranges.push((start, data_len));
        }
        let mut host = start;
        let mut guest = 0u64;
        let mut left = nb_data;
        while left > 0 {
            let l2_index = (guest >> self.cb) & (self.g.l2_entries() - 1);
            let nb = left.min(self.g.l2_entries() - l2_index);
            self.link(guest, host, nb)?;
            guest += nb * cs;
            host += nb * cs;
            left -= nb;
        }
        Ok(())
    }

    /// Overlays the final refcount blocks, L1 and L2 tables and builds the plan.
    pub(super) fn finish(mut self, header: Header) -> Result<CreatePlan> {
        let blocks = std::mem::take(&mut self.blocks);
        for (off, b) in &blocks {
            self.write(*off, b);
        }
        let l2 = std::mem::take(&mut self.l2);
        for (off, t) in &l2 {
            self.write(*off, t);
        }
        if !self.l1.is_empty() {
            let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write(self.l1_offset, &bytes);
        }
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let cs = self.cs;
        for (ci, mut data) in std::mem::take(&mut self.file) {
            while data.last() == Some(&0) {
                data.pop();
            }
            let lead = data.iter().take_while(|&&b| b == 0).count();
            if lead == data.len() {
                continue;
            }
            let off = (ci << self.cb) + lead as u64;
            let data = data.split_off(lead);
            if let Some((lo, ld)) = writes.last_mut()
                && *lo + ld.len() as u64 == (ci << self.cb)
                && (ld.len() as u64).is_multiple_of(cs)
                && lead == 0
            {
                ld.extend_from_slice(&data);
                continue;
            }
            writes.push((off, data));
        }
        if let Some((off, len)) = self.tail_zeros {
            let at = writes.partition_point(|(o, _)| *o < off);
            writes.insert(at, (off, vec![0u8; len as usize]));
        }
        Ok(CreatePlan { writes, file_len: self.file_end, data_ranges: self.data_ranges, header })
    }
}
