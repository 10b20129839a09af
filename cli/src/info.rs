//! `quring info`: image information in qemu-img's human and JSON shapes.

use crate::util::human_size;
use clap::Parser;
use quring::format::feature;
use quring::image::Image;
use serde_json::{Map, Value, json};
use std::os::unix::fs::MetadataExt;

/// Arguments of `quring info`.
#[derive(Parser)]
pub struct Args {
    #[command(flatten)]
    a: crate::args::InspectArgs,
    /// Describe every image of the backing chain, top first.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
}

pub fn run(Args { a, backing_chain }: Args) -> Result<u8, Box<dyn std::error::Error>> {
    if !backing_chain {
        let (v, human) = describe(&a.image, a.format.as_deref(), a.force_share)?;
        if a.json() {
            println!("{}", crate::qjson::pretty(&v));
        } else {
            print!("{human}");
        }
        return Ok(0);
    }
    // qemu-img info --backing-chain: each image, then its backing file (as the image names
    // it, relative to the image's directory), in the format the image records.
    let mut seen = std::collections::HashSet::new();
    let mut path = a.image.clone();
    let mut fmt = a.format.clone();
    let (mut values, mut texts) = (Vec::new(), Vec::new());
    loop {
        if !seen.insert(path.clone()) {
            return Err(format!("Backing file '{}' creates an infinite loop.", path.display()).into());
        }
        let (v, human) = describe(&path, fmt.as_deref(), a.force_share)?;
        let next = v.get("full-backing-filename").and_then(|b| b.as_str()).map(std::path::PathBuf::from);
        fmt = v.get("backing-filename-format").and_then(|f| f.as_str()).map(str::to_string);
        values.push(v);
        texts.push(human);
        match next {
            Some(n) => path = n,
            None => break,
        }
    }
    if a.json() {
        println!("{}", crate::qjson::pretty(&Value::Array(values)));
    } else {
        print!("{}", texts.join("\n"));
    }
    Ok(0)
}

/// One image's `info`: qemu-img's JSON object and human text.
fn describe(
    image: &std::path::Path,
    format: Option<&str>,
    force_share: bool,
) -> Result<(Value, String), Box<dyn std::error::Error>> {
    let fmt = crate::probe::resolve(image, format, false)?;
    let could_not = |e: String| format!("Could not open '{}': {e}", image.display());
    if fmt == crate::probe::ImageFormat::Raw {
        let f = std::fs::File::open(image).map_err(|e| could_not(crate::probe::os_text(&e)))?;
        let md = f.metadata()?;
        let file = file_child(image, &md);
        let mut v = Map::new();
        v.insert("children".into(), json!([{"name": "file", "info": file}]));
        let len = md.len().div_ceil(512) * 512;
        v.insert("virtual-size".into(), json!(len));
        v.insert("filename".into(), json!(image.display().to_string()));
        v.insert("format".into(), json!("raw"));
        v.insert("actual-size".into(), json!(md.blocks() * 512));
        v.insert("dirty-flag".into(), json!(false));
        let v = Value::Object(v);
        let mut s = String::new();
        s += &format!("image: {}\n", image.display());
        s += "file format: raw\n";
        s += &format!("virtual size: {} ({len} bytes)\n", human_size(len));
        s += &format!("disk size: {}\n", human_size(md.blocks() * 512));
        s += &child_human(&v);
        return Ok((v, s));
    }
    // qemu-img info does not open the backing chain: an image whose backing file is missing
    // is still described (with the path the backing file was looked for at).
    let opts = quring::image::Options {
        read_only: true,
        force_share,
        backing: quring::image::BackingPolicy::Ignore,
        // Nor does it need the data file: one that is missing leaves the image described.
        data_file: quring::image::DataFilePolicy::MetadataOnly,
        ..Default::default()
    };
    // A missing file in qemu-img's words (no Rust "os error" suffix).
    std::fs::File::open(image)
        .map_err(|e| could_not(format!("Could not open '{}': {}", image.display(), crate::probe::os_text(&e))))?;
    let img = Image::open(image, &opts).map_err(|e| could_not(e.to_string()))?;
    let v = info_json(&img, image)?;
    let text = human(&img, &v);
    Ok((v, text))
}

/// The protocol child (`children[0].info`): the image file itself.
fn file_child(path: &std::path::Path, md: &std::fs::Metadata) -> Value {
    json!({
        "children": [],
        // QEMU's lengths are in whole sectors.
        "virtual-size": md.len().div_ceil(512) * 512,
        "filename": path.display().to_string(),
        "format": "file",
        "actual-size": md.blocks() * 512,
        "format-specific": {"type": "file", "data": {}},
        "dirty-flag": false
    })
}

/// qemu-img's "Child node '/file':" section.
fn child_human(v: &Value) -> String {
    let f = &v["children"][0]["info"];
    let len = f["virtual-size"].as_u64().unwrap_or(0);
    format!(
        "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {} ({len} bytes)\n    disk size: {}\n",
        f["filename"].as_str().unwrap_or(""),
        human_size(len),
        human_size(f["actual-size"].as_u64().unwrap_or(0))
    )
}

/// QEMU's human form of a list inside "Format specific information" (the bitmaps):
/// "[i]:" per element, nested objects and lists indented by four more spaces, each level
/// at `depth` * 4 spaces.
fn human_list(list: &[Value], depth: usize) -> String {
    let pad = " ".repeat(depth * 4);
    let mut s = String::new();
    for (i, v) in list.iter().enumerate() {
        match v {
            Value::Object(m) => {
                s += &format!("{pad}[{i}]:\n");
                for (k, x) in m {
                    match x {
                        Value::Array(l) => {
                            s += &format!("{pad}    {k}:\n");
                            s += &human_list(l, depth + 2);
                        }
                        Value::String(t) => s += &format!("{pad}    {k}: {t}\n"),
                        other => s += &format!("{pad}    {k}: {other}\n"),
                    }
                }
            }
            Value::String(t) => s += &format!("{pad}[{i}]: {t}\n"),
            other => s += &format!("{pad}[{i}]: {other}\n"),
        }
    }
    s
}

/// A snapshot's DATE column: local time, as QEMU's strftime("%Y-%m-%d %H:%M:%S").
fn snapshot_date(sec: u32) -> String {
    let t = sec as libc::time_t;
    // SAFETY: tm is plain data, fully written by localtime_r on success.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to a time_t and a tm.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return sec.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// A snapshot's VM CLOCK column: "HHHH:MM:SS.mmm".
fn snapshot_clock(nsec: u64) -> String {
    let secs = nsec / 1_000_000_000;
    format!("{:04}:{:02}:{:02}.{:03}", secs / 3600, (secs / 60) % 60, secs % 60, (nsec / 1_000_000) % 1000)
}

/// The snapshot table as qemu-img prints it (`Snapshot list:` and one line per snapshot).
pub fn snapshot_table(img: &Image) -> String {
    let mut s = String::from("Snapshot list:\n");
    s += &format!("{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT");
    for sn in img.snapshots() {
        let vmsize =
            sn.extra.get(0..8).map(|b| u64::from_be_bytes(b.try_into().unwrap())).unwrap_or(sn.vm_state_size as u64);
        let icount = match sn.extra.get(16..24).map(|b| u64::from_be_bytes(b.try_into().unwrap())) {
            Some(ic) if ic != u64::MAX => ic.to_string(),
            _ => String::new(),
        };
        s += &format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            human_size(vmsize),
            snapshot_date(sn.date_sec),
            snapshot_clock(sn.vm_clock_nsec),
            icount
        );
    }
    s
}

fn info_json(img: &Image, path: &std::path::Path) -> Result<Value, Box<dyn std::error::Error>> {
    let h = img.header();
    let md = std::fs::metadata(path)?;
    let mut data = Map::new();
    if h.version == 2 {
        data.insert("compat".into(), json!("0.10"));
        data.insert("compression-type".into(), json!(h.compression_type.name()));
        data.insert("refcount-bits".into(), json!(1u64 << h.refcount_order));
    } else {
        data.insert("compat".into(), json!("1.1"));
        data.insert("compression-type".into(), json!(h.compression_type.name()));
        data.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        let bitmaps = img.bitmaps();
        if !bitmaps.is_empty() {
            // QEMU's Qcow2BitmapInfo: flags ("in-use", "auto"), name, granularity.
            let list: Vec<Value> = bitmaps
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.in_use {
                        flags.push("in-use");
                    }
                    if b.auto {
                        flags.push("auto");
                    }
                    json!({"flags": flags, "name": b.name, "granularity": b.granularity})
                })
                .collect();
            data.insert("bitmaps".into(), Value::Array(list));
        }
        data.insert("refcount-bits".into(), json!(1u64 << h.refcount_order));
        if h.has_data_file() {
            // The name can be absent (`amend -o data_file=` removes it): qemu-img then
            // shows only data-file-raw.
            if let Some(name) = h.data_file()? {
                data.insert("data-file".into(), json!(name));
            }
            data.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
        data.insert("corrupt".into(), json!(h.incompatible_features & feature::INCOMPAT_CORRUPT != 0));
        data.insert("extended-l2".into(), json!(h.incompatible_features & feature::INCOMPAT_EXTL2 != 0));
    }
    // quring's identity extension (docs/identity.md): not known to qemu-img, so listed
    // after its keys.
    if let Some(id) = img.identity() {
        data.insert("guid".into(), json!(id.guid.to_string()));
        if h.backing_file.is_some() {
            if !id.backing_guid.is_nil() {
                data.insert("backing-guid".into(), json!(id.backing_guid.to_string()));
            }
            data.insert("backing-length".into(), json!(id.backing_len));
            if img.identity_stale() {
                // Another tool changed the backing file: the fields above are not applied.
                data.insert("backing-identity-stale".into(), json!(true));
            }
        }
    }
    let mut v = Map::new();
    v.insert("children".into(), json!([{"name": "file", "info": file_child(path, &md)}]));
    if h.backing_file.is_some()
        && let Some(f) = h.backing_format()
    {
        v.insert("backing-filename-format".into(), json!(f));
    }
    if !img.snapshots().is_empty() {
        let snaps: Vec<Value> = img
            .snapshots()
            .iter()
            .map(|s| {
                let icount = s.extra.get(16..24).map(|b| u64::from_be_bytes(b.try_into().unwrap()));
                let mut m = Map::new();
                if let Some(ic) = icount
                    && ic != u64::MAX
                {
                    m.insert("icount".into(), json!(ic));
                }
                let vmsize = s
                    .extra
                    .get(0..8)
                    .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
                    .unwrap_or(s.vm_state_size as u64);
                // The order qemu-img prints them in.
                m.insert("vm-clock-nsec".into(), json!(s.vm_clock_nsec % 1_000_000_000));
                m.insert("name".into(), json!(s.name));
                m.insert("date-sec".into(), json!(s.date_sec));
                m.insert("date-nsec".into(), json!(s.date_nsec));
                m.insert("vm-clock-sec".into(), json!(s.vm_clock_nsec / 1_000_000_000));
                m.insert("id".into(), json!(s.id));
                m.insert("vm-state-size".into(), json!(vmsize));
                Value::Object(m)
            })
            .collect();
        v.insert("snapshots".into(), Value::Array(snaps));
    }
    v.insert("virtual-size".into(), json!(img.size()));
    v.insert("filename".into(), json!(path.display().to_string()));
    v.insert("cluster-size".into(), json!(img.geometry().cluster_size()));
    v.insert("format".into(), json!("qcow2"));
    v.insert("actual-size".into(), json!(md.blocks() * 512));
    v.insert("format-specific".into(), json!({"type": "qcow2", "data": Value::Object(data)}));
    if let Some(b) = &h.backing_file {
        let full = quring::image::resolve_backing_path(path, b);
        v.insert("full-backing-filename".into(), json!(full.display().to_string()));
        v.insert("backing-filename".into(), json!(b));
    }
    v.insert("dirty-flag".into(), json!(h.incompatible_features & feature::INCOMPAT_DIRTY != 0));
    Ok(Value::Object(v))
}

fn human(img: &Image, v: &Value) -> String {
    let mut s = String::new();
    let size = img.size();
    s += &format!("image: {}\n", v["filename"].as_str().unwrap_or(""));
    s += "file format: qcow2\n";
    s += &format!("virtual size: {} ({size} bytes)\n", human_size(size));
    s += &format!("disk size: {}\n", human_size(v["actual-size"].as_u64().unwrap_or(0)));
    s += &format!("cluster_size: {}\n", img.geometry().cluster_size());
    if let Some(b) = v.get("backing-filename").and_then(|b| b.as_str()) {
        s += &format!("backing file: {b}");
        let full = v["full-backing-filename"].as_str().unwrap_or(b);
        if full != b {
            s += &format!(" (actual path: {full})");
        }
        s += "\n";
        if let Some(f) = v.get("backing-filename-format").and_then(|f| f.as_str()) {
            s += &format!("backing file format: {f}\n");
        }
    }
    if !img.snapshots().is_empty() {
        s += &snapshot_table(img);
    }
    s += "Format specific information:\n";
    if let Some(d) = v["format-specific"]["data"].as_object() {
        for (k, val) in d {
            if let Value::Array(list) = val {
                s += &format!("    {}:\n", k.replace('-', " "));
                s += &human_list(list, 2);
                continue;
            }
            let val = match val {
                Value::String(x) => x.clone(),
                other => other.to_string(),
            };
            s += &format!("    {}: {val}\n", k.replace('-', " "));
        }
    }
    s += &child_human(v);
    s
}
