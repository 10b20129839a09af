//! `quring compare [-f fmt] [-F fmt] [-s] [-q] [-U] A B`: qemu-img compare. Exit 0 when the
//! guest contents are identical, 1 when they differ (the first differing 512-byte sector
//! is named), 2 when an image cannot be opened, 3 when block status fails, 4 when a read
//! fails. Without -s, images of different sizes are identical when the larger one holds
//! only zeros past the smaller one's end.

use crate::guest::Guest;
use clap::Parser;
use std::path::PathBuf;

/// qemu-img's comparison buffer: the most compared at once.
const IO_BUF: u64 = 2 << 20;

/// Arguments of `quring compare`.
#[derive(Parser)]
pub struct Args {
    /// Format of the first image.
    #[arg(short = 'f')]
    fmt1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    fmt2: Option<String>,
    /// Strict: images of different sizes, or whose allocation differs, are not identical.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Quiet: only the exit code.
    #[arg(short = 'q')]
    quiet: bool,
    /// Force share (open images another process writes).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Progress (accepted; the comparison is quick).
    #[arg(short = 'p')]
    progress: bool,
    /// Cache mode of the source (accepted; reads go through the engine).
    #[arg(short = 'T')]
    cache: Option<String>,
    /// The two images.
    images: Vec<PathBuf>,
}

/// How a comparison ended.
enum End {
    Identical,
    Differ(String),
    Error(u8, String),
}

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let _ = (a.progress, &a.cache);
    if a.images.len() != 2 {
        eprintln!("quring: Expecting two image file names\nTry 'quring compare --help' for more info");
        return Ok(1);
    }
    let say = |s: &str| {
        if !a.quiet {
            println!("{s}");
        }
    };
    let open = |i: usize, f: &Option<String>| Guest::open(&a.images[i], f.as_deref(), a.force_share);
    let mut g1 = match open(0, &a.fmt1) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("quring: {e}");
            return Ok(2);
        }
    };
    let mut g2 = match open(1, &a.fmt2) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("quring: {e}");
            return Ok(2);
        }
    };
    match compare(&mut g1, &mut g2, a.strict, &a.images, &say) {
        End::Identical => {
            say("Images are identical.");
            Ok(0)
        }
        End::Differ(m) => {
            say(&m);
            Ok(1)
        }
        End::Error(code, m) => {
            eprintln!("quring: {m}");
            Ok(code)
        }
    }
}

/// First 512-byte sector of `a` that differs from `b` (`b` None: from zeros).
fn first_diff(a: &[u8], b: Option<&[u8]>) -> Option<u64> {
    let pos = match b {
        Some(b) => a.iter().zip(b).position(|(x, y)| x != y),
        None => a.iter().position(|&x| x != 0),
    };
    pos.map(|p| (p as u64) & !511)
}

fn compare(g1: &mut Guest, g2: &mut Guest, strict: bool, names: &[PathBuf], say: &dyn Fn(&str)) -> End {
    let (s1, s2) = (g1.size(), g2.size());
    if strict && s1 != s2 {
        return End::Differ("Strict mode: Image size mismatch!".into());
    }
    let common = s1.min(s2);
    let mut b1 = vec![0u8; IO_BUF as usize];
    let mut b2 = vec![0u8; IO_BUF as usize];
    let status_failed = |i: usize| End::Error(3, format!("Sector allocation test failed for {}", names[i].display()));
    let mut off = 0u64;
    while off < common {
        let Ok(e1) = g1.status(off, s1 - off) else { return status_failed(0) };
        let Ok(e2) = g2.status(off, s2 - off) else { return status_failed(1) };
        let chunk = e1.len.min(e2.len).min(common - off).min(IO_BUF);
        let flags = |e: &crate::guest::Extent| (e.zero, e.data, e.allocated, e.offset_valid, e.compressed);
        if strict && flags(&e1) != flags(&e2) {
            return End::Differ(format!("Strict mode: Offset {off} block status mismatch!"));
        }
        if !(e1.zero && e2.zero) {
            let n = chunk as usize;
            for (g, buf, known_zero, i) in [(&mut *g1, &mut b1, e1.zero, 0), (&mut *g2, &mut b2, e2.zero, 1)] {
                if known_zero {
                    buf[..n].fill(0);
                } else if let Err(e) = g.read(off, &mut buf[..n]) {
                    return End::Error(4, format!("Error while reading offset {off} of {}: {e}", names[i].display()));
                }
            }
            if let Some(d) = first_diff(&b1[..n], Some(&b2[..n])) {
                return End::Differ(format!("Content mismatch at offset {}!", off + d));
            }
        }
        off += chunk;
    }
    if s1 != s2 {
        say("Warning: Image size mismatch!");
        let (g, size, i) = if s1 > s2 { (g1, s1, 0) } else { (g2, s2, 1) };
        while off < size {
            let Ok(e) = g.status(off, size - off) else { return status_failed(i) };
            let chunk = e.len.min(size - off).min(IO_BUF);
            if !e.zero {
                let n = chunk as usize;
                if let Err(err) = g.read(off, &mut b1[..n]) {
                    return End::Error(4, format!("Error while reading offset {off} of {}: {err}", names[i].display()));
                }
                if let Some(d) = first_diff(&b1[..n], None) {
                    return End::Differ(format!("Content mismatch at offset {}!", off + d));
                }
            }
            off += chunk;
        }
    }
    End::Identical
}
