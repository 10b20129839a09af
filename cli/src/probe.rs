//! Image formats on the command line: `-f raw|qcow2`, or probing when `-f` is absent (the
//! qcow2 magic, else raw), with qemu-img's messages and its warning for a probed raw image
//! opened for writing.

use std::io::Read;
use std::path::Path;

/// The formats quring reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// A raw file: guest offset = file offset.
    Raw,
    /// A qcow2 image (opened through the engine).
    Qcow2,
}

impl ImageFormat {
    /// Parses a format name as `-O` takes it (qemu-img: "Unknown file format 'x'").
    pub fn parse_output(s: &str) -> Result<ImageFormat, String> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            o => Err(format!("Unknown file format '{o}'")),
        }
    }
}

/// qemu-img's warning for a probed raw image opened for writing.
pub fn probed_raw_warning(path: &Path) -> String {
    format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions.",
        path.display()
    )
}

/// The format of `path`: `given` (`-f`) when there is one, else probed. `writing`: the image
/// is opened for writing, so a probed raw format gets qemu-img's warning on stderr. Errors
/// are qemu-img's texts ("Could not open 'x': Unknown driver 'y'", a missing file).
pub fn resolve(path: &Path, given: Option<&str>, writing: bool) -> Result<ImageFormat, String> {
    if let Some(f) = given {
        return match f {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            o => Err(format!("Could not open '{}': Unknown driver '{o}'", path.display())),
        };
    }
    let fmt = probe(path)?;
    if fmt == ImageFormat::Raw && writing {
        eprintln!("{}", probed_raw_warning(path));
    }
    Ok(fmt)
}

/// Probes the format of `path` from its first bytes: the qcow2 magic, else raw.
pub fn probe(path: &Path) -> Result<ImageFormat, String> {
    let p = path.display();
    let mut f = std::fs::File::open(path)
        .map_err(|e| format!("Could not open '{p}': Could not open '{p}': {}", os_text(&e)))?;
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("Could not open '{p}': {}", os_text(&e))),
        }
    }
    Ok(if n == 4 && u32::from_be_bytes(magic) == quring::format::header::MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// An OS error as C's strerror prints it (without Rust's " (os error N)").
pub fn os_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Data or hole status of `len` bytes at `off` of a raw file of `size` bytes (SEEK_DATA /
/// SEEK_HOLE, as QEMU's file driver): (is data, run length). Without SEEK_DATA support
/// everything is data.
pub fn raw_extent(f: &std::fs::File, off: u64, len: u64, size: u64) -> (bool, u64) {
    use std::os::unix::io::AsRawFd;
    let fd = f.as_raw_fd();
    let len = len.min(size.saturating_sub(off));
    // SAFETY: lseek on a valid fd has no memory effects.
    let data = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
    if data < 0 {
        let hole = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        return (!hole, len);
    }
    let data = data as u64;
    if data > off {
        return (false, (data - off).min(len));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, off as i64, libc::SEEK_HOLE) };
    let hole = if hole < 0 { size } else { hole as u64 };
    (true, (hole.max(off + 1) - off).min(len))
}
