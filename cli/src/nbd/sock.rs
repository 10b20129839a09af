//! Socket plumbing: the two listener kinds, non-blocking receive/send on raw descriptors,
//! `ppoll` with a deadline, eventfds, and the deadline-bound exact reads and writes the
//! handshake uses.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// A listening socket.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// Accepts one connection without blocking (`Ok(None)`: none waiting). The socket is
    /// made non-blocking; TCP sockets get TCP_NODELAY (the protocol asks for it).
    pub fn accept(&self) -> io::Result<Option<Socket>> {
        let r = match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Socket::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Socket::Tcp(s)),
        };
        match r {
            Ok(s) => {
                s.set_nonblocking()?;
                if let Socket::Tcp(t) = &s {
                    t.set_nodelay(true)?;
                }
                Ok(Some(s))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            // The peer gave up between the poll and the accept.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED) | Some(libc::EPROTO)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A connected client socket (non-blocking).
pub enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub fn fd(&self) -> RawFd {
        match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_nonblocking(true),
            Socket::Tcp(s) => s.set_nonblocking(true),
        }
    }

    /// The peer, for messages.
    pub fn peer(&self) -> String {
        match self {
            Socket::Unix(_) => "unix".into(),
            Socket::Tcp(s) => s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "tcp".into()),
        }
    }
}

/// `recv` without blocking. `Ok(0)`: the peer closed its side.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes for the duration of the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `readv` into two buffers without blocking (the socket is non-blocking).
pub fn recv2(fd: RawFd, a: &mut [u8], b: &mut [u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec { iov_base: a.as_mut_ptr().cast(), iov_len: a.len() },
        libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() },
    ];
    loop {
        // SAFETY: both iovecs describe live, exclusively borrowed buffers.
        let n = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `sendmsg` of an iovec array without blocking and without SIGPIPE.
///
/// # Safety
/// Every iovec must describe memory valid for reads for the duration of the call.
pub unsafe fn sendv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: msg points at the caller's iovecs, valid per this function's contract.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `ppoll` with an optional timeout (`None`: wait forever). An interrupted wait returns 0.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ts = timeout.map(|t| libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos() as _ });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: fds is a valid array of pollfd; tsp is null or points at `ts`, alive here.
    let n = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, tsp, std::ptr::null()) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) }
}

pub fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// An eventfd used as a level-triggered flag or a wake-up counter.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain eventfd(2); the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Makes the fd readable.
    pub fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) is still readable,
        // which is all a signal needs.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter (the fd is no longer readable).
    pub fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing pending) is fine.
        unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Has io_uring signal `efd` whenever a completion is posted or, on rings set up with
/// DEFER_TASKRUN (the engine's queues are, where the kernel allows), whenever a completion
/// is queued for the ring's task. Polling the ring fd itself misses the latter: the kernel
/// reports such a ring readable when poll starts, but a completion queued while poll
/// sleeps wakes only a task waiting inside io_uring_enter, so a thread asleep in poll on
/// the ring fd sleeps on with the completion held back.
pub fn register_ring_eventfd(ring_fd: RawFd, efd: &EventFd) -> io::Result<()> {
    /// `IORING_REGISTER_EVENTFD` (include/uapi/linux/io_uring.h).
    const IORING_REGISTER_EVENTFD: libc::c_long = 4;
    let fd: i32 = efd.fd();
    // SAFETY: io_uring_register with a pointer to one live i32; the kernel only reads it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring_fd as libc::c_long,
            IORING_REGISTER_EVENTFD,
            &fd as *const i32,
            1,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Why a handshake exchange stopped.
#[derive(Debug)]
pub enum HsError {
    /// The peer closed the connection.
    Closed,
    /// The handshake time limit passed.
    Timeout,
    /// The server is shutting down.
    Stopped,
    Io(io::Error),
}

impl std::fmt::Display for HsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HsError::Closed => write!(f, "the client closed the connection"),
            HsError::Timeout => write!(f, "handshake time limit reached"),
            HsError::Stopped => write!(f, "server shutting down"),
            HsError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Blocking-style exact reads and writes on a non-blocking socket, bounded by a deadline
/// and interrupted by the server's stop eventfd.
pub struct HsIo {
    pub fd: RawFd,
    pub deadline: Instant,
    pub stop: RawFd,
}

impl HsIo {
    fn wait(&self, events: libc::c_short) -> Result<(), HsError> {
        let left = self.deadline.checked_duration_since(Instant::now()).ok_or(HsError::Timeout)?;
        let mut fds = [pollfd(self.fd, events), pollfd(self.stop, libc::POLLIN)];
        poll(&mut fds, Some(left)).map_err(HsError::Io)?;
        if fds[1].revents != 0 {
            return Err(HsError::Stopped);
        }
        Ok(())
    }

    /// Has the server been asked to stop?
    pub fn stopping(&self) -> bool {
        let mut fds = [pollfd(self.stop, libc::POLLIN)];
        matches!(poll(&mut fds, Some(Duration::ZERO)), Ok(n) if n > 0)
    }

    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), HsError> {
        let mut at = 0;
        while at < buf.len() {
            match recv(self.fd, &mut buf[at..]) {
                Ok(0) => return Err(HsError::Closed),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLIN)?,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(HsError::Closed),
                Err(e) => return Err(HsError::Io(e)),
            }
        }
        Ok(())
    }

    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), HsError> {
        let mut at = 0;
        while at < buf.len() {
            let iov = [libc::iovec { iov_base: buf[at..].as_ptr() as *mut libc::c_void, iov_len: buf.len() - at }];
            // SAFETY: the iovec points into `buf`, borrowed for the call.
            match unsafe { sendv(self.fd, &iov) } {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET)) => {
                    return Err(HsError::Closed);
                }
                Err(e) => return Err(HsError::Io(e)),
            }
        }
        Ok(())
    }
}
