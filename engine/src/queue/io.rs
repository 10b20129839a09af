//! What each SQE is for ([`Io`], keyed by the SQE's `user_data`) and the dispatch of its
//! completion to the request, job or slice load that issued it.

use super::*;

/// What one SQE is for.
pub(crate) enum Io {
    /// Data read straight into the guest buffer.
    Data { req: usize, dst: *mut u8, len: usize },
    /// Data read through an aligned bounce buffer.
    Bounce { req: usize, buf: AlignedBuf, skip: usize, dst: *mut u8, len: usize },
    /// A compressed cluster read; decompressed into `dst` on completion.
    Compressed {
        req: usize,
        buf: AlignedBuf,
        skip: usize,
        clen: usize,
        layer: Arc<Image>,
        in_cluster: usize,
        dst: *mut u8,
        len: usize,
    },
    /// An L2 slice load into a cache slot.
    Load { layer: Arc<Image>, slot: SlotId, key: u64 },
    /// A whole guest read served by one data read straight into its buffer: the request
    /// needs no state beyond this (no [`Req`]); see `Queue::try_whole_read`.
    Whole { user_data: u64, dst: *mut u8, len: usize, entered: u8 },
    /// A data write straight from the guest buffer (`token`: the test hook's).
    Write { req: usize, token: u64 },
    /// A data write from an aligned copy of an unaligned guest buffer.
    WriteBounce { req: usize, _buf: AlignedBuf, token: u64 },
    /// An allocation job's data write (from its bounce buffer or the guest buffer).
    JobWrite { job: usize },
    /// One data write (a `writev` of `_iov`, kept until it completes) for several jobs of
    /// one request whose bytes follow each other on the host, or for one job with its
    /// copy-on-write head and tail (`len`: the whole write), maybe after an overwrite in
    /// place of the same request (`lead`: the request and the test hook's token).
    GroupWrite { jobs: Vec<usize>, len: u64, lead: Option<(usize, u64)>, _iov: Vec<libc::iovec> },
    /// The read of the queue's wake eventfd (see `queue/wake.rs`) into `_buf`.
    Wake { _buf: Box<u64> },
    /// A NOP that makes the queue retry its parked requests (see `Queue::nudge`).
    Nudge,
    /// A write of this queue's metadata write-back (`queue/writeback.rs`): write `index`
    /// of stage `stage` of its plan (`token`: the test hook's).
    WbWrite { stage: usize, index: usize, token: u64 },
    /// A device flush of this queue's metadata write-back (`token`: the test hook's; `None`
    /// for the flush of an external data file, which the hook does not see).
    WbFsync { token: Option<u64> },
    /// A read request's private copy of an L2 slice (see `queue/read.rs`).
    Private { req: usize, layer: Arc<Image>, key: u64, first: usize, buf: AlignedBuf },
}

impl Queue {
    pub(super) fn complete_io(&mut self, io: usize, res: i32) {
        let Some(entry) = self.ios.try_remove(io) else {
            return;
        };
        match entry {
            Io::Data { req, dst, len } => {
                if res < 0 {
                    self.fail(req, res);
                } else if (res as usize) < len {
                    // Past the end of the file: the rest reads as zeros.
                    // SAFETY: dst..dst+len is inside the request's guest buffer.
                    unsafe { std::ptr::write_bytes(dst.add(res as usize), 0, len - res as usize) };
                }
                self.io_done(req);
            }
            Io::Bounce { req, buf, skip, dst, len } => {
                if res < 0 {
                    self.fail(req, res);
                } else {
                    let avail = (res as usize).saturating_sub(skip).min(len);
                    // SAFETY: dst..dst+len is inside the guest buffer; buf holds skip+len bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(buf.as_ptr().add(skip), dst, avail);
                        std::ptr::write_bytes(dst.add(avail), 0, len - avail);
                    }
                }
                self.put_buf(buf);
                self.io_done(req);
            }
            Io::Compressed { req, buf, skip, clen, layer, in_cluster, dst, len } => {
                if res < 0 {
                    self.fail(req, res);
                } else {
                    let avail = (res as usize).saturating_sub(skip).min(clen);
                    let mut cluster = vec![0u8; layer.geo.cluster_size() as usize];
                    match crate::format::compress::decompress(layer.compression, &buf[skip..skip + avail], &mut cluster)
                    {
                        Ok(()) => {
                            // SAFETY: dst..dst+len is inside the guest buffer.
                            unsafe { std::ptr::copy_nonoverlapping(cluster.as_ptr().add(in_cluster), dst, len) };
                        }
                        Err(e) => self.fail_with(req, e),
                    }
                }
                self.put_buf(buf);
                self.io_done(req);
            }
            Io::Load { layer, slot, key } => self.slice_loaded(layer, slot, key, res),
            Io::Whole { user_data, dst, len, entered } => {
                self.whole_in_flight -= 1;
                self.image.leave(&self.gate, entered);
                if res >= 0 {
                    if (res as usize) < len {
                        // Past the end of the file: the rest reads as zeros.
                        // SAFETY: dst..dst+len is the request's guest buffer.
                        unsafe { std::ptr::write_bytes(dst.add(res as usize), 0, len - res as usize) };
                    }
                    Counters::bump(&self.counters.guest_reads, 1);
                    Counters::bump(&self.counters.read_bytes, len as u64);
                }
                self.done.push(Completion { user_data, result: res.min(0) });
            }
            Io::Write { req, token } | Io::WriteBounce { req, token, .. } => {
                if res < 0 {
                    self.fail(req, res);
                } else if let Some(h) = &self.image.hook {
                    h.0.completed(token);
                }
                self.io_done(req);
            }
            Io::JobWrite { job } => self.job_write_done(job, res),
            Io::GroupWrite { jobs, len, lead, .. } => {
                // A short write leaves some of the jobs' bytes unwritten: none of them is
                // published.
                let res = if res >= 0 && (res as u64) < len { -libc::EIO } else { res };
                for job in jobs {
                    self.job_write_done(job, res);
                }
                if let Some((req, token)) = lead {
                    if res < 0 {
                        self.fail(req, res);
                    } else if let Some(h) = &self.image.hook {
                        h.0.completed(token);
                    }
                    self.io_done(req);
                }
            }
            Io::Wake { .. } => self.woke(),
            Io::Nudge => self.nudged(),
            Io::WbWrite { stage, index, token } => self.wb_write_done(stage, index, token, res),
            Io::WbFsync { token } => self.wb_fsync_done(token, res),
            Io::Private { req, layer, key, first, buf } => self.private_loaded(req, layer, key, first, buf, res),
        }
    }
}
