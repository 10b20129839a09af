//! The command language of `quring io`: qemu-io's `read`, `write`, `discard` and `flush`
//! (and their one-letter names), with qemu-io's option letters, number syntax, limits and
//! messages. [`parse`] turns one `-c` string into a [`Cmd`] without touching an image, and
//! every number in it is bounded there: offsets and lengths at `INT64_MAX` ("Parsing error:
//! argument too large"), request lengths at [`MAX_REQUEST`] ("length cannot exceed
//! 2147483136"), pattern bytes at 0..=255 ("256 is not a valid pattern byte"). [`run`]
//! executes a command through a [`Queue`], checking the range against the disk size before
//! it allocates anything, so no command allocates more than the part of the disk it touches.
//!
//! This file only uses the library's public API: the `quring` tool compiles it as its
//! module `io_lang`, and the fuzz target `cli` (fuzz/harness.rs, replayed by
//! tests/fuzz_regressions.rs) includes the same file by path. Keeping it out of the library
//! keeps a tool's command syntax out of the engine's API, and the fuzzer still runs exactly
//! the code the tool runs.

use quring::io::AlignedBuf;
use quring::queue::Queue;
use std::io::Write;
use std::time::Instant;

/// The longest request qemu-io accepts (QEMU's `BDRV_REQUEST_MAX_BYTES`: `INT_MAX` rounded
/// down to 512 bytes).
pub const MAX_REQUEST: u64 = 2_147_483_136;

/// Pattern qemu-io writes without `-P`.
pub const DEFAULT_PATTERN: u8 = 0xcd;

/// How a command reports (qemu-io's `-q`, `-C`, `-v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `-q`: no statistics (and no dump).
    pub quiet: bool,
    /// `-C`: statistics as one machine-readable line.
    pub terse: bool,
    /// `-v` (read): hex dump of the data.
    pub dump: bool,
}

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// `read [-Cpqrv] [-P pattern] off len`
    Read {
        /// `-P`: every byte must be this one.
        pattern: Option<u8>,
        off: u64,
        len: u64,
        report: Report,
    },
    /// `write [-CfnpqruZ] [-P pattern | -z [-u] [-n]] off len`
    Write {
        /// The byte written (0 with `-z`).
        pattern: u8,
        /// `-z`: write zeros (without a data buffer).
        zero: bool,
        /// `-u` (with `-z`): clusters may be deallocated.
        unmap: bool,
        /// `-f`: the write is durable when the command completes (a flush follows it).
        fua: bool,
        off: u64,
        len: u64,
        report: Report,
    },
    /// `discard [-Cq] off len`
    Discard { off: u64, len: u64, report: Report },
    /// `flush`
    Flush,
    /// An empty command line (qemu-io does nothing).
    Nothing,
}

impl Cmd {
    /// Does the command change the image (the image is then opened read-write)?
    pub fn writes(&self) -> bool {
        !matches!(self, Cmd::Read { .. } | Cmd::Nothing)
    }
}

/// What each command accepts, as qemu-io's getopt strings (a letter followed by `:` takes
/// an argument), and which of those quring does not implement.
struct Spec {
    name: &'static str,
    usage: &'static str,
    opts: &'static str,
    unsupported: &'static str,
    /// Number of positional arguments (qemu-io's argmin; flush takes none).
    args: usize,
}

const SPECS: [(&str, Spec); 4] = [
    (
        "r",
        Spec {
            name: "read",
            usage: "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
            opts: "bCl:pqP:rs:v",
            unsupported: "bls",
            args: 2,
        },
    ),
    (
        "w",
        Spec {
            name: "write",
            usage: "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset",
            opts: "bcCfnpP:qrs:uz",
            unsupported: "bcs",
            args: 2,
        },
    ),
    (
        "d",
        Spec {
            name: "discard",
            usage: "discard [-Cq] off len -- discards a number of bytes at a specified offset",
            opts: "Cq",
            unsupported: "",
            args: 2,
        },
    ),
    (
        "f",
        Spec {
            name: "flush",
            usage: "flush -- flush all in-core file state to disk",
            opts: "",
            unsupported: "",
            args: 0,
        },
    ),
];

/// Why a number did not parse (qemu's `qemu_strtosz` errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumError {
    /// Not a number, or junk after it (EINVAL).
    Invalid,
    /// Larger than the type allows (ERANGE).
    TooLarge,
}

/// qemu's `qemu_strtosz` (default unit: bytes): a decimal number with an optional fraction
/// and an optional one-letter binary suffix (`b`, `k`, `M`, `G`, `T`, `P`, `E`, any case), or a
/// `0x` hex number without fraction or suffix. A fraction needs a suffix (`1.5k`, not `1.5`)
/// and is rounded to the nearest byte; exponents are not numbers (`1e3` is junk after `1e`).
pub fn strtosz(s: &str) -> Result<u64, NumError> {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'+') {
        i = 1;
    }
    let digits = |from: usize| b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
    let n = digits(i);
    if n == 0 && b.get(i) != Some(&b'.') {
        return Err(NumError::Invalid);
    }
    let int: u64 = if n == 0 { 0 } else { s[i..i + n].parse().map_err(|_| NumError::TooLarge)? };
    i += n;
    if n > 0
        && int == 0
        && matches!(b.get(i), Some(b'x' | b'X'))
        && b[..i].iter().filter(|c| c.is_ascii_digit()).count() == 1
    {
        let h = b[i + 1..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if h == 0 || i + 1 + h != b.len() {
            return Err(NumError::Invalid);
        }
        return u64::from_str_radix(&s[i + 1..], 16).map_err(|_| NumError::TooLarge);
    }
    let mut frac = 0.0f64;
    if b.get(i) == Some(&b'.') {
        let f = digits(i + 1);
        if n == 0 && f == 0 {
            return Err(NumError::Invalid);
        }
        if f > 0 {
            frac = format!("0.{}", &s[i + 1..i + 1 + f]).parse().map_err(|_| NumError::Invalid)?;
        }
        i += 1 + f;
    }
    let mul: u64 = match b.get(i).map(|c| c.to_ascii_lowercase()) {
        None => 1,
        Some(c) => {
            i += 1;
            match c {
                b'b' => 1,
                b'k' => 1 << 10,
                b'm' => 1 << 20,
                b'g' => 1 << 30,
                b't' => 1 << 40,
                b'p' => 1 << 50,
                b'e' => 1 << 60,
                _ => return Err(NumError::Invalid),
            }
        }
    };
    if i != b.len() || (frac != 0.0 && mul == 1) {
        return Err(NumError::Invalid);
    }
    let whole = int.checked_mul(mul).ok_or(NumError::TooLarge)?;
    let part = frac * mul as f64 + 0.5;
    if part >= u64::MAX as f64 {
        return Err(NumError::TooLarge);
    }
    whole.checked_add(part as u64).ok_or(NumError::TooLarge)
}

/// qemu-io's `cvtnum`: [`strtosz`] bounded at `INT64_MAX`, with qemu-io's messages.
pub fn cvtnum(s: &str) -> Result<u64, String> {
    match strtosz(s) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) | Err(NumError::TooLarge) => Err(format!("Parsing error: argument too large -- {s}")),
        Err(NumError::Invalid) => {
            Err(format!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}"))
        }
    }
}

/// qemu-io's pattern byte: C's `strtol(s, &end, 0)` (decimal, `0x` hex or `0` octal, with an
/// optional sign) that must use the whole argument and lie in 0..=255.
pub fn parse_pattern(s: &str) -> Result<u8, String> {
    let bad = || format!("{s} is not a valid pattern byte");
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) =
        if (t.starts_with("0x") || t.starts_with("0X")) && t[2..].starts_with(|c: char| c.is_ascii_hexdigit()) {
            (16, &t[2..])
        } else if t.starts_with('0') {
            (8, t)
        } else {
            (10, t)
        };
    if digits.is_empty() {
        // strtol consumed nothing: end == the whole argument, valid only when it is empty.
        return if s.is_empty() { Ok(0) } else { Err(bad()) };
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    // Longer than any in-range value is out of range (strtol saturates at LONG_MAX).
    // Anything longer than 8 significant digits is out of range whatever the radix.
    if digits.trim_start_matches('0').len() > 8 {
        return Err(bad());
    }
    let v = u64::from_str_radix(digits, radix).map_err(|_| bad())?;
    match (neg, v) {
        (true, 0) => Ok(0),
        (false, v) if v <= 255 => Ok(v as u8),
        _ => Err(bad()),
    }
}

/// Parses one qemu-io command line (`read -P 0xab 0 64k`). Errors are qemu-io's messages
/// (an option error carries the usage line after it).
pub fn parse(line: &str) -> Result<Cmd, String> {
    // qemu-io splits at spaces only (a tab is part of a word).
    let words: Vec<&str> = line.split(' ').filter(|w| !w.is_empty()).collect();
    let Some((&name, rest)) = words.split_first() else { return Ok(Cmd::Nothing) };
    let spec = SPECS
        .iter()
        .find(|(alt, s)| s.name == name || *alt == name)
        .map(|(_, s)| s)
        .ok_or_else(|| format!("command \"{name}\" not found"))?;
    if rest.len() < spec.args || (spec.args == 0 && !rest.is_empty()) {
        return Err(if spec.args == 0 {
            format!("bad argument count {} to {}, expected 0 arguments", rest.len(), spec.name)
        } else {
            format!("bad argument count {} to {}, expected at least {} arguments", rest.len(), spec.name, spec.args)
        });
    }
    let usage = |msg: String| if msg.is_empty() { spec.usage.to_string() } else { format!("{msg}\n{}", spec.usage) };
    // getopt with GNU argument permutation: options may follow the operands; "--" ends them.
    let mut flags: Vec<(char, Option<&str>)> = Vec::new();
    let mut pos: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let w = rest[i];
        i += 1;
        if w == "--" {
            pos.extend(&rest[i..]);
            break;
        }
        if !w.starts_with('-') || w.len() == 1 {
            pos.push(w);
            continue;
        }
        for (k, c) in w.char_indices().skip(1) {
            let Some(at) = spec.opts.find(c).filter(|_| c != ':') else {
                return Err(usage(format!("{}: invalid option -- '{c}'", spec.name)));
            };
            if spec.opts[at + c.len_utf8()..].starts_with(':') {
                let tail = &w[k + c.len_utf8()..];
                let arg = if !tail.is_empty() {
                    tail
                } else if i < rest.len() {
                    i += 1;
                    rest[i - 1]
                } else {
                    return Err(usage(format!("{}: option requires an argument -- '{c}'", spec.name)));
                };
                flags.push((c, Some(arg)));
                break;
            }
            flags.push((c, None));
        }
    }
    let mut pattern = None;
    let mut report = Report::default();
    let (mut zero, mut unmap, mut fua, mut no_fallback) = (false, false, false, false);
    for &(c, arg) in &flags {
        if spec.unsupported.contains(c) {
            return Err(format!("{}: option -{c} is not supported by quring", spec.name));
        }
        match c {
            'P' => pattern = Some(parse_pattern(arg.unwrap_or_default())?),
            'q' => report.quiet = true,
            'C' => report.terse = true,
            'v' => report.dump = true,
            'z' => zero = true,
            'u' => unmap = true,
            'f' => fua = true,
            'n' => no_fallback = true,
            // -p (ignored by qemu-io too) and -r (register the I/O buffer): no effect here.
            _ => {}
        }
    }
    if pos.len() != spec.args {
        return Err(usage(String::new()));
    }
    if spec.name == "flush" {
        return Ok(Cmd::Flush);
    }
    if spec.name == "write" {
        if unmap && !zero {
            return Err("-u requires -z to be specified".into());
        }
        if no_fallback && !zero {
            return Err("-n requires -z to be specified".into());
        }
        if zero && pattern.is_some() {
            return Err("Only one of -z, -P, and -s can be specified at the same time".into());
        }
    }
    let off = cvtnum(pos[0])?;
    let len = cvtnum(pos[1])?;
    if len > MAX_REQUEST {
        // qemu-io lets a zero write without fallback (-z -n) be as long as it likes.
        if spec.name != "write" || !zero {
            return Err(format!("length cannot exceed {MAX_REQUEST}, given {}", pos[1]));
        }
        if !no_fallback {
            return Err(format!("length cannot exceed {MAX_REQUEST} without -n, given {}", pos[1]));
        }
    }
    Ok(match spec.name {
        "read" => Cmd::Read { pattern, off, len, report },
        "write" => Cmd::Write {
            pattern: if zero { 0 } else { pattern.unwrap_or(DEFAULT_PATTERN) },
            zero,
            unmap,
            fua,
            off,
            len,
            report,
        },
        _ => Cmd::Discard { off, len, report },
    })
}

fn human(n: f64) -> String {
    // qemu-io's cvtstr: three decimals, ".000" dropped, binary units.
    const UNITS: [(&str, f64); 6] = [
        ("EiB", (1u64 << 60) as f64),
        ("PiB", (1u64 << 50) as f64),
        ("TiB", (1u64 << 40) as f64),
        ("GiB", (1u64 << 30) as f64),
        ("MiB", (1u64 << 20) as f64),
        ("KiB", 1024.0),
    ];
    let (v, unit) = UNITS.iter().find(|(_, m)| n >= *m).map_or((n, "bytes"), |(u, m)| (n / m, *u));
    let s = if unit == "bytes" { format!("{v:.6}") } else { format!("{v:.3}") };
    // qemu cuts at the first ".000" (so 12.000500 bytes prints as 12 bytes).
    let s = s.find(".000").map_or(s.as_str(), |i| &s[..i]);
    format!("{s} {unit}")
}

fn report(out: &mut dyn Write, r: Report, verb: &str, off: u64, len: u64, t: f64) {
    if r.quiet {
        return;
    }
    let t = t.max(1e-9);
    if r.terse {
        let (secs, cs) = (t as u64, ((t.fract() * 100.0) as u64).min(99));
        let _ = writeln!(
            out,
            "{len},1,{}:{:02}:{:02}.{cs:02},{:.3},{:.3}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            len as f64 / t,
            1.0 / t
        );
        return;
    }
    let _ = writeln!(out, "{verb} {len}/{len} bytes at offset {off}");
    let _ = writeln!(
        out,
        "{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
        human(len as f64),
        t,
        human(len as f64 / t),
        1.0 / t
    );
}

/// qemu-io's `dump_buffer`.
fn dump(out: &mut dyn Write, buf: &[u8], off: u64) {
    for (i, row) in buf.chunks(16).enumerate() {
        let hex: String = row.iter().map(|b| format!("{b:02x} ")).collect();
        let text: String = row.iter().map(|&b| if b.is_ascii_alphanumeric() { b as char } else { '.' }).collect();
        let _ = writeln!(out, "{:08x}:  {hex} {text}", off + i as u64 * 16);
    }
}

/// Runs `cmd` on the disk of `size` bytes behind `q`; statistics and pattern mismatches go
/// to `out`, failures to `err` (qemu-io's "read failed: ..."). Returns false when the
/// command failed or a pattern did not verify (qemu-io's exit status 1).
pub fn run(q: &mut Queue, size: u64, cmd: &Cmd, out: &mut dyn Write, err: &mut dyn Write) -> bool {
    let (verb, off, len) = match *cmd {
        Cmd::Nothing => return true,
        Cmd::Flush => {
            return match q.flush() {
                Ok(()) => true,
                Err(e) => {
                    let _ = writeln!(err, "flush failed: {e}");
                    false
                }
            };
        }
        Cmd::Read { off, len, .. } => ("read", off, len),
        Cmd::Write { off, len, .. } => ("write", off, len),
        Cmd::Discard { off, len, .. } => ("discard", off, len),
    };
    // The range is checked before any buffer exists: a request past the end costs nothing.
    if off.checked_add(len).is_none_or(|end| end > size) {
        let _ = writeln!(
            err,
            "{verb} failed: invalid request: range {off}+{len} is past the end of the image ({size} bytes)"
        );
        return false;
    }
    let t = Instant::now();
    let r = match *cmd {
        Cmd::Read { pattern, report: rep, .. } => {
            let r = read_range(q, off, len, |buf| {
                if let Some(p) = pattern
                    && let Some(bad) = buf.iter().position(|&b| b != p)
                {
                    let _ = writeln!(out, "Pattern verification failed at offset {}, {len} bytes", off + bad as u64);
                    return false;
                }
                if rep.dump && !rep.quiet {
                    dump(out, buf, off);
                }
                true
            });
            match r {
                Ok(verified) => {
                    report(out, rep, "read", off, len, t.elapsed().as_secs_f64());
                    return verified;
                }
                Err(e) => Err(e),
            }
        }
        Cmd::Write { pattern, zero, unmap, fua, report: rep, .. } => {
            let r = if zero { write_zeroes(q, off, len, unmap) } else { write_bytes(q, off, len, pattern) };
            let r = r.and_then(|()| if fua { q.flush().map_err(|e| e.to_string()) } else { Ok(()) });
            r.map(|()| report(out, rep, "wrote", off, len, t.elapsed().as_secs_f64()))
        }
        Cmd::Discard { report: rep, .. } => {
            // Discard is advisory: shrink to whole sectors.
            let (a, b) = (off.div_ceil(512) * 512, (off + len) / 512 * 512);
            let r = if b > a { q.discard(a, b - a).map_err(|e| e.to_string()) } else { Ok(()) };
            r.map(|()| report(out, rep, "discard", off, len, t.elapsed().as_secs_f64()))
        }
        Cmd::Flush | Cmd::Nothing => unreachable!(),
    };
    match r {
        Ok(()) => true,
        Err(e) => {
            let _ = writeln!(err, "{verb} failed: {e}");
            false
        }
    }
}

/// A buffer for `len` bytes, or the message of a failed allocation.
fn buffer(len: u64) -> Result<AlignedBuf, String> {
    usize::try_from(len).ok().and_then(AlignedBuf::try_new).ok_or_else(|| "Cannot allocate memory".to_string())
}

/// Reads `off..off + len` (any byte range inside the disk; the engine takes 512-byte aligned
/// requests) and hands the bytes to `check`.
fn read_range(q: &mut Queue, off: u64, len: u64, check: impl FnOnce(&[u8]) -> bool) -> Result<bool, String> {
    if len == 0 {
        return Ok(check(&[]));
    }
    let start = off & !511;
    let end = (off + len).div_ceil(512) * 512;
    let mut buf = buffer(end - start)?;
    q.read_at(&mut buf, start).map_err(|e| e.to_string())?;
    let head = (off - start) as usize;
    Ok(check(&buf[head..head + len as usize]))
}

/// Writes `len` bytes of `byte` at any byte offset: whole sectors directly, the partial
/// sectors at either end read-modify-write (as QEMU's block layer does for qemu-io).
fn write_bytes(q: &mut Queue, off: u64, len: u64, byte: u8) -> Result<(), String> {
    if len == 0 {
        return Ok(());
    }
    let start = off & !511;
    let end = (off + len).div_ceil(512) * 512;
    let mut buf = buffer(end - start)?;
    let (head_partial, tail_partial) = (start != off, end != off + len);
    if head_partial {
        q.read_at(&mut buf[..512], start).map_err(|e| e.to_string())?;
    }
    // The last sector, unless it is the first one and was just read.
    if tail_partial && !(head_partial && end - 512 == start) {
        let n = buf.len();
        q.read_at(&mut buf[n - 512..], end - 512).map_err(|e| e.to_string())?;
    }
    let head = (off - start) as usize;
    buf[head..head + len as usize].fill(byte);
    q.write_at(&buf, start).map_err(|e| e.to_string())
}

/// Writes zeros at any byte offset without a buffer for the whole range: the aligned middle
/// as a zero write, partial sectors at either end as byte writes.
fn write_zeroes(q: &mut Queue, off: u64, len: u64, unmap: bool) -> Result<(), String> {
    let end = off + len;
    let (a, b) = (off.div_ceil(512) * 512, end / 512 * 512);
    if a >= b {
        return write_bytes(q, off, len, 0);
    }
    write_bytes(q, off, a - off, 0)?;
    q.write_zeroes(a, b - a, unmap).map_err(|e| e.to_string())?;
    write_bytes(q, b, end - b, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_as_qemu_strtosz() {
        let ok = [
            ("0", 0),
            ("512", 512),
            ("+5", 5),
            ("010", 10),
            ("0x10", 16),
            ("0X10", 16),
            ("+0x10", 16),
            ("1k", 1024),
            ("1K", 1024),
            ("1b", 1),
            ("1B", 1),
            ("1.5k", 1536),
            ("1.k", 1024),
            (".5k", 512),
            ("5.", 5),
            ("0.0005k", 1),
            ("1.9999k", 2048),
            ("1e", 1 << 60),
            ("7E", 7 << 60),
            ("9223372036854775807", i64::MAX as u64),
        ];
        for (s, v) in ok {
            assert_eq!(strtosz(s), Ok(v), "{s}");
        }
        for s in [
            "", "-0", "-1", "+", ".", ".k", "k", "1.5", "1kb", "12x", "1e3", "0x", "0x1k", "0x10.", "00x10", "1 k",
            "1\t",
        ] {
            assert_eq!(strtosz(s), Err(NumError::Invalid), "{s}");
        }
        for s in ["18446744073709551616", "16E", "0x10000000000000000", "99999999999999999999k"] {
            assert_eq!(strtosz(s), Err(NumError::TooLarge), "{s}");
        }
        assert_eq!(cvtnum("8E").unwrap_err(), "Parsing error: argument too large -- 8E");
        assert_eq!(
            cvtnum("18446744073709551615").unwrap_err(),
            "Parsing error: argument too large -- 18446744073709551615"
        );
        assert_eq!(cvtnum("8192P").unwrap_err(), "Parsing error: argument too large -- 8192P");
        assert!(cvtnum("8191P").is_ok());
    }

    #[test]
    fn patterns_as_strtol() {
        for (s, v) in [
            ("0", 0),
            ("255", 255),
            ("0xff", 255),
            ("0XfF", 255),
            ("010", 8),
            ("+1", 1),
            ("-0", 0),
            (" 7", 7),
            ("0x00cd", 0xcd),
        ] {
            assert_eq!(parse_pattern(s), Ok(v), "{s}");
        }
        for s in [
            "256",
            "0x1ff",
            "-1",
            "abc",
            "1k",
            "0x",
            "08",
            "1.0",
            "99999999999999999999999999",
            "0x100000000000000000cd",
        ] {
            assert_eq!(parse_pattern(s), Err(format!("{s} is not a valid pattern byte")), "{s}");
        }
    }

    #[test]
    fn commands_and_qemu_io_messages() {
        let rd = |pattern, off, len, report| Cmd::Read { pattern, off, len, report };
        let q = Report { quiet: true, ..Report::default() };
        assert_eq!(parse("read -P 0xab 0 64k"), Ok(rd(Some(0xab), 0, 65536, Report::default())));
        assert_eq!(parse("r -qP0 1 2"), Ok(rd(Some(0), 1, 2, q)));
        assert_eq!(parse("read 0 1 -q"), Ok(rd(None, 0, 1, q)));
        assert_eq!(parse("read -- 0 1"), Ok(rd(None, 0, 1, Report::default())));
        assert_eq!(parse(""), Ok(Cmd::Nothing));
        assert_eq!(parse("  flush "), Ok(Cmd::Flush));
        assert_eq!(
            parse("write -z -u -n 0 8G"),
            Ok(Cmd::Write {
                pattern: 0,
                zero: true,
                unmap: true,
                fua: false,
                off: 0,
                len: 8 << 30,
                report: Report::default()
            })
        );
        let err = |s: &str| parse(s).unwrap_err();
        assert_eq!(err("read 0 8E"), "Parsing error: argument too large -- 8E");
        assert_eq!(err("write -P 1 0 8E"), "Parsing error: argument too large -- 8E");
        assert_eq!(err("read 0 18446744073709551615"), "Parsing error: argument too large -- 18446744073709551615");
        assert_eq!(err("read 0 64G"), "length cannot exceed 2147483136, given 64G");
        assert_eq!(err("discard 0 3G"), "length cannot exceed 2147483136, given 3G");
        assert_eq!(err("write -z 0 3G"), "length cannot exceed 2147483136 without -n, given 3G");
        assert!(parse("read 0 2147483136").is_ok());
        assert_eq!(err("read 0 2147483137"), "length cannot exceed 2147483136, given 2147483137");
        assert_eq!(err("write -P 256 0 512"), "256 is not a valid pattern byte");
        assert_eq!(err("write -P 0x1ff 0 512"), "0x1ff is not a valid pattern byte");
        assert_eq!(err("read 0 12x"), "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 12x");
        assert_eq!(err("write -u 0 512"), "-u requires -z to be specified");
        assert_eq!(err("write -n 0 512"), "-n requires -z to be specified");
        assert_eq!(err("write -z -P 1 0 1"), "Only one of -z, -P, and -s can be specified at the same time");
        assert_eq!(err("frob 0 1"), "command \"frob\" not found");
        assert_eq!(err("read 0"), "bad argument count 1 to read, expected at least 2 arguments");
        assert_eq!(err("flush 1"), "bad argument count 1 to flush, expected 0 arguments");
        assert!(err("read 0 1 2").starts_with("read [-abCqrv]"));
        assert!(err("read 0 -1").starts_with("read: invalid option -- '1'\nread [-abCqrv]"));
        assert!(err("write -x 0 1").starts_with("write: invalid option -- 'x'\nwrite [-bcCfnqruz]"));
        assert!(err("read 0 1 -P").starts_with("read: option requires an argument -- 'P'\n"));
        assert_eq!(err("read -s 0 0 1"), "read: option -s is not supported by quring");
    }

    #[test]
    fn human_sizes_as_qemu_io() {
        assert_eq!(human(512.0), "512 bytes");
        assert_eq!(human(1536.0), "1.500 KiB");
        assert_eq!(human(65536.0), "64 KiB");
        assert_eq!(human(0.5), "0.500000 bytes");
        assert_eq!(human(12.0005), "12 bytes");
    }
}
