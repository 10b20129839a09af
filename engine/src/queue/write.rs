//! Write, zero-write, discard and flush request state machines, and copy-on-write
//! allocation jobs.
//!
//! * An overwrite of data the image owns (a COPIED cluster; with extended L2, subclusters
//!   already allocated) is one data write: no metadata, no lock.
//! * Anything else in a cluster becomes a [`Job`]: take a host cluster from the queue's
//!   reserved batch, fill the parts of the written cluster (or subclusters) that the
//!   request does not cover from what the guest sees there now (backing file, zeros, a
//!   compressed or snapshot-shared cluster) by internal reads, write everything as one I/O,
//!   then publish the new L2 entry: a compare-and-swap on the cached L2 word (standard L2,
//!   no lock) or an update under the metadata lock (extended L2's two words). A queue that
//!   loses the race gives its cluster back and redoes the piece as an overwrite.
//! * Zero writes and discards of whole clusters change L2 entries under the metadata lock
//!   (zero flag / zero bitmap); partial pieces of zero writes are written as zeros, partial
//!   pieces of discards are ignored (as QEMU does).
//! * Flush writes metadata back in dependency order ([`crate::meta::writeback`]).
//!
//! The metadata lock is only ever tried: when another queue holds it the request (or job)
//! is parked and retried, so a queue never blocks its thread on another queue.

use super::{Io, Parent, Queue, ReqKind};
use crate::format::l2::{self, ClusterKind, L2Entry, SubclusterBitmap};
use crate::format::types::GuestOffset;
use crate::io::AlignedBuf;
use crate::meta::cache::{Claim, SlotId};
use crate::meta::mapping::L2Slot;
use crate::{Error, Result};
use io_uring::{opcode, types};

/// Clusters a queue reserves at a time.
const BATCH: u64 = 64;

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
enum Started {
    /// The job runs; the piece is taken care of.
    Yes,
    /// The metadata lock is busy (batch refill): park the request.
    NeedLock,
    /// The L2 slice was evicted meanwhile: the request is parked on its reload.
    Parked,
    /// The entry changed since the piece was resolved: resolve it again.
    Stale,
}

/// What a write piece needs.
enum WPiece {
    /// Overwrite in place: `len` bytes at host offset `host`.
    InPlace { host: u64, len: u64 },
    /// Allocation job for `len` bytes.
    Alloc { slot: L2Slot, e: u64, b: u64, len: u64 },
    /// L1 entry `l1i` needs a (private) L2 table first.
    NeedTable { l1i: u64 },
    /// L2 slice `key` is not cached.
    Miss { key: u64 },
}

fn sub_mask(first: u32, last: u32) -> u32 {
    let n = last - first + 1;
    if n >= 32 { u32::MAX } else { ((1u32 << n) - 1) << first }
}

impl crate::image::Image {
    /// Refuses writes to read-only or corrupt images.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only || self.meta.is_none() {
            return Err(Error::InvalidRequest("the image is open read-only".into()));
        }
        if self.corrupt.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::InvalidRequest("the image is marked corrupt; writes are refused".into()));
        }
        Ok(())
    }

    /// L1 entry checks for writers: a private table is needed.
    fn write_l1_ready(&self, l1i: u64) -> bool {
        let e = self.l1_entry(l1i);
        e.l2_offset().0 != 0 && e.copied() && !e.contiguous()
    }
}

impl Queue {
    fn resolve_write(&self, pos: u64, len: u64) -> Result<WPiece> {
        let img = &self.image;
        let g = &img.geo;
        let in_c = g.offset_in_cluster(pos);
        let len = len.min(g.cluster_size() - in_c);
        let l1i = g.l1_index(g.guest_cluster(GuestOffset(pos)));
        if img.l1_entry(l1i).contiguous() && img.l1_entry(l1i).copied() {
            // L2-less range: the data lives at a fixed place; no metadata.
            let host = img.contiguous_host(GuestOffset(pos)).expect("contiguous");
            return Ok(WPiece::InPlace { host, len });
        }
        if !img.write_l1_ready(l1i) {
            return Ok(WPiece::NeedTable { l1i });
        }
        let slot = img.l2_slot(GuestOffset(pos))?.expect("L1 entry checked");
        let (e, b) = if g.extended_l2 {
            match img.l2_cache.read_pair(slot.key, slot.word) {
                Some(p) => {
                    crate::counters::Counters::bump(&self.counters.l2_hits, 1);
                    p
                }
                None => return Ok(WPiece::Miss { key: slot.key }),
            }
        } else {
            match img.l2_cache.read_word(slot.key, slot.word) {
                Some(e) => {
                    crate::counters::Counters::bump(&self.counters.l2_hits, 1);
                    (e, 0)
                }
                None => return Ok(WPiece::Miss { key: slot.key }),
            }
        };
        let kind = L2Entry(e).decode(g)?;
        if let ClusterKind::Normal { host, copied: true } = kind {
            if !g.extended_l2 {
                return Ok(WPiece::InPlace { host: host.0 + in_c, len });
            }
            let bm = SubclusterBitmap(b);
            if bm.alloc() & bm.zero() != 0 {
                return Err(Error::corrupt("L2 bitmap", format!("{b:#018x} has subclusters both allocated and zero")));
            }
            let m = sub_mask(g.subcluster_index(in_c), g.subcluster_index(in_c + len - 1));
            if bm.alloc() & m == m {
                return Ok(WPiece::InPlace { host: host.0 + in_c, len });
            }
        }
        Ok(WPiece::Alloc { slot, e, b, len })
    }

    /// Takes a host cluster from the batch, refilling it under the metadata lock.
    /// `Ok(None)`: the lock is busy (park).
    fn take_cluster(&mut self) -> Result<Option<u64>> {
        if let Some(c) = self.batch.pop() {
            return Ok(Some(c));
        }
        let img = self.image.clone();
        let Some(mut st) = img.try_meta()? else { return Ok(None) };
        st.rc.pending_free.append(&mut self.local_frees);
        let mut got = Vec::with_capacity(BATCH as usize);
        img.reserve_clusters(&mut st, BATCH, &mut got, &self.counters)?;
        drop(st);
        // Pop from the end: keep ascending order for contiguous layout.
        got.reverse();
        self.batch = got;
        Ok(self.batch.pop())
    }

    /// Returns the unused batch and owed decrements to the image (queue teardown).
    pub(crate) fn release_batch(&mut self) {
        if self.batch.is_empty() && self.local_frees.is_empty() {
            return;
        }
        let img = self.image.clone();
        if let Some(m) = &img.meta {
            let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
            st.rc.pending_free.append(&mut self.local_frees);
            let batch = std::mem::take(&mut self.batch);
            let _ = img.unreserve_clusters(&mut st, &batch);
        }
    }

    /// Fails write request `id` with an error met before it wrote anything. Corrupt
    /// metadata of this image found on a write's way is a fatal corruption event, as in
    /// QEMU (which signals it for invalid or misaligned L1/L2 entries and for writes that
    /// would overlap metadata): the image is marked corrupt ([`Image::signal_corruption`]).
    ///
    /// [`Image::signal_corruption`]: crate::image::Image::signal_corruption
    fn fail_write(&mut self, id: usize, e: Error) {
        let e = self.image.signal_corruption(e);
        self.fail_with(id, e);
    }

    fn park_lock(&mut self, id: usize) {
        self.reqs[id].parked = true;
        self.lock_parked.push(id);
    }

    /// When the L2 cache set of `key` is full of dirty slices, writes metadata back (under
    /// the metadata lock, if free) so that a slot can be reused.
    pub(crate) fn unclog(&mut self, layer: &std::sync::Arc<crate::image::Image>, key: u64) {
        if layer.meta.is_none() || !layer.l2_cache.set_clogged(key) {
            return;
        }
        if let Ok(Some(mut st)) = layer.try_meta() {
            st.rc.pending_free.append(&mut self.local_frees);
            let _ = layer.flush_metadata(&mut st, false, &self.counters);
        }
    }

    /// Starts loading L2 slice `key` of `layer` (or waits for the queue loading it).
    /// Returns true when it is already cached.
    pub(crate) fn load_slice(&mut self, layer: std::sync::Arc<crate::image::Image>, key: u64) -> bool {
        let mut evicted = false;
        let claim = layer.l2_cache.claim_noting(key, &mut evicted);
        if evicted {
            crate::counters::Counters::bump(&self.counters.l2_evictions, 1);
        }
        match claim {
            Claim::Present(_) => true,
            Claim::Busy => {
                self.unclog(&layer, key);
                false
            }
            Claim::Load(slot) => {
                crate::counters::Counters::bump(&self.counters.l2_misses, 1);
                let len = layer.l2_cache.slot_size();
                let ptr = layer.l2_cache.slot_ptr(slot);
                let fd = layer.file.fd();
                let io = self.ios.insert(Io::Load { layer, slot, key, len });
                let sqe = opcode::Read::new(types::Fd(fd), ptr, len as u32).offset(key).build().user_data(io as u64);
                self.push(sqe);
                false
            }
        }
    }

    /// Parks request `id` until L2 slice `key` of this image is cached (starting its load).
    pub(crate) fn park_slice(&mut self, id: usize, key: u64) {
        // If it is cached already the parked request is simply retried at once.
        self.load_slice(self.image.clone(), key);
        self.reqs[id].parked = true;
        self.parked.push((id, key));
    }

    /// Ensures a private L2 table for `l1i` under the lock. `Ok(false)`: lock busy.
    fn make_table(&mut self, l1i: u64) -> Result<bool> {
        let img = self.image.clone();
        let Some(mut st) = img.try_meta()? else { return Ok(false) };
        img.ensure_l2_table(&mut st, l1i, &self.counters)?;
        Ok(true)
    }

    /// Advances a write request.
    pub(crate) fn drive_write(&mut self, id: usize) {
        // Hold the request open while we walk it: a nested completion (a child request
        // that finishes at once) must not finish it under our feet.
        self.reqs[id].pending += 1;
        let mut run: Option<(u64, u64, u64)> = None; // (host, guest, len)
        loop {
            let r = &self.reqs[id];
            let end = r.offset + r.len;
            if r.cursor >= end || r.error != 0 {
                break;
            }
            let pos = r.cursor;
            let piece = match self.resolve_write(pos, end - pos) {
                Ok(p) => p,
                Err(e) => {
                    self.fail_write(id, e);
                    break;
                }
            };
            match piece {
                WPiece::InPlace { host, len } => {
                    match &mut run {
                        Some((rh, rg, rl)) if *rh + *rl == host && *rg + *rl == pos => *rl += len,
                        _ => {
                            if let Some(r) = run.take() {
                                self.issue_write(id, r);
                            }
                            run = Some((host, pos, len));
                        }
                    }
                    self.reqs[id].cursor += len;
                }
                WPiece::Miss { key } => {
                    self.park_slice(id, key);
                    break;
                }
                WPiece::NeedTable { l1i } => match self.make_table(l1i) {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.park_lock(id);
                        break;
                    }
                    Err(e) => {
                        self.fail_write(id, e);
                        break;
                    }
                },
                WPiece::Alloc { slot, e, b, len } => {
                    if let Some(r) = run.take() {
                        self.issue_write(id, r);
                    }
                    match self.start_job(id, pos, len, slot, e, b) {
                        Ok(Started::Yes) => self.reqs[id].cursor += len,
                        Ok(Started::NeedLock) => {
                            self.park_lock(id);
                            break;
                        }
                        Ok(Started::Parked) => break,
                        Ok(Started::Stale) => continue,
                        Err(err) => {
                            self.fail_write(id, err);
                            break;
                        }
                    }
                }
            }
        }
        if let Some(r) = run.take() {
            self.issue_write(id, r);
        }
        self.reqs[id].pending -= 1;
        self.maybe_finish(id);
    }

    fn issue_write(&mut self, id: usize, (host, guest, len): (u64, u64, u64)) {
        let r = &self.reqs[id];
        // SAFETY: guest lies within the request's range, so inside its buffer.
        let src = unsafe { r.buf.add((guest - r.offset) as usize) } as *const u8;
        let fd = self.image.file.fd();
        if let Some(h) = &self.image.hook
            && let Some(errno) = h.0.fail_write(crate::io::hook::WriteKind::Data, host, len)
        {
            self.fail(id, -errno);
            return;
        }
        let token = self.image.hook.as_ref().map_or(0, |h| {
            // SAFETY: src is valid for len bytes (inside the request buffer).
            let data = unsafe { std::slice::from_raw_parts(src, len as usize) };
            h.0.issued(crate::io::hook::WriteKind::Data, host, crate::io::hook::WriteData::Bytes(data))
        });
        self.reqs[id].pending += 1;
        crate::counters::Counters::add(&self.counters.data_writes, 1);
        crate::counters::Counters::add(&self.counters.data_write_bytes, len);
        if (src as usize).is_multiple_of(512) {
            let io = self.ios.insert(Io::Write { req: id, token });
            let sqe = opcode::Write::new(types::Fd(fd), src, len as u32).offset(host).build().user_data(io as u64);
            self.push(sqe);
        } else {
            // Unaligned guest buffer: bounce through an aligned copy, kept by a job-less Io.
            let mut b = AlignedBuf::new(len as usize);
            // SAFETY: src is valid for len bytes (inside the request buffer).
            unsafe { std::ptr::copy_nonoverlapping(src, b.as_mut_ptr(), len as usize) };
            let ptr = b.as_ptr();
            let io = self.ios.insert(Io::WriteBounce { req: id, _buf: b, token });
            let sqe = opcode::Write::new(types::Fd(fd), ptr, len as u32).offset(host).build().user_data(io as u64);
            self.push(sqe);
        }
    }

    /// Plans and starts an allocation job. `Ok(false)`: needs the lock (park).
    fn start_job(&mut self, id: usize, pos: u64, len: u64, at: L2Slot, e: u64, b: u64) -> Result<Started> {
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
                let m = sub_mask(s0, s1);
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
                let m = sub_mask(s0, s1);
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
            // The plan above comes from the entry as it was looked up. A job that held the
            // claim meanwhile may have published since (allocated the subclusters this
            // one would fill, turned the zero cluster into data): a fill planned from the
            // old entry would then write its zeros over that job's data in the live
            // cluster, before the commit could notice. Plans are made only from the entry
            // as it is under the claim.
            let now_e = img.l2_cache.load_word(slot, at.word);
            let now_b = if ext { img.l2_cache.load_word(slot, at.word + 1) } else { b };
            if now_e != e || now_b != b {
                img.fill_busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&hc);
                img.l2_cache.unpin(slot);
                return Ok(Started::Stale);
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

    fn job_write(&mut self, job: usize) {
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
    fn owe_free(&mut self, e: L2Entry) {
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

    /// Advances a zero-write or discard request.
    pub(crate) fn drive_zero(&mut self, id: usize) {
        // Hold the request open while we walk it: a nested completion (a child request
        // that finishes at once) must not finish it under our feet.
        self.reqs[id].pending += 1;
        let img = self.image.clone();
        let g = img.geo;
        let cs = g.cluster_size();
        let v3 = img.version >= 3;
        loop {
            let r = &self.reqs[id];
            let end = r.offset + r.len;
            if r.cursor >= end || r.error != 0 {
                break;
            }
            let (kind, pos) = (r.kind, r.cursor);
            let cstart = pos - g.offset_in_cluster(pos);
            let cend = (cstart + cs).min(img.vsize());
            let n = end.min(cend) - pos;
            let whole = pos == cstart && pos + n == cend;
            let discard = kind == ReqKind::Discard;
            let unmap = matches!(kind, ReqKind::Zero { unmap: true });
            // Pieces the metadata cannot express are written as zeros (zero writes) or
            // ignored (discards).
            let (meta_start, meta_end) = if whole {
                (pos, pos + n)
            } else if g.extended_l2 && !discard && v3 {
                // Only whole subclusters can be zeroed in the bitmap: the ones that lie
                // inside [pos, pos+n). A range inside one subcluster has none (the last
                // subcluster of a disk that ends inside it counts as whole).
                let scs = g.subcluster_size();
                let a = pos.div_ceil(scs) * scs;
                let b = if pos + n == cend { pos + n } else { (pos + n) / scs * scs };
                if a < b { (a, b) } else { (pos, pos) }
            } else {
                (pos, pos)
            };
            // v2 images have no zero flag: a discard there would expose the backing file,
            // so QEMU ignores discards on v2 images with a backing file, and so do we.
            if discard && (meta_start == meta_end || (!v3 && img.backing.is_some())) {
                self.reqs[id].cursor += n;
                continue;
            }
            if !discard && (!v3 || meta_start == meta_end || meta_start > pos || meta_end < pos + n) {
                // Zero data for the parts outside [meta_start, meta_end).
                let parts: Vec<(u64, u64)> = if !v3 || meta_start >= meta_end {
                    vec![(pos, pos + n)]
                } else {
                    [(pos, meta_start), (meta_end, pos + n)].into_iter().filter(|(a, b)| b > a).collect()
                };
                if !parts.is_empty() {
                    for (a, b) in parts {
                        let zp = self.zeros.as_mut_ptr();
                        self.reqs[id].pending += 1;
                        let rid = self.new_req(0, ReqKind::Write, a, b - a, zp, Parent::Req(id));
                        self.drive_write(rid);
                    }
                    if !v3 || meta_start >= meta_end {
                        self.reqs[id].cursor += n;
                        continue;
                    }
                }
            }
            // Metadata change for [meta_start, meta_end) of this cluster.
            let l1i = g.l1_index(g.guest_cluster(GuestOffset(pos)));
            let l1e = img.l1_entry(l1i);
            if l1e.l2_offset().0 == 0 && img.backing.is_none() {
                // No table and nothing below: already reads as zeros.
                self.reqs[id].cursor += n;
                continue;
            }
            if !img.write_l1_ready(l1i) {
                match self.make_table(l1i) {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.park_lock(id);
                        break;
                    }
                    Err(e) => {
                        self.fail_write(id, e);
                        break;
                    }
                }
            }
            let at = match img.l2_slot(GuestOffset(pos)) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    self.fail_write(id, e);
                    break;
                }
            };
            let Some(slot) = img.l2_cache.pin(at.key) else {
                self.park_slice(id, at.key);
                break;
            };
            let st = match img.try_meta() {
                Ok(Some(st)) => st,
                Ok(None) => {
                    img.l2_cache.unpin(slot);
                    self.park_lock(id);
                    break;
                }
                Err(e) => {
                    img.l2_cache.unpin(slot);
                    self.fail_with(id, e);
                    break;
                }
            };
            let r = self.zero_entry(slot, at.word, meta_start - cstart, meta_end - meta_start, whole, discard, unmap);
            drop(st);
            img.l2_cache.unpin(slot);
            match r {
                Ok(true) => {}
                Ok(false) => {
                    // The entry cannot express it (part of a compressed cluster): zeros
                    // are written as data, which copies the cluster (as QEMU does).
                    let zp = self.zeros.as_mut_ptr();
                    self.reqs[id].pending += 1;
                    let rid = self.new_req(0, ReqKind::Write, meta_start, meta_end - meta_start, zp, Parent::Req(id));
                    self.drive_write(rid);
                }
                Err(e) => {
                    self.fail_write(id, e);
                    break;
                }
            }
            self.reqs[id].cursor += n;
        }
        self.reqs[id].pending -= 1;
        self.maybe_finish(id);
    }

    /// Rewrites one L2 entry for a zero write or discard (metadata lock held). `Ok(false)`:
    /// the entry cannot express the change (a partial zero write to a compressed cluster);
    /// nothing was changed and the range must be written as zeros.
    #[allow(clippy::too_many_arguments)]
    fn zero_entry(
        &mut self,
        slot: SlotId,
        word: usize,
        in_c: u64,
        len: u64,
        whole: bool,
        discard: bool,
        unmap: bool,
    ) -> Result<bool> {
        let img = self.image.clone();
        let g = img.geo;
        let cache = &img.l2_cache;
        loop {
            let e = cache.load_word(slot, word);
            let kind = L2Entry(e).decode(&g)?;
            let allocated = matches!(kind, ClusterKind::Normal { .. } | ClusterKind::ZeroAlloc { .. });
            let compressed = matches!(kind, ClusterKind::Compressed { .. });
            if g.extended_l2 {
                let b = cache.load_word(slot, word + 1);
                let (ne, nb, free) = if whole {
                    let drop_it = compressed || (allocated && (unmap || discard));
                    let ne = if drop_it { 0 } else { e };
                    (ne, SubclusterBitmap::from_parts(0, u32::MAX).0, drop_it)
                } else {
                    if compressed {
                        return Ok(false);
                    }
                    let s0 = g.subcluster_index(in_c);
                    let s1 = g.subcluster_index(in_c + len - 1);
                    let m = sub_mask(s0, s1);
                    let bm = SubclusterBitmap(b);
                    (e, SubclusterBitmap::from_parts(bm.alloc() & !m, bm.zero() | m).0, false)
                };
                cache.store_pair(slot, word, ne, nb);
                if free {
                    self.owe_free(L2Entry(e));
                }
                return Ok(true);
            }
            let has_backing = img.backing.is_some();
            let (ne, free) = if discard {
                let v3 = img.version >= 3;
                let ne = if v3 && (has_backing || allocated || compressed) { l2::L2_ZERO } else { 0 };
                (ne, allocated || compressed)
            } else {
                let drop_it = compressed || (unmap && allocated);
                let ne = if drop_it { l2::L2_ZERO } else { e | l2::L2_ZERO };
                (ne, drop_it)
            };
            if ne == e {
                return Ok(true);
            }
            if cache.cas_word(slot, word, e, ne) {
                if free {
                    self.owe_free(L2Entry(e));
                }
                return Ok(true);
            }
        }
    }

    /// Flush: write metadata back in dependency order and flush the device, under the
    /// metadata lock (parked when another queue holds it).
    pub(crate) fn drive_flush(&mut self, id: usize) {
        if self.image.meta.is_none() {
            self.finish(id);
            return;
        }
        // Group commit: every flush (and writethrough write) waiting in this queue is
        // served by one metadata write-back and one device flush, in the reap loop.
        self.flush_waiters.push(id);
    }

    /// Serves the waiting flushes with one write-back and one device flush, if the
    /// metadata lock is free (otherwise they wait for the next round).
    pub(crate) fn group_flush(&mut self) {
        if self.flush_waiters.is_empty() {
            return;
        }
        let img = self.image.clone();
        let mut st = match img.try_meta() {
            Ok(Some(st)) => st,
            Ok(None) => return,
            Err(e) => {
                for id in std::mem::take(&mut self.flush_waiters) {
                    self.fail(id, -e.raw_os_error());
                    self.finish(id);
                }
                return;
            }
        };
        let waiters = std::mem::take(&mut self.flush_waiters);
        st.rc.pending_free.append(&mut self.local_frees);
        let r = img.flush_metadata(&mut st, false, &self.counters).and_then(|_| {
            crate::counters::Counters::add(&self.counters.device_flushes, 1);
            img.sync.fdatasync(img.file.fd())
        });
        drop(st);
        let err = r.err();
        for id in waiters {
            if let Some(e) = &err {
                self.fail(id, -e.raw_os_error());
                if self.reqs[id].detail.is_none() {
                    self.reqs[id].detail = Some(Error::errno(format!("flush failed: {e}"), e.raw_os_error()));
                }
            }
            self.finish(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::CreateOptions;
    use crate::image::{Image, Options};
    use crate::queue::QueueOptions;

    /// A job that fills subclusters of its own cluster in place must plan from the entry as
    /// it is once it holds the cluster's fill claim. Here the write into the first half of
    /// subcluster 23 is resolved while that subcluster is unallocated; then a whole-cluster
    /// write allocates every subcluster and publishes; then the first job starts. Planned
    /// from the stale bitmap it filled the second half of subcluster 23 with zeros over the
    /// whole-cluster write's data (its commit then failed and it redid only its own bytes):
    /// found by tests/mq_model.rs (c64k-ext-rc1, 8 queues, seed 886000275).
    #[test]
    fn in_place_fill_plans_from_the_entry_under_its_claim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fill.qcow2");
        let cs = 65536u64;
        let o = CreateOptions { size: 4 * cs, cluster_size: cs, extended_l2: true, ..Default::default() };
        crate::image::create(&path, &o, false).unwrap();
        let img = Image::open(&path, &Options::default()).unwrap();
        let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
        // Cluster 0 exists with only subcluster 0 allocated.
        q.write_at(&[0x11; 2048], 0).unwrap();
        let (pos, len) = (23 * 2048, 1024);
        let Ok(WPiece::Alloc { slot, e, b, .. }) = q.resolve_write(pos, len) else {
            panic!("subcluster 23 is not allocated yet: an allocation job is planned");
        };
        // Another writer allocates every subcluster meanwhile.
        q.write_at(&vec![0xb2; cs as usize], 0).unwrap();
        // The first job starts with what it looked up.
        let data = vec![0xa5u8; len as usize];
        let id = q.new_req(9, ReqKind::Write, pos, len, data.as_ptr() as *mut u8, Parent::Caller);
        q.reqs[id].pending += 1;
        let started = q.start_job(id, pos, len, slot, e, b).unwrap();
        q.reqs[id].pending -= 1;
        if matches!(started, Started::Yes) {
            q.reqs[id].cursor += len;
            q.maybe_finish(id);
        } else {
            q.drive_write(id);
        }
        q.commit().unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            q.reap(&mut done, 1, Some(std::time::Duration::from_secs(10))).unwrap();
        }
        assert_eq!(done[0], crate::queue::Completion { user_data: 9, result: 0 });
        let mut got = vec![0u8; 2048];
        q.read_at(&mut got, pos).unwrap();
        assert!(got[..1024].iter().all(|&x| x == 0xa5), "the job's own bytes");
        let bad = got[1024..].iter().position(|&x| x != 0xb2);
        assert_eq!(bad, None, "the rest of subcluster 23 holds the whole-cluster write's data");
        drop(q);
        img.close().unwrap();
    }
}
