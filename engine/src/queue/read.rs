//! The read request state machine: walk the guest range, translate each piece through the
//! backing chain, and issue one SQE per contiguous host run (zero pieces are filled in
//! place). A piece whose L2 slice is missing parks the request on that slice.
//!
//! Reads never wait for another queue's metadata: when the missing slice cannot be loaded
//! into the shared cache now (another queue is loading it, or its cache set has no slot to
//! give: the regime where misses outnumber slots), the read loads a private copy of the
//! slice for itself ([`PrivateSlice`]) and goes on from that. The copy is read from the
//! file after the request looked the slice up in the cache and missed, and a slice that
//! is not in the cache has no newer version anywhere (dirty slices are never evicted), so
//! the copy holds every update completed before the lookup: what the request may see. It
//! serves only this request and is dropped with it. The copy is the one 512-byte sector of
//! the slice that holds the entry (64 entries, 32 extended ones): a small read, and only
//! those entries to check. No queue ever waits for, or wakes, another for a read.

use super::run::{Run, RunBuilder};
use super::{Io, Queue};
use crate::counters::Counters;
use crate::format::l2::Extent;
use crate::format::types::{GuestOffset, HostOffset};
use crate::image::SliceClaim;
use crate::image::mapping::Lookup;
use crate::image::{Backing, Image};
use crate::io::AlignedBuf;
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

/// Bytes of a slice a private load reads: one sector.
const PRIVATE_BYTES: usize = 512;
/// 64-bit words in [`PRIVATE_BYTES`].
const PRIVATE_WORDS: usize = PRIVATE_BYTES / 8;
/// Private loads one queue keeps in flight at most (their buffers are its memory); past
/// that, a read waits for the shared cache like a writer (registered, woken).
const PRIVATE_IN_FLIGHT: usize = 64;

/// A read request's own copy of one sector of an L2 slice of `layer`, loaded when the
/// shared cache could not take the slice (see the module doc), checked as a cache load is.
pub(crate) struct PrivateSlice {
    layer: Arc<Image>,
    /// The slice's cache key (host offset).
    key: u64,
    /// The slice word the copy starts at (a multiple of [`PRIVATE_WORDS`]).
    first: usize,
    pub(super) buf: AlignedBuf,
}

impl PrivateSlice {
    /// Does this copy hold (part of) slice `key` of `layer`?
    fn serves(&self, layer: &Arc<Image>, key: u64) -> bool {
        self.key == key && Arc::ptr_eq(&self.layer, layer)
    }

    /// Slice word `w` (host-endian), if the copy holds it.
    fn word(&self, w: usize) -> Option<u64> {
        let i = w.checked_sub(self.first).filter(|&i| i < PRIVATE_WORDS)?;
        Some(be_word(&self.buf, i))
    }
}

/// Big-endian word `w` of a slice buffer.
fn be_word(buf: &AlignedBuf, w: usize) -> u64 {
    u64::from_be_bytes(buf[w * 8..w * 8 + 8].try_into().expect("8 bytes"))
}

/// Translates `len` bytes at `off` through the chain starting at `top` (no reference
/// counting on the hit path: layers are borrowed, and only cloned for the rare pieces that
/// must keep one). A miss that `private` serves is answered from it.
#[inline]
fn resolve(top: &Arc<Image>, off: u64, len: u64, c: &Counters, private: Option<&PrivateSlice>) -> crate::Result<Piece> {
    let mut layer: &Arc<Image> = top;
    let mut len = len;
    loop {
        if off >= layer.vsize() {
            return Ok(Piece::Zero { len });
        }
        let found = match layer.lookup(GuestOffset(off), len)? {
            Lookup::Miss { key } if private.is_some_and(|p| p.serves(layer, key)) => {
                let p = private.expect("checked");
                layer.lookup_with(GuestOffset(off), len, |slot, pair| {
                    Some((p.word(slot.word)?, if pair { p.word(slot.word + 1)? } else { 0 }))
                })?
            }
            found => found,
        };
        match found {
            Lookup::Miss { key } => return Ok(Piece::Miss { layer: layer.clone(), key }),
            Lookup::Mapped { extent, len: n, cached } => {
                if cached {
                    Counters::bump(&c.l2_hits, 1);
                }
                match extent {
                    Extent::Data(h) => return Ok(Piece::Data { fd: layer.data_fd(), host: h.0, len: n }),
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
                    Extent::Unallocated if off >= layer.backing_limit() => return Ok(Piece::Zero { len: n }),
                    Extent::Unallocated => match &layer.backing {
                        None => return Ok(Piece::Zero { len: n }),
                        Some(Backing::Raw(raw)) => {
                            if off >= raw.size {
                                return Ok(Piece::Zero { len: n });
                            }
                            let n = n.min(layer.backing_limit() - off);
                            return Ok(Piece::Data { fd: raw.file.fd(), host: off, len: n });
                        }
                        Some(Backing::Qcow2(b)) => {
                            len = n.min(layer.backing_limit() - off);
                            layer = b;
                        }
                    },
                }
            }
        }
    }
}

impl Queue {
    /// Read request `id` missed slice `key` of `layer`: loads it into the shared cache and
    /// parks on it, or (when the cache cannot take it now) loads a private copy for the
    /// request. True when the slice turned out to be cached (walk on).
    fn read_miss(&mut self, id: usize, layer: Arc<Image>, key: u64, pos: u64) -> bool {
        match layer.claim_slice(key, &self.counters) {
            SliceClaim::Cached => true,
            SliceClaim::Load { slot, ptr, len } => {
                self.issue_load(layer, slot, key, ptr, len);
                self.park(id);
                self.parked.push((id, key));
                false
            }
            SliceClaim::Busy if self.private_in_flight >= PRIVATE_IN_FLIGHT => {
                if self.load_slice(layer, key) {
                    return true;
                }
                self.park(id);
                self.parked.push((id, key));
                false
            }
            SliceClaim::Busy => {
                // The sector of the slice that holds this position's entry.
                let word = match layer.l2_slot(GuestOffset(pos)) {
                    Ok(Some(slot)) if slot.key == key => slot.word,
                    // The L1 entry changed since the lookup (a new or copied L2 table):
                    // resolve the piece again.
                    Ok(_) => return true,
                    Err(e) => {
                        self.fail_with(id, e);
                        return false;
                    }
                };
                let first = word / PRIVATE_WORDS * PRIVATE_WORDS;
                let mut buf = self.get_buf(PRIVATE_BYTES);
                let ptr = buf.as_mut_ptr();
                let fd = layer.file.fd();
                Counters::bump(&self.counters.meta_loads, 1);
                Counters::bump(&self.counters.l2_private_loads, 1);
                let io = self.ios.insert(Io::Private { req: id, layer, key, first, buf });
                self.private_in_flight += 1;
                // The buffer's heap memory stays where it is while the Io entry holds it.
                let sqe = opcode::Read::new(types::Fd(fd), ptr, PRIVATE_BYTES as u32)
                    .offset(key + first as u64 * 8)
                    .build()
                    .user_data(io as u64);
                self.push(sqe);
                self.park(id);
                false
            }
        }
    }

    /// The private slice load of read `id` completed with `res`: check it, keep it with the
    /// request and walk on, or fail the request.
    pub(super) fn private_loaded(
        &mut self,
        id: usize,
        layer: Arc<Image>,
        key: u64,
        first: usize,
        buf: AlignedBuf,
        res: i32,
    ) {
        self.private_in_flight -= 1;
        let step = (layer.geo.l2_entry_size() / 8) as usize;
        let entries = first / step..(first + PRIVATE_WORDS) / step;
        let checked = if res < 0 {
            Err(crate::Error::errno(format!("reading the L2 slice at {key:#x}"), -res))
        } else if (res as usize) < PRIVATE_BYTES {
            Err(crate::Error::corrupt(
                "L2 table",
                format!(
                    "the slice at {key:#x} extends past the end of the file (read {res} of {PRIVATE_BYTES} bytes at word {first})"
                ),
            ))
        } else {
            layer.check_l2_entries(key, entries, |w| be_word(&buf, w - first))
        };
        if !self.unpark(id) {
            self.put_buf(buf);
            return;
        }
        match checked {
            Ok(()) => {
                if let Some(old) = self.reqs[id].private.replace(PrivateSlice { layer, key, first, buf }) {
                    self.put_buf(old.buf);
                }
                self.drive(id);
            }
            Err(e) => {
                self.put_buf(buf);
                let e = match e {
                    e @ crate::Error::Corrupt { .. } => e,
                    e => crate::Error::errno(e.to_string(), e.raw_os_error()),
                };
                self.fail_with(id, e);
                self.maybe_finish(id);
            }
        }
    }

    /// Advances a read request as far as possible without waiting.
    pub(crate) fn drive_read(&mut self, id: usize) {
        // Hold the request open while we walk it: a nested completion (a child request
        // that finishes at once) must not finish it under our feet.
        self.reqs[id].pending += 1;
        let top = Arc::clone(&self.image);
        let mut run = RunBuilder::default();
        while let Some((pos, end)) = self.walk_next(id) {
            let piece = match resolve(&top, pos, end - pos, &self.counters, self.reqs[id].private.as_ref()) {
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
                    if self.read_miss(id, layer, key, pos) {
                        continue;
                    }
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
        let fd = img.data_fd();
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
