//! Copy-on-write allocation jobs: one cluster (or the subclusters of one) written whole
//! into its new place, then published in the L2 entry.

use super::*;
use crate::format::l2::{ClusterKind, L2Entry, SubclusterBitmap, subcluster_mask};
use crate::image::mapping::L2Slot;
use crate::io::AlignedBuf;
use crate::meta::cache::SlotId;
use io_uring::{opcode, types};

/// One copy-on-write allocation of (part of) a cluster.
pub(crate) struct Job {
    /// The request this piece belongs to.
    req: usize,
    /// Guest range written by the request in this cluster.
    pos: u64,
    len: u64,
    /// Guest data for `pos..pos+len`.
    src: *const u8,
    /// Guest offset of the cluster.
    cstart: u64,
    /// Where the L2 entry lives (pinned for the job's lifetime).
    slot: SlotId,
    word: usize,
    old_e: u64,
    old_b: u64,
    /// Host offset of the cluster written.
    host: u64,
    /// `host` came from the batch (give it back if the entry changed under us).
    fresh: bool,
    /// Byte range inside the cluster that is written.
    wstart: u64,
    /// Bounce buffer for wstart..wend (None: written straight from the guest buffer).
    buf: Option<AlignedBuf>,
    /// Entry and bitmap to publish.
    new_e: u64,
    new_b: u64,
    /// Decrements owed once published (the old cluster, when replaced).
    free_old: bool,
    reads_pending: u32,
    /// The test hook's token for the data write.
    token: u64,
    error: i32,
    detail: Option<Error>,
}

/// How starting a job went.
pub(super) enum Started {
    /// The job runs; the piece is taken care of.
    Yes,
    /// The metadata lock is busy (batch refill): park the request.
    NeedLock,
    /// The L2 slice was evicted meanwhile: the request is parked on its reload.
    Parked,
}

impl Queue {
    /// Plans and starts an allocation job. `Ok(false)`: needs the lock (park).
    pub(super) fn start_job(&mut self, id: usize, pos: u64, len: u64, at: L2Slot, e: u64, b: u64) -> Result<Started> {
        let img = self.image.clone();
        let g = img.geo;
        let cs = g.cluster_size();
        let cstart = pos - g.offset_in_cluster(pos);
        let in_c = pos - cstart;
        let kind = L2Entry(e).decode(&g)?;
        let Some(slot) = img.l2_cache.pin(at.key) else {
            // Evicted since we looked: reload, then the request resolves the piece again.
            self.park_slice(id, at.key);
            return Ok(Started::Parked);
        };
        // What gets written and where.
        let (mut host, fresh, wstart, wend, new_e, new_b, free_old);
        let ext = g.extended_l2;
        let scs = g.subcluster_size();
        match kind {
            ClusterKind::Normal { host: h, copied: true } if ext => {
                // Allocate subclusters inside our own cluster.
                let (s0, s1) = (g.subcluster_index(in_c), g.subcluster_index(in_c + len - 1));
                let m = subcluster_mask(s0, s1);
                let bm = SubclusterBitmap(b);
                host = h.0;
                fresh = false;
                // Edge subclusters that already hold data are written only where this
                // request writes: rewriting their other bytes from a fill read would race
                // with concurrent writes there (a read-modify-write of someone else's bytes).
                wstart = if bm.alloc() >> s0 & 1 != 0 { in_c } else { s0 as u64 * scs };
                wend = if bm.alloc() >> s1 & 1 != 0 { in_c + len } else { (s1 as u64 + 1) * scs };
                new_e = e;
                new_b = SubclusterBitmap::from_parts(bm.alloc() | m, bm.zero() & !m).0;
                free_old = false;
            }
            ClusterKind::ZeroAlloc { host: h, copied: true } if !ext => {
                // A preallocated zero cluster we own: write it in place, zero-filled.
                host = h.0;
                fresh = false;
                wstart = 0;
                wend = cs;
                new_e = L2Entry::normal(h, true).0;
                new_b = 0;
                free_old = false;
            }
            ClusterKind::Unallocated | ClusterKind::ZeroPlain if ext => {
                let (s0, s1) = (g.subcluster_index(in_c), g.subcluster_index(in_c + len - 1));
                let m = subcluster_mask(s0, s1);
                let bm = SubclusterBitmap(b);
                host = 0;
                fresh = true;
                wstart = s0 as u64 * scs;
                wend = (s1 as u64 + 1) * scs;
                new_e = 0; // set once the cluster is known
                new_b = SubclusterBitmap::from_parts(bm.alloc() | m, bm.zero() & !m).0;
                free_old = false;
            }
            _ => {
                // Whole-cluster copy-on-write into a new cluster.
                host = 0;
                fresh = true;
                wstart = 0;
                wend = cs;
                new_e = 0;
                new_b = if ext { SubclusterBitmap::from_parts(u32::MAX, 0).0 } else { 0 };
                free_old = matches!(
                    kind,
                    ClusterKind::Normal { .. } | ClusterKind::ZeroAlloc { .. } | ClusterKind::Compressed { .. }
                );
            }
        }
        if !fresh {
            // Only one in-place fill per host cluster at a time (see Image::fill_busy).
            let hc = host >> g.cluster_bits;
            let claimed = match img.fill_busy.try_lock() {
                Ok(mut set) => set.insert(hc),
                Err(_) => false,
            };
            if !claimed {
                img.l2_cache.unpin(slot);
                return Ok(Started::NeedLock);
            }
        }
        if fresh {
            match self.take_cluster() {
                Ok(Some(c)) => host = c << g.cluster_bits,
                Ok(None) => {
                    img.l2_cache.unpin(slot);
                    return Ok(Started::NeedLock);
                }
                Err(err) => {
                    img.l2_cache.unpin(slot);
                    return Err(err);
                }
            }
        }
        let new_e = if new_e == 0 { L2Entry::normal(crate::format::HostOffset(host), true).0 } else { new_e };
        // Fill ranges (guest offsets) that the write does not cover, clipped to the disk.
        let vend = (cstart + wend).min(img.vsize());
        let fills: Vec<(u64, u64)> =
            [(cstart + wstart, pos), (pos + len, vend)].into_iter().filter(|(a, b)| b > a).collect();
        // Do the parts of the cluster the write does not cover read as zeros now?
        let fill_is_zero = match kind {
            ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc { .. } => true,
            ClusterKind::Unallocated => img.backing.is_none(),
            // Only unallocated edge subclusters are filled (see above): zeros without a
            // backing file.
            ClusterKind::Normal { copied: true, .. } if ext => img.backing.is_none(),
            _ => false,
        };
        // A fresh batch cluster reads as zeros on disk (see reserve_clusters): then only the
        // guest's bytes need writing.
        let skip_fill = fresh && fill_is_zero;
        let (wstart, fills) = if skip_fill { (in_c, Vec::new()) } else { (wstart, fills) };
        let wend = if skip_fill { in_c + len } else { wend };
        let zero_source = fill_is_zero;
        let r = &self.reqs[id];
        // SAFETY: pos lies inside the request.
        let src = unsafe { r.buf.add((pos - r.offset) as usize) } as *const u8;
        let direct = fills.is_empty() && wend - wstart == len && (src as usize).is_multiple_of(512);
        let buf = if direct { None } else { Some(self.get_buf((wend - wstart) as usize)) };
        let job = self.jobs.insert(Job {
            req: id,
            pos,
            len,
            src,
            cstart,
            slot,
            word: at.word,
            old_e: e,
            old_b: b,
            host,
            fresh,
            wstart,
            buf,
            new_e,
            new_b,
            free_old,
            reads_pending: 0,
            token: 0,
            error: 0,
            detail: None,
        });
        self.reqs[id].pending += 1;
        // Hold the job open while its fill reads start: a read that completes at once must
        // not start the write before the others are issued.
        self.jobs[job].reads_pending = 1;
        if !zero_source {
            for (a, bnd) in fills {
                let j = &mut self.jobs[job];
                let dst = j.buf.as_mut().expect("fills imply a bounce buffer").as_mut_ptr();
                // SAFETY: a - (cstart+wstart) < wend - wstart: inside the bounce buffer.
                let dst = unsafe { dst.add((a - cstart - wstart) as usize) };
                j.reads_pending += 1;
                crate::counters::Counters::add(&self.counters.cow_bytes, bnd - a);
                let rid = self.new_req(0, ReqKind::Read, a, bnd - a, dst, Parent::Job(job));
                self.drive_read(rid);
            }
        }
        self.job_read_done(job, 0, None);
        Ok(Started::Yes)
    }

    pub(crate) fn job_read_done(&mut self, job: usize, err: i32, detail: Option<Error>) {
        let j = &mut self.jobs[job];
        j.reads_pending -= 1;
        if err != 0 && j.error == 0 {
            j.error = err;
            j.detail = detail;
        }
        if j.reads_pending == 0 {
            if j.error != 0 {
                self.job_end(job, false);
            } else {
                self.job_write(job);
            }
        }
    }

    pub(super) fn job_write(&mut self, job: usize) {
        let fd = self.image.file.fd();
        let j = &mut self.jobs[job];
        let (ptr, n) = match &mut j.buf {
            Some(b) => {
                // SAFETY: src holds len bytes; the bounce holds wend-wstart >= the offset+len.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        j.src,
                        b.as_mut_ptr().add((j.pos - j.cstart - j.wstart) as usize),
                        j.len as usize,
                    )
                };
                (b.as_ptr(), b.len())
            }
            None => (j.src, j.len as usize),
        };
        let off = j.host + j.wstart;
        if let Some(h) = &self.image.hook {
            if let Some(errno) = h.0.fail_write(crate::io::hook::WriteKind::Data, off, n as u64) {
                j.error = -errno;
                self.job_end(job, false);
                return;
            }
            // SAFETY: ptr is valid for n bytes (bounce buffer or guest buffer).
            let data = unsafe { std::slice::from_raw_parts(ptr, n) };
            j.token = h.0.issued(crate::io::hook::WriteKind::Data, off, crate::io::hook::WriteData::Bytes(data));
        }
        crate::counters::Counters::add(&self.counters.data_writes, 1);
        crate::counters::Counters::add(&self.counters.data_write_bytes, n as u64);
        let io = self.ios.insert(Io::JobWrite { job });
        let sqe = opcode::Write::new(types::Fd(fd), ptr, n as u32).offset(off).build().user_data(io as u64);
        self.push(sqe);
    }

    pub(crate) fn job_write_done(&mut self, job: usize, res: i32) {
        let j = &mut self.jobs[job];
        if res < 0 {
            j.error = res;
            self.job_end(job, false);
            return;
        }
        if let Some(h) = &self.image.hook {
            h.0.completed(j.token);
        }
        self.job_commit(job);
    }

    /// Publishes the job's L2 entry.
    pub(crate) fn job_commit(&mut self, job: usize) {
        let img = self.image.clone();
        let g = img.geo;
        let (slot, word, old_e, old_b, new_e, new_b) = {
            let j = &self.jobs[job];
            (j.slot, j.word, j.old_e, j.old_b, j.new_e, j.new_b)
        };
        if !g.extended_l2 {
            if img.l2_cache.cas_word(slot, word, old_e, new_e) {
                self.job_end(job, true);
            } else {
                self.job_end(job, false);
            }
            return;
        }
        let st = match img.try_meta() {
            Ok(Some(st)) => st,
            Ok(None) => {
                self.job_parked.push(job);
                return;
            }
            Err(e) => {
                let j = &mut self.jobs[job];
                j.error = -e.raw_os_error();
                j.detail = Some(e);
                self.job_end(job, false);
                return;
            }
        };
        let cur_e = img.l2_cache.load_word(slot, word);
        let cur_b = img.l2_cache.load_word(slot, word + 1);
        let ok = cur_e == old_e && cur_b == old_b;
        if ok {
            // Both words in one seqlock write: no reader sees the new offset with the old
            // bitmap (it would fill a subcluster that is being published with zeros).
            img.l2_cache.store_pair(slot, word, new_e, new_b);
        }
        drop(st);
        self.job_end(job, ok);
    }

    /// Finishes a job: on success owe the old cluster's decrement; on a lost race give the
    /// cluster back and redo the piece; on error fail the request.
    fn job_end(&mut self, job: usize, published: bool) {
        let mut j = self.jobs.remove(job);
        if let Some(b) = j.buf.take() {
            self.put_buf(b);
        }
        let img = self.image.clone();
        img.l2_cache.unpin(j.slot);
        if !j.fresh {
            img.fill_busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&(j.host >> img.geo.cluster_bits));
        }
        let id = j.req;
        if j.error != 0 {
            if j.fresh {
                // It may hold bytes now: never reuse it as a known-zero batch cluster.
                self.local_frees.push((j.host >> img.geo.cluster_bits, 1));
            }
            match j.detail {
                Some(d) => self.fail_with(id, d),
                None => self.fail(id, j.error),
            }
            self.io_done(id);
            return;
        }
        if published {
            if j.free_old {
                self.owe_free(L2Entry(j.old_e));
            }
            self.io_done(id);
            return;
        }
        // Lost the race: the cluster changed under us. Redo this piece.
        if j.fresh {
            // It may hold bytes now: never reuse it as a known-zero batch cluster.
            self.local_frees.push((j.host >> img.geo.cluster_bits, 1));
        }
        let rid = self.new_req(0, ReqKind::Write, j.pos, j.len, j.src as *mut u8, Parent::Req(id));
        self.drive_write(rid);
    }

    /// Records the decrements an L2 entry's clusters are owed.
    pub(super) fn owe_free(&mut self, e: L2Entry) {
        let g = self.image.geo;
        match e.decode(&g) {
            Ok(ClusterKind::Normal { host, .. }) | Ok(ClusterKind::ZeroAlloc { host, .. }) => {
                self.local_frees.push((host.0 >> g.cluster_bits, 1));
            }
            Ok(ClusterKind::Compressed { host, len }) => {
                for c in host.0 >> g.cluster_bits..=(host.0 + len - 1) >> g.cluster_bits {
                    self.local_frees.push((c, 1));
                }
            }
            _ => {}
        }
    }
}
