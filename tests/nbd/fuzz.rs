//! A protocol fuzzer for `quring serve --nbd`: clients that send random, invalid and mutated
//! handshakes and requests, drop connections at random points, and check every reply
//! against the protocol, while a well-behaved client writes and verifies its own region.
//!
//! What may change: the fuzzer replays the server's framing of every transmission byte it
//! sends ([`Model`]: 28-byte headers, a payload after each WRITE header whatever its
//! validity, nothing read after a bad magic or DISC), so it knows every range a WRITE, TRIM
//! or WRITE_ZEROES could have touched, and it never sends bytes that would make a request
//! touch the protected regions (the verifier's region and a guard region). Handshake
//! streams never contain the request magic, so nothing after a mutated handshake can be a
//! request. At the end the caller compares the image outside the touched ranges with its
//! original content.

use super::client::*;
use crate::common::Rng;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the fuzzer may write and what it must not touch.
#[derive(Clone, Debug)]
pub struct Layout {
    pub size: u64,
    /// Requests are aimed here (mutations may move them anywhere but `protected`).
    pub fuzz: (u64, u64),
    /// The verifier's region.
    pub verify: (u64, u64),
    /// Never written by anyone.
    pub guard: (u64, u64),
}

impl Layout {
    fn protected(&self, a: u64, b: u64) -> bool {
        [self.verify, self.guard].iter().any(|&(x, y)| a < y && x < b)
    }
}

/// A request as the server parses it from the stream.
#[derive(Clone, Copy, Debug)]
pub struct Parsed {
    pub ty: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// The server's framing of a transmission stream, replayed.
#[derive(Clone, Debug)]
pub struct Model {
    /// The export size: a request that does not fit is refused whole, so it touches nothing.
    size: u64,
    head: Vec<u8>,
    payload_left: u64,
    /// The server reads nothing more (bad magic, DISC).
    pub dead: bool,
    pub bad_magic: bool,
    /// Ranges a request in the stream could change: (start, end), end may exceed the size.
    pub touched: Vec<(u64, u64)>,
}

impl Model {
    pub fn new(size: u64) -> Model {
        Model { size, head: Vec::new(), payload_left: 0, dead: false, bad_magic: false, touched: Vec::new() }
    }

    /// Feeds bytes; returns the requests completed by them.
    pub fn feed(&mut self, mut b: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        while !b.is_empty() && !self.dead {
            if self.payload_left > 0 {
                let n = (b.len() as u64).min(self.payload_left) as usize;
                self.payload_left -= n as u64;
                b = &b[n..];
                continue;
            }
            let n = (28 - self.head.len()).min(b.len());
            self.head.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.head.len() < 28 {
                break;
            }
            let h = std::mem::take(&mut self.head);
            if be32(&h) != REQUEST_MAGIC {
                self.dead = true;
                self.bad_magic = true;
                break;
            }
            let p = Parsed { ty: be16(&h[6..]), cookie: be64(&h[8..]), offset: be64(&h[16..]), len: be32(&h[24..]) };
            if p.ty == CMD_DISC {
                self.dead = true;
                break;
            }
            let fits = p.offset.checked_add(p.len as u64).is_some_and(|e| e <= self.size);
            if matches!(p.ty, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) && p.len > 0 && fits {
                self.touched.push((p.offset, p.offset.saturating_add(p.len as u64)));
            }
            if p.ty == CMD_WRITE {
                self.payload_left = p.len as u64;
            }
            out.push(p);
        }
        out
    }

    fn touches_protected(&self, l: &Layout) -> bool {
        self.touched.iter().any(|&(a, b)| l.protected(a, b))
    }
}

/// What a reply must say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Ok,
    Err(u32),
    /// Some error.
    AnyErr,
    /// Anything the protocol allows (mutated requests).
    Any,
}

/// Counters of a run.
#[derive(Default, Debug)]
pub struct Stats {
    pub sessions: AtomicU64,
    pub handshake_sessions: AtomicU64,
    pub transmission_sessions: AtomicU64,
    pub drop_sessions: AtomicU64,
    pub requests: AtomicU64,
    pub mutated: AtomicU64,
    pub replies_checked: AtomicU64,
    pub error_replies: AtomicU64,
    pub server_hangups: AtomicU64,
    pub verifier_ops: AtomicU64,
}

impl Stats {
    pub fn line(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{} sessions ({} handshake, {} transmission, {} dropped), {} requests ({} mutated), {} replies checked \
             ({} errors), {} server hang-ups, {} verifier operations",
            g(&self.sessions),
            g(&self.handshake_sessions),
            g(&self.transmission_sessions),
            g(&self.drop_sessions),
            g(&self.requests),
            g(&self.mutated),
            g(&self.replies_checked),
            g(&self.error_replies),
            g(&self.server_hangups),
            g(&self.verifier_ops)
        )
    }
}

/// A fuzzing thread: sessions until `deadline`; returns the touched ranges or the failure.
pub fn fuzz_thread(
    addr: &Addr,
    l: &Layout,
    seed: u64,
    deadline: Instant,
    stats: &Stats,
) -> Result<Vec<(u64, u64)>, String> {
    let mut rng = Rng(seed);
    let mut touched = Vec::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        stats.sessions.fetch_add(1, Ordering::Relaxed);
        let kind = rng.below(10);
        let r = match kind {
            0..=2 => {
                stats.handshake_sessions.fetch_add(1, Ordering::Relaxed);
                handshake_session(addr, &mut rng)
            }
            3 => {
                stats.drop_sessions.fetch_add(1, Ordering::Relaxed);
                drop_session(addr, l, &mut rng, &mut touched)
            }
            _ => {
                stats.transmission_sessions.fetch_add(1, Ordering::Relaxed);
                transmission_session(addr, l, &mut rng, stats, &mut touched)
            }
        };
        r.map_err(|e| format!("seed {seed:#x}, session {n} (kind {kind}): {e}"))?;
    }
    Ok(touched)
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// Mutated handshakes: valid option sequences with bit flips, random bytes, bad lengths,
/// truncation; the stream never holds the request magic.
fn handshake_session(addr: &Addr, rng: &mut Rng) -> io::Result<()> {
    let mut s = Stream::connect(addr)?;
    let mut b: Vec<u8> = Vec::new();
    let cflags: u32 = if rng.percent(90) { 3 } else { rng.next() as u32 };
    b.extend_from_slice(&cflags.to_be_bytes());
    for _ in 0..rng.range(1, 8) {
        let f = match rng.below(10) {
            0 => option_frame(OPT_STRUCTURED_REPLY, &[]),
            1 => option_frame(OPT_SET_META_CONTEXT, &meta_data(b"", &[b"base:allocation", b"qemu:dirty-bitmap:x"])),
            2 => option_frame(OPT_LIST_META_CONTEXT, &meta_data(b"", &[])),
            3 => option_frame(OPT_LIST, &[]),
            4 => option_frame(OPT_INFO, &go_data(if rng.percent(50) { b"" } else { b"nope" }, &[0, 1, 2, 3])),
            5 => option_frame(rng.below(40) as u32, &random_bytes(rng, 32)),
            6 => option_frame(5, &[]),
            7 => option_frame(OPT_GO, &go_data(b"", &[3])),
            8 => option_frame(OPT_EXPORT_NAME, b""),
            _ => option_frame(OPT_ABORT, &[]),
        };
        b.extend_from_slice(&f);
    }
    for _ in 0..rng.range(1, 4) {
        if b.is_empty() {
            break;
        }
        let i = rng.below(b.len() as u64) as usize;
        match rng.below(5) {
            0 => b[i] ^= 1 << rng.below(8),
            1 => b[i] = rng.next() as u8,
            2 => b.truncate(i),
            3 => {
                let junk = random_bytes(rng, 16);
                b.splice(i..i, junk);
            }
            _ => {
                // A length field (bytes 12..16 of a frame) set to something odd.
                if i + 4 <= b.len() {
                    let v: u32 = [0, 1, 5, 4095, 65536, 65537, u32::MAX][rng.below(7) as usize];
                    b[i..i + 4].copy_from_slice(&v.to_be_bytes());
                }
            }
        }
    }
    scrub_request_magic(&mut b);
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if be64(&g) != NBDMAGIC || be64(&g[8..]) != IHAVEOPT {
        return Err(err("bad greeting"));
    }
    for chunk in b.chunks(rng.range(1, 64) as usize) {
        if s.write_all(chunk).is_err() {
            break;
        }
    }
    // Drain whatever comes back until the server closes or goes quiet.
    let _ = s.set_timeout(Some(Duration::from_millis(300)));
    let mut sink = [0u8; 4096];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

fn random_bytes(rng: &mut Rng, max: u64) -> Vec<u8> {
    (0..rng.range(1, max)).map(|_| rng.next() as u8).collect()
}

/// Breaks any occurrence of the request magic.
fn scrub_request_magic(b: &mut [u8]) {
    let m = REQUEST_MAGIC.to_be_bytes();
    for i in 0..b.len().saturating_sub(3) {
        if b[i..i + 4] == m {
            b[i] ^= 0x80;
        }
    }
}

/// Connections that go away at awkward moments: before the greeting is read, mid-option,
/// with requests and payloads in flight, with replies never read.
pub fn drop_session(addr: &Addr, l: &Layout, rng: &mut Rng, touched: &mut Vec<(u64, u64)>) -> io::Result<()> {
    match rng.below(5) {
        0 => {
            let _ = Stream::connect(addr)?;
        }
        1 => {
            let mut s = Stream::connect(addr)?;
            greet(&mut s, 3)?;
            s.write_all(&option_frame(OPT_GO, &go_data(b"", &[]))[..rng.range(1, 20) as usize])?;
        }
        _ => {
            let mut c =
                Client::connect(addr, Want { structured: rng.percent(50), meta: rng.percent(50), export_name: false })?;
            let mut model = Model::new(l.size);
            let mut bytes = Vec::new();
            for _ in 0..rng.range(1, 40) {
                let (ty, len) = if rng.percent(50) {
                    (CMD_WRITE, rng.range(1, 128) * 512)
                } else {
                    (CMD_READ, rng.range(1, 256) * 512)
                };
                let off = if ty == CMD_WRITE { write_offset(rng, l, len) } else { aligned_in(rng, l.fuzz, len) };
                bytes.extend_from_slice(&request(ty, 0, rng.next(), off, len as u32));
                if ty == CMD_WRITE {
                    bytes.extend(std::iter::repeat_n(rng.next() as u8, len as usize));
                }
            }
            if rng.percent(30) {
                bytes.extend_from_slice(&request(CMD_DISC, 0, 0, 0, 0));
            }
            // Cut the stream anywhere.
            let cut = rng.range(1, bytes.len() as u64) as usize;
            model.feed(&bytes[..cut]);
            assert!(!model.touches_protected(l), "drop session generated a protected write");
            touched.extend(model.touched.iter().copied());
            let _ = c.s.write_all(&bytes[..cut]);
        }
    }
    Ok(())
}

/// A sector-aligned offset for a write of `len` (<= 1 MiB) bytes: only in the first MiB
/// of every 2 MiB of the fuzz region, so that the other half is written by nothing but
/// mutations and must otherwise stay as it was.
fn write_offset(rng: &mut Rng, l: &Layout, len: u64) -> u64 {
    let stripes = (l.fuzz.1 - l.fuzz.0) / (2 << 20);
    let start = l.fuzz.0 + rng.below(stripes) * (2 << 20);
    aligned_in(rng, (start, start + (1 << 20)), len.min(1 << 20))
}

fn aligned_in(rng: &mut Rng, (a, b): (u64, u64), len: u64) -> u64 {
    let slots = (b - a - len.min(b - a)) / 512;
    a + rng.below(slots + 1) * 512
}

/// One generated request: bytes on the wire and what its reply must say.
struct Gen {
    bytes: Vec<u8>,
    expect: Expect,
    mutated: bool,
}

fn gen_request(rng: &mut Rng, l: &Layout, c: &Client, cookie: u64) -> Gen {
    let structured = c.structured;
    let meta = c.meta.is_some();
    let mut expect = Expect::Ok;
    let mut payload: Vec<u8> = Vec::new();
    let small = |rng: &mut Rng| rng.range(1, 128) * 512;
    let (ty, mut flags, off, len): (u16, u16, u64, u64) = match rng.below(24) {
        0..=4 => {
            let len = small(rng);
            let f = if structured && rng.percent(30) { FLAG_DF } else { 0 };
            (CMD_READ, f, aligned_in(rng, l.fuzz, len), len)
        }
        5..=9 => {
            let len = small(rng);
            payload = if rng.percent(20) { vec![0u8; len as usize] } else { random_bytes_n(rng, len as usize) };
            (CMD_WRITE, if rng.percent(20) { FLAG_FUA } else { 0 }, write_offset(rng, l, len), len)
        }
        10 => (CMD_FLUSH, 0, 0, 0),
        11 => {
            let len = rng.range(1, 1 << 20);
            let off = write_offset(rng, l, len) + rng.below(512).min((1 << 20) - len);
            (CMD_TRIM, if rng.percent(20) { FLAG_FUA } else { 0 }, off, len)
        }
        12 => {
            let len = (rng.range(1, 64) * 512 * if rng.percent(50) { 128 } else { 1 }).min(1 << 20);
            let mut f = 0;
            if rng.percent(40) {
                f |= FLAG_NO_HOLE;
            }
            if rng.percent(40) {
                f |= FLAG_FAST_ZERO;
                expect = Expect::Any; // fast, or ENOTSUP
            }
            (CMD_WRITE_ZEROES, f, write_offset(rng, l, len), len)
        }
        13 => (CMD_CACHE, 0, aligned_in(rng, l.fuzz, 1 << 20), 1 << 20),
        14 | 15 => {
            if !meta {
                expect = Expect::Err(EINVAL);
            }
            let len = rng.range(1, 4096) * 512;
            let off = aligned_in(rng, (0, l.size), len);
            (CMD_BLOCK_STATUS, if rng.percent(30) { FLAG_REQ_ONE } else { 0 }, off, len)
        }
        16 => {
            expect = Expect::Err(EINVAL);
            (rng.range(8, 0xffff) as u16, 0, 0, 512)
        }
        17 => {
            expect = Expect::Err(EINVAL);
            (CMD_READ, 1 << rng.range(5, 15), 0, 512)
        }
        18 => {
            // Past the end (or an offset+length that overflows).
            expect = Expect::AnyErr;
            let ty =
                [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE, CMD_BLOCK_STATUS][rng.below(6) as usize];
            if ty == CMD_BLOCK_STATUS && !meta {
                expect = Expect::Err(EINVAL);
            }
            let off = [l.size, l.size - 512, u64::MAX - 511, 1 << 62][rng.below(4) as usize];
            let len = 1024;
            if ty == CMD_WRITE {
                payload = vec![0xee; len as usize];
            }
            (ty, 0, off, len)
        }
        19 => {
            // Unaligned READ/WRITE/WRITE_ZEROES.
            expect = Expect::Err(EINVAL);
            let ty = [CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES][rng.below(3) as usize];
            let len = rng.range(1, 4096);
            let off = (l.fuzz.0 + rng.below(1 << 20)) | 1;
            if ty == CMD_WRITE {
                payload = vec![0x11; len as usize];
            }
            (ty, 0, off, len)
        }
        20 => {
            // Zero-length requests.
            let ty = [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES][rng.below(4) as usize];
            (ty, 0, write_offset(rng, l, 0), 0)
        }
        21 => {
            // Larger than the maximum payload.
            expect = Expect::Err(EINVAL);
            if rng.percent(90) {
                (CMD_READ, 0, 0, MAX_PAYLOAD as u64 + 512)
            } else {
                let len = MAX_PAYLOAD as u64 + 512;
                payload = vec![0x33; len as usize];
                (CMD_WRITE, 0, l.fuzz.0, len)
            }
        }
        22 => {
            expect = Expect::Err(EINVAL);
            if meta { (CMD_BLOCK_STATUS, 0, 0, 0) } else { (CMD_BLOCK_STATUS, 0, 0, 512) }
        }
        _ => {
            // Flags a command does not take.
            expect = Expect::Err(EINVAL);
            let (ty, f) =
                [(CMD_WRITE, FLAG_DF), (CMD_FLUSH, FLAG_REQ_ONE), (CMD_READ, FLAG_NO_HOLE), (CMD_TRIM, FLAG_FAST_ZERO)]
                    [rng.below(4) as usize];
            if ty == CMD_WRITE {
                payload = vec![0x22; 512];
            }
            (ty, f, write_offset(rng, l, 512), 512)
        }
    };
    if ty == CMD_READ && flags & FLAG_DF != 0 && !structured {
        flags &= !FLAG_DF;
    }
    let mut bytes = request(ty, flags, cookie, off, len as u32).to_vec();
    bytes.extend_from_slice(&payload);
    let mut mutated = false;
    if rng.percent(8) {
        // Flip bits in the header outside the cookie (the fuzzer must match replies).
        for _ in 0..rng.range(1, 3) {
            let byte = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27][rng.below(20) as usize];
            bytes[byte] ^= 1 << rng.below(8);
        }
        mutated = true;
        expect = Expect::Any;
    }
    Gen { bytes, expect, mutated }
}

fn random_bytes_n(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A negotiated connection sending batches of generated requests; replies are checked
/// against the protocol and the expectations. Ends with DISC, a drop mid-request, garbage,
/// or a plain close.
fn transmission_session(
    addr: &Addr,
    l: &Layout,
    rng: &mut Rng,
    st: &Stats,
    touched: &mut Vec<(u64, u64)>,
) -> io::Result<()> {
    let want = Want { structured: rng.percent(75), meta: rng.percent(75), export_name: rng.percent(15) };
    let mut c = Client::connect(addr, want).map_err(|e| err(format!("handshake ({want:?}): {e}")))?;
    if c.size != l.size {
        return Err(err(format!("export size {} instead of {}", c.size, l.size)));
    }
    let mut model = Model::new(l.size);
    let mut expect: HashMap<u64, Expect> = HashMap::new();
    let mut cookie = rng.next() >> 8;
    let batches = rng.range(1, 20);
    for batch in 0..batches {
        let n = rng.range(1, 16);
        let mut wire = Vec::new();
        for _ in 0..n {
            cookie += 1;
            // A mutation may aim at a protected range: generate again.
            let g = (0..10).map(|_| gen_request(rng, l, &c, cookie)).find(|g| {
                let mut t = model.clone();
                t.feed(&g.bytes);
                !t.touches_protected(l)
            });
            let Some(g) = g else { continue };
            if g.mutated {
                st.mutated.fetch_add(1, Ordering::Relaxed);
            }
            st.requests.fetch_add(1, Ordering::Relaxed);
            for p in model.feed(&g.bytes) {
                c.outstanding.insert(p.cookie, (p.ty, p.offset, p.len));
                expect.insert(p.cookie, if p.cookie == cookie { g.expect } else { Expect::Any });
            }
            wire.extend_from_slice(&g.bytes);
            if model.dead {
                break;
            }
        }
        // The session's end: garbage, a cut, or DISC in the last batch.
        let last = batch + 1 == batches;
        let mut cut = false;
        if last {
            match rng.below(6) {
                0 => {
                    let g = random_bytes(rng, 40);
                    let mut t = model.clone();
                    t.feed(&g);
                    if !t.touches_protected(l) {
                        for p in model.feed(&g) {
                            c.outstanding.insert(p.cookie, (p.ty, p.offset, p.len));
                            expect.insert(p.cookie, Expect::Any);
                        }
                        wire.extend_from_slice(&g);
                    }
                }
                1 => {
                    wire.extend_from_slice(&request(CMD_DISC, 0, 0, 0, 0));
                    model.feed(&request(CMD_DISC, 0, 0, 0, 0));
                }
                2 if !wire.is_empty() => {
                    // Drop mid-request: only a prefix goes out, replies are not read.
                    let at = rng.range(1, wire.len() as u64) as usize;
                    wire.truncate(at);
                    cut = true;
                }
                _ => {}
            }
        }
        // A mutated length may have turned what followed a WRITE header into its payload:
        // complete the payload (the server answers nothing before), or give up on a huge one.
        if !cut && model.payload_left > 0 {
            if model.payload_left <= 64 << 20 {
                let pad = vec![0u8; model.payload_left as usize];
                model.feed(&pad);
                wire.extend_from_slice(&pad);
            } else {
                cut = true;
            }
        }
        touched.append(&mut model.touched);
        if let Err(e) = c.s.write_all(&wire) {
            // After a bad magic or DISC the server stops reading and may close while the
            // rest is still on its way (TCP then resets).
            if model.dead {
                st.server_hangups.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            return Err(err(format!("sending {} bytes: {e}", wire.len())));
        }
        if cut {
            return Ok(());
        }
        // Replies: every parsed request gets one, unless the server hung up after a bad
        // magic (it may answer what it started first).
        while !c.outstanding.is_empty() {
            match c.recv() {
                Ok(r) => {
                    st.replies_checked.fetch_add(1, Ordering::Relaxed);
                    if r.error != 0 {
                        st.error_replies.fetch_add(1, Ordering::Relaxed);
                    }
                    let e = expect.remove(&r.cookie).unwrap_or(Expect::Any);
                    let ok = match e {
                        Expect::Ok => r.error == 0,
                        Expect::Err(x) => r.error == x,
                        Expect::AnyErr => r.error != 0,
                        Expect::Any => true,
                    };
                    if !ok {
                        return Err(err(format!(
                            "cookie {}: expected {e:?}, got error {} ({})",
                            r.cookie, r.error, r.message
                        )));
                    }
                }
                Err(e)
                    if model.bad_magic
                        && matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) =>
                {
                    st.server_hangups.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    return Err(err(format!(
                        "waiting for {} replies (bad magic sent: {}, DISC sent: {}): {e}",
                        c.outstanding.len(),
                        model.bad_magic,
                        model.dead
                    )));
                }
            }
        }
        if model.dead {
            if model.bad_magic {
                // The server must hang up now.
                if !c.s.closed_within(Duration::from_secs(20)) {
                    return Err(err("the server kept a connection open after a bad request magic"));
                }
                st.server_hangups.fetch_add(1, Ordering::Relaxed);
            } else if !c.s.closed_within(Duration::from_secs(20)) {
                return Err(err("the server kept a connection open after NBD_CMD_DISC"));
            }
            return Ok(());
        }
    }
    Ok(())
}

/// The well-behaved client: writes random data into its region, reads it back, flushes,
/// asks for block status; keeps a shadow of the region. Runs until `stop`.
pub fn verifier(
    addr: &Addr,
    l: &Layout,
    seed: u64,
    stop: &AtomicBool,
    st: &Stats,
    shadow: &Mutex<Vec<u8>>,
) -> Result<(), String> {
    let mut rng = Rng(seed);
    let mut c = Client::connect(addr, Want::default()).map_err(|e| format!("verifier connect: {e}"))?;
    let (a, b) = l.verify;
    let op = |c: &mut Client, rng: &mut Rng| -> io::Result<()> {
        let len = rng.range(1, 64) * 512;
        let off = aligned_in(rng, (a, b), len);
        let at = (off - a) as usize;
        match rng.below(8) {
            0..=3 => {
                let data = random_bytes_n(rng, len as usize);
                let e = c.write(off, &data, if rng.percent(20) { FLAG_FUA } else { 0 })?;
                if e != 0 {
                    return Err(err(format!("verifier write at {off}: error {e}")));
                }
                shadow.lock().unwrap()[at..at + len as usize].copy_from_slice(&data);
            }
            4..=6 => {
                let got = c.read(off, len as u32)?.map_err(|e| err(format!("verifier read at {off}: error {e}")))?;
                let want = &shadow.lock().unwrap()[at..at + len as usize];
                if got != want {
                    let i = got.iter().zip(want).position(|(x, y)| x != y).unwrap();
                    return Err(err(format!("verifier read at {off}+{len}: byte {} differs", off + i as u64)));
                }
            }
            7 if rng.percent(50) => {
                let r = c.call(CMD_BLOCK_STATUS, 0, a, (b - a) as u32, &[])?;
                if r.error != 0 || r.extents.iter().map(|e| e.0 as u64).sum::<u64>() != b - a {
                    return Err(err(format!("verifier block status: error {}, extents {:?}", r.error, r.extents)));
                }
            }
            _ => {
                let r = c.call(CMD_FLUSH, 0, 0, 0, &[])?;
                if r.error != 0 {
                    return Err(err(format!("verifier flush: error {}", r.error)));
                }
            }
        }
        Ok(())
    };
    while !stop.load(Ordering::Acquire) {
        op(&mut c, &mut rng).map_err(|e| format!("verifier (seed {seed:#x}): {e}"))?;
        st.verifier_ops.fetch_add(1, Ordering::Relaxed);
    }
    c.disconnect();
    Ok(())
}

/// Merges ranges into sorted disjoint ones clipped to `size`.
pub fn merge(mut v: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    v.retain(|&(a, _)| a < size);
    for r in v.iter_mut() {
        r.1 = r.1.min(size);
    }
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// What a fuzz run leaves: the merged ranges requests could have written, the verifier's
/// shadow of its region, and the counters.
pub struct Outcome {
    pub touched: Vec<(u64, u64)>,
    pub shadow: Vec<u8>,
    pub stats: String,
}

/// Runs `threads` fuzzers and one verifier for `dur`.
pub fn run(
    addr: &Addr,
    l: &Layout,
    seed: u64,
    dur: Duration,
    threads: u64,
    initial_verify: Vec<u8>,
) -> Result<Outcome, String> {
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let shadow = Arc::new(Mutex::new(initial_verify));
    let deadline = Instant::now() + dur;
    let v = {
        let (addr, l, stop, st, sh) = (addr.clone(), l.clone(), stop.clone(), stats.clone(), shadow.clone());
        std::thread::spawn(move || verifier(&addr, &l, seed ^ 0xfeed, &stop, &st, &sh))
    };
    let fz: Vec<_> = (0..threads)
        .map(|t| {
            let (addr, l, st) = (addr.clone(), l.clone(), stats.clone());
            std::thread::spawn(move || fuzz_thread(&addr, &l, seed.wrapping_add(t * 0x9e37_79b9), deadline, &st))
        })
        .collect();
    let mut touched = Vec::new();
    let mut failure = None;
    for t in fz {
        match t.join() {
            Ok(Ok(v)) => touched.extend(v),
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some("a fuzz thread panicked".into())),
        }
    }
    stop.store(true, Ordering::Release);
    match v.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failure = failure.or(Some(e)),
        Err(_) => failure = failure.or(Some("the verifier panicked".into())),
    }
    if let Some(f) = failure {
        return Err(format!("{f}\n  so far: {}", stats.line()));
    }
    let sh = shadow.lock().unwrap().clone();
    Ok(Outcome { touched: merge(touched, l.size), shadow: sh, stats: stats.line() })
}
