//! The fixed newstyle handshake, server side: greeting, client flags, then options until
//! the client enters transmission (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), aborts, or
//! breaks the protocol.
//!
//! Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
//! LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`, and
//! `qemu:dirty-bitmap:NAME` for each bitmap exported with `--bitmap`). STARTTLS is refused by policy
//! (no TLS); everything else (EXTENDED_HEADERS included) gets `NBD_REP_ERR_UNSUP`, after
//! which the client may go on. The server hangs up on what it cannot answer: a bad option
//! magic, unknown client flags, an option over 64 KiB, EXPORT_NAME of an unknown export.

use super::proto::*;
use super::sock::{HsError, HsIo};

/// Longest option data read; longer options end the connection (no option this server
/// knows needs more: names and queries are at most 4 KiB each).
const MAX_OPTION_LEN: u32 = 64 << 10;

/// What the server exports.
#[derive(Clone, Debug)]
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub read_only: bool,
    pub multi_conn: bool,
    /// Advertise `NBD_FLAG_SEND_FAST_ZERO`.
    pub fast_zero: bool,
    /// Persistent bitmaps exported as `qemu:dirty-bitmap:NAME` contexts (at most
    /// [`MAX_BITMAPS`]); bitmap `i` gets context id `i + 1`.
    pub bitmaps: Vec<String>,
}

/// Bitmaps one export offers at most (the session keeps its selection in a 64-bit mask).
pub const MAX_BITMAPS: usize = 64;

impl Export {
    /// Does a client's export name select this export? The empty name is the default
    /// export, which is this one.
    fn selected_by(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// Transmission flags for a connection (DF only with structured replies).
    pub fn flags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
            if self.fast_zero {
                f |= TFLAG_SEND_FAST_ZERO;
            }
        }
        if structured {
            f |= TFLAG_SEND_DF;
        }
        if self.multi_conn {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        f
    }
}

/// The result of a successful handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub structured: bool,
    /// The context id of `base:allocation`, when the client selected it.
    pub base_allocation: Option<u32>,
    /// The exported bitmaps the client selected (bit `i`: [`Export::bitmaps`]`[i]`, context
    /// id `i + 1`).
    pub bitmaps: u64,
}

impl Session {
    /// Did the client select any metadata context (BLOCK_STATUS allowed)?
    pub fn has_meta(&self) -> bool {
        self.base_allocation.is_some() || self.bitmaps != 0
    }
}

/// How the handshake ended.
#[derive(Debug)]
pub enum Outcome {
    /// Transmission starts.
    Go(Session),
    /// The client aborted (`NBD_OPT_ABORT`); nothing more to do.
    Aborted,
    /// The client broke the protocol: hang up (the reason is for the log).
    Refused(String),
}

/// Context id this server gives `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 0;

/// Context id of exported bitmap `i`.
pub fn bitmap_context_id(i: usize) -> u32 {
    i as u32 + 1
}

fn reply(io: &mut HsIo, opt: u32, ty: u32, data: &[u8]) -> Result<(), HsError> {
    io.write_all(&option_reply(opt, ty, data))
}

fn error(io: &mut HsIo, opt: u32, ty: u32, msg: &str) -> Result<(), HsError> {
    reply(io, opt, ty, truncate_str(msg, MAX_STRING).as_bytes())
}

/// Runs the handshake on `io` for `export`.
pub fn negotiate(io: &mut HsIo, export: &Export) -> Result<Outcome, HsError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&greeting)?;
    let mut b4 = [0u8; 4];
    io.read_exact(&mut b4)?;
    let cflags = u32::from_be_bytes(b4);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(Outcome::Refused(format!("unknown client flags {cflags:#x}")));
    }
    let fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation = None;
    let mut bitmaps = 0u64;
    loop {
        let mut h = [0u8; 16];
        io.read_exact(&mut h)?;
        let (magic, opt, len) = (be64(&h[0..8]), be32(&h[8..12]), be32(&h[12..16]));
        if magic != IHAVEOPT {
            return Ok(Outcome::Refused(format!("bad option magic {magic:#018x}")));
        }
        if len > MAX_OPTION_LEN {
            return Ok(Outcome::Refused(format!("option {opt} with {len} bytes of data (at most {MAX_OPTION_LEN})")));
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data)?;
        if io.stopping() && opt != OPT_ABORT {
            if opt != OPT_EXPORT_NAME {
                error(io, opt, REP_ERR_SHUTDOWN, "the server is shutting down")?;
            }
            return Err(HsError::Stopped);
        }
        if !fixed && opt != OPT_EXPORT_NAME {
            return Ok(Outcome::Refused(format!("option {opt} from a client without fixed newstyle")));
        }
        match opt {
            OPT_EXPORT_NAME => {
                if !export.selected_by(&data) {
                    return Ok(Outcome::Refused(format!(
                        "unknown export '{}' requested with NBD_OPT_EXPORT_NAME",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut r = Vec::with_capacity(10 + 124);
                r.extend_from_slice(&export.size.to_be_bytes());
                r.extend_from_slice(&export.flags(structured).to_be_bytes());
                if !no_zeroes {
                    r.resize(10 + 124, 0);
                }
                io.write_all(&r)?;
                return Ok(Outcome::Go(Session { structured, base_allocation, bitmaps }));
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = reply(io, opt, REP_ACK, &[]);
                return Ok(Outcome::Aborted);
            }
            OPT_LIST => {
                if len != 0 {
                    error(io, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let name = truncate_str(&export.name, MAX_STRING);
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                if let Some(desc) = &export.description {
                    d.extend_from_slice(truncate_str(desc, MAX_STRING).as_bytes());
                }
                reply(io, opt, REP_SERVER, &d)?;
                reply(io, opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS => error(io, opt, REP_ERR_POLICY, "TLS is not configured on this server")?,
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(why) => {
                        error(io, opt, REP_ERR_INVALID, why)?;
                        continue;
                    }
                };
                if !export.selected_by(req.name) {
                    let msg = format!("export '{}' not present", String::from_utf8_lossy(req.name));
                    error(io, opt, REP_ERR_UNKNOWN, &msg)?;
                    continue;
                }
                reply(io, opt, REP_INFO, &info_export(export.size, export.flags(structured)))?;
                if req.infos.contains(&INFO_NAME) {
                    reply(io, opt, REP_INFO, &info_string(INFO_NAME, &export.name))?;
                }
                if req.infos.contains(&INFO_DESCRIPTION)
                    && let Some(d) = &export.description
                {
                    reply(io, opt, REP_INFO, &info_string(INFO_DESCRIPTION, d))?;
                }
                // Always sent: this server needs 512-byte alignment, not the default of 1.
                reply(io, opt, REP_INFO, &info_block_size())?;
                reply(io, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Outcome::Go(Session { structured, base_allocation, bitmaps }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    error(io, opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else if structured {
                    error(io, opt, REP_ERR_INVALID, "structured replies are already negotiated")?;
                } else {
                    structured = true;
                    reply(io, opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // Replaces the selection, even when it fails.
                    base_allocation = None;
                    bitmaps = 0;
                }
                if !structured {
                    error(io, opt, REP_ERR_INVALID, "metadata contexts need structured replies first")?;
                    continue;
                }
                let req = match parse_meta_request(&data) {
                    Ok(r) => r,
                    Err(why) => {
                        error(io, opt, REP_ERR_INVALID, why)?;
                        continue;
                    }
                };
                if !export.selected_by(req.name) {
                    let msg = format!("export '{}' not present", String::from_utf8_lossy(req.name));
                    error(io, opt, REP_ERR_UNKNOWN, &msg)?;
                    continue;
                }
                // Listing with no query lists everything; anything else must match.
                let matched = (!set && req.queries.is_empty())
                    || req.queries.iter().any(|q| query_matches_base_allocation(q, !set));
                if matched {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                    reply(io, opt, REP_META_CONTEXT, &d)?;
                    if set {
                        base_allocation = Some(BASE_ALLOCATION_ID);
                    }
                }
                // Then the bitmaps, in the order they were exported (as qemu-nbd answers).
                for (i, name) in export.bitmaps.iter().enumerate() {
                    let matched = (!set && req.queries.is_empty())
                        || req.queries.iter().any(|q| query_matches_bitmap(q, name, !set));
                    if matched {
                        let mut d = bitmap_context_id(i).to_be_bytes().to_vec();
                        d.extend_from_slice(CONTEXT_DIRTY_BITMAP_PREFIX.as_bytes());
                        d.extend_from_slice(name.as_bytes());
                        reply(io, opt, REP_META_CONTEXT, &d)?;
                        if set {
                            bitmaps |= 1 << i;
                        }
                    }
                }
                reply(io, opt, REP_ACK, &[])?;
            }
            _ => error(io, opt, REP_ERR_UNSUP, &format!("option {opt} is not supported"))?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn export() -> Export {
        Export {
            name: "disk".into(),
            description: Some("a test".into()),
            size: 1 << 20,
            read_only: false,
            multi_conn: true,
            fast_zero: true,
            bitmaps: vec!["b".into()],
        }
    }

    /// Runs the server side on one end of a socket pair while `client` talks on the other.
    fn run(client: impl FnOnce(&mut UnixStream) + Send + 'static) -> Outcome {
        let (srv, mut cli) = UnixStream::pair().unwrap();
        srv.set_nonblocking(true).unwrap();
        let stop = super::super::sock::EventFd::new().unwrap();
        let t = std::thread::spawn(move || client(&mut cli));
        let mut io = HsIo { fd: srv.as_raw_fd(), deadline: Instant::now() + Duration::from_secs(10), stop: stop.fd() };
        let r = negotiate(&mut io, &export());
        drop(srv);
        t.join().unwrap();
        r.unwrap_or_else(|e| Outcome::Refused(format!("io: {e}")))
    }

    fn greeting(c: &mut UnixStream, flags: u32) {
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        assert_eq!(be64(&g[0..8]), NBDMAGIC);
        assert_eq!(be64(&g[8..16]), IHAVEOPT);
        assert_eq!(be16(&g[16..18]), 3);
        c.write_all(&flags.to_be_bytes()).unwrap();
    }

    fn option(c: &mut UnixStream, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        c.write_all(&b).unwrap();
    }

    /// Reads one option reply: (option, type, data).
    fn read_reply(c: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h[0..8]), OPTION_REPLY_MAGIC);
        let mut d = vec![0u8; be32(&h[16..20]) as usize];
        c.read_exact(&mut d).unwrap();
        (be32(&h[8..12]), be32(&h[12..16]), d)
    }

    fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    #[test]
    fn go_with_structured_and_base_allocation() {
        let out = run(|c| {
            greeting(c, 3);
            option(c, 99, b"whatever");
            assert_eq!(read_reply(c).1, REP_ERR_UNSUP);
            option(c, OPT_SET_META_CONTEXT, &meta_data(b"disk", &[b"base:allocation"]));
            assert_eq!(read_reply(c).1, REP_ERR_INVALID, "meta context before structured replies");
            option(c, OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(read_reply(c), (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
            option(c, OPT_LIST_META_CONTEXT, &meta_data(b"disk", &[]));
            let (_, ty, d) = read_reply(c);
            assert_eq!(ty, REP_META_CONTEXT);
            assert_eq!(&d[4..], b"base:allocation");
            let (_, ty, d) = read_reply(c);
            assert_eq!(ty, REP_META_CONTEXT);
            assert_eq!((be32(&d[0..4]), &d[4..]), (1, &b"qemu:dirty-bitmap:b"[..]));
            assert_eq!(read_reply(c).1, REP_ACK);
            // Listing by namespace; selecting needs full names.
            option(c, OPT_LIST_META_CONTEXT, &meta_data(b"disk", &[b"qemu:"]));
            assert_eq!(&read_reply(c).2[4..], b"qemu:dirty-bitmap:b");
            assert_eq!(read_reply(c).1, REP_ACK);
            option(c, OPT_SET_META_CONTEXT, &meta_data(b"disk", &[b"qemu:dirty-bitmap:", b"qemu:"]));
            assert_eq!(read_reply(c).1, REP_ACK);
            option(c, OPT_SET_META_CONTEXT, &meta_data(b"disk", &[b"qemu:dirty-bitmap:b"]));
            assert_eq!(&read_reply(c).2[4..], b"qemu:dirty-bitmap:b");
            assert_eq!(read_reply(c).1, REP_ACK);
            // A new selection replaces the last one.
            option(c, OPT_SET_META_CONTEXT, &meta_data(b"disk", &[b"qemu:dirty-bitmap:x", b"base:allocation"]));
            assert_eq!(read_reply(c).1, REP_META_CONTEXT);
            assert_eq!(read_reply(c).1, REP_ACK);
            option(c, OPT_GO, &go_data(b"nope", &[]));
            assert_eq!(read_reply(c).1, REP_ERR_UNKNOWN);
            option(c, OPT_GO, &go_data(b"disk", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]));
            let mut seen = Vec::new();
            loop {
                let (opt, ty, d) = read_reply(c);
                assert_eq!(opt, OPT_GO);
                if ty == REP_ACK {
                    break;
                }
                assert_eq!(ty, REP_INFO);
                let info = be16(&d[0..2]);
                if info == INFO_EXPORT {
                    assert_eq!(be64(&d[2..10]), 1 << 20);
                    let f = be16(&d[10..12]);
                    assert_ne!(f & TFLAG_SEND_DF, 0);
                    assert_ne!(f & TFLAG_CAN_MULTI_CONN, 0);
                    assert_eq!(f & TFLAG_READ_ONLY, 0);
                }
                if info == INFO_BLOCK_SIZE {
                    assert_eq!((be32(&d[2..6]), be32(&d[10..14])), (512, 32 << 20));
                }
                seen.push(info);
            }
            seen.sort();
            assert_eq!(seen, vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]);
        });
        match out {
            Outcome::Go(s) => assert_eq!(s, Session { structured: true, base_allocation: Some(0), bitmaps: 0 }),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn export_name_and_list() {
        let out = run(|c| {
            greeting(c, 1);
            option(c, OPT_LIST, &[]);
            let (_, ty, d) = read_reply(c);
            assert_eq!(ty, REP_SERVER);
            assert_eq!(be32(&d[0..4]), 4);
            assert_eq!(&d[4..8], b"disk");
            assert_eq!(read_reply(c).1, REP_ACK);
            option(c, OPT_LIST, b"x");
            assert_eq!(read_reply(c).1, REP_ERR_INVALID);
            option(c, OPT_STARTTLS, &[]);
            assert_eq!(read_reply(c).1, REP_ERR_POLICY);
            option(c, OPT_INFO, &go_data(b"", &[]));
            assert_eq!(read_reply(c).1, REP_INFO);
            assert_eq!(read_reply(c).1, REP_INFO);
            assert_eq!(read_reply(c).1, REP_ACK);
            option(c, OPT_INFO, &[0, 0, 0, 9, b'x']);
            assert_eq!(read_reply(c).1, REP_ERR_INVALID);
            option(c, OPT_EXPORT_NAME, b"disk");
            let mut r = [0u8; 134];
            c.read_exact(&mut r).unwrap();
            assert_eq!(be64(&r[0..8]), 1 << 20);
            assert_eq!(be16(&r[8..10]) & TFLAG_SEND_DF, 0, "no DF without structured replies");
            assert!(r[10..].iter().all(|&b| b == 0));
        });
        assert!(
            matches!(out, Outcome::Go(Session { structured: false, base_allocation: None, bitmaps: 0 })),
            "{out:?}"
        );
    }

    #[test]
    fn misbehaving_clients_are_refused() {
        let out = run(|c| greeting(c, 4));
        assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
        let out = run(|c| {
            greeting(c, 3);
            c.write_all(&[0u8; 16]).unwrap();
        });
        assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
        let out = run(|c| {
            greeting(c, 3);
            let mut b = IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&OPT_GO.to_be_bytes());
            b.extend_from_slice(&u32::MAX.to_be_bytes());
            c.write_all(&b).unwrap();
        });
        assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
        let out = run(|c| {
            greeting(c, 0);
            option(c, OPT_GO, &go_data(b"", &[]));
        });
        assert!(matches!(out, Outcome::Refused(_)), "non-fixed client: {out:?}");
        let out = run(|c| {
            greeting(c, 3);
            option(c, OPT_EXPORT_NAME, b"other");
        });
        assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
        let out = run(|c| {
            greeting(c, 3);
            option(c, OPT_ABORT, &[]);
            assert_eq!(read_reply(c).1, REP_ACK);
        });
        assert!(matches!(out, Outcome::Aborted), "{out:?}");
        // A client that goes away mid-option.
        let out = run(|c| {
            greeting(c, 3);
            c.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
        });
        assert!(out_is_io_close(&out), "{out:?}");
    }

    fn out_is_io_close(o: &Outcome) -> bool {
        matches!(o, Outcome::Refused(m) if m.contains("closed"))
    }
}
