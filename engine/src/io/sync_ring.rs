//! A small io_uring for synchronous I/O: open, close, create, the tools' metadata loads,
//! and (until every queue drives its own metadata writes) the writers' metadata work under
//! the image's metadata lock: cluster reservation, new L2 tables, write-back and the
//! flush's device flush. Each call submits one SQE and waits for its CQE: the same O_DIRECT
//! path as the data path.

use super::hook::{Hook, WriteData, WriteKind};
use super::{AlignedBuf, ImageFile, SECTOR};
use crate::{Error, Result};
use io_uring::{IoUring, opcode, types};
use std::sync::Mutex;

/// A mutex-protected ring for blocking reads/writes/fsync.
pub struct SyncRing {
    ring: Mutex<IoUring>,
    hook: Option<Hook>,
    next_token: std::sync::atomic::AtomicU64,
    poisoned: std::sync::atomic::AtomicBool,
}

impl SyncRing {
    /// Creates a ring with a few entries.
    pub fn new() -> Result<Self> {
        let ring = IoUring::new(8).map_err(|e| Error::io("io_uring_setup", e))?;
        Ok(SyncRing {
            ring: Mutex::new(ring),
            hook: None,
            next_token: std::sync::atomic::AtomicU64::new(1),
            poisoned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A ring whose writes and flushes go through a test hook.
    pub fn with_hook(hook: Option<Hook>) -> Result<Self> {
        let mut r = Self::new()?;
        r.hook = hook;
        Ok(r)
    }

    fn hook_fail(&self, kind: WriteKind, off: u64, len: u64) -> Result<()> {
        if let Some(h) = &self.hook
            && let Some(errno) = h.0.fail_write(kind, off, len)
        {
            return Err(Error::errno(format!("write ({kind:?}) at {off:#x}"), errno));
        }
        Ok(())
    }

    fn run(&self, sqe: io_uring::squeue::Entry, what: &str) -> Result<i32> {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if self.poisoned.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::InvalidRequest(format!("{what}: the administrative ring failed earlier")));
        }
        // Each operation is told apart by its own user_data: a completion left over from
        // an earlier call (there should be none, see below) is never taken for this one.
        let token = self.next_token.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sqe = sqe.user_data(token);
        // SAFETY: the buffers referenced by `sqe` are borrowed by our caller for the whole
        // call, and we do not return before this SQE's completion has been seen (the loop
        // below only leaves with our CQE, or with an enter error that means the SQE was
        // never consumed).
        unsafe {
            ring.submission().push(&sqe).map_err(|_| Error::InvalidRequest("sync ring full".into()))?;
        }
        loop {
            // io_uring_enter reports a submitted SQE even when its wait was interrupted
            // (EINTR is then lost), so a successful enter does not mean a completion is
            // there: look, and wait again when it is not.
            for cqe in ring.completion() {
                if cqe.user_data() == token {
                    let res = cqe.result();
                    if res < 0 {
                        return Err(Error::errno(what.to_string(), -res));
                    }
                    return Ok(res);
                }
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => {
                    if ring.submission().is_empty() {
                        // Consumed by the kernel: the buffers are in use until the CQE
                        // comes, so keep waiting for it.
                        continue;
                    }
                    // Still in the SQ with a pointer into the caller's buffer: this ring
                    // must never enter the kernel again (it would submit that SQE).
                    self.poisoned.store(true, std::sync::atomic::Ordering::Release);
                    return Err(Error::io("io_uring_enter", e));
                }
            }
        }
    }

    /// Reads `len` bytes at `off` (any alignment) from `fd`. Bytes past the end of the file
    /// read as zero. Returns the buffer and the number of bytes that were really in the file.
    pub fn read(&self, fd: i32, off: u64, len: usize) -> Result<(Vec<u8>, usize)> {
        let start = off & !(SECTOR - 1);
        let end = (off + len as u64).div_ceil(SECTOR) * SECTOR;
        let mut buf = AlignedBuf::new((end - start) as usize);
        let mut done = 0usize;
        while done < buf.len() {
            let chunk = (buf.len() - done).min(1 << 30);
            // SAFETY: pointer and length lie inside `buf`, alive for the call.
            let ptr = unsafe { buf.as_mut_ptr().add(done) };
            let sqe = opcode::Read::new(types::Fd(fd), ptr, chunk as u32).offset(start + done as u64).build();
            let n = self.run(sqe, "read")? as usize;
            if n == 0 {
                break;
            }
            done += n;
            if !n.is_multiple_of(SECTOR as usize) {
                break; // end of file
            }
        }
        let head = (off - start) as usize;
        let valid = done.saturating_sub(head).min(len);
        let mut out = buf[head..head + len].to_vec();
        out[valid..].fill(0);
        Ok((out, valid))
    }

    /// Reads exactly `len` bytes; fails naming `what` when the file is shorter.
    pub fn read_exact(&self, fd: i32, off: u64, len: usize, what: &'static str) -> Result<Vec<u8>> {
        let (buf, valid) = self.read(fd, off, len)?;
        if valid < len {
            return Err(Error::corrupt(
                what,
                format!("{len} bytes at offset {off:#x} extend past the end of the file"),
            ));
        }
        Ok(buf)
    }

    /// Writes `data` at `off`. Offset and length must be 512-byte aligned when the file is
    /// O_DIRECT; unaligned writes are done read-modify-write.
    pub fn write(&self, fd: i32, off: u64, data: &[u8]) -> Result<()> {
        self.write_kind(WriteKind::Other, fd, off, data)
    }

    /// [`SyncRing::write`] for metadata of a known kind (seen by the test hook).
    pub fn write_kind(&self, kind: WriteKind, fd: i32, off: u64, data: &[u8]) -> Result<()> {
        self.hook_fail(kind, off, data.len() as u64)?;
        let token = self.hook.as_ref().map(|h| h.0.issued(kind, off, WriteData::Bytes(data)));
        self.write_raw(fd, off, data)?;
        if let (Some(h), Some(t)) = (&self.hook, token) {
            h.0.completed(t);
        }
        Ok(())
    }

    fn write_raw(&self, fd: i32, off: u64, data: &[u8]) -> Result<()> {
        let start = off & !(SECTOR - 1);
        let end = (off + data.len() as u64).div_ceil(SECTOR) * SECTOR;
        let mut buf = AlignedBuf::new((end - start) as usize);
        if start != off || end != off + data.len() as u64 {
            let (old, _) = self.read(fd, start, buf.len())?;
            buf.copy_from_slice(&old);
        }
        let head = (off - start) as usize;
        buf[head..head + data.len()].copy_from_slice(data);
        let mut done = 0usize;
        while done < buf.len() {
            // SAFETY: pointer and length lie inside `buf`, alive for the call.
            let ptr = unsafe { buf.as_ptr().add(done) };
            let sqe =
                opcode::Write::new(types::Fd(fd), ptr, (buf.len() - done) as u32).offset(start + done as u64).build();
            let n = self.run(sqe, "write")? as usize;
            if n == 0 {
                return Err(Error::errno("write", libc::EIO));
            }
            done += n;
        }
        Ok(())
    }

    /// fdatasync through io_uring.
    pub fn fdatasync(&self, fd: i32) -> Result<()> {
        if let Some(h) = &self.hook
            && let Some(errno) = h.0.fail_flush()
        {
            return Err(Error::errno("fdatasync", errno));
        }
        let token = self.hook.as_ref().map(|h| h.0.flush_issued());
        let sqe = opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build();
        let r = self.run(sqe, "fdatasync").map(|_| ());
        if let (Some(h), Some(t)) = (&self.hook, token) {
            h.0.flush_completed(t, r.is_ok());
        }
        r
    }

    /// Makes `[off, off + len)` of `file` read as zeros (seen by the hook as one zero write):
    /// whole granules ([`ImageFile::hole_granule`]) are punched, the parts of the range
    /// that cover a granule only partly are written with zeros, so the punch never makes
    /// the file system zero a partial block through the page cache. `off` and `len` are
    /// multiples of the sector size (cluster ranges).
    pub fn punch(&self, kind: WriteKind, file: &ImageFile, off: u64, len: u64) -> Result<()> {
        self.hook_fail(kind, off, len)?;
        let token = self.hook.as_ref().map(|h| h.0.issued(kind, off, WriteData::Zeros(len)));
        let fd = file.fd();
        let g = file.hole_granule();
        let end = off.checked_add(len).ok_or_else(|| Error::InvalidRequest(format!("punch {off}+{len} overflows")))?;
        let (a, b) = (off.next_multiple_of(g), end / g * g);
        if a < b {
            self.fallocate(fd, a, b - a, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)?;
            self.write_zeros(fd, off, a - off)?;
            self.write_zeros(fd, b, end - b)?;
        } else {
            self.write_zeros(fd, off, len)?;
        }
        if let (Some(h), Some(t)) = (&self.hook, token) {
            h.0.completed(t);
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `off` (both sector-aligned), outside the hook: for ranges
    /// that read as zeros already (a punch's partial granules, the tail of the last block
    /// before the file is extended).
    pub(crate) fn write_zeros(&self, fd: i32, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; usize::try_from(len).map_err(|_| Error::InvalidRequest(format!("zero write of {len}")))?];
        self.write_raw(fd, off, &zeros)
    }

    /// ftruncate through io_uring.
    pub fn ftruncate(&self, fd: i32, len: u64) -> Result<()> {
        let sqe = opcode::Ftruncate::new(types::Fd(fd), len).build();
        self.run(sqe, "ftruncate").map(|_| ())
    }

    /// fallocate through io_uring.
    pub fn fallocate(&self, fd: i32, off: u64, len: u64, mode: i32) -> Result<()> {
        let sqe = opcode::Fallocate::new(types::Fd(fd), len).offset(off).mode(mode).build();
        self.run(sqe, "fallocate").map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A scratch file on a real file system (the target directory; tmpfs has no blocks).
    fn scratch(len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        std::fs::create_dir_all(&dir).unwrap();
        let dir = tempfile::tempdir_in(dir).unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0xaau8; len]).unwrap();
        (dir, path)
    }

    /// Punches inside one block, across two blocks and over whole blocks with partial ends
    /// read as zeros and keep the bytes around them.
    #[test]
    fn punches_read_as_zeros_and_keep_their_neighbours() {
        let len = 64 << 10;
        let (_dir, path) = scratch(len);
        let img = ImageFile::open(&path, true).unwrap();
        let ring = SyncRing::new().unwrap();
        let g = img.hole_granule() as usize;
        let cases = [(512, 512), (g - 1024, 2048), (2 * g + 512, g + 1024), (5 * g, 2 * g)];
        for &(off, n) in &cases {
            ring.punch(WriteKind::Other, &img, off as u64, n as u64).unwrap();
        }
        let mut want = vec![0xaau8; len];
        for &(off, n) in &cases {
            want[off..off + n].fill(0);
        }
        let mut got = vec![0u8; len];
        std::fs::File::open(&path).unwrap().read_exact_at(&mut got, 0).unwrap();
        assert!(got == want, "content after the punches differs");
    }
}
