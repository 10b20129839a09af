//! Test-side NBD: a `quring serve --nbd` process harness and a small blocking NBD client
//! written from the protocol specification (not from the server's code), strict about what
//! it receives: every reply is checked for the protocol's framing, a known cookie, a known
//! chunk type and an error value the protocol allows.
#![allow(dead_code)]

use crate::common::*;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 16;

pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;
/// Error values the protocol defines.
pub const NBD_ERRNOS: [u32; 8] = [1, 5, 12, 22, 28, 75, 95, 108];

pub const MAX_PAYLOAD: u32 = 32 << 20;

// ---------------------------------------------------------------------------------------------
// The server process

/// How the server listens.
#[derive(Clone, Debug)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(u16),
}

impl Addr {
    /// The NBD URI qemu and libnbd take.
    pub fn uri(&self) -> String {
        match self {
            Addr::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            Addr::Tcp(port) => format!("nbd://127.0.0.1:{port}/"),
        }
    }
}

/// A free loopback TCP port (bound and released; the server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `quring serve --nbd`.
pub struct Server {
    pub child: Child,
    pub addr: Addr,
    pub log: PathBuf,
    pub pid_file: PathBuf,
}

impl Server {
    /// Starts the server on `img` (with `--persistent` and a pid file) and waits until it
    /// listens. `tcp`: loopback TCP on a free port, else a Unix socket in `dir`.
    pub fn start(dir: &Path, img: &Path, tcp: bool, extra: &[&str]) -> Server {
        Server::start_env(dir, img, tcp, extra, &[])
    }

    /// [`Server::start`] with extra environment variables for the server.
    pub fn start_env(dir: &Path, img: &Path, tcp: bool, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let tag =
            format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
        let pid_file = dir.join(format!("nbd-{tag}.pid"));
        let log = dir.join(format!("nbd-{tag}.log"));
        let addr = if tcp { Addr::Tcp(free_port()) } else { Addr::Unix(dir.join(format!("nbd-{tag}.sock"))) };
        let mut args: Vec<String> =
            vec!["serve".into(), "--nbd".into(), "-t".into(), "--pid-file".into(), s(&pid_file)];
        match &addr {
            Addr::Unix(p) => args.extend(["-k".into(), s(p)]),
            Addr::Tcp(port) => args.extend(["-b".into(), "127.0.0.1".into(), "-p".into(), port.to_string()]),
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(s(img));
        let child = Command::new(quring_bin())
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn quring serve --nbd");
        let mut srv = Server { child, addr, log, pid_file };
        let start = Instant::now();
        while !srv.pid_file.exists() {
            if let Some(st) = srv.child.try_wait().unwrap() {
                panic!("quring serve --nbd exited early ({st}): {}\n  args: {args:?}", srv.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "quring serve --nbd wrote no pid file: {}",
                srv.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        srv
    }

    pub fn uri(&self) -> String {
        self.addr.uri()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then waits (at most `timeout`) for the exit. Returns the exit code (None:
    /// killed by a signal) and the log.
    pub fn stop(mut self, timeout: Duration) -> (Option<i32>, String) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.code(), self.log_text());
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("quring serve --nbd did not exit within {timeout:?} of SIGTERM: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the server and requires exit code 0 and no leftover pid file or socket.
    #[track_caller]
    pub fn stop_ok(self) -> String {
        let (pid, sock) = (self.pid_file.clone(), self.addr.clone());
        let (code, log) = self.stop(Duration::from_secs(60));
        assert_eq!(code, Some(0), "quring serve --nbd exit code:\n{log}");
        assert!(!pid.exists(), "pid file left behind");
        if let Addr::Unix(p) = sock {
            assert!(!p.exists(), "socket file left behind");
        }
        log
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire helpers

pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub fn connect(addr: &Addr) -> io::Result<Stream> {
        let s = match addr {
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            Addr::Tcp(port) => {
                let t = TcpStream::connect(("127.0.0.1", *port))?;
                t.set_nodelay(true)?;
                Stream::Tcp(t)
            }
        };
        s.set_timeout(Some(Duration::from_secs(20)))?;
        Ok(s)
    }

    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Whether the peer has closed (reads EOF within `wait`).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let _ = self.set_timeout(Some(wait));
        let mut b = [0u8; 4096];
        let start = Instant::now();
        loop {
            match self.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
            if start.elapsed() > wait {
                return false;
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// One option frame as the client sends it.
pub fn option_frame(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// NBD_OPT_GO / NBD_OPT_INFO data.
pub fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT data.
pub fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

/// A request header.
pub fn request(ty: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// Reads one option reply: (option, type, data).
pub fn read_option_reply(s: &mut Stream) -> io::Result<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    if be64(&h[0..8]) != OPTION_REPLY_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad option reply magic {:#x}", be64(&h))));
    }
    let len = be32(&h[16..20]) as usize;
    if len > 1 << 20 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("option reply of {len} bytes")));
    }
    let mut d = vec![0u8; len];
    s.read_exact(&mut d)?;
    Ok((be32(&h[8..12]), be32(&h[12..16]), d))
}

/// Reads and checks the server's greeting, answers with `flags`.
pub fn greet(s: &mut Stream, flags: u32) -> io::Result<()> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if be64(&g[0..8]) != NBDMAGIC || be64(&g[8..16]) != IHAVEOPT || be16(&g[16..18]) & 1 == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad greeting"));
    }
    s.write_all(&flags.to_be_bytes())
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

// ---------------------------------------------------------------------------------------------
// Client

/// What the client negotiates.
#[derive(Clone, Copy, Debug)]
pub struct Want {
    pub structured: bool,
    pub meta: bool,
    /// Use NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO.
    pub export_name: bool,
}

impl Default for Want {
    fn default() -> Self {
        Want { structured: true, meta: true, export_name: false }
    }
}

/// A finished reply.
#[derive(Debug, Default)]
pub struct Reply {
    pub cookie: u64,
    /// 0 or an NBD error.
    pub error: u32,
    /// READ data (holes filled with zeros).
    pub data: Vec<u8>,
    /// BLOCK_STATUS extents.
    pub extents: Vec<(u32, u32)>,
    pub message: String,
}

/// A connected client in transmission phase.
pub struct Client {
    pub s: Stream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub meta: Option<u32>,
    /// Cookies sent and not answered: (command, offset, length).
    pub outstanding: HashMap<u64, (u16, u64, u32)>,
    next_cookie: u64,
}

impl Client {
    /// Connects and negotiates.
    pub fn connect(addr: &Addr, want: Want) -> io::Result<Client> {
        let mut s = Stream::connect(addr)?;
        greet(&mut s, 3)?;
        let mut structured = false;
        let mut meta = None;
        if want.structured {
            s.write_all(&option_frame(OPT_STRUCTURED_REPLY, &[]))?;
            let (_, ty, _) = read_option_reply(&mut s)?;
            if ty != REP_ACK {
                return Err(bad(format!("structured replies refused: {ty:#x}")));
            }
            structured = true;
            if want.meta {
                s.write_all(&option_frame(OPT_SET_META_CONTEXT, &meta_data(b"", &[b"base:allocation"])))?;
                loop {
                    let (_, ty, d) = read_option_reply(&mut s)?;
                    match ty {
                        REP_META_CONTEXT => {
                            if &d[4..] != b"base:allocation" {
                                return Err(bad(format!("unexpected context {:?}", String::from_utf8_lossy(&d[4..]))));
                            }
                            meta = Some(be32(&d));
                        }
                        REP_ACK => break,
                        t => return Err(bad(format!("SET_META_CONTEXT reply {t:#x}"))),
                    }
                }
            }
        }
        let (size, flags);
        if want.export_name {
            s.write_all(&option_frame(OPT_EXPORT_NAME, b""))?;
            let mut r = [0u8; 10];
            s.read_exact(&mut r)?;
            size = be64(&r);
            flags = be16(&r[8..]);
        } else {
            s.write_all(&option_frame(OPT_GO, &go_data(b"", &[3])))?;
            let mut got = None;
            loop {
                let (opt, ty, d) = read_option_reply(&mut s)?;
                if opt != OPT_GO {
                    return Err(bad(format!("reply for option {opt} to GO")));
                }
                match ty {
                    REP_INFO if be16(&d) == 0 => got = Some((be64(&d[2..10]), be16(&d[10..12]))),
                    REP_INFO => {}
                    REP_ACK => break,
                    t => return Err(bad(format!("GO refused: {t:#x} {}", String::from_utf8_lossy(&d)))),
                }
            }
            (size, flags) = got.ok_or_else(|| bad("no NBD_INFO_EXPORT".into()))?;
        }
        Ok(Client { s, size, flags, structured, meta, outstanding: HashMap::new(), next_cookie: 1 })
    }

    /// Sends a request (and payload) and remembers it; returns its cookie.
    pub fn send(&mut self, ty: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.send_with_cookie(cookie, ty, flags, offset, len, payload)?;
        Ok(cookie)
    }

    pub fn send_with_cookie(
        &mut self,
        cookie: u64,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = request(ty, flags, cookie, offset, len).to_vec();
        b.extend_from_slice(payload);
        if ty != CMD_DISC {
            self.outstanding.insert(cookie, (ty, offset, len));
        }
        self.s.write_all(&b)
    }

    /// Reads one complete reply (all its chunks) and checks it against the protocol.
    pub fn recv(&mut self) -> io::Result<Reply> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h)?;
                let (error, cookie) = (be32(&h), be64(&h[4..]));
                let (ty, _, len) = self
                    .outstanding
                    .remove(&cookie)
                    .ok_or_else(|| bad(format!("simple reply for unknown cookie {cookie}")))?;
                check_errno(error)?;
                if ty == CMD_READ && self.structured {
                    return Err(bad("simple reply to a READ with structured replies on".into()));
                }
                if ty == CMD_BLOCK_STATUS && error == 0 {
                    return Err(bad("simple success reply to BLOCK_STATUS".into()));
                }
                let mut data = Vec::new();
                if ty == CMD_READ && error == 0 {
                    data = vec![0u8; len as usize];
                    self.s.read_exact(&mut data)?;
                }
                Ok(Reply { cookie, error, data, ..Reply::default() })
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut reply = Reply::default();
                let mut first = true;
                let mut covered = 0u64;
                let mut magic = m;
                loop {
                    if !first {
                        self.s.read_exact(&mut magic)?;
                        if be32(&magic) != STRUCTURED_REPLY_MAGIC {
                            return Err(bad(format!("chunk magic {:#x} inside a structured reply", be32(&magic))));
                        }
                    }
                    let mut h = [0u8; 16];
                    self.s.read_exact(&mut h)?;
                    let (flags, ty, cookie, len) = (be16(&h), be16(&h[2..]), be64(&h[4..]), be32(&h[12..]));
                    if first {
                        reply.cookie = cookie;
                        first = false;
                    } else if cookie != reply.cookie {
                        return Err(bad("chunks of two replies interleaved without DONE".into()));
                    }
                    let &(cmd, roff, rlen) = self
                        .outstanding
                        .get(&cookie)
                        .ok_or_else(|| bad(format!("chunk for unknown cookie {cookie}")))?;
                    if len > MAX_PAYLOAD + 4096 {
                        return Err(bad(format!("chunk payload of {len} bytes")));
                    }
                    let mut p = vec![0u8; len as usize];
                    self.s.read_exact(&mut p)?;
                    match ty {
                        0 => {
                            if len != 0 || flags & 1 == 0 {
                                return Err(bad("NONE chunk with data or without DONE".into()));
                            }
                        }
                        1 | 2 => {
                            if cmd != CMD_READ || len < if ty == 1 { 9 } else { 12 } {
                                return Err(bad(format!("content chunk {ty} ({len} bytes) for command {cmd}")));
                            }
                            let off = be64(&p);
                            let n = if ty == 1 { len as u64 - 8 } else { be32(&p[8..]) as u64 };
                            if off < roff || off + n > roff + rlen as u64 {
                                return Err(bad(format!("content {off}+{n} outside the request {roff}+{rlen}")));
                            }
                            if reply.data.is_empty() {
                                reply.data = vec![0u8; rlen as usize];
                            }
                            if ty == 1 {
                                let at = (off - roff) as usize;
                                reply.data[at..at + n as usize].copy_from_slice(&p[8..]);
                            }
                            covered += n;
                        }
                        5 => {
                            if cmd != CMD_BLOCK_STATUS || len < 12 || (len - 4) % 8 != 0 {
                                return Err(bad(format!("block status chunk of {len} bytes for command {cmd}")));
                            }
                            if Some(be32(&p)) != self.meta {
                                return Err(bad("block status for a context never selected".into()));
                            }
                            for e in p[4..].chunks(8) {
                                let (l, f) = (be32(e), be32(&e[4..]));
                                if l == 0 {
                                    return Err(bad("zero-length extent".into()));
                                }
                                reply.extents.push((l, f));
                            }
                        }
                        t if t & 0x8000 != 0 => {
                            if len < 6 {
                                return Err(bad("error chunk shorter than 6 bytes".into()));
                            }
                            let (err, mlen) = (be32(&p), be16(&p[4..]) as usize);
                            if err == 0 || 6 + mlen > len as usize {
                                return Err(bad(format!("error chunk: error {err}, message {mlen} of {len} bytes")));
                            }
                            check_errno(err)?;
                            reply.error = err;
                            reply.message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
                        }
                        t => return Err(bad(format!("unknown chunk type {t}"))),
                    }
                    if flags & 1 != 0 {
                        break;
                    }
                }
                let (cmd, _, rlen) = self.outstanding.remove(&reply.cookie).expect("checked above");
                if reply.error == 0 && cmd == CMD_READ && covered != rlen as u64 {
                    return Err(bad(format!("read reply covers {covered} of {rlen} bytes")));
                }
                if reply.error == 0 && cmd == CMD_BLOCK_STATUS && reply.extents.is_empty() {
                    return Err(bad("block status reply without extents".into()));
                }
                Ok(reply)
            }
            x => Err(bad(format!("reply magic {x:#x}"))),
        }
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, ty: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<Reply> {
        let c = self.send(ty, flags, offset, len, payload)?;
        let r = self.recv()?;
        if r.cookie != c {
            return Err(bad(format!("reply for cookie {} while only {c} was outstanding", r.cookie)));
        }
        Ok(r)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let r = self.call(CMD_READ, 0, offset, len, &[])?;
        Ok(if r.error == 0 { Ok(r.data) } else { Err(r.error) })
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u32> {
        Ok(self.call(CMD_WRITE, flags, offset, data.len() as u32, data)?.error)
    }

    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0, &[]);
    }
}

fn check_errno(e: u32) -> io::Result<()> {
    if e == 0 || NBD_ERRNOS.contains(&e) { Ok(()) } else { Err(bad(format!("error value {e} is not an NBD error"))) }
}
