//! `quring map`: the guest -> file mapping, merged and printed exactly as `qemu-img map`.

use clap::Parser;
use quring::image::status::BlockStatus;
use std::fmt::Write;

/// Arguments of `quring map`.
#[derive(Parser)]
pub struct Args {
    #[command(flatten)]
    a: crate::args::InspectArgs,
    #[command(flatten)]
    chain: crate::args::ChainArgs,
    /// Print the dirty extents of this persistent bitmap instead of the mapping (the whole
    /// disk in extents, each dirty or clean).
    #[arg(long = "bitmap", value_name = "NAME")]
    bitmap: Option<String>,
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

/// What `map` walks: a qcow2 chain through the engine's block status, or a raw file's data
/// and holes.
enum Layer {
    Qcow2(std::sync::Arc<quring::image::Image>),
    Raw(std::fs::File, std::path::PathBuf, u64),
}

impl Layer {
    fn status(&self, off: u64, len: u64) -> Result<BlockStatus, Box<dyn std::error::Error>> {
        match self {
            Layer::Qcow2(img) => Ok(img.block_status(off, len)?),
            Layer::Raw(f, path, size) => {
                let (data, n) = crate::probe::raw_extent(f, off, len, *size);
                Ok(BlockStatus {
                    len: n.max(1),
                    depth: 0,
                    present: true,
                    zero: !data,
                    data,
                    compressed: false,
                    offset: Some(off),
                    file: Some(path.clone()),
                })
            }
        }
    }
}

pub fn run(Args { a, chain, bitmap }: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let could_not = |e: String| format!("Could not open '{}': {e}", a.image.display());
    if let Some(name) = bitmap {
        return dirty_map(&a, &chain, &name);
    }
    let layer = match crate::probe::resolve(&a.image, a.format.as_deref(), false)? {
        crate::probe::ImageFormat::Qcow2 => {
            let mut o = quring::image::Options { read_only: true, force_share: a.force_share, ..Default::default() };
            chain.apply(&mut o)?;
            Layer::Qcow2(quring::image::Image::open(&a.image, &o).map_err(|e| could_not(e.to_string()))?)
        }
        crate::probe::ImageFormat::Raw => {
            let f = std::fs::File::open(&a.image).map_err(|e| could_not(crate::probe::os_text(&e)))?;
            let size = f.metadata()?.len().div_ceil(512) * 512;
            Layer::Raw(f, a.image.clone(), size)
        }
    };
    let json = a.json();
    let size = match &layer {
        Layer::Qcow2(img) => img.size(),
        Layer::Raw(_, _, size) => *size,
    };
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
        let st = layer.status(off, n)?;
        let len = st.len;
        let next = Entry { start: off, st };
        match &mut cur {
            Some(c) if mergeable(c, &next) => c.st.len += len,
            _ => {
                if let Some(c) = cur.take()
                    && !dump(&mut out, &c, json, &mut first)
                {
                    print!("{out}");
                    return Err(NO_OFFSET.into());
                }
                cur = Some(next);
            }
        }
        off += len;
    }
    if let Some(c) = cur.take()
        && !dump(&mut out, &c, json, &mut first)
    {
        print!("{out}");
        return Err(NO_OFFSET.into());
    }
    if json && size == 0 {
        // qemu-img's one entry for an empty image.
        out.push_str(
            "{ \"start\": 0, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}",
        );
    }
    if json {
        out.push_str("]\n");
    }
    print!("{out}");
    Ok(0)
}

/// `map --bitmap NAME`: the dirty extents of a persistent bitmap (what changed since it
/// was created or cleared). JSON: every extent of the disk in order, `{ "start": S,
/// "length": L, "dirty": true|false}` (qemu-img map over `qemu-nbd --bitmap NAME` with
/// `x-dirty-bitmap=qemu:dirty-bitmap:NAME` shows the dirty ones as `"data": false`);
/// human: the dirty extents, offset and length.
fn dirty_map(
    a: &crate::args::InspectArgs,
    chain: &crate::args::ChainArgs,
    name: &str,
) -> Result<u8, Box<dyn std::error::Error>> {
    let could_not = |e: String| format!("Could not open '{}': {e}", a.image.display());
    if crate::probe::resolve(&a.image, a.format.as_deref(), false)? == crate::probe::ImageFormat::Raw {
        return Err(format!("Dirty bitmap '{name}' not found").into());
    }
    let mut o = quring::image::Options {
        read_only: true,
        force_share: a.force_share,
        backing: quring::image::BackingPolicy::Ignore,
        ..Default::default()
    };
    chain.apply(&mut o)?;
    let img = quring::image::Image::open(&a.image, &o).map_err(|e| could_not(e.to_string()))?;
    let dirty = img.dirty_ranges(name).map_err(|e| match e {
        quring::Error::InvalidRequest(s) => s,
        other => other.to_string(),
    })?;
    let size = img.size();
    let mut out = String::new();
    if a.json() {
        let mut extents = Vec::new();
        let mut pos = 0u64;
        for (o, l) in &dirty {
            if o.get() > pos {
                extents.push((pos, o.get() - pos, false));
            }
            extents.push((o.get(), *l, true));
            pos = o.get() + l;
        }
        if pos < size || size == 0 {
            extents.push((pos, size - pos, false));
        }
        let lines: Vec<String> =
            extents.iter().map(|(s, l, d)| format!("{{ \"start\": {s}, \"length\": {l}, \"dirty\": {d}}}")).collect();
        let _ = writeln!(out, "[{}]", lines.join(",\n"));
    } else {
        let _ = writeln!(out, "{:<16}{:<16}", "Offset", "Length");
        for (o, l) in &dirty {
            let _ = writeln!(out, "{:<16}{:<16}", hx(o.get()), hx(*l));
        }
    }
    print!("{out}");
    Ok(0)
}

/// qemu-img's refusal to print a human map of data without a file offset.
const NO_OFFSET: &str = "File contains external, encrypted or compressed clusters.";

/// Prints one merged entry; false when the human format cannot show it (data without an
/// offset: compressed clusters).
fn dump(out: &mut String, e: &Entry, json: bool, first: &mut bool) -> bool {
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
    } else if s.data {
        let (Some(o), Some(f)) = (s.offset, &s.file) else { return false };
        // Data that reads as zeros (a preallocated hole) is not listed, as in qemu-img.
        if s.zero {
            return true;
        }
        let _ = writeln!(out, "{:<16}{:<16}{:<16}{}", hx(e.start), hx(s.len), hx(o), f.display());
    }
    true
}

/// printf's `%#x`: "0" for zero, "0x..." otherwise.
fn hx(v: u64) -> String {
    if v == 0 { "0".into() } else { format!("{v:#x}") }
}
