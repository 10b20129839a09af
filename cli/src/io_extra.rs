//! qemu-io commands beyond `io_lang.rs`'s core (read, write, discard, flush): `aio_read`,
//! `aio_write`, `aio_flush` (run to completion at once: the results are the same as
//! qemu-io's once its requests are flushed), `readv`/`writev` (one request over the sum of
//! the lengths), `length`, `info`, `map`, `alloc`, `truncate`, `sleep` and `help`, with
//! qemu-io's output.

use crate::io_lang::{self, Cmd};
use quring::queue::Queue;
use std::io::Write;

/// A command of this file.
pub enum Extra {
    Length,
    Info,
    Map,
    Alloc { off: u64, len: u64 },
    Truncate(u64),
    Sleep(u64),
    Help(Option<String>),
}

/// One `-c` string: a core command (aliases rewritten) or an extra one.
pub enum Parsed {
    Core(Cmd),
    Extra(Extra),
}

impl Parsed {
    pub fn writes(&self) -> bool {
        match self {
            Parsed::Core(c) => c.writes(),
            Parsed::Extra(Extra::Truncate(_)) => true,
            Parsed::Extra(_) => false,
        }
    }
}

const HELP: &[(&str, &str)] = &[
    ("aio_flush", "aio_flush -- completes all outstanding aio requests"),
    ("aio_read", "aio_read [-Cqv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes"),
    ("aio_write", "aio_write [-Cfiquz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes"),
    ("alloc", "alloc offset [count] -- checks if offset is allocated in the file"),
    ("discard", "discard [-Cq] off len -- discards a number of bytes at a specified offset"),
    ("flush", "flush -- flush all in-core file state to disk"),
    ("help", "help [command] -- help for one or all commands"),
    ("info", "info -- prints information about the current file"),
    ("length", "length -- gets the length of the current file"),
    ("map", "map -- prints the allocation state of all sectors"),
    ("read", "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset"),
    ("readv", "readv [-Cqv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset"),
    ("sleep", "sleep milliseconds -- waits for the given value in milliseconds"),
    ("truncate", "truncate [-m prealloc_mode] off -- truncates the current file at the given offset"),
    (
        "write",
        "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset",
    ),
    ("writev", "writev [-Cfq] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset"),
];

/// Parses one command line.
pub fn parse(line: &str) -> Result<Parsed, String> {
    let words: Vec<&str> = line.split(' ').filter(|w| !w.is_empty()).collect();
    let Some((&name, rest)) = words.split_first() else { return io_lang::parse(line).map(Parsed::Core) };
    let nums = |n: usize| -> Result<Vec<u64>, String> {
        if rest.len() != n {
            return Err(format!("bad argument count {} to {name}, expected {n} arguments", rest.len()));
        }
        rest.iter().map(|w| io_lang::cvtnum(w)).collect()
    };
    let e = match name {
        "length" | "l" => Extra::Length,
        "info" | "i" => Extra::Info,
        "map" => Extra::Map,
        "alloc" | "a" => {
            if rest.is_empty() || rest.len() > 2 {
                return Err(format!("bad argument count {} to alloc, expected between 1 and 2 arguments", rest.len()));
            }
            let off = io_lang::cvtnum(rest[0])?;
            let len = if rest.len() == 2 { io_lang::cvtnum(rest[1])? } else { 512 };
            Extra::Alloc { off, len }
        }
        "truncate" | "t" => Extra::Truncate(nums(1)?[0]),
        "sleep" => Extra::Sleep(nums(1)?[0]),
        "help" | "?" => Extra::Help(rest.first().map(|s| s.to_string())),
        "aio_flush" => return io_lang::parse("flush").map(Parsed::Core),
        "aio_read" | "aio_write" | "readv" | "writev" => {
            // One request over the sum of the lengths: rewrite as read/write off total.
            let verb = if name.contains("read") { "read" } else { "write" };
            let (opts, pos): (Vec<&str>, Vec<&str>) = split_opts(rest);
            if pos.len() < 2 {
                return Err(format!("bad argument count {} to {name}, expected at least 2 arguments", pos.len()));
            }
            let mut total = 0u64;
            for l in &pos[1..] {
                total = total.checked_add(io_lang::cvtnum(l)?).ok_or("Parsing error: argument too large")?;
            }
            let line = format!("{verb} {} {} {total}", opts.join(" "), pos[0]);
            return io_lang::parse(&line).map(Parsed::Core);
        }
        _ => return io_lang::parse(line).map(Parsed::Core),
    };
    Ok(Parsed::Extra(e))
}

/// Splits options (with the argument of -P) from positional words.
fn split_opts<'a>(rest: &[&'a str]) -> (Vec<&'a str>, Vec<&'a str>) {
    let (mut opts, mut pos) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < rest.len() {
        let w = rest[i];
        if w.starts_with('-') && w.len() > 1 {
            opts.push(w);
            if w.ends_with('P') && i + 1 < rest.len() {
                opts.push(rest[i + 1]);
                i += 1;
            }
        } else {
            pos.push(w);
        }
        i += 1;
    }
    (opts, pos)
}

/// qemu-io's size printing (cvtstr): "4 MiB", "3.938 MiB", "512 bytes".
fn cvtstr(n: u64) -> String {
    const UNITS: [(&str, u64); 6] =
        [("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    let (v, unit) =
        UNITS.iter().find(|(_, m)| n >= *m).map_or((n as f64, "bytes"), |(u, m)| (n as f64 / *m as f64, *u));
    let s = if unit == "bytes" { format!("{v:.6}") } else { format!("{v:.3}") };
    let s = s.find(".000").map_or(s.as_str(), |i| &s[..i]).to_string();
    format!("{s} {unit}")
}

/// Runs an extra command. Returns false on failure.
pub fn run(q: &mut Queue, e: &Extra, out: &mut dyn Write, err: &mut dyn Write) -> bool {
    let img = q.image().clone();
    match e {
        Extra::Length => {
            let _ = writeln!(out, "{}", cvtstr(img.size()));
        }
        Extra::Info => {
            let h = img.header();
            let _ = writeln!(out, "format name: qcow2");
            let _ = writeln!(out, "cluster size: {}", cvtstr(img.geometry().cluster_size()));
            let _ = writeln!(out, "vm state offset: {}", cvtstr(img.geometry().l1_coverage()));
            let _ = writeln!(out, "Format specific information:");
            let _ = writeln!(out, "    compat: {}", if h.version == 2 { "0.10" } else { "1.1" });
            let _ = writeln!(out, "    compression type: {}", h.compression_type.name());
            if h.version == 3 {
                let _ = writeln!(out, "    lazy refcounts: {}", h.lazy_refcounts());
            }
            let _ = writeln!(out, "    refcount bits: {}", 1u64 << h.refcount_order);
            if h.version == 3 {
                use quring::format::feature::{INCOMPAT_CORRUPT, INCOMPAT_EXTL2};
                let _ = writeln!(out, "    corrupt: {}", h.incompatible_features & INCOMPAT_CORRUPT != 0);
                let _ = writeln!(out, "    extended l2: {}", h.incompatible_features & INCOMPAT_EXTL2 != 0);
            }
        }
        Extra::Map => {
            // Allocated in this layer or not, merged (qemu-io's map_is_allocated).
            let size = img.size();
            let mut off = 0;
            let mut cur: Option<(bool, u64, u64)> = None;
            let mut lines = Vec::new();
            while off < size {
                let st = match img.block_status(off, size - off) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = writeln!(err, "map failed: {e}");
                        return false;
                    }
                };
                let alloc = st.present && st.depth == 0;
                match &mut cur {
                    Some((a, _, l)) if *a == alloc => *l += st.len,
                    _ => {
                        if let Some(c) = cur.take() {
                            lines.push(c);
                        }
                        cur = Some((alloc, off, st.len));
                    }
                }
                off += st.len;
            }
            lines.extend(cur);
            for (a, o, l) in lines {
                let _ = writeln!(
                    out,
                    "{} ({l:#x}) bytes {} at offset {} ({o:#x})",
                    cvtstr(l),
                    if a { "    allocated" } else { "not allocated" },
                    cvtstr(o)
                );
            }
        }
        Extra::Alloc { off, len } => {
            let end = off.saturating_add(*len).min(img.size());
            let (mut p, mut sum) = (*off, 0u64);
            while p < end {
                match img.block_status(p, end - p) {
                    Ok(st) => {
                        if st.present && st.depth == 0 {
                            sum += st.len;
                        }
                        p += st.len;
                    }
                    Err(e) => {
                        let _ = writeln!(err, "alloc failed: {e}");
                        return false;
                    }
                }
            }
            let _ = writeln!(out, "{sum}/{len} bytes allocated at offset {}", cvtstr(*off));
        }
        Extra::Truncate(n) => {
            if let Err(e) = img.resize(*n) {
                let _ = writeln!(err, "truncate: {e}");
                return false;
            }
        }
        Extra::Sleep(ms) => std::thread::sleep(std::time::Duration::from_millis(*ms)),
        Extra::Help(None) => {
            for (_, u) in HELP {
                let _ = writeln!(out, "{u}");
            }
            let _ = writeln!(out, "\nUse 'help commandname' for extended help.");
        }
        Extra::Help(Some(c)) => match HELP.iter().find(|(n, _)| n == c) {
            Some((_, u)) => {
                let _ = writeln!(out, "{u}");
            }
            None => {
                let _ = writeln!(err, "command {c} not found");
                return false;
            }
        },
    }
    true
}
