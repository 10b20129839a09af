//! Blocking helpers for tools and tests: one request, waited for.

use super::*;

/// The user_data of the blocking helpers' requests.
pub(super) const BLOCKING_TAG: u64 = u64::MAX - 1;

impl Queue {
    /// Blocking helper: reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let op = Op::Read { offset, buf: buf.as_mut_ptr(), len: buf.len() };
        self.run_one(op)
    }

    /// Blocking helper: writes `buf` at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.run_one(Op::Write { offset, buf: buf.as_ptr(), len: buf.len() })
    }

    /// Blocking helper: writes zeros (`unmap`: clusters may be deallocated).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.run_one(Op::WriteZeroes { offset, len, unmap })
    }

    /// Blocking helper: discards.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.run_one(Op::Discard { offset, len })
    }

    /// Blocking helper: flushes.
    pub fn flush(&mut self) -> Result<()> {
        self.run_one(Op::Flush)
    }

    fn run_one(&mut self, op: Op) -> Result<()> {
        // SAFETY: the buffer (if any) is borrowed by our caller for the whole call, and we
        // wait for the completion of this request before returning.
        unsafe { self.submit(Request { op, user_data: BLOCKING_TAG })? };
        self.wait_blocking()
    }

    /// Waits for the request tagged [`BLOCKING_TAG`]; other completions stay for `reap`.
    pub(super) fn wait_blocking(&mut self) -> Result<()> {
        const TAG: u64 = BLOCKING_TAG;
        let mut out = Vec::new();
        loop {
            self.reap(&mut out, 1, None)?;
            if let Some(pos) = out.iter().position(|c| c.user_data == TAG) {
                let c = out.remove(pos);
                self.done.extend(out);
                if c.result == 0 {
                    return Ok(());
                }
                return Err(self.error_detail(TAG).unwrap_or_else(|| Error::errno("request", -c.result)));
            }
        }
    }
}
