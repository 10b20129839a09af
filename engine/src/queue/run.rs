//! Runs: guest bytes that map to contiguous bytes of one file, merged so that each becomes
//! one SQE.

use crate::format::types::{GuestOffset, HostOffset};
use std::os::unix::io::RawFd;

/// `len` guest bytes at `guest` that are `len` bytes at `host` in file `fd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub fd: RawFd,
    pub host: HostOffset,
    pub guest: GuestOffset,
    pub len: u64,
}

/// A run being built while a request is walked.
#[derive(Default)]
pub(crate) struct RunBuilder(Option<Run>);

impl RunBuilder {
    /// Adds a piece. Returns the finished run when the piece does not continue the current
    /// one (the piece then starts the next run).
    #[must_use]
    pub fn add(&mut self, piece: Run) -> Option<Run> {
        match &mut self.0 {
            Some(r) if r.fd == piece.fd && r.host + r.len == piece.host && r.guest + r.len == piece.guest => {
                r.len += piece.len;
                None
            }
            cur => cur.replace(piece),
        }
    }

    /// The run in progress, if any (the walk paused or ended).
    #[must_use]
    pub fn take(&mut self) -> Option<Run> {
        self.0.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_contiguous_pieces_only() {
        let p = |fd, h, g, l| Run { fd, host: HostOffset(h), guest: GuestOffset(g), len: l };
        let mut b = RunBuilder::default();
        assert_eq!(b.add(p(3, 0x1000, 0, 512)), None);
        assert_eq!(b.add(p(3, 0x1200, 512, 512)), None);
        // Host gap: the first run is done.
        assert_eq!(b.add(p(3, 0x2000, 1024, 512)), Some(p(3, 0x1000, 0, 1024)));
        // Another file.
        assert_eq!(b.add(p(4, 0x2200, 1536, 512)), Some(p(3, 0x2000, 1024, 512)));
        assert_eq!(b.take(), Some(p(4, 0x2200, 1536, 512)));
        assert_eq!(b.take(), None);
    }
}
