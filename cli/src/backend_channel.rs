//! The vhost-user back-end request channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`), used by
//! `quring serve --vhost-user-blk` for one message: `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`
//! (no payload), after which the front-end re-reads the device configuration
//! (`VHOST_USER_GET_CONFIG`: a live resize's new capacity) and raises the guest's
//! configuration interrupt.
//!
//! What the rust-vmm crates lack: `vhost` 0.18 receives the channel
//! (`VHOST_USER_SET_BACKEND_REQ_FD`) and hands the back-end a `vhost::vhost_user::Backend`,
//! whose socket is private and which forwards only the shared-object and shmem messages:
//! its `VhostUserFrontendReqHandler::handle_config_change` is the trait's default (ENOSYS),
//! and nothing else sends `CONFIG_CHANGE_MSG`. So when the crate hands the channel over,
//! [`Channel::find`] looks for its socket among the process's descriptors: the one Unix
//! stream socket without a local address that did not exist before the front-end
//! connected (the front-end's own connection carries the listener's path; the channel is
//! one end of a socketpair the front-end made and passed over), and keeps a duplicate to
//! write the message header on. Nothing else in `quring serve` creates unnamed sockets
//! once it serves, and a descriptor reused between the scan and the duplicate is caught
//! by comparing inodes. If the crate gains a way to send the message, this module goes.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vhost::vhost_user::Backend;
use vhost::vhost_user::message::BackendReq;

/// The inodes of the process's sockets now (`/proc/self/fd/N` -> `socket:[INODE]`), with
/// their descriptor numbers.
pub fn sockets() -> Vec<(RawFd, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
        let link = std::fs::read_link(e.path()).ok()?;
        let ino = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()?;
        Some((fd, ino))
    })
    .collect()
}

/// The socket inodes that exist before a front-end connects.
pub fn socket_inodes() -> HashSet<u64> {
    sockets().into_iter().map(|(_, i)| i).collect()
}

/// Whether `fd` is a Unix stream socket without a local address (a socketpair's end).
fn unnamed_unix_stream(fd: RawFd) -> bool {
    // SAFETY: getsockname/getsockopt write at most the lengths given into local storage.
    unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::getsockname(fd, (&raw mut addr).cast(), &mut len) != 0 {
            return false;
        }
        let mut ty: libc::c_int = 0;
        let mut tlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut ty).cast(), &mut tlen) != 0 {
            return false;
        }
        addr.sun_family as libc::c_int == libc::AF_UNIX
            && len as usize <= std::mem::size_of::<libc::sa_family_t>()
            && ty == libc::SOCK_STREAM
    }
}

/// The back-end request channel, found (see the module documentation).
pub struct Channel {
    fd: OwnedFd,
    /// The crate's handle on the same socket, kept so that its end stays as it is.
    _backend: Backend,
}

impl Channel {
    /// Finds the channel the crate just handed over as `backend`: the one new unnamed Unix
    /// stream socket since `before` was taken.
    pub fn find(before: &HashSet<u64>, backend: Backend) -> Result<Channel, String> {
        let mut found = Vec::new();
        for (fd, ino) in sockets() {
            if before.contains(&ino) || !unnamed_unix_stream(fd) {
                continue;
            }
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor number; a closed one fails (checked).
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                continue;
            }
            // SAFETY: dup is a fresh descriptor we own.
            let dup = unsafe { OwnedFd::from_raw_fd(dup) };
            // The number may have been closed and reused since the scan.
            // SAFETY: fstat into local storage.
            let same = unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                libc::fstat(dup.as_raw_fd(), &mut st) == 0 && st.st_ino == ino
            };
            if same {
                found.push(dup);
            }
        }
        match found.len() {
            1 => Ok(Channel { fd: found.pop().expect("one"), _backend: backend }),
            0 => Err("no new unnamed Unix socket: cannot find the back-end channel".into()),
            n => Err(format!("{n} new unnamed Unix sockets: cannot tell which is the back-end channel")),
        }
    }

    /// Sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (no reply asked: REPLY_ACK is not
    /// offered).
    pub fn config_changed(&self) -> std::io::Result<()> {
        // The message header (the crate keeps its header type private): request, flags
        // (version 1, no NEED_REPLY), payload size, little endian.
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&u32::from(BackendReq::CONFIG_CHANGE_MSG).to_le_bytes());
        hdr[4..8].copy_from_slice(&1u32.to_le_bytes());
        let mut b = &hdr[..];
        while !b.is_empty() {
            // SAFETY: send from a live slice on our own descriptor; MSG_NOSIGNAL turns a
            // gone front-end into EPIPE instead of SIGPIPE.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            b = &b[n as usize..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn sends_the_config_change_header() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (crate_end, _) = UnixStream::pair().unwrap();
        assert!(unnamed_unix_stream(ours.as_raw_fd()));
        let ch = Channel { fd: OwnedFd::from(ours), _backend: Backend::from_stream(crate_end) };
        ch.config_changed().unwrap();
        let mut got = [0u8; 12];
        theirs.read_exact(&mut got).unwrap();
        // request 2 (CONFIG_CHANGE_MSG), flags 1 (version 1, no NEED_REPLY), size 0.
        assert_eq!(got, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
