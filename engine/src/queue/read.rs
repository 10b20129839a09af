//! The read request state machine: walk the guest range, translate each piece through the
//! backing chain, and issue one SQE per contiguous host run (zero pieces are filled in
//! place). A piece whose L2 slice is missing parks the request on that slice.

use super::run::{Run, RunBuilder};
use super::{Io, Queue};
use crate::counters::Counters;
use crate::format::l2::Extent;
use crate::format::types::{GuestOffset, HostOffset};
use crate::image::mapping::Lookup;
use crate::image::{Backing, Image};
use io_uring::{opcode, types};
use std::sync::Arc;

/// One resolved piece of a read.
enum Piece {
    /// `len` bytes of file `fd` at `host`.
    Data { fd: i32, host: u64, len: u64 },
    /// `len` bytes of zeros.
    Zero { len: u64 },
    /// Part of a compressed cluster of `layer`.
    Compressed { layer: Arc<Image>, host: u64, clen: u64, in_cluster: u64, len: u64 },
    /// `layer` needs the L2 slice at `key`.
    Miss { layer: Arc<Image>, key: u64 },
}

/// Translates `len` bytes at `off` through the chain starting at `top` (no reference
/// counting on the hit path: layers are borrowed, and only cloned for the rare pieces that
/// must keep one).
#[inline]
fn resolve(top: &Arc<Image>, off: u64, len: u64, c: &Counters) -> crate::Result<Piece> {
    let mut layer: &Arc<Image> = top;
    let mut len = len;
    loop {
        if off >= layer.vsize() {
            return Ok(Piece::Zero { len });
        }
        match layer.lookup(GuestOffset(off), len)? {
            Lookup::Miss { key } => return Ok(Piece::Miss { layer: layer.clone(), key }),
            Lookup::Mapped { extent, len: n, cached } => {
                if cached {
                    Counters::bump(&c.l2_hits, 1);
                }
                match extent {
                    Extent::Data(h) => return Ok(Piece::Data { fd: layer.file.fd(), host: h.0, len: n }),
                    Extent::Zero => return Ok(Piece::Zero { len: n }),
                    Extent::Compressed { host, len: clen } => {
                        if host.0 >= layer.file_len() {
                            return Err(crate::Error::corrupt(
                                "compressed cluster",
                                format!(
                                    "guest offset {off:#x} maps to compressed data at {:#x}, past the end of the file ({} bytes)",
                                    host.0,
                                    layer.file_len()
                                ),
                            ));
                        }
                        let in_cluster = layer.geo.offset_in_cluster(off);
                        return Ok(Piece::Compressed { layer: layer.clone(), host: host.0, clen, in_cluster, len: n });
                    }
                    Extent::Unallocated => match &layer.backing {
                        None => return Ok(Piece::Zero { len: n }),
                        Some(Backing::Raw(raw)) => {
                            if off >= raw.size {
                                return Ok(Piece::Zero { len: n });
                            }
                            return Ok(Piece::Data { fd: raw.file.fd(), host: off, len: n });
                        }
                        Some(Backing::Qcow2(b)) => {
                            layer = b;
                            len = n;
                        }
                    },
                }
            }
        }
    }
}

impl Queue {
    /// Advances a read request as far as possible without waiting.
    pub(crate) fn drive_read(&mut self, id: usize) {
        // Hold the request open while we walk it: a nested completion (a child request
        // that finishes at once) must not finish it under our feet.
        self.reqs[id].pending += 1;
        let top = Arc::clone(&self.image);
        let mut run = RunBuilder::default();
        while let Some((pos, end)) = self.walk_next(id) {
            let piece = match resolve(&top, pos, end - pos, &self.counters) {
                Ok(p) => p,
                Err(e) => {
                    self.fail_with(id, e);
                    break;
                }
            };
            match piece {
                Piece::Data { fd, host, len } => {
                    if let Some(done) = run.add(Run { fd, host: HostOffset(host), guest: GuestOffset(pos), len }) {
                        self.issue_data(id, done);
                    }
                    self.reqs[id].cursor += len;
                }
                Piece::Zero { len } => {
                    let dst = self.dst(id, pos, len);
                    // SAFETY: dst is valid for len bytes (GuestBuf::at checked the range).
                    unsafe { std::ptr::write_bytes(dst, 0, len as usize) };
                    self.reqs[id].cursor += len;
                }
                Piece::Compressed { layer, host, clen, in_cluster, len } => {
                    if let Some(r) = run.take() {
                        self.issue_data(id, r);
                    }
                    let start = host & !511;
                    let skip = (host - start) as usize;
                    let total = (skip as u64 + clen).div_ceil(512) * 512;
                    let mut buf = self.get_read_buf(total as usize);
                    let ptr = buf.as_mut_ptr();
                    let fd = layer.file.fd();
                    let dst = self.dst(id, pos, len);
                    let io = self.ios.insert(Io::Compressed {
                        req: id,
                        buf,
                        skip,
                        clen: clen as usize,
                        layer,
                        in_cluster: in_cluster as usize,
                        dst,
                        len: len as usize,
                    });
                    let sqe =
                        opcode::Read::new(types::Fd(fd), ptr, total as u32).offset(start).build().user_data(io as u64);
                    self.reqs[id].pending += 1;
                    self.reqs[id].cursor += len;
                    self.push(sqe);
                }
                Piece::Miss { layer, key } => {
                    if self.load_slice(layer, key) {
                        continue;
                    }
                    self.park(id);
                    self.parked.push((id, key));
                    break;
                }
            }
        }
        if let Some(r) = run.take() {
            self.issue_data(id, r);
        }
        self.reqs[id].pending -= 1;
        self.maybe_finish(id);
    }

    /// The read fast path: a guest read that one data read of this image's file serves
    /// whole (the range lies in one cached, allocated cluster, or in one L2-less extent, and
    /// buffer, host offset and length are sector-aligned) goes to the ring without a request
    /// state ([`Io::Whole`]). Anything else returns false without side effects (the lookup
    /// is counted by the general path that follows).
    #[inline]
    pub(crate) fn try_whole_read(&mut self, user_data: u64, offset: u64, len: u64, buf: *mut u8, entered: u8) -> bool {
        let img = &self.image;
        let Ok(Lookup::Mapped { extent: Extent::Data(h), len: n, cached }) = img.lookup(GuestOffset(offset), len)
        else {
            return false;
        };
        if n != len || !(buf as usize).is_multiple_of(512) || !h.0.is_multiple_of(512) || len > u32::MAX as u64 {
            return false;
        }
        if cached {
            Counters::bump(&self.counters.l2_hits, 1);
        }
        let fd = img.file.fd();
        let io = self.ios.insert(Io::Whole { user_data, dst: buf, len: len as usize, entered });
        self.whole_in_flight += 1;
        let sqe = opcode::Read::new(types::Fd(fd), buf, len as u32).offset(h.0).build().user_data(io as u64);
        self.push(sqe);
        true
    }

    /// The request's memory for `len` bytes at guest offset `pos`.
    #[inline]
    fn dst(&self, id: usize, pos: u64, len: u64) -> *mut u8 {
        self.reqs[id].mem(pos, len)
    }

    /// Issues the read of one run (straight into the guest buffer when everything is
    /// sector-aligned, through a bounce buffer otherwise).
    fn issue_data(&mut self, id: usize, Run { fd, host, guest, len }: Run) {
        let (host, guest) = (host.0, guest.0);
        let dst = self.dst(id, guest, len);
        let aligned = (dst as usize).is_multiple_of(512) && host % 512 == 0 && len % 512 == 0;
        let (io, ptr, off, n) = if aligned {
            (self.ios.insert(Io::Data { req: id, dst, len: len as usize }), dst, host, len)
        } else {
            let start = host & !511;
            let skip = (host - start) as usize;
            let total = (skip as u64 + len).div_ceil(512) * 512;
            let mut buf = self.get_read_buf(total as usize);
            let ptr = buf.as_mut_ptr();
            (self.ios.insert(Io::Bounce { req: id, buf, skip, dst, len: len as usize }), ptr, start, total)
        };
        let sqe = opcode::Read::new(types::Fd(fd), ptr, n as u32).offset(off).build().user_data(io as u64);
        self.reqs[id].pending += 1;
        self.push(sqe);
    }
}
