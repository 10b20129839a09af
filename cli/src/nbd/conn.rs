//! One connection: the handshake, then the transmission loop on the connection's own
//! [`Queue`].
//!
//! The loop is a single thread that blocks only in `ppoll` or in a bounded wait on its ring,
//! and makes one `io_uring_enter` per turn at most:
//!
//! 1. **Reap** what the last enter posted ([`Queue::reap_posted`], no system call), in any
//!    order, and queue the replies: a structured READ reply is one final OFFSET_DATA chunk
//!    (header and data buffer, no copy); FUA writes get an engine flush before their reply
//!    (unless the image is writethrough).
//! 2. **Receive.** Non-blocking `recv` into a 64 KiB buffer, so one system call picks up
//!    every request a pipelining client has sent (fio at QD32 sends 32 headers at once). A
//!    short read means the socket is drained (a stream socket fills the buffer while it
//!    has data), so the loop does not try it again before its next wait. A WRITE payload
//!    goes into an aligned buffer from the pool that the engine writes from directly; the
//!    part already in the receive buffer is copied (small payloads: one copy in memory
//!    beats one extra system call per request), the rest is read straight into the
//!    aligned buffer with `readv(payload remainder, receive buffer)`, which also picks up
//!    the requests that follow. Each request becomes one engine request whose `user_data`
//!    is its slot in the pending table, queued on the ring; nothing waits for it. READ
//!    data lands in an aligned buffer that is then sent as is.
//! 3. **Send** queued replies with one `sendmsg` of up to 64 replies' iovecs.
//! 4. **Submit and wait.** When replies are all sent, the socket is drained and requests
//!    are in flight, the client is waiting for us: one `io_uring_enter` submits the new
//!    requests and waits for all of them to complete ([`Queue::submit_and_wait`], at most
//!    100 µs, then back round the loop). The engine's rings defer completions to their
//!    thread (DEFER_TASKRUN), so the kernel wakes the thread once for the batch, and the
//!    client gets its replies in one burst. (Submitting in the same call as the wait took
//!    the server from 0.76-1.13 to 0.50 system calls per request, 4k random reads at QD32
//!    on /dev/shm.) When the turn did something else, the enter only submits
//!    ([`Queue::commit`]) and the loop goes round again. Otherwise it submits and waits in
//!    `ppoll` on the socket (readable when there is room for more requests, writable when
//!    replies are waiting), an eventfd registered with the queue's ring (completions; the
//!    ring fd itself does not wake a poller for completions that a DEFER_TASKRUN ring
//!    holds back, see [`sock::register_ring_eventfd`]; drained just before the ppoll, then
//!    [`Queue::events_waiting`] looks at the ring), the block-status worker's eventfd and
//!    the server's stop eventfd, at most for the queue's `poll_hint` when requests wait on
//!    something the ring fd does not signal.
//!
//! Why not socket I/O on io_uring: the engine's queue owns its ring and its `user_data`
//! space, so socket SQEs would need a second ring, and a second ring means polling two
//! completion queues instead of one socket. Non-blocking `recv`/`sendmsg` batch naturally
//! (many requests per `recv`, many replies per `sendmsg`), and the socket is only polled
//! when a call returned EAGAIN or a short count, so a busy connection makes about one
//! system call per batch per direction plus the engine's enter.
//!
//! Back-pressure: the loop stops reading while 256 requests or 128 MiB of buffers are in
//! flight or 64 MiB of replies wait for the client; the kernel's socket buffer then fills
//! and the client blocks. A client that stops reading its replies for 30 s is dropped.
//!
//! Misbehaving clients: a request with a bad magic ends the connection (the stream cannot
//! be resynchronised); invalid requests get the protocol's error reply (a rejected WRITE's
//! payload is read and dropped); a connection that drops mid-request has its half-read
//! request discarded, its in-flight requests completed (the engine needs their buffers
//! until then) and their replies dropped. Nothing a client does touches another
//! connection's queue.

use super::negotiate::{Export, Outcome, Session, negotiate};
use super::proto::*;
use super::sock::{self, HsIo, Socket, recv, recv2, sendv};
use super::status::{Done, Job, Worker};
use crate::export_opts::{ZeroPolicy, is_zero};
use quring::image::Image;
use quring::io::AlignedBuf;
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use slab::Slab;
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Receive buffer size.
const RX_CAP: usize = 64 << 10;
/// Requests in flight per connection before the loop stops reading.
const MAX_IN_FLIGHT: usize = 256;
/// Request buffer bytes in flight before the loop stops reading.
const MAX_IN_FLIGHT_BYTES: usize = 128 << 20;
/// Reply bytes waiting for the client before the loop stops reading.
const MAX_TX_BYTES: usize = 64 << 20;
/// Replies per `sendmsg`.
const TX_BATCH: usize = 64;
/// A client that accepts no reply byte for this long is dropped.
const TX_STALL: Duration = Duration::from_secs(30);
/// The same while the server shuts down.
const TX_STALL_STOPPING: Duration = Duration::from_secs(5);
/// Longest wait for a batch of completions while the socket is not watched (see
/// `Conn::wait`): the most a new request can wait to be read.
const BATCH_WAIT: Duration = Duration::from_micros(100);

/// `--discard` / `--detect-zeroes` and what the connection needs of the server.
pub struct Config {
    pub image: Arc<Image>,
    pub export: Export,
    /// The exported bitmaps ([`Export::bitmaps`]' order).
    pub bitmaps: Arc<[quring::image::BitmapView]>,
    pub zero: ZeroPolicy,
    pub handshake_limit: Duration,
    pub stop: Arc<AtomicBool>,
    pub stop_fd: RawFd,
    pub verbose: bool,
}

/// What one connection did.
#[derive(Default, Debug, Clone)]
pub struct Summary {
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub block_status: u64,
    pub caches: u64,
    pub errors: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Why the connection ended.
    pub end: String,
    /// Reached the transmission phase.
    pub transmitted: bool,
}

impl Summary {
    pub fn add(&mut self, o: &Summary) {
        self.requests += o.requests;
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.trims += o.trims;
        self.write_zeroes += o.write_zeroes;
        self.block_status += o.block_status;
        self.caches += o.caches;
        self.errors += o.errors;
        self.read_bytes += o.read_bytes;
        self.write_bytes += o.write_bytes;
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "requests {} reads {} ({} bytes) writes {} ({} bytes) flushes {} trims {} write_zeroes {} \
             block_status {} cache {} errors {}",
            self.requests,
            self.reads,
            self.read_bytes,
            self.writes,
            self.write_bytes,
            self.flushes,
            self.trims,
            self.write_zeroes,
            self.block_status,
            self.caches,
            self.errors
        )
    }
}

/// Serves one accepted connection to its end.
pub fn serve(sock: Socket, cfg: &Config) -> Summary {
    let mut io = HsIo { fd: sock.fd(), deadline: Instant::now() + cfg.handshake_limit, stop: cfg.stop_fd };
    let session = match negotiate(&mut io, &cfg.export) {
        Ok(Outcome::Go(s)) => s,
        Ok(Outcome::Aborted) => return Summary { end: "client aborted the handshake".into(), ..Summary::default() },
        Ok(Outcome::Refused(why)) => return Summary { end: format!("handshake refused: {why}"), ..Summary::default() },
        Err(e) => return Summary { end: format!("handshake: {e}"), ..Summary::default() },
    };
    let queue = match Queue::new(&cfg.image, &QueueOptions::default()) {
        Ok(q) => q,
        Err(e) => return Summary { end: format!("cannot create a queue: {e}"), ..Summary::default() },
    };
    let mut c = Conn::new(queue, &sock, cfg, session);
    c.run();
    let mut s = std::mem::take(&mut c.summary);
    s.transmitted = true;
    s
}

/// A request the server has accepted and not answered yet.
struct Pending {
    cookie: u64,
    kind: Kind,
    offset: u64,
    /// The data buffer (READ, WRITE).
    buf: Option<AlignedBuf>,
    /// Flush before replying (FUA on a writeback image).
    fua: bool,
    /// The FUA flush is running.
    flushing: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    Status,
    Cache,
}

/// What the receive side is in the middle of.
#[derive(Clone, Copy, Debug)]
enum Rx {
    /// Between requests.
    Header,
    /// Reading a WRITE payload into `pending[key].buf`; `got` bytes are in.
    Payload { key: usize, got: usize },
    /// Dropping the payload of a refused WRITE.
    Skip { left: u64 },
}

/// A reply on its way out: a header and an optional body, `sent` bytes of them written.
struct Out {
    head: [u8; CHUNK_HEADER_LEN + 8],
    head_len: u8,
    body: Body,
    sent: usize,
}

enum Body {
    None,
    Buf(AlignedBuf),
    Bytes(Vec<u8>),
}

impl Out {
    fn body(&self) -> &[u8] {
        match &self.body {
            Body::None => &[],
            Body::Buf(b) => b,
            Body::Bytes(v) => v,
        }
    }
    fn len(&self) -> usize {
        self.head_len as usize + self.body().len()
    }
}

/// Aligned buffers for payloads, reused (contents unspecified: every use overwrites them).
#[derive(Default)]
struct Pool(Vec<AlignedBuf>);

impl Pool {
    fn get(&mut self, len: usize) -> AlignedBuf {
        let fit = self.0.iter().rposition(|b| b.capacity() >= len && b.capacity() <= (2 * len).max(8192));
        match fit {
            Some(i) => {
                let mut b = self.0.swap_remove(i);
                b.set_len(len);
                b
            }
            None => AlignedBuf::new(len),
        }
    }
    fn put(&mut self, b: AlignedBuf) {
        if self.0.len() < 128 && b.capacity() <= 4 << 20 {
            self.0.push(b);
        }
    }
}

struct Conn<'a> {
    // Field order is drop order: the queue goes first, waiting for every SQE that still
    // points into a buffer of `pending`; then the block-status worker is joined.
    queue: Queue,
    worker: Option<Worker>,
    pending: Slab<Pending>,
    /// Signalled by the ring when completions are queued or posted (see
    /// [`sock::register_ring_eventfd`]); `None`: the ring refused it, wait with a timeout.
    ring_wake: Option<sock::EventFd>,
    fd: RawFd,
    cfg: &'a Config,
    session: Session,
    limits: Limits,
    writethrough: bool,
    rx: Box<[u8]>,
    rs: usize,
    re: usize,
    state: Rx,
    /// No more requests are read (EOF, DISC, bad magic, receive error, shutdown).
    input_closed: bool,
    tx: VecDeque<Out>,
    tx_bytes: usize,
    /// Sending failed: replies are dropped.
    tx_dead: bool,
    /// Last time the client accepted reply bytes (or the queue became non-empty).
    tx_progress: Instant,
    /// Hints from the last system calls: recv/sendmsg would not block.
    readable: bool,
    writable: bool,
    engine_in_flight: usize,
    in_flight_bytes: usize,
    pool: Pool,
    completions: Vec<Completion>,
    iov: Vec<libc::iovec>,
    summary: Summary,
}

impl<'a> Conn<'a> {
    fn new(queue: Queue, sock: &Socket, cfg: &'a Config, session: Session) -> Conn<'a> {
        let limits = Limits {
            size: cfg.image.size(),
            read_only: cfg.export.read_only,
            structured: session.structured,
            meta: session.has_meta(),
            fast_zero: cfg.export.fast_zero,
        };
        let ring_wake = sock::EventFd::new()
            .and_then(|e| sock::register_ring_eventfd(queue.ring_fd(), &e).map(|()| e))
            .map_err(|e| eprintln!("quring serve: cannot register an eventfd with the queue's ring ({e}): polling it"))
            .ok();
        Conn {
            queue,
            worker: None,
            pending: Slab::with_capacity(MAX_IN_FLIGHT),
            ring_wake,
            fd: sock.fd(),
            cfg,
            session,
            limits,
            writethrough: cfg.image.cache_mode() == quring::image::CacheMode::Writethrough,
            rx: vec![0u8; RX_CAP].into_boxed_slice(),
            rs: 0,
            re: 0,
            state: Rx::Header,
            input_closed: false,
            tx: VecDeque::new(),
            tx_bytes: 0,
            tx_dead: false,
            tx_progress: Instant::now(),
            readable: true,
            writable: true,
            engine_in_flight: 0,
            in_flight_bytes: 0,
            pool: Pool::default(),
            completions: Vec::with_capacity(MAX_IN_FLIGHT),
            iov: Vec::with_capacity(2 * TX_BATCH),
            summary: Summary::default(),
        }
    }

    /// Room for another request?
    fn room(&self) -> bool {
        self.pending.len() < MAX_IN_FLIGHT && self.in_flight_bytes < MAX_IN_FLIGHT_BYTES && self.tx_bytes < MAX_TX_BYTES
    }

    fn close_input(&mut self, why: impl Into<String>) {
        if self.input_closed {
            return;
        }
        self.input_closed = true;
        if self.summary.end.is_empty() {
            self.summary.end = why.into();
        }
        // A half-received WRITE never reached the engine: forget it.
        if let Rx::Payload { key, .. } = self.state {
            let p = self.pending.remove(key);
            self.in_flight_bytes -= p.buf.as_ref().map_or(0, |b| b.len());
            self.recycle(p.buf);
        }
        self.state = Rx::Header;
    }

    fn run(&mut self) {
        loop {
            let mut progress = false;
            if !self.input_closed && self.cfg.stop.load(Ordering::Acquire) {
                self.close_input("server shutting down");
            }
            // 1. Completions the last enter posted (no system call of its own; SQEs that
            //    their handling queues are submitted at once).
            if self.engine_in_flight > 0 {
                self.completions.clear();
                if let Err(e) = self.queue.reap_posted(&mut self.completions) {
                    self.summary.end = format!("engine: {e}");
                    return;
                }
                if !self.completions.is_empty() {
                    progress = true;
                    let done = std::mem::take(&mut self.completions);
                    for c in &done {
                        self.engine_in_flight -= 1;
                        self.completed(c.user_data as usize, c.result);
                    }
                    self.completions = done;
                }
            }
            while let Some(d) = self.worker.as_mut().and_then(|w| w.try_recv()) {
                progress = true;
                self.worker_done(d);
            }
            // 2. Receive and start requests (queued on the ring, submitted in step 4).
            if !self.input_closed && self.readable && self.room() {
                match self.receive() {
                    Ok(0) => self.close_input("client closed the connection"),
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                    Err(e) => self.close_input(format!("receive: {e}")),
                }
            }
            if !self.input_closed {
                progress |= self.parse();
            }
            // 3. Send.
            if !self.tx.is_empty() && self.writable {
                progress |= self.send();
            }
            if self.tx_dead && !self.tx.is_empty() {
                self.drop_replies();
            }
            if self.input_closed && self.pending.is_empty() && self.tx.is_empty() {
                return;
            }
            if !self.tx.is_empty() {
                let limit = if self.cfg.stop.load(Ordering::Acquire) { TX_STALL_STOPPING } else { TX_STALL };
                if self.tx_progress.elapsed() > limit {
                    self.close_input(format!("the client read no reply for {} s", limit.as_secs()));
                    self.tx_dead = true;
                    continue;
                }
            }
            // 4. Submit and go round again, or submit and wait in the same system call when
            //    the batch is all there is to wait for.
            let r = if progress && !self.batch_wait_due() { self.queue.commit() } else { self.wait() };
            if let Err(e) = r {
                self.summary.end = format!("engine: {e}");
                return;
            }
        }
    }

    /// Nothing to send and nothing unread on the socket (the last receive drained it), the
    /// client waits for replies: wait in the ring for every request in flight (at most
    /// BATCH_WAIT), so that one wake-up and one sendmsg serve the batch instead of one per
    /// completion. The socket is not watched meanwhile.
    fn batch_wait_due(&mut self) -> bool {
        self.engine_in_flight > 0
            && self.tx.is_empty()
            && !self.readable
            && self.worker.as_ref().is_none_or(|w| w.busy == 0)
            && self.queue.poll_hint().is_none()
            && !self.input_closed
            // A request that finished without a CQE would keep the wait to its timeout.
            && self.queue.finished() == 0
    }

    /// Submits what is queued and sleeps until something happens: in the ring for the whole
    /// batch (see [`Conn::batch_wait_due`]), else in `ppoll`.
    fn wait(&mut self) -> quring::Result<()> {
        if self.batch_wait_due() {
            self.queue.submit_and_wait(self.engine_in_flight, BATCH_WAIT)?;
            // The socket may have become readable meanwhile: try it next time round. The
            // completions also signalled `ring_wake`: it is drained before the next ppoll.
            self.readable = true;
            return Ok(());
        }
        self.queue.commit()?;
        let mut sock_ev: libc::c_short = 0;
        if !self.input_closed && self.room() {
            sock_ev |= libc::POLLIN;
        }
        if !self.tx.is_empty() {
            sock_ev |= libc::POLLOUT;
        }
        let mut fds = [sock::pollfd(self.fd, sock_ev), sock::pollfd(-1, 0), sock::pollfd(-1, 0), sock::pollfd(-1, 0)];
        let mut timeout = None;
        if self.engine_in_flight > 0 {
            match &self.ring_wake {
                Some(e) => {
                    // Completions reaped since the last ppoll left it signalled: reset it,
                    // then look at the ring (the kernel raises the ring's TASKRUN flag
                    // before it signals the eventfd, so nothing signalled before the
                    // drain goes unseen; anything after it wakes the ppoll).
                    e.drain();
                    if self.queue.events_waiting() {
                        return Ok(());
                    }
                    fds[1] = sock::pollfd(e.fd(), libc::POLLIN)
                }
                None => timeout = Some(Duration::from_micros(200)),
            }
            if let Some(h) = self.queue.poll_hint() {
                timeout = Some(timeout.map_or(h, |t: Duration| t.min(h)));
            }
        }
        if let Some(w) = &self.worker
            && w.busy > 0
        {
            fds[2] = sock::pollfd(w.wake.fd(), libc::POLLIN);
        }
        if !self.input_closed {
            fds[3] = sock::pollfd(self.cfg.stop_fd, libc::POLLIN);
        }
        if !self.tx.is_empty() {
            let t = Duration::from_secs(1);
            timeout = Some(timeout.map_or(t, |x| x.min(t)));
        }
        if sock::poll(&mut fds, timeout).is_err() {
            // Only EINVAL/ENOMEM: nothing to wait on this time round.
            std::thread::sleep(Duration::from_millis(1));
            return Ok(());
        }
        let rev = fds[0].revents;
        if rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.readable = true;
        }
        if rev & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0 {
            self.writable = true;
        }
        if fds[2].revents != 0
            && let Some(w) = &self.worker
        {
            w.wake.drain();
        }
        Ok(())
    }

    /// One receive system call. `Ok(0)`: end of stream.
    fn receive(&mut self) -> io::Result<usize> {
        if let Rx::Payload { key, got } = self.state
            && self.rs == self.re
        {
            // The payload's remainder straight into its aligned buffer; whatever follows
            // into the receive buffer.
            self.rs = 0;
            self.re = 0;
            let buf = self.pending[key].buf.as_mut().expect("a write has a buffer");
            let need = buf.len() - got;
            let n = recv2(self.fd, &mut buf[got..], &mut self.rx[..])?;
            if n == 0 {
                return Ok(0);
            }
            if n < need + self.rx.len() {
                // A stream socket fills the buffers while it has data: it is drained.
                self.readable = false;
            }
            let into = n.min(need);
            self.re = n - into;
            if got + into == buf.len() {
                self.state = Rx::Header;
                self.start_write(key);
            } else {
                self.state = Rx::Payload { key, got: got + into };
            }
            return Ok(n);
        }
        if self.rs == self.re {
            self.rs = 0;
            self.re = 0;
        } else if self.rx.len() - self.re < REQUEST_LEN {
            self.rx.copy_within(self.rs..self.re, 0);
            self.re -= self.rs;
            self.rs = 0;
        }
        let want = self.rx.len() - self.re;
        let n = recv(self.fd, &mut self.rx[self.re..])?;
        if n < want {
            // Drained (see above): the next wait need not try it first.
            self.readable = false;
        }
        self.re += n;
        Ok(n)
    }

    /// Starts every complete request in the receive buffer (while there is room). Returns
    /// whether anything was consumed.
    fn parse(&mut self) -> bool {
        let start = self.rs;
        loop {
            let avail = self.re - self.rs;
            match self.state {
                Rx::Header => {
                    if avail < REQUEST_LEN || !self.room() || self.input_closed {
                        break;
                    }
                    let h = RequestHeader::decode(self.rx[self.rs..self.rs + REQUEST_LEN].try_into().unwrap());
                    self.rs += REQUEST_LEN;
                    self.request(h);
                }
                Rx::Payload { key, got } => {
                    if avail == 0 {
                        break;
                    }
                    let buf = self.pending[key].buf.as_mut().expect("a write has a buffer");
                    let n = avail.min(buf.len() - got);
                    buf[got..got + n].copy_from_slice(&self.rx[self.rs..self.rs + n]);
                    self.rs += n;
                    if got + n == buf.len() {
                        self.state = Rx::Header;
                        self.start_write(key);
                    } else {
                        self.state = Rx::Payload { key, got: got + n };
                        break;
                    }
                }
                Rx::Skip { left } => {
                    if avail == 0 {
                        break;
                    }
                    let n = (avail as u64).min(left);
                    self.rs += n as usize;
                    self.state = if n == left { Rx::Header } else { Rx::Skip { left: left - n } };
                }
            }
        }
        self.rs != start
    }

    /// Handles one request header.
    fn request(&mut self, h: RequestHeader) {
        self.summary.requests += 1;
        match classify(&h, &self.limits) {
            Verdict::BadMagic => {
                self.close_input(format!("bad request magic {:#010x}: hanging up", h.magic));
            }
            Verdict::Disc => self.close_input("client disconnected (NBD_CMD_DISC)"),
            Verdict::Fail { errno, why } => {
                self.reply_error(h.cookie, errno, why);
                if h.payload_len() > 0 {
                    self.state = Rx::Skip { left: h.payload_len() as u64 };
                }
            }
            Verdict::Run(cmd) => self.start(h.cookie, cmd),
        }
    }

    fn add(&mut self, cookie: u64, kind: Kind, offset: u64, buf: Option<AlignedBuf>, fua: bool) -> usize {
        self.in_flight_bytes += buf.as_ref().map_or(0, |b| b.len());
        let fua = fua && !self.writethrough;
        self.pending.insert(Pending { cookie, kind, offset, buf, fua, flushing: false })
    }

    fn start(&mut self, cookie: u64, cmd: Cmd) {
        match cmd {
            Cmd::Read { offset, len } => {
                self.summary.reads += 1;
                if len == 0 {
                    self.reply_ok(cookie, true);
                    return;
                }
                let mut buf = self.pool.get(len as usize);
                let ptr = buf.as_mut_ptr();
                let key = self.add(cookie, Kind::Read, offset, Some(buf), false);
                self.submit(key, Op::Read { offset, buf: ptr, len: len as usize });
            }
            Cmd::Write { offset, len, fua } => {
                self.summary.writes += 1;
                if len == 0 {
                    self.reply_ok(cookie, false);
                    return;
                }
                let buf = self.pool.get(len as usize);
                let key = self.add(cookie, Kind::Write, offset, Some(buf), fua);
                self.state = Rx::Payload { key, got: 0 };
            }
            Cmd::Flush => {
                self.summary.flushes += 1;
                let key = self.add(cookie, Kind::Flush, 0, None, false);
                self.submit(key, Op::Flush);
            }
            Cmd::Trim { offset, len, fua } => {
                self.summary.trims += 1;
                // A hint: ignored with --discard=ignore, shrunk to whole sectors otherwise.
                let a = offset.div_ceil(512) * 512;
                let b = (offset + len as u64) / 512 * 512;
                if !self.cfg.zero.discards() || a >= b {
                    self.reply_ok(cookie, false);
                    return;
                }
                let key = self.add(cookie, Kind::Trim, offset, None, fua);
                self.submit(key, Op::Discard { offset: a, len: b - a });
            }
            Cmd::WriteZeroes { offset, len, fua, no_hole, fast } => {
                self.summary.write_zeroes += 1;
                if fast && !self.fast_zero_possible(offset, len as u64) {
                    self.reply_error(cookie, ENOTSUP, "this range cannot be zeroed faster than written");
                    return;
                }
                if len == 0 {
                    self.reply_ok(cookie, false);
                    return;
                }
                let unmap = self.cfg.zero.zero_unmap(!no_hole);
                let key = self.add(cookie, Kind::Zero, offset, None, fua);
                self.submit(key, Op::WriteZeroes { offset, len: len as u64, unmap });
            }
            Cmd::Cache { offset, len } => {
                self.summary.caches += 1;
                let key = self.add(cookie, Kind::Cache, offset, None, false);
                self.hand_to_worker(key, Job::Cache { key, offset, len });
            }
            Cmd::BlockStatus { offset, len, req_one } => {
                self.summary.block_status += 1;
                let key = self.add(cookie, Kind::Status, offset, None, false);
                let (base, bitmaps) = (self.session.base_allocation, self.session.bitmaps);
                self.hand_to_worker(key, Job::Status { key, offset, len, req_one, base, bitmaps });
            }
        }
    }

    /// Whether a write-zeroes of `[offset, offset+len)` changes only metadata: a v3 image
    /// (zero flag) and a range of whole clusters (subclusters with extended L2; the end of
    /// the disk counts as a boundary). Otherwise FAST_ZERO gets ENOTSUP before anything is
    /// touched, as the protocol asks.
    fn fast_zero_possible(&self, offset: u64, len: u64) -> bool {
        let img = &self.cfg.image;
        let g = img.geometry();
        let gran = if g.extended_l2 { g.subcluster_size() } else { g.cluster_size() };
        let end = offset + len;
        img.header().version >= 3 && offset.is_multiple_of(gran) && (end.is_multiple_of(gran) || end == img.size())
    }

    fn hand_to_worker(&mut self, key: usize, job: Job) {
        if self.worker.is_none() {
            match Worker::start(self.cfg.image.clone(), self.cfg.bitmaps.clone(), "quring-nbd-status".into()) {
                Ok(w) => self.worker = Some(w),
                Err(e) => {
                    self.finish(key, -libc::EIO, Some(format!("cannot start the block status thread: {e}")));
                    return;
                }
            }
        }
        self.worker.as_mut().expect("started above").send(job);
    }

    /// The payload of WRITE `key` is complete: hand it to the engine.
    fn start_write(&mut self, key: usize) {
        let p = &mut self.pending[key];
        let buf = p.buf.as_mut().expect("a write has a buffer");
        let (offset, len) = (p.offset, buf.len());
        self.summary.write_bytes += len as u64;
        let op = match self.cfg.zero.detected_zero(|| is_zero(buf)) {
            Some(unmap) => Op::WriteZeroes { offset, len: len as u64, unmap },
            None => Op::Write { offset, buf: buf.as_ptr(), len },
        };
        self.submit(key, op);
    }

    fn submit(&mut self, key: usize, op: Op) {
        // SAFETY: the only buffers are `pending[key].buf`, which stays in the slab, untouched
        // and unmoved (the AlignedBuf's heap block), until this request's completion is
        // reaped; `Conn` drops the queue (which waits for every SQE) before the slab.
        match unsafe { self.queue.submit(Request { op, user_data: key as u64 }) } {
            Ok(()) => self.engine_in_flight += 1,
            Err(e) => self.finish(key, -e.raw_os_error(), Some(e.to_string())),
        }
    }

    fn completed(&mut self, key: usize, result: i32) {
        let p = &mut self.pending[key];
        if result == 0 && p.fua && !p.flushing {
            p.flushing = true;
            self.submit(key, Op::Flush);
            return;
        }
        let detail = if result != 0 { self.queue.error_detail(key as u64).map(|e| e.to_string()) } else { None };
        self.finish(key, result, detail);
    }

    fn worker_done(&mut self, d: Done) {
        let p = self.pending.remove(d.key);
        match d.result {
            Ok(chunks) if p.kind == Kind::Status => {
                let last = chunks.len().saturating_sub(1);
                for (i, (ctx, ext)) in chunks.iter().enumerate() {
                    self.push(Out::bytes(block_status_chunk(p.cookie, *ctx, ext, i == last)));
                }
            }
            Ok(_) => self.reply_ok(p.cookie, false),
            Err((errno, msg)) => self.reply_error(p.cookie, nbd_errno(errno), &msg),
        }
    }

    /// Answers request `key` (result 0 or -errno) and forgets it.
    fn finish(&mut self, key: usize, result: i32, detail: Option<String>) {
        let mut p = self.pending.remove(key);
        self.in_flight_bytes -= p.buf.as_ref().map_or(0, |b| b.len());
        if result == 0 {
            if p.kind == Kind::Read
                && let Some(buf) = p.buf.take()
            {
                self.summary.read_bytes += buf.len() as u64;
                let out = if self.session.structured {
                    Out::head(&offset_data_header(p.cookie, p.offset, buf.len() as u32), Body::Buf(buf))
                } else {
                    Out::head(&simple_reply(p.cookie, 0), Body::Buf(buf))
                };
                self.push(out);
                return;
            }
            self.reply_ok(p.cookie, false);
        } else {
            let errno = -result;
            let msg = detail.unwrap_or_else(|| io::Error::from_raw_os_error(errno).to_string());
            self.reply_error(p.cookie, nbd_errno(errno), &msg);
        }
        self.recycle(p.buf.take());
    }

    fn recycle(&mut self, buf: Option<AlignedBuf>) {
        if let Some(b) = buf {
            self.pool.put(b);
        }
    }

    /// A successful reply without data (`read`: an empty READ, which needs a structured
    /// reply when those are on).
    fn reply_ok(&mut self, cookie: u64, read: bool) {
        if read && self.session.structured {
            self.push(Out::head(&chunk_header(REPLY_FLAG_DONE, CHUNK_NONE, cookie, 0), Body::None));
        } else {
            self.push(Out::head(&simple_reply(cookie, 0), Body::None));
        }
    }

    /// An error reply: structured (with the message) when negotiated.
    fn reply_error(&mut self, cookie: u64, errno: u32, msg: &str) {
        self.summary.errors += 1;
        if self.session.structured {
            self.push(Out::bytes(error_chunk(cookie, errno, msg)));
        } else {
            self.push(Out::head(&simple_reply(cookie, errno), Body::None));
        }
    }

    fn push(&mut self, out: Out) {
        if self.tx_dead {
            if let Body::Buf(b) = out.body {
                self.pool.put(b);
            }
            return;
        }
        if self.tx.is_empty() {
            self.tx_progress = Instant::now();
        }
        self.tx_bytes += out.len();
        self.tx.push_back(out);
    }

    fn drop_replies(&mut self) {
        while let Some(o) = self.tx.pop_front() {
            if let Body::Buf(b) = o.body {
                self.pool.put(b);
            }
        }
        self.tx_bytes = 0;
    }

    /// Sends queued replies until the socket would block. Returns whether bytes went out.
    fn send(&mut self) -> bool {
        let mut any = false;
        while !self.tx.is_empty() {
            self.iov.clear();
            for (i, o) in self.tx.iter().take(TX_BATCH).enumerate() {
                let skip = if i == 0 { o.sent } else { 0 };
                let hl = o.head_len as usize;
                if skip < hl {
                    self.iov.push(libc::iovec { iov_base: o.head[skip..hl].as_ptr() as *mut _, iov_len: hl - skip });
                }
                let body = o.body();
                let bskip = skip.saturating_sub(hl);
                if body.len() > bskip {
                    self.iov
                        .push(libc::iovec { iov_base: body[bskip..].as_ptr() as *mut _, iov_len: body.len() - bskip });
                }
            }
            // SAFETY: the iovecs point into replies held by `self.tx`, unchanged until the
            // call returns.
            match unsafe { sendv(self.fd, &self.iov) } {
                Ok(mut n) => {
                    any = true;
                    self.tx_progress = Instant::now();
                    self.tx_bytes -= n;
                    while n > 0 {
                        let o = self.tx.front_mut().expect("bytes sent belong to queued replies");
                        let left = o.len() - o.sent;
                        if n >= left {
                            n -= left;
                            if let Some(Out { body: Body::Buf(b), .. }) = self.tx.pop_front() {
                                self.pool.put(b);
                            }
                        } else {
                            o.sent += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    break;
                }
                Err(e) => {
                    self.close_input(format!("send: {e}"));
                    self.tx_dead = true;
                    break;
                }
            }
        }
        any
    }
}

impl Out {
    fn head(h: &[u8], body: Body) -> Out {
        let mut head = [0u8; CHUNK_HEADER_LEN + 8];
        head[..h.len()].copy_from_slice(h);
        Out { head, head_len: h.len() as u8, body, sent: 0 }
    }
    fn bytes(v: Vec<u8>) -> Out {
        Out { head: [0u8; CHUNK_HEADER_LEN + 8], head_len: 0, body: Body::Bytes(v), sent: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_buffers() {
        let mut p = Pool::default();
        let b = p.get(4096);
        let ptr = b.as_ptr();
        p.put(b);
        let b = p.get(4096);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 4096);
        let big = p.get(1 << 20);
        assert_eq!(big.len(), 1 << 20);
        p.put(b);
        assert_ne!(p.get(1 << 20).as_ptr(), ptr, "a 4 KiB buffer is not handed out for 1 MiB");
    }
}
