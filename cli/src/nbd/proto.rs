//! The NBD wire format: constants, request decoding, reply encoding and the validation of a
//! transmission request against the export. Pure: no I/O, no engine; everything here is
//! unit-tested below.
//!
//! Values are taken from the protocol specification (NetworkBlockDevice/nbd, doc/proto.md);
//! every integer on the wire is big-endian.

// ---------------------------------------------------------------------------------------------
// Handshake

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, sent by the server after NBDMAGIC and by the client before
/// every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;

/// `NBD_REP_INFO` types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (16 bits).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// The allocation metadata context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of a dirty bitmap's metadata context (QEMU's; the bitmap's name follows).
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

// ---------------------------------------------------------------------------------------------
// Transmission

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk types.
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` status flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// NBD error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Size constraints this server advertises (`NBD_INFO_BLOCK_SIZE`): the engine addresses
/// 512-byte sectors, so requests must be sector-aligned.
pub const MIN_BLOCK: u32 = 512;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ/WRITE payload (the protocol's interoperable maximum, as qemu-nbd).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Maps a system errno (positive) to the NBD error the protocol allows for it.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// A request header as sent by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    /// Decodes the 28 header bytes.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Self {
        RequestHeader {
            magic: be32(&b[0..4]),
            flags: be16(&b[4..6]),
            ty: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        }
    }

    /// Encodes the header (the client side, for tests).
    #[cfg(test)]
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.ty.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Bytes of payload that follow this header on the wire. Only WRITE carries one, and
    /// it does whatever the server thinks of the request: the framing does not depend on
    /// validity.
    pub fn payload_len(&self) -> u32 {
        if self.ty == CMD_WRITE { self.len } else { 0 }
    }
}

/// What the export allows, as negotiated for one connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// A metadata context was selected (BLOCK_STATUS allowed).
    pub meta: bool,
    /// `NBD_FLAG_SEND_FAST_ZERO` was advertised.
    pub fast_zero: bool,
}

/// A valid command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    Cache { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, fua: bool, no_hole: bool, fast: bool },
    BlockStatus { offset: u64, len: u32, req_one: bool },
}

/// What to do with a request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a request: the stream cannot be trusted any more (hard disconnect).
    BadMagic,
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disc,
    Run(Cmd),
    /// Answer with this error (a WRITE's payload is still read and dropped).
    Fail {
        errno: u32,
        why: &'static str,
    },
}

/// Validates a request against the export, in the order the errors matter to a client:
/// unknown command, flags, permission, range, alignment, size.
pub fn classify(h: &RequestHeader, l: &Limits) -> Verdict {
    let fail = |errno, why| Verdict::Fail { errno, why };
    if h.magic != REQUEST_MAGIC {
        return Verdict::BadMagic;
    }
    let writes = matches!(h.ty, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let allowed = CMD_FLAG_FUA
        | match h.ty {
            CMD_READ if l.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES if l.fast_zero => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    match h.ty {
        CMD_DISC => return Verdict::Disc,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {}
        _ => return fail(EINVAL, "unknown command"),
    }
    if h.flags & !allowed != 0 {
        return fail(EINVAL, "command flags not valid for this command");
    }
    if writes && l.read_only {
        return fail(EPERM, "the export is read-only");
    }
    if h.ty == CMD_BLOCK_STATUS && !(l.structured && l.meta) {
        return fail(EINVAL, "block status needs structured replies and a metadata context");
    }
    if h.ty == CMD_FLUSH {
        return Verdict::Run(Cmd::Flush);
    }
    let (offset, len) = (h.offset, h.len);
    if offset.checked_add(len as u64).is_none_or(|end| end > l.size) {
        let errno = if matches!(h.ty, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
        return fail(errno, "request past the end of the export");
    }
    // TRIM is a hint: it is shrunk to whole sectors instead of refused.
    if h.ty != CMD_TRIM && (!offset.is_multiple_of(MIN_BLOCK as u64) || !len.is_multiple_of(MIN_BLOCK)) {
        return fail(EINVAL, "request not aligned to the minimum block size (512)");
    }
    if matches!(h.ty, CMD_READ | CMD_WRITE) && len > MAX_PAYLOAD {
        return fail(EINVAL, "request larger than the maximum payload (32 MiB)");
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    Verdict::Run(match h.ty {
        CMD_READ => Cmd::Read { offset, len },
        CMD_WRITE => Cmd::Write { offset, len, fua },
        CMD_TRIM => Cmd::Trim { offset, len, fua },
        CMD_CACHE => Cmd::Cache { offset, len },
        CMD_WRITE_ZEROES => Cmd::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS if len == 0 => return fail(EINVAL, "block status of an empty range"),
        CMD_BLOCK_STATUS => Cmd::BlockStatus { offset, len, req_one: h.flags & CMD_FLAG_REQ_ONE != 0 },
        _ => unreachable!("filtered above"),
    })
}

// ---------------------------------------------------------------------------------------------
// Replies

/// A simple reply (16 bytes).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header (20 bytes) for a payload of `len` bytes.
pub fn chunk_header(flags: u16, ty: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The 28 bytes that precede `data_len` bytes of read data in a final
/// `NBD_REPLY_TYPE_OFFSET_DATA` chunk: chunk header and offset.
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32) -> [u8; CHUNK_HEADER_LEN + 8] {
    let mut b = [0u8; CHUNK_HEADER_LEN + 8];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, cookie, data_len + 8));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message (cut to the protocol's limit).
pub fn error_chunk(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = truncate_str(msg, MAX_STRING);
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + 6 + msg.len());
    b.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, CHUNK_ERROR, cookie, 6 + msg.len() as u32));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b
}

/// An `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context: `(length, flags)` extents;
/// `done` on the last chunk of the reply (one chunk per selected context).
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)], done: bool) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    b.extend_from_slice(&chunk_header(flags, CHUNK_BLOCK_STATUS, cookie, len as u32));
    b.extend_from_slice(&context.to_be_bytes());
    for &(l, f) in extents {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// An option reply: header and data.
pub fn option_reply(option: u32, ty: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_INFO_EXPORT` data: type, size, transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = INFO_EXPORT.to_be_bytes().to_vec();
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` data.
pub fn info_block_size() -> Vec<u8> {
    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` data.
pub fn info_string(ty: u16, s: &str) -> Vec<u8> {
    let mut b = ty.to_be_bytes().to_vec();
    b.extend_from_slice(truncate_str(s, MAX_STRING).as_bytes());
    b
}

// ---------------------------------------------------------------------------------------------
// Option data

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and information requests.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    pub infos: Vec<u16>,
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data; `Err` names what is malformed.
pub fn parse_info_request(d: &[u8]) -> Result<InfoRequest<'_>, &'static str> {
    let mut r = Reader(d);
    let n = r.u32().ok_or("option too short for a name length")? as usize;
    if n > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    let name = r.bytes(n).ok_or("export name longer than the option")?;
    let count = r.u16().ok_or("option too short for the information request count")? as usize;
    let mut infos = Vec::with_capacity(count);
    for _ in 0..count {
        infos.push(r.u16().ok_or("information requests longer than the option")?);
    }
    if !r.0.is_empty() {
        return Err("trailing bytes after the information requests");
    }
    Ok(InfoRequest { name, infos })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    pub name: &'a [u8],
    pub queries: Vec<&'a [u8]>,
}

/// Parses metadata context option data; `Err` names what is malformed.
pub fn parse_meta_request(d: &[u8]) -> Result<MetaRequest<'_>, &'static str> {
    let mut r = Reader(d);
    let n = r.u32().ok_or("option too short for a name length")? as usize;
    if n > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    let name = r.bytes(n).ok_or("export name longer than the option")?;
    let count = r.u32().ok_or("option too short for the query count")? as usize;
    // Each query takes at least its 4-byte length: a count the data cannot hold is bogus
    // (and must not size an allocation).
    if count > r.0.len() / 4 {
        return Err("more queries than the option can hold");
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let l = r.u32().ok_or("query length past the end of the option")? as usize;
        if l > MAX_STRING {
            return Err("query longer than 4096 bytes");
        }
        queries.push(r.bytes(l).ok_or("query longer than the option")?);
    }
    if !r.0.is_empty() {
        return Err("trailing bytes after the queries");
    }
    Ok(MetaRequest { name, queries })
}

/// Does `query` select `base:allocation`? For listing, `base:` (the namespace wildcard)
/// also does; for selecting only the full name does.
pub fn query_matches_base_allocation(query: &[u8], listing: bool) -> bool {
    query == CONTEXT_BASE_ALLOCATION.as_bytes() || (listing && query == b"base:")
}

/// Does `query` select the context of bitmap `name` (`qemu:dirty-bitmap:NAME`)? For
/// listing, `qemu:` (the namespace) and `qemu:dirty-bitmap:` (every bitmap) also do, as
/// with qemu-nbd; for selecting only the full name does.
pub fn query_matches_bitmap(query: &[u8], name: &str, listing: bool) -> bool {
    let p = CONTEXT_DIRTY_BITMAP_PREFIX.as_bytes();
    query.strip_prefix(p) == Some(name.as_bytes()) || (listing && (query == b"qemu:" || query == p))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(be16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(be32)
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

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits { size: 1 << 20, read_only: false, structured: true, meta: true, fast_zero: true };

    fn req(ty: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { magic: REQUEST_MAGIC, flags, ty, cookie: 7, offset, len }
    }

    fn errno(v: Verdict) -> u32 {
        match v {
            Verdict::Fail { errno, .. } => errno,
            v => panic!("expected an error, got {v:?}"),
        }
    }

    #[test]
    fn header_round_trip() {
        let h = RequestHeader {
            magic: REQUEST_MAGIC,
            flags: 1,
            ty: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        };
        let b = h.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&b), h);
        assert_eq!(h.payload_len(), 512);
        assert_eq!(req(CMD_READ, 0, 0, 512).payload_len(), 0);
    }

    #[test]
    fn classify_valid() {
        assert_eq!(classify(&req(CMD_READ, 0, 0, 4096), &L), Verdict::Run(Cmd::Read { offset: 0, len: 4096 }));
        assert_eq!(
            classify(&req(CMD_WRITE, CMD_FLAG_FUA, 512, 512), &L),
            Verdict::Run(Cmd::Write { offset: 512, len: 512, fua: true })
        );
        assert_eq!(classify(&req(CMD_FLUSH, 0, 123, 7), &L), Verdict::Run(Cmd::Flush));
        assert_eq!(classify(&req(CMD_DISC, 0xffff, 0, 0), &L), Verdict::Disc);
        assert_eq!(
            classify(&req(CMD_TRIM, 0, 1, 1000), &L),
            Verdict::Run(Cmd::Trim { offset: 1, len: 1000, fua: false }),
            "trim is shrunk later, not refused"
        );
        assert_eq!(
            classify(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, 0, 1 << 20), &L),
            Verdict::Run(Cmd::WriteZeroes { offset: 0, len: 1 << 20, fua: false, no_hole: true, fast: true })
        );
        assert_eq!(
            classify(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &L),
            Verdict::Run(Cmd::BlockStatus { offset: 0, len: 512, req_one: true })
        );
        assert_eq!(classify(&req(CMD_READ, CMD_FLAG_DF, 0, 0), &L), Verdict::Run(Cmd::Read { offset: 0, len: 0 }));
        assert_eq!(classify(&req(CMD_CACHE, 0, 0, 1 << 20), &L), Verdict::Run(Cmd::Cache { offset: 0, len: 1 << 20 }));
    }

    #[test]
    fn classify_errors() {
        let mut h = req(CMD_READ, 0, 0, 512);
        h.magic ^= 1;
        assert_eq!(classify(&h, &L), Verdict::BadMagic);
        assert_eq!(errno(classify(&req(9, 0, 0, 512), &L)), EINVAL);
        assert_eq!(errno(classify(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512), &L)), EINVAL);
        assert_eq!(errno(classify(&req(CMD_WRITE, 1 << 9, 0, 512), &L)), EINVAL);
        let simple = Limits { structured: false, meta: false, ..L };
        assert_eq!(errno(classify(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &simple)), EINVAL);
        assert_eq!(errno(classify(&req(CMD_BLOCK_STATUS, 0, 0, 512), &simple)), EINVAL);
        let nofast = Limits { fast_zero: false, ..L };
        assert_eq!(errno(classify(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), &nofast)), EINVAL);
        let ro = Limits { read_only: true, ..L };
        for ty in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(errno(classify(&req(ty, 0, 0, 512), &ro)), EPERM);
        }
        assert_eq!(classify(&req(CMD_READ, 0, 0, 512), &ro), Verdict::Run(Cmd::Read { offset: 0, len: 512 }));
        // Past the end: ENOSPC for writes, EINVAL otherwise; overflow of offset+len too.
        assert_eq!(errno(classify(&req(CMD_WRITE, 0, (1 << 20) - 512, 1024), &L)), ENOSPC);
        assert_eq!(errno(classify(&req(CMD_WRITE_ZEROES, 0, 1 << 20, 512), &L)), ENOSPC);
        assert_eq!(errno(classify(&req(CMD_READ, 0, u64::MAX - 100, 512), &L)), EINVAL);
        assert_eq!(errno(classify(&req(CMD_TRIM, 0, 1 << 20, 1), &L)), EINVAL);
        assert_eq!(errno(classify(&req(CMD_BLOCK_STATUS, 0, 1 << 20, 1), &L)), EINVAL);
        // Alignment.
        assert_eq!(errno(classify(&req(CMD_READ, 0, 1, 512), &L)), EINVAL);
        assert_eq!(errno(classify(&req(CMD_WRITE, 0, 0, 100), &L)), EINVAL);
        assert_eq!(errno(classify(&req(CMD_WRITE_ZEROES, 0, 0, 100), &L)), EINVAL);
        // Size.
        let big = Limits { size: 1 << 30, ..L };
        assert_eq!(errno(classify(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 512), &big)), EINVAL);
        assert_eq!(
            classify(&req(CMD_READ, 0, 0, MAX_PAYLOAD), &big),
            Verdict::Run(Cmd::Read { offset: 0, len: MAX_PAYLOAD })
        );
        assert_eq!(errno(classify(&req(CMD_BLOCK_STATUS, 0, 0, 0), &L)), EINVAL);
    }

    #[test]
    fn replies() {
        assert_eq!(simple_reply(0x11, 22), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 0x11]);
        let h = offset_data_header(5, 4096, 512);
        assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&h[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be16(&h[6..8]), CHUNK_OFFSET_DATA);
        assert_eq!(be64(&h[8..16]), 5);
        assert_eq!(be32(&h[16..20]), 520);
        assert_eq!(be64(&h[20..28]), 4096);
        let e = error_chunk(9, EIO, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(be16(&e[6..8]), CHUNK_ERROR);
        assert_eq!(be32(&e[16..20]), 9);
        assert_eq!(be32(&e[20..24]), EIO);
        assert_eq!(be16(&e[24..26]), 3);
        let long = "x".repeat(5000);
        assert_eq!(error_chunk(9, EIO, &long).len(), 20 + 6 + 4096);
        let s = block_status_chunk(3, 0, &[(4096, STATE_HOLE | STATE_ZERO), (512, 0)], true);
        assert_eq!(s.len(), 20 + 4 + 16);
        assert_eq!(be32(&s[16..20]), 20);
        assert_eq!(be32(&s[28..32]), 3);
        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(be64(&o[0..8]), OPTION_REPLY_MAGIC);
        assert_eq!(info_export(1 << 30, 0x1234).len(), 12);
        assert_eq!(info_block_size().len(), 14);
    }

    #[test]
    fn option_parsing() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(parse_info_request(&d), Ok(InfoRequest { name: b"abc", infos: vec![3, 1] }));
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        let mut extra = d.clone();
        extra.push(0);
        assert!(parse_info_request(&extra).is_err());
        assert!(parse_info_request(&u32::MAX.to_be_bytes()).is_err());

        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            m.extend_from_slice(&(q.len() as u32).to_be_bytes());
            m.extend_from_slice(q);
        }
        let p = parse_meta_request(&m).unwrap();
        assert_eq!(p.name, b"");
        assert_eq!(p.queries, vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]);
        assert!(parse_meta_request(&m[..m.len() - 2]).is_err());
        let mut bogus = 0u32.to_be_bytes().to_vec();
        bogus.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&bogus).is_err());
        assert!(query_matches_base_allocation(b"base:allocation", false));
        assert!(!query_matches_base_allocation(b"base:", false));
        assert!(query_matches_base_allocation(b"base:", true));
        assert!(!query_matches_base_allocation(b"base:allocationx", true));
        assert!(query_matches_bitmap(b"qemu:dirty-bitmap:b", "b", false));
        assert!(!query_matches_bitmap(b"qemu:dirty-bitmap:", "b", false));
        assert!(query_matches_bitmap(b"qemu:dirty-bitmap:", "b", true));
        assert!(query_matches_bitmap(b"qemu:", "b", true));
        assert!(!query_matches_bitmap(b"qemu:", "b", false));
        assert!(!query_matches_bitmap(b"qemu:dirty-bitmap:bb", "b", true));
        assert!(!query_matches_bitmap(b"base:allocation", "b", true));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_errno(libc::EROFS), EPERM);
        assert_eq!(nbd_errno(libc::EDQUOT), ENOSPC);
        assert_eq!(nbd_errno(libc::ENOTSUP), ENOTSUP);
        assert_eq!(nbd_errno(libc::EBADF), EIO);
        assert_eq!(nbd_errno(libc::EINVAL), EINVAL);
    }
}
