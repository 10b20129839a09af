//! Shared CLI helpers: qemu-style sizes and `-o key=value,...` option lists.

use clap::Args as ClapArgs;
use quring::image::{Image, Options};
use std::path::Path;
use std::path::PathBuf;
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

/// `--output=human|json`, as qemu-img spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Text for people.
    Human,
    /// qemu-img's JSON.
    Json,
}

/// Parses `--output` with qemu-img's message for a bad value.
pub fn parse_output(s: &str) -> Result<OutputFormat, String> {
    match s {
        "human" => Ok(OutputFormat::Human),
        "json" => Ok(OutputFormat::Json),
        o => Err(format!("--output expects 'human' or 'json' not '{o}'")),
    }
}

/// The arguments every inspecting command (`info`, `map`, `check`) takes, as qemu-img names
/// them.
#[derive(ClapArgs)]
pub struct InspectArgs {
    /// Output format: human or json.
    #[arg(long = "output", value_parser = parse_output, default_value = "human")]
    pub output: OutputFormat,
    /// Image format (only qcow2).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Force share: open the image even when another process writes it (no write lock is
    /// ever taken for inspection; with -U a reader's lock is not taken either).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub image: PathBuf,
}

impl InspectArgs {
    /// Is JSON output wanted?
    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }
}
