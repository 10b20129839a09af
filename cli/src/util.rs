//! Shared CLI helpers: qemu-style sizes and `-o key=value,...` option lists.
//!
//! Like `io_lang.rs`, this file only uses the library's public API: the fuzz target `cli`
//! (fuzz/harness.rs) includes it by path to fuzz the option values the tools parse.

use quring::format::header::CompressionType;
use quring::format::layout::{CreateOptions, Preallocation};
use quring::image::{Image, Options};
use std::path::Path;
use std::sync::Arc;

/// Parses a qemu-img size: a number with an optional binary suffix (k, M, G, T, P, E; b for
/// bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(format!("Invalid size '{s}': unknown suffix '{c}'")),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| format!("Invalid size '{s}': too large"));
    }
    let f: f64 = num.parse().map_err(|_| format!("Invalid size '{s}'"))?;
    if f.is_nan() || f < 0.0 || f * mult as f64 > u64::MAX as f64 {
        return Err(format!("Invalid size '{s}'"));
    }
    Ok((f * mult as f64) as u64)
}

/// Parses `key=value,key=value` (qemu's `-o`), later options overriding earlier ones.
pub fn parse_opts(list: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for l in list {
        for kv in l.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("Invalid option '{kv}': expected key=value"))?;
            out.retain(|(ok, _)| ok != k);
            out.push((k.to_string(), v.to_string()));
        }
    }
    Ok(out)
}

fn on_off(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
    }
}

/// Applies qemu-img style `-o` options to `o`.
pub fn apply_create_opts(o: &mut CreateOptions, list: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let mut compat_set = None;
    for (k, v) in parse_opts(list)? {
        match k.as_str() {
            "cluster_size" => o.cluster_size = parse_size(&v)?,
            "extended_l2" => o.extended_l2 = on_off(&k, &v)?,
            "refcount_bits" => o.refcount_bits = v.parse().map_err(|_| format!("Invalid refcount_bits '{v}'"))?,
            "lazy_refcounts" => o.lazy_refcounts = on_off(&k, &v)?,
            "compat" => {
                compat_set = Some(match v.as_str() {
                    "0.10" | "v2" => true,
                    "1.1" | "v3" => false,
                    _ => return Err(format!("Invalid compatibility level: '{v}'").into()),
                })
            }
            "preallocation" => {
                o.preallocation = match v.as_str() {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    "falloc" => Preallocation::Falloc,
                    "full" => Preallocation::Full,
                    _ => return Err(format!("Invalid parameter '{v}' for preallocation").into()),
                }
            }
            "backing_file" => o.backing_file = Some(v),
            "backing_fmt" => o.backing_fmt = Some(v),
            "compression_type" => {
                o.compression = match v.as_str() {
                    "zlib" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(format!("Invalid compression type '{v}'").into()),
                }
            }
            "l2_less" => o.l2_less = on_off(&k, &v)?,
            "data_file" => o.data_file = Some(v),
            "data_file_raw" => o.data_file_raw = on_off(&k, &v)?,
            // quring's identity extension (docs/identity.md); on by default in the tools.
            "identity" => o.identity = on_off(&k, &v)?.then(quring::format::identity::Identity::generate),
            other => return Err(format!("Invalid parameter '{other}'").into()),
        }
    }
    if let Some(v2) = compat_set {
        o.compat_v2 = v2;
    }
    Ok(())
}

/// The GUID (nil when it has none) and length of the backing file `name` of a new image at
/// `image`, for the new image's identity extension (None: the file cannot be read).
pub fn backing_identity(image: &Path, name: &str, fmt: Option<&str>) -> (quring::format::identity::Guid, Option<u64>) {
    let path = quring::image::resolve_backing_path(image, name);
    let guid = quring::image::header_guid(&path).unwrap_or_default();
    let len = match fmt {
        Some("raw") => std::fs::metadata(&path).ok().map(|m| m.len()),
        _ => open_ro(&path, true).map(|i| i.size()).ok().or_else(|| std::fs::metadata(&path).ok().map(|m| m.len())),
    };
    (guid, len)
}

/// Opens an image read-only for inspection tools (`force_share`: qemu-img's -U).
pub fn open_ro(path: &Path, force_share: bool) -> quring::Result<Arc<Image>> {
    Image::open(path, &Options { read_only: true, force_share, ..Options::default() })
}

/// Formats a byte count like qemu-img ("4 MiB", "1.5 GiB", "324 KiB").
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    // qemu prints three significant digits.
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    format!("{s} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("12x").is_err());
        assert_eq!(human_size(4194304), "4 MiB");
        assert_eq!(human_size(331776), "324 KiB");
    }
}
