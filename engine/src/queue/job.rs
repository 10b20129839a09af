//! Copy-on-write allocation jobs: one cluster (or the subclusters of one) written whole
//! into its new place, then published in the L2 entry.

use super::cow;
use super::*;
use crate::format::l2::{ClusterKind, L2Entry, SubclusterBitmap};
use crate::format::types::{GuestOffset, HostCluster, HostOffset};
use crate::image::mapping::L2Slot;
use crate::io::AlignedBuf;
use crate::meta::cache::SlotId;
use io_uring::{opcode, types};
use std::ops::Range;

/// One copy-on-write allocation of (part of) a cluster: the [`cow::CowPlan`] being carried
/// out. Lives from `start_job` until `job_end`; its L2 slot is pinned meanwhile.
pub(crate) struct Job {
    /// The request this piece belongs to.
    req: usize,
    /// Guest bytes written by the request in this cluster, and where they come from.
    guest: GuestOffset,
    len: u64,
    src: *const u8,
    /// Guest offset of the cluster.
    cluster: GuestOffset,
    /// The L2 entry (pinned slot and word) and its value when the job was planned.
    slot: SlotId,
    word: usize,
    old: (L2Entry, SubclusterBitmap),
    /// The cluster written (the image's own, or a new one from the batch).
    host: HostOffset,
    /// `host` came from the batch (given back if the entry changed under us).
    fresh: bool,
    /// First byte of the cluster that is written (the plan's `write.start`).
    write_start: u64,
    /// Where the written bytes outside the guest buffer are.
    bounce: Bounce,
    /// Entry and bitmap to publish.
    new: (L2Entry, SubclusterBitmap),
    /// The old entry's clusters are freed once the new one is published.
    free_old: bool,
    /// Fill reads in flight (plus one while they are being issued).
    reads_pending: u32,
    /// The test hook's token for the data write.
    token: u64,
    error: i32,
    detail: Option<Error>,
}

/// Largest write a [`WriteGroup`] grows to (an SQE's length is 32 bits).
pub(super) const MAX_GROUP_WRITE: u64 = 1 << 30;

/// Most iovecs of one [`WriteGroup`] (the kernel's `UIO_MAXIOV`).
const MAX_GROUP_IOVECS: usize = 1024;

/// The buffers of a job's written range (`write.start..write.end` of its plan) besides the
/// guest's bytes.
enum Bounce {
    /// Only the guest's bytes are written, straight from the guest buffer.
    Direct,
    /// The copy-on-write head (`write.start..in_c`) and tail (`in_c + len..write.end`) in
    /// buffers of their own, written with the guest buffer in one `writev` (issue 15: no
    /// copy of the guest's bytes, no zeroing of a whole-cluster buffer; the jobs of one
    /// request join one write per contiguous host run).
    Split { head: Option<AlignedBuf>, tail: Option<AlignedBuf> },
    /// The whole range in one buffer, the guest's bytes copied in (guest buffer or edges
    /// not 512-byte aligned, which O_DIRECT iovecs need).
    Whole(AlignedBuf),
}

/// An iovec of `len` bytes at `ptr`.
fn iov(ptr: *const u8, len: usize) -> libc::iovec {
    libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: len }
}

/// Appends `v` to `list`, merged into the last iovec when it continues it in memory.
fn push_iov(list: &mut Vec<libc::iovec>, v: libc::iovec) {
    if let Some(last) = list.last_mut()
        && (last.iov_base as *const u8).wrapping_add(last.iov_len) == v.iov_base as *const u8
    {
        last.iov_len += v.iov_len;
        return;
    }
    list.push(v);
}

/// Data writes of consecutive jobs of one request (issue 15, item 1): a request that
/// allocates several clusters takes them in ascending order from the queue's batch, so a
/// write of whole clusters (or of every touched subcluster) that needs no copy-on-write is
/// one write per contiguous host range instead of one per cluster. Each job still
/// publishes its own L2 entry when the write completes.
pub(crate) struct WriteGroup {
    /// The request whose walk started the jobs.
    req: usize,
    /// The jobs, in guest order.
    jobs: Vec<usize>,
    /// The group starts with an overwrite in place of the same request (the clusters before
    /// the jobs' are the image's already and the new ones follow them on the host): it
    /// holds one `pending` of the request; the test hook's token for its bytes.
    lead: Option<u64>,
    /// The memory written (guest buffer pieces and copy-on-write buffers, in host order),
    /// the host offset of its first byte, and the total length.
    iov: Vec<libc::iovec>,
    off: u64,
    len: u64,
}

/// How starting a job went.
pub(super) enum Started {
    /// The job runs; the piece is taken care of.
    Yes,
    /// The metadata lock is busy (batch refill), or another job fills this cluster in
    /// place: park the request.
    NeedLock,
    /// The L2 slice was evicted meanwhile: the request is parked on its reload.
    Parked,
    /// The entry changed since the piece was resolved: resolve it again.
    Stale,
}

impl Queue {
    /// Plans ([`cow::plan`]) and starts an allocation job for `len` bytes at `pos` (inside
    /// one cluster) whose L2 entry at `at` held `e` / `b` when the write resolved it.
    pub(super) fn start_job(
        &mut self,
        id: usize,
        pos: GuestOffset,
        len: u64,
        at: L2Slot,
        e: L2Entry,
        b: SubclusterBitmap,
    ) -> Result<Started> {
        let img = self.image.clone();
        let g = img.geo;
        let in_c = g.offset_in_cluster(pos.0);
        let cluster = GuestOffset(pos.0 - in_c);
        let kind = e.decode(&g)?;
        let Some(slot) = img.l2_cache.pin(at.key) else {
            // Evicted since we looked: reload, then the request resolves the piece again.
            self.park_slice(id, at.key);
            return Ok(Started::Parked);
        };
        let in_disk = (img.vsize() - cluster.0).min(g.cluster_size());
        // Whether the image's own cluster reads as zeros outside its allocated subclusters
        // (checked again under the fill claim).
        let clean_host = match kind {
            ClusterKind::Normal { host, copied: true } if g.extended_l2 && !g.external_data => Some(host),
            _ => None,
        };
        let own_clean = clean_host.is_some_and(|h| img.is_clean(h.0));
        let backing_zero = |r: Range<u64>| img.backing_reads_zero(cluster.0 + r.start, r.end - r.start);
        let plan = cow::plan(&g, kind, b, in_c, len, in_disk, img.backing.is_some(), own_clean, &backing_zero);
        // With an external data file a new cluster is the one at the guest offset (QEMU's
        // do_alloc_cluster_offset), written in place under the same fill claim as an owned
        // one: two jobs for one cluster would otherwise both write it whole.
        let target = match plan.target {
            cow::Target::Fresh if g.external_data => cow::Target::Own(HostOffset(cluster.0)),
            t => t,
        };
        let host = match target {
            cow::Target::Own(h) => {
                // Only one in-place fill per host cluster at a time (see Image::fill_busy).
                if !img.claim_fill(g.host_cluster(h).0) {
                    img.l2_cache.unpin(slot);
                    return Ok(Started::NeedLock);
                }
                // The plan comes from the entry as it was looked up. A job that held the
                // claim meanwhile may have published since (allocated the subclusters this
                // one would fill, turned the zero cluster into data): a fill planned from the
                // old entry would then write its zeros over that job's data in the live
                // cluster, before the commit could notice. Plans are made only from the entry
                // as it is under the claim.
                // A plan that trusted the clean mark needs it still there (a job that
                // failed or lost its publication meanwhile may have written the cluster).
                if self.entry_changed(slot, at.word, e, b) || (own_clean && !img.is_clean(h.0)) {
                    img.release_fill(g.host_cluster(h).0);
                    img.l2_cache.unpin(slot);
                    return Ok(Started::Stale);
                }
                h
            }
            cow::Target::Fresh => {
                // One new cluster per guest cluster at a time (see Image::alloc_busy): a
                // write into a guest cluster that another job is allocating waits for its
                // entry, then writes in place (or fills subclusters of it).
                let gc = g.guest_cluster(cluster);
                if !img.claim_alloc(gc) {
                    img.l2_cache.unpin(slot);
                    return Ok(Started::NeedLock);
                }
                // A job that held the claim may have published since the piece was
                // resolved: plan again from its entry rather than write a cluster whose
                // publication must fail.
                if self.entry_changed(slot, at.word, e, b) {
                    img.release_alloc(gc);
                    img.l2_cache.unpin(slot);
                    return Ok(Started::Stale);
                }
                let want = self.clusters_left(id, cluster);
                match self.take_cluster(id, want) {
                    Ok(Some(c)) => g.host_offset(c),
                    Ok(None) => {
                        img.release_alloc(gc);
                        img.l2_cache.unpin(slot);
                        return Ok(Started::NeedLock);
                    }
                    Err(err) => {
                        img.release_alloc(gc);
                        img.l2_cache.unpin(slot);
                        return Err(err);
                    }
                }
            }
        };
        let new_e = match plan.entry {
            cow::NewEntry::Keep => e,
            cow::NewEntry::Normal => L2Entry::normal(host, true),
        };
        let src = self.reqs[id].mem(pos.0, len) as *const u8;
        let wlen = plan.write.end - plan.write.start;
        let filled: u64 = plan.fills.iter().map(|f| f.end - f.start).sum();
        if wlen > len + filled {
            Counters::add(&self.counters.zero_fill_bytes, wlen - len - filled);
        }
        let (head, tail) = (plan.write.start..in_c, (in_c + len)..plan.write.end);
        let aligned = |x: u64| x.is_multiple_of(512);
        let bounce = if !(src as usize).is_multiple_of(512) || !aligned(len) && wlen > len {
            Bounce::Whole(self.get_buf(wlen as usize))
        } else if wlen == len {
            Bounce::Direct
        } else if aligned(head.end - head.start) && aligned(tail.end - tail.start) {
            // A part that one fill read covers whole needs no zeroing first.
            let mut part = |r: &Range<u64>| {
                let n = (r.end - r.start) as usize;
                if n == 0 {
                    None
                } else if plan.fills.contains(r) {
                    Some(self.get_read_buf(n))
                } else {
                    Some(self.get_buf(n))
                }
            };
            let (h, t) = (part(&head), part(&tail));
            Bounce::Split { head: h, tail: t }
        } else {
            Bounce::Whole(self.get_buf(wlen as usize))
        };
        let job = self.jobs.insert(Job {
            req: id,
            guest: pos,
            len,
            src,
            cluster,
            slot,
            word: at.word,
            old: (e, b),
            host,
            fresh: target == cow::Target::Fresh,
            write_start: plan.write.start,
            bounce,
            new: (new_e, plan.bitmap),
            free_old: plan.free_old,
            // Held open while the fill reads are issued: a read that completes at once
            // must not start the write before the others are issued.
            reads_pending: 1,
            token: 0,
            error: 0,
            detail: None,
        });
        self.reqs[id].pending += 1;
        for fill in plan.fills {
            let j = &mut self.jobs[job];
            let dst = match &mut j.bounce {
                // SAFETY: write.start <= fill.start < fill.end <= write.end: inside the
                // bounce buffer of write.end - write.start bytes.
                Bounce::Whole(b) => unsafe { b.as_mut_ptr().add((fill.start - plan.write.start) as usize) },
                // A fill lies in the head (write.start..in_c) or in the tail
                // (in_c + len..write.end, clipped to the disk's end).
                Bounce::Split { head: Some(b), .. } if fill.end <= in_c => {
                    // SAFETY: write.start <= fill.start < fill.end <= in_c: inside the head.
                    unsafe { b.as_mut_ptr().add((fill.start - plan.write.start) as usize) }
                }
                // SAFETY: in_c + len <= fill.start < fill.end <= write.end: inside the tail.
                Bounce::Split { tail: Some(b), .. } => unsafe {
                    b.as_mut_ptr().add((fill.start - in_c - len) as usize)
                },
                _ => unreachable!("fills lie outside the guest's bytes, in a bounce buffer"),
            };
            j.reads_pending += 1;
            Counters::add(&self.counters.cow_bytes, fill.end - fill.start);
            let rid =
                self.new_req(0, ReqKind::Read, cluster.0 + fill.start, fill.end - fill.start, dst, Parent::Job(job));
            self.drive_read(rid);
        }
        self.job_read_done(job, 0, None);
        Ok(Started::Yes)
    }

    /// Whether the L2 entry (and with extended L2 its bitmap) at `word` of pinned slice
    /// `slot` differs from `e` / `b`, what a piece was resolved from.
    fn entry_changed(&self, slot: SlotId, word: usize, e: L2Entry, b: SubclusterBitmap) -> bool {
        let c = &self.image.l2_cache;
        let now_e = L2Entry(c.load_word(slot, word));
        let now_b = if self.image.geo.extended_l2 { SubclusterBitmap(c.load_word(slot, word + 1)) } else { b };
        now_e != e || now_b != b
    }

    /// Guest clusters of request `id` from the one at `cluster` to its end: how many new
    /// clusters the rest of its walk may take (a batch refill reserves them together, so
    /// that they follow each other on the host).
    fn clusters_left(&self, id: usize, cluster: GuestOffset) -> u64 {
        let r = &self.reqs[id];
        let g = &self.image.geo;
        let end = r.offset + r.len;
        (end - cluster.0).div_ceil(g.cluster_size())
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
        let fd = self.image.data_fd();
        let j = &mut self.jobs[job];
        let mut list = Vec::with_capacity(3);
        match &mut j.bounce {
            Bounce::Whole(b) => {
                // SAFETY: src holds len bytes; the bounce buffer covers the written range,
                // which contains the guest's bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        j.src,
                        b.as_mut_ptr().add((j.guest.0 - j.cluster.0 - j.write_start) as usize),
                        j.len as usize,
                    )
                };
                list.push(iov(b.as_ptr(), b.len()));
            }
            Bounce::Direct => list.push(iov(j.src, j.len as usize)),
            Bounce::Split { head, tail } => {
                if let Some(h) = head {
                    list.push(iov(h.as_ptr(), h.len()));
                }
                list.push(iov(j.src, j.len as usize));
                if let Some(t) = tail {
                    list.push(iov(t.as_ptr(), t.len()));
                }
            }
        }
        let n: u64 = list.iter().map(|v| v.iov_len as u64).sum();
        let off = (j.host + j.write_start).0;
        let req = j.req;
        if let Some(h) = &self.image.hook {
            if let Some(errno) = h.0.fail_write(crate::io::hook::WriteKind::Data, off, n) {
                j.error = -errno;
                self.job_end(job, false);
                return;
            }
            let mut data = Vec::with_capacity(n as usize);
            for v in &list {
                // SAFETY: every iovec is valid for its length (bounce or guest buffer).
                data.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
            }
            j.token = h.0.issued(crate::io::hook::WriteKind::Data, off, crate::io::hook::WriteData::Bytes(&data));
        }
        if self.grouping > 0 {
            // While the request is walked: join the previous job's write when this one
            // continues it on the host.
            if let Some(g) = &mut self.group
                && g.req == req
                && g.off + g.len == off
                && g.len + n <= MAX_GROUP_WRITE
                && g.iov.len() + list.len() <= MAX_GROUP_IOVECS
            {
                g.jobs.push(job);
                g.len += n;
                for v in list {
                    push_iov(&mut g.iov, v);
                }
                return;
            }
            self.issue_group();
            self.group = Some(WriteGroup { req, jobs: vec![job], lead: None, iov: list, off, len: n });
            return;
        }
        crate::counters::Counters::add(&self.counters.data_writes, 1);
        crate::counters::Counters::add(&self.counters.data_write_bytes, n);
        if let [v] = list[..] {
            let io = self.ios.insert(Io::JobWrite { job });
            let sqe = opcode::Write::new(types::Fd(fd), v.iov_base as *const u8, v.iov_len as u32)
                .offset(off)
                .build()
                .user_data(io as u64);
            self.push(sqe);
        } else {
            let (ptr, cnt) = (list.as_ptr(), list.len() as u32);
            let io = self.ios.insert(Io::GroupWrite { jobs: vec![job], len: n, lead: None, _iov: list });
            let sqe = opcode::Writev::new(types::Fd(fd), ptr, cnt).offset(off).build().user_data(io as u64);
            self.push(sqe);
        }
    }

    /// Starts a [`WriteGroup`] with `len` bytes of request `id` at `ptr` (its memory,
    /// 512-byte aligned) that overwrite host bytes at `off` in place, so that the jobs the
    /// walk starts next join them in one write when their clusters follow on the host.
    pub(super) fn lead_group(&mut self, id: usize, ptr: *const u8, off: u64, len: u64) {
        self.issue_group();
        let mut token = 0;
        if let Some(h) = &self.image.hook {
            if let Some(errno) = h.0.fail_write(crate::io::hook::WriteKind::Data, off, len) {
                self.fail(id, -errno);
                return;
            }
            // SAFETY: ptr is valid for len bytes (inside the request buffer).
            let data = unsafe { std::slice::from_raw_parts(ptr, len as usize) };
            token = h.0.issued(crate::io::hook::WriteKind::Data, off, crate::io::hook::WriteData::Bytes(data));
        }
        self.reqs[id].pending += 1;
        self.group = Some(WriteGroup {
            req: id,
            jobs: Vec::new(),
            lead: Some(token),
            iov: vec![iov(ptr, len as usize)],
            off,
            len,
        });
    }

    /// Issues the pending [`WriteGroup`], if any: one data write for all its jobs.
    pub(super) fn issue_group(&mut self) {
        let Some(g) = self.group.take() else { return };
        crate::counters::Counters::add(&self.counters.data_writes, 1);
        crate::counters::Counters::add(&self.counters.data_write_bytes, g.len);
        let fd = self.image.data_fd();
        let single = match g.iov[..] {
            [v] => Some(v.iov_base as *const u8),
            _ => None,
        };
        let (iov_ptr, cnt) = (g.iov.as_ptr(), g.iov.len() as u32);
        let io = match (g.lead, g.jobs.len(), single) {
            (Some(token), 0, Some(_)) => self.ios.insert(Io::Write { req: g.req, token }),
            (None, 1, Some(_)) => self.ios.insert(Io::JobWrite { job: g.jobs[0] }),
            (lead, _, _) => {
                let lead = lead.map(|token| (g.req, token));
                self.ios.insert(Io::GroupWrite { jobs: g.jobs, len: g.len, lead, _iov: g.iov })
            }
        };
        let sqe = match single {
            // The iovec array moved into the Io (its heap buffer stays where it is).
            Some(ptr) => opcode::Write::new(types::Fd(fd), ptr, g.len as u32).offset(g.off).build(),
            None => opcode::Writev::new(types::Fd(fd), iov_ptr, cnt).offset(g.off).build(),
        };
        self.push(sqe.user_data(io as u64));
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
        self.note_lock_events();
        let (slot, word, (old_e, old_b), (new_e, new_b)) = {
            let j = &self.jobs[job];
            (j.slot, j.word, j.old, j.new)
        };
        if !g.extended_l2 {
            if img.l2_cache.cas_word(slot, word, old_e.0, new_e.0) {
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
                self.wait_lock();
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
        let ok = cur_e == old_e.0 && cur_b == old_b.0;
        if ok {
            // Both words in one seqlock write: no reader sees the new offset with the old
            // bitmap (it would fill a subcluster that is being published with zeros).
            img.l2_cache.store_pair(slot, word, new_e.0, new_b.0);
            // A new cluster read as zeros and only this job wrote it: clean (see
            // Image::clean_clusters) until every subcluster is allocated.
            let (fresh, host) = (self.jobs[job].fresh, self.jobs[job].host.0);
            let full = new_b.alloc() == u32::MAX;
            if fresh && !g.external_data {
                img.mark_clean(host, full);
            } else if full {
                img.unmark_clean(host);
            }
        }
        drop(st);
        self.job_end(job, ok);
    }

    /// Finishes a job: on success owe the old cluster's decrement; on a lost race give the
    /// cluster back and redo the piece; on error fail the request.
    fn job_end(&mut self, job: usize, published: bool) {
        let j = self.jobs.remove(job);
        match j.bounce {
            Bounce::Direct => {}
            Bounce::Whole(b) => self.put_buf(b),
            Bounce::Split { head, tail } => {
                for b in [head, tail].into_iter().flatten() {
                    self.put_buf(b);
                }
            }
        }
        let img = self.image.clone();
        img.l2_cache.unpin(j.slot);
        let host = img.geo.host_cluster(j.host);
        if j.fresh {
            img.release_alloc(img.geo.guest_cluster(j.cluster));
        } else {
            img.release_fill(host.0);
        }
        let id = j.req;
        if !j.fresh && (j.error != 0 || !published) {
            // It may hold bytes of ours outside its allocated subclusters now.
            img.unmark_clean(j.host.0);
        }
        if j.error != 0 {
            if j.fresh {
                // It may hold bytes now: never reuse it as a known-zero batch cluster.
                self.owe(host, 1);
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
                self.owe_free(j.old.0);
            }
            self.io_done(id);
            return;
        }
        // Lost the race: the cluster changed under us. Redo this piece.
        if j.fresh {
            // It may hold bytes now: never reuse it as a known-zero batch cluster.
            self.owe(host, 1);
        }
        let rid = self.new_req(0, ReqKind::Write, j.guest.0, j.len, j.src as *mut u8, Parent::Req(id));
        self.drive_write(rid);
    }

    /// Owes `n` refcount decrements to host cluster `c` (handed to the image's pending
    /// frees the next time this queue takes the metadata lock).
    pub(super) fn owe(&mut self, c: HostCluster, n: u64) {
        self.image.unmark_clean(self.image.geo.host_offset(c).0);
        self.local_frees.lock().unwrap_or_else(|e| e.into_inner()).push((c.0, n));
    }

    /// Records the decrements an L2 entry's clusters are owed.
    pub(super) fn owe_free(&mut self, e: L2Entry) {
        let g = self.image.geo;
        if g.external_data {
            // Data clusters in an external data file have no refcounts.
            return;
        }
        match e.decode(&g) {
            Ok(ClusterKind::Normal { host, .. }) | Ok(ClusterKind::ZeroAlloc { host, .. }) => {
                self.owe(g.host_cluster(host), 1);
            }
            Ok(ClusterKind::Compressed { host, len }) => {
                let last = g.host_cluster(host + (len - 1));
                for c in g.host_cluster(host).0..=last.0 {
                    self.owe(HostCluster(c), 1);
                }
            }
            _ => {}
        }
    }
}
