//! `quring map`: the guest -> file mapping, merged and printed exactly as `qemu-img map`.

use crate::util::open_ro;
use clap::Parser;
use quring::image::status::BlockStatus;
use std::fmt::Write;

/// Arguments of `quring map`.
#[derive(Parser)]
pub struct Args {
    #[command(flatten)]
    a: crate::args::InspectArgs,
}

struct Entry {
    start: u64,
    st: BlockStatus,
}

fn mergeable(a: &Entry, b: &Entry) -> bool {
    let (x, y) = (&a.st, &b.st);
    x.zero == y.zero
        && x.data == y.data
        && x.compressed == y.compressed
        && x.depth == y.depth
        && x.present == y.present
        && x.file == y.file
        && x.offset.is_some() == y.offset.is_some()
        && x.offset.is_none_or(|o| Some(o + x.len) == y.offset)
}

pub fn run(Args { a }: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let img = open_ro(&a.image, a.force_share).map_err(|e| format!("Could not open '{}': {e}", a.image.display()))?;
    let json = a.json();
    let size = img.size();
    let mut out = String::new();
    if json {
        out.push('[');
    } else {
        let _ = writeln!(out, "{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
    }
    let mut cur: Option<Entry> = None;
    let mut first = true;
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(1 << 30);
        let st = img.block_status(off, n)?;
        let len = st.len;
        let next = Entry { start: off, st };
        match &mut cur {
            Some(c) if mergeable(c, &next) => c.st.len += len,
            _ => {
                if let Some(c) = cur.take() {
                    dump(&mut out, &c, json, &mut first);
                }
                cur = Some(next);
            }
        }
        off += len;
    }
    if let Some(c) = cur.take() {
        dump(&mut out, &c, json, &mut first);
    }
    if json {
        out.push_str("]\n");
    }
    print!("{out}");
    Ok(0)
}

fn dump(out: &mut String, e: &Entry, json: bool, first: &mut bool) {
    let s = &e.st;
    if json {
        if !*first {
            out.push_str(",\n");
        }
        *first = false;
        let _ = write!(
            out,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, s.len, s.depth, s.present, s.zero, s.data, s.compressed
        );
        if let Some(o) = s.offset {
            let _ = write!(out, ", \"offset\": {o}");
        }
        out.push('}');
    } else if s.data
        && let (Some(o), Some(f)) = (s.offset, &s.file)
    {
        let _ = writeln!(out, "{:<16}{:<16}{:<16}{}", hx(e.start), hx(s.len), hx(o), f.display());
    }
}

/// printf's `%#x`: "0" for zero, "0x..." otherwise.
fn hx(v: u64) -> String {
    if v == 0 { "0".into() } else { format!("{v:#x}") }
}
