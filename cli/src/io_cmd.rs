//! `quring io`: qemu-io style commands (`read [-P pat] off len`, `write [-P pat] [-z [-u]]
//! off len`, `discard off len`, `flush`), with qemu-io's output and exit status (1 when a
//! command failed or a pattern did not verify).

use crate::util::parse_size;
use clap::Parser;
use quring::image::{Image, Options};
use quring::io::AlignedBuf;
use quring::queue::{Queue, QueueOptions};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `quring io`.
#[derive(Parser)]
pub struct Args {
    /// A command to run (repeatable), e.g. -c 'read -P 0xab 0 64k'.
    #[arg(short = 'c', long = "cmd")]
    cmds: Vec<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format (only qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Force share.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// L2 cache size in bytes (QEMU's l2-cache-size; k/M suffixes).
    #[arg(long = "l2-cache-size")]
    l2_cache_size: Option<String>,
    /// Cache mode: writeback (default) or writethrough.
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: String,
    /// The image.
    image: PathBuf,
}

enum Cmd {
    Read { pattern: Option<u8>, off: u64, len: u64, quiet: bool },
    Write { pattern: u8, zero: bool, unmap: bool, off: u64, len: u64, quiet: bool },
    Discard { off: u64, len: u64, quiet: bool },
    Flush,
}

fn parse_num(s: &str) -> Result<u64, String> {
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).map_err(|_| format!("invalid number '{s}'"));
    }
    parse_size(s)
}

fn parse_cmd(c: &str) -> Result<Cmd, String> {
    let words: Vec<&str> = c.split_whitespace().collect();
    let (name, rest) = words.split_first().ok_or("empty command")?;
    let mut pattern = None;
    let mut zero = false;
    let mut unmap = false;
    let mut quiet = false;
    let mut pos = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            "-P" => {
                i += 1;
                let p = rest.get(i).ok_or("-P needs a pattern")?;
                let v = parse_num(p)?;
                pattern = Some((v & 0xff) as u8);
            }
            "-z" => zero = true,
            "-u" => unmap = true,
            "-q" => quiet = true,
            "-v" | "-C" | "-F" | "-f" | "-n" | "-a" | "-p" => {}
            w if w.starts_with('-') && w.len() > 1 && !w[1..].starts_with(|c: char| c.is_ascii_digit()) => {
                return Err(format!("{name}: unsupported option '{w}'"));
            }
            w => pos.push(w),
        }
        i += 1;
    }
    let two = |pos: &[&str]| -> Result<(u64, u64), String> {
        if pos.len() != 2 {
            return Err(format!("{name}: expected OFFSET LENGTH"));
        }
        Ok((parse_num(pos[0])?, parse_num(pos[1])?))
    };
    match *name {
        "read" => {
            let (off, len) = two(&pos)?;
            Ok(Cmd::Read { pattern, off, len, quiet })
        }
        "write" => {
            let (off, len) = two(&pos)?;
            if unmap && !zero {
                return Err("write: -u requires -z".into());
            }
            Ok(Cmd::Write { pattern: pattern.unwrap_or(0xcd), zero, unmap, off, len, quiet })
        }
        "discard" => {
            let (off, len) = two(&pos)?;
            Ok(Cmd::Discard { off, len, quiet })
        }
        "flush" => Ok(Cmd::Flush),
        other => Err(format!("command '{other}' is not supported (read, write, discard, flush)")),
    }
}

fn size_str(n: u64) -> String {
    crate::util::human_size(n).replace(" B", " bytes")
}

fn report(verb: &str, off: u64, len: u64, t: f64) {
    println!("{verb} {len}/{len} bytes at offset {off}");
    let t = t.max(1e-9);
    println!(
        "{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
        size_str(len),
        t,
        crate::util::human_size((len as f64 / t) as u64),
        1.0 / t
    );
}

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let cmds: Vec<Cmd> = a.cmds.iter().map(|c| parse_cmd(c)).collect::<Result<_, _>>()?;
    let writes = cmds.iter().any(|c| !matches!(c, Cmd::Read { .. }));
    let cache = match a.cache.as_str() {
        "writeback" | "none" => quring::image::CacheMode::Writeback,
        "writethrough" | "directsync" => quring::image::CacheMode::Writethrough,
        c => return Err(format!("Invalid cache mode '{c}'").into()),
    };
    let l2_cache_size = a.l2_cache_size.as_deref().map(parse_size).transpose()?;
    let opts = Options {
        read_only: a.read_only || !writes,
        force_share: a.force_share,
        cache,
        l2_cache_size,
        ..Options::default()
    };
    let img = Image::open(&a.image, &opts).map_err(|e| format!("can't open device {}: {e}", a.image.display()))?;
    let mut q = Queue::new(&img, &QueueOptions::default())?;
    let mut status = 0u8;
    for c in cmds {
        match c {
            Cmd::Read { pattern, off, len, quiet } => {
                // The engine takes 512-byte aligned requests; qemu-io takes any byte range.
                let start = off & !511;
                let end = (off + len).div_ceil(512) * 512;
                let mut abuf = AlignedBuf::new((end - start) as usize);
                let t = Instant::now();
                let r = q.read_at(&mut abuf, start);
                let head = (off - start) as usize;
                let buf = &abuf[head..head + len as usize];
                match r {
                    Ok(()) => {
                        if let Some(p) = pattern
                            && let Some(bad) = buf.iter().position(|&b| b != p)
                        {
                            println!("Pattern verification failed at offset {}, {len} bytes", off + bad as u64);
                            status = 1;
                        }
                        if !quiet {
                            report("read", off, len, t.elapsed().as_secs_f64());
                        }
                    }
                    Err(e) => {
                        eprintln!("read failed: {e}");
                        status = 1;
                    }
                }
            }
            Cmd::Write { pattern, zero, unmap, off, len, quiet } => {
                let t = Instant::now();
                let r = if zero && off % 512 == 0 && len % 512 == 0 {
                    q.write_zeroes(off, len, unmap)
                } else {
                    write_bytes(&mut q, off, len, if zero { 0 } else { pattern })
                };
                match r {
                    Ok(()) => {
                        if !quiet {
                            report("wrote", off, len, t.elapsed().as_secs_f64());
                        }
                    }
                    Err(e) => {
                        eprintln!("write failed: {e}");
                        status = 1;
                    }
                }
            }
            Cmd::Discard { off, len, quiet } => {
                let t = Instant::now();
                // Discard is advisory: shrink to whole sectors.
                let a = off.div_ceil(512) * 512;
                let b = (off + len) / 512 * 512;
                let r = if b > a { q.discard(a, b - a) } else { Ok(()) };
                match r {
                    Ok(()) => {
                        if !quiet {
                            report("discard", off, len, t.elapsed().as_secs_f64());
                        }
                    }
                    Err(e) => {
                        eprintln!("discard failed: {e}");
                        status = 1;
                    }
                }
            }
            Cmd::Flush => {
                if let Err(e) = q.flush() {
                    eprintln!("flush failed: {e}");
                    status = 1;
                }
            }
        }
    }
    // Close explicitly: a failure to make the writes durable is this command's failure (a
    // close left to Drop could only print it).
    drop(q);
    if let Err(e) = img.close() {
        eprintln!("quring: closing '{}' failed: {e}", a.image.display());
        status = 1;
    }
    Ok(status)
}

/// Writes `len` bytes of `byte` at any byte offset: whole sectors directly, partial
/// sectors read-modify-write (as QEMU's block layer does for qemu-io).
fn write_bytes(q: &mut Queue, off: u64, len: u64, byte: u8) -> quring::Result<()> {
    let start = off & !511;
    let end = (off + len).div_ceil(512) * 512;
    let mut buf = AlignedBuf::new((end - start) as usize);
    if start != off || end != off + len {
        q.read_at(&mut buf, start)?;
    }
    let head = (off - start) as usize;
    buf[head..head + len as usize].fill(byte);
    q.write_at(&buf, start)
}
