//! `quring measure [--output=human|json] [-O raw|qcow2] [-o options] [--size N | [-f fmt]
//! IMG]`: qemu-img measure. The sizes a new image needs (required) and takes fully
//! allocated, for a virtual size or for the content of an image (with its backing chain);
//! qemu-img's human lines and JSON (QDict key order), its messages and exit codes.

use crate::args::{OutputFormat, parse_output};
use crate::guest::Guest;
use clap::Parser;
use quring::format::layout::{CreateOptions, Preallocation};
use quring::format::measure::fully_allocated_size;
use std::path::PathBuf;

/// Arguments of `quring measure`.
#[derive(Parser)]
pub struct Args {
    /// Output format: human or json.
    #[arg(long = "output", value_parser = parse_output, default_value = "human")]
    output: OutputFormat,
    /// Format of the image to create (raw by default, as qemu-img).
    #[arg(short = 'O', default_value = "raw")]
    out_fmt: String,
    /// Creation options of the new image (qcow2: cluster_size, extended_l2, compat,
    /// refcount_bits, preallocation, backing_file...).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Virtual size of the new image (instead of an input image).
    #[arg(long = "size")]
    size: Option<String>,
    /// Format of the input image.
    #[arg(short = 'f')]
    fmt: Option<String>,
    /// Force share.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The input image.
    image: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let fail = |m: &str| {
        eprintln!("quring: {m}");
        Ok(1)
    };
    if a.image.is_none() && a.fmt.is_some() {
        return fail("--image-opts, -f, and -l require a filename argument.");
    }
    if a.image.is_none() && a.size.is_none() {
        return fail("Either --size N or one filename must be specified.");
    }
    if a.image.is_some() && a.size.is_some() {
        return fail("--size N cannot be used together with a filename.");
    }
    let qcow2 = match a.out_fmt.as_str() {
        "qcow2" => true,
        "raw" => false,
        o => return fail(&format!("Block driver '{o}' does not support size measurement")),
    };
    let mut o = CreateOptions::default();
    if qcow2 {
        if let Err(e) = crate::util::apply_create_opts(&mut o, &a.options) {
            eprintln!("quring: {e}");
            return fail("Invalid options for file format 'qcow2'");
        }
    } else if let Some((k, _)) = crate::util::parse_opts(&a.options)?.into_iter().find(|(k, _)| k != "preallocation") {
        eprintln!("quring: Invalid parameter '{k}'");
        return fail("Invalid options for file format 'raw'");
    }
    let size = match &a.size {
        Some(s) => Some(crate::util::parse_size(s).map_err(|_| {
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        })?),
        None => None,
    };
    let mut input = match &a.image {
        Some(p) => match Guest::open(p, a.fmt.as_deref(), a.force_share) {
            Ok(g) => Some(g),
            Err(e) => return fail(&e),
        },
        None => None,
    };

    let (required, full, bitmaps) = if !qcow2 {
        let r = match &input {
            Some(g) => g.size(),
            None => size.unwrap_or(0).div_ceil(512) * 512,
        };
        (r, r, None)
    } else {
        // qcow2_measure()'s option checks, in its order.
        let cs = o.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return fail("Cluster size must be a power of two between 512 and 2048k");
        }
        if o.extended_l2 && cs < 16384 {
            return fail("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
        }
        if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
            return fail("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if o.compat_v2 && o.refcount_bits != 16 {
            return fail(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            );
        }
        let order = o.refcount_bits.trailing_zeros();
        let mut vsize = size.unwrap_or(0).div_ceil(cs) * cs;
        let l2e = if o.extended_l2 { 16 } else { 8 };
        if (vsize / cs).div_ceil(cs / l2e) * 8 > 32 << 20 {
            return fail("The image size is too large (try using a larger cluster size)");
        }
        let mut required = 0u64;
        if let Some(g) = &mut input {
            let ssize = g.size();
            vsize = ssize.div_ceil(cs) * cs;
            if o.backing_file.is_some() {
                // The new image's backing file may share nothing with the input.
                required = vsize;
            } else {
                let mut off = 0;
                while off < ssize {
                    let e = match g.status(off, ssize - off) {
                        Ok(e) => e,
                        Err(e) => return fail(&format!("Unable to get block status: {e}")),
                    };
                    let mut n = e.len;
                    if !e.zero && e.data {
                        // Counted up to the end of its cluster (and the next status from there).
                        n = (off + n).div_ceil(cs) * cs - off;
                        required += off % cs + n;
                    }
                    off += n;
                }
            }
        }
        if matches!(o.preallocation, Preallocation::Full | Preallocation::Falloc) {
            required = vsize;
        }
        let full = fully_allocated_size(vsize, cs, order, o.extended_l2);
        let required = full - vsize + required;
        // Bitmaps need a v3 target and a qcow2 input.
        let bitmaps = match input.as_ref().and_then(|g| g.image()) {
            Some(img) if !o.compat_v2 => Some(input_bitmaps(img, a.image.as_deref(), cs)),
            _ => None,
        };
        (required, full, bitmaps)
    };
    if a.output == OutputFormat::Json {
        let mut s = String::from("{\n");
        if let Some(b) = bitmaps {
            s += &format!("    \"bitmaps\": {b},\n");
        }
        s += &format!("    \"required\": {required},\n    \"fully-allocated\": {full}\n}}");
        println!("{s}");
    } else {
        println!("required size: {required}\nfully allocated size: {full}");
        if let Some(b) = bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(0)
}

/// The space the input image's persistent bitmaps take in the new image (0 without any:
/// QEMU loads them only while the bitmaps autoclear bit is set).
fn input_bitmaps(img: &quring::image::Image, path: Option<&std::path::Path>, cs: u64) -> u64 {
    use quring::format::bytes::{be32, be64};
    use std::os::unix::fs::FileExt;
    let h = img.header();
    if h.autoclear_features & quring::format::feature::AUTOCLEAR_BITMAPS == 0 {
        return 0;
    }
    let Some(ext) = h.extensions.iter().find(|e| e.kind == quring::format::extension::EXT_BITMAPS) else {
        return 0;
    };
    if ext.data.len() < 24 {
        return 0;
    }
    let (count, dir_size, dir_offset) = (be32(&ext.data, 0), be64(&ext.data, 8), be64(&ext.data, 16));
    // QEMU's limit on the directory (64 MiB).
    if dir_size > 64 << 20 {
        return 0;
    }
    let mut dir = vec![0u8; dir_size as usize];
    let Some(Ok(f)) = path.map(std::fs::File::open) else { return 0 };
    if f.read_exact_at(&mut dir, dir_offset).is_err() {
        return 0;
    }
    quring::format::measure::bitmaps_size(&dir, count, img.size(), cs)
}
