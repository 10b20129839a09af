//! `quring info`: image information in qemu-img's human and JSON shapes.

use crate::util::{human_size, open_ro};
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
}

pub fn run(Args { a }: Args) -> Result<u8, Box<dyn std::error::Error>> {
    if let Some(f) = &a.format
        && f != "qcow2"
    {
        return Err(format!("unsupported format '{f}' (quring handles qcow2)").into());
    }
    let img = open_ro(&a.image, a.force_share).map_err(|e| format!("Could not open '{}': {e}", a.image.display()))?;
    let v = info_json(&img, &a.image)?;
    if a.json() {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", human(&img, &v));
    }
    Ok(0)
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
        data.insert("refcount-bits".into(), json!(1u64 << h.refcount_order));
        data.insert("corrupt".into(), json!(h.incompatible_features & feature::INCOMPAT_CORRUPT != 0));
        data.insert("extended-l2".into(), json!(h.incompatible_features & feature::INCOMPAT_EXTL2 != 0));
    }
    let mut v = Map::new();
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
                m.insert("vm-state-size".into(), json!(vmsize));
                m.insert("date-sec".into(), json!(s.date_sec));
                m.insert("date-nsec".into(), json!(s.date_nsec));
                m.insert("vm-clock-nsec".into(), json!(s.vm_clock_nsec % 1_000_000_000));
                m.insert("name".into(), json!(s.name));
                m.insert("vm-clock-sec".into(), json!(s.vm_clock_nsec / 1_000_000_000));
                m.insert("id".into(), json!(s.id));
                Value::Object(m)
            })
            .collect();
        v.insert("snapshots".into(), Value::Array(snaps));
    }
    if let Some(_b) = &h.backing_file
        && let Some(f) = h.backing_format()
    {
        v.insert("backing-filename-format".into(), json!(f));
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
        s += "Snapshot list:\n";
        s +=
            &format!("{:<4} {:<17} {:>8} {:>19} {:>15} {:>10}\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
        for sn in img.snapshots() {
            s += &format!(
                "{:<4} {:<17} {:>8} {:>19} {:>15}\n",
                sn.id,
                sn.name,
                human_size(sn.vm_state_size as u64),
                sn.date_sec,
                sn.vm_clock_nsec
            );
        }
    }
    s += "Format specific information:\n";
    if let Some(d) = v["format-specific"]["data"].as_object() {
        for (k, val) in d {
            let val = match val {
                Value::String(x) => x.clone(),
                other => other.to_string(),
            };
            s += &format!("    {}: {val}\n", k.replace('-', " "));
        }
    }
    s
}
