//! The asynchronous metadata write-back on this queue's ring: the stages of a
//! [`WbPlan`] (copies taken under the metadata lock by [`Image::begin_writeback`](crate::image::Image))
//! issued as SQEs, ordered by completions: every write of a stage (`IORING_OP_WRITE`),
//! then, once they all completed, a device flush (`IORING_OP_FSYNC` with
//! `IORING_FSYNC_DATASYNC`), then the next stage. Nothing is issued after a failure; when
//! the SQEs in flight are back the write-back ends, settles (everything copied is dirty
//! again) and fails the flushes that joined it. The test hook sees every write and flush.

use super::*;
use crate::image::writeback::WbPlan;
use io_uring::{opcode, types};

/// The write-back this queue runs.
pub(crate) struct Writeback {
    plan: WbPlan,
    /// The stage being carried out.
    stage: usize,
    /// Its writes were issued (then its flush, if any, is next).
    writes_issued: bool,
    /// Its device flush was issued.
    flush_issued: bool,
    /// SQEs in flight.
    outstanding: u32,
    /// The first failure.
    error: Option<Error>,
}

impl Writeback {
    /// Its generation.
    pub(crate) fn generation(&self) -> u64 {
        self.plan.generation
    }
}

impl Queue {
    /// Runs `plan` on this queue's ring.
    pub(super) fn start_writeback(&mut self, plan: WbPlan) {
        debug_assert!(self.wb.is_none(), "one write-back per image at a time");
        crate::counters::Counters::add(&self.counters.writebacks, 1);
        self.wb = Some(Box::new(Writeback {
            plan,
            stage: 0,
            writes_issued: false,
            flush_issued: false,
            outstanding: 0,
            error: None,
        }));
        self.wb_advance();
    }

    /// Issues what the write-back can issue now; ends it when it is done or failed.
    fn wb_advance(&mut self) {
        let img = self.image.clone();
        let fd = img.file.fd();
        loop {
            let Some(wb) = self.wb.as_mut() else { return };
            if wb.outstanding > 0 {
                return;
            }
            if wb.error.is_some() || wb.stage >= wb.plan.stages.len() {
                self.wb_end();
                return;
            }
            let stage = &wb.plan.stages[wb.stage];
            if !wb.writes_issued {
                wb.writes_issued = true;
                let mut sqes = Vec::with_capacity(stage.writes.len());
                for (i, w) in stage.writes.iter().enumerate() {
                    let len = w.buf.len() as u64;
                    let hooked = img.hook.as_ref().map(|h| (h.0.fail_write(w.kind, w.off, len), h));
                    if let Some((Some(errno), _)) = hooked {
                        wb.error = Some(Error::errno(format!("write ({:?}) at {:#x}", w.kind, w.off), errno));
                        break;
                    }
                    let token = hooked
                        .map_or(0, |(_, h)| h.0.issued(w.kind, w.off, crate::io::hook::WriteData::Bytes(&w.buf[..])));
                    sqes.push((i, token, w.buf.as_ptr(), len as u32, w.off));
                }
                let stage_no = wb.stage;
                wb.outstanding += sqes.len() as u32;
                for (i, token, ptr, len, off) in sqes {
                    let io = self.ios.insert(Io::WbWrite { stage: stage_no, index: i, token });
                    // The buffer lives in the plan, which outlives every SQE of it (the
                    // write-back ends only when none is outstanding).
                    let sqe = opcode::Write::new(types::Fd(fd), ptr, len).offset(off).build().user_data(io as u64);
                    self.push(sqe);
                }
                continue;
            }
            if stage.flush && !wb.flush_issued {
                wb.flush_issued = true;
                if let Some(errno) = img.hook.as_ref().and_then(|h| h.0.fail_flush()) {
                    wb.error = Some(Error::errno("fdatasync", errno));
                    continue;
                }
                let token = img.hook.as_ref().map_or(0, |h| h.0.flush_issued());
                wb.outstanding += 1;
                crate::counters::Counters::add(&self.counters.device_flushes, 1);
                let io = self.ios.insert(Io::WbFsync { token: Some(token) });
                let sqe =
                    opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build().user_data(io as u64);
                self.push(sqe);
                // Guest data in an external data file: durable by the same stage flush (its
                // entries are in the copies this plan took, so the flush before the L2 stage
                // orders that data before them; the closing flush makes it durable).
                if img.data_file.is_some() {
                    let wb = self.wb.as_mut().expect("write-back in progress");
                    wb.outstanding += 1;
                    let io = self.ios.insert(Io::WbFsync { token: None });
                    let sqe = opcode::Fsync::new(types::Fd(img.data_fd()))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(io as u64);
                    self.push(sqe);
                }
                continue;
            }
            wb.stage += 1;
            wb.writes_issued = false;
            wb.flush_issued = false;
        }
    }

    /// A write of the write-back completed with `res`.
    pub(super) fn wb_write_done(&mut self, stage: usize, index: usize, token: u64, res: i32) {
        let img = self.image.clone();
        let Some(wb) = self.wb.as_mut() else { return };
        wb.outstanding -= 1;
        let w = &wb.plan.stages[stage].writes[index];
        if res < 0 || (res as usize) < w.buf.len() {
            let errno = if res < 0 { -res } else { libc::EIO };
            wb.error.get_or_insert_with(|| Error::errno(format!("write ({:?}) at {:#x}", w.kind, w.off), errno));
        } else if let Some(h) = &img.hook {
            h.0.completed(token);
        }
        self.wb_advance();
    }

    /// A device flush of the write-back completed with `res`.
    pub(super) fn wb_fsync_done(&mut self, token: Option<u64>, res: i32) {
        if let (Some(h), Some(token)) = (&self.image.hook, token) {
            h.0.flush_completed(token, res >= 0);
        }
        let Some(wb) = self.wb.as_mut() else { return };
        wb.outstanding -= 1;
        if res < 0 {
            wb.error.get_or_insert_with(|| Error::errno("fdatasync", -res));
        }
        self.wb_advance();
    }

    /// The write-back is over: settle it, let the next one start, complete the flushes
    /// that joined it.
    fn wb_end(&mut self) {
        let Some(wb) = self.wb.take() else { return };
        let generation = wb.plan.generation;
        let corrupt = self.image.settle_writeback(wb.plan, wb.error.is_none());
        let err = wb.error.or(corrupt);
        self.image.wb.end(generation, err.as_ref());
        self.resolve_joined();
    }

    /// Queue teardown: lets a write-back in flight on this ring finish.
    pub(super) fn drain_writeback(&mut self) {
        while self.wb.is_some() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.process_cqes();
        }
    }
}
