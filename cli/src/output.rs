//! The files a command is about to overwrite (`convert`'s output, `create`'s target) are
//! checked before a byte of them changes, as qemu-img does:
//!
//! * QEMU's write lock on the file must be ours (another process using the image, or the
//!   input of this command, which holds read locks that refuse to share writing): "Failed to
//!   get \"write\" lock / Is another process using the image [F]?";
//! * the file must not be the input or any file of the input's backing chain, compared by
//!   device and inode (a raw backing file carries no quring lock, `-U` shares the input with
//!   writers, and a filesystem may not support OFD locks: the lock alone does not cover
//!   these);
//! * for `create`, the new image must not be its own backing file ("Trying to create an
//!   image with the same filename as the backing file") nor a file of its backing chain.
//!
//! A refusal leaves the file byte-identical: it is opened without `O_TRUNC` and truncated only
//! after every check passed.

use quring::image::{Backing, Image};
use quring::io::lock::{ImageLock, LockMode};
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// One file of an image chain: its device and inode, and the path it was opened by.
#[derive(Clone, Debug)]
pub struct ChainFile {
    pub dev: u64,
    pub ino: u64,
    pub path: PathBuf,
}

/// Every file of `img`'s chain, top first: the image, its qcow2 backing images and a raw
/// backing file at the bottom.
pub fn chain_files(img: &Image) -> Vec<ChainFile> {
    let mut out = Vec::new();
    let mut push = |f: &File, path: &Path| {
        if let Ok(m) = f.metadata() {
            out.push(ChainFile { dev: m.dev(), ino: m.ino(), path: path.to_path_buf() });
        }
    };
    let mut cur = img;
    loop {
        push(cur.file().file(), cur.path());
        match cur.backing() {
            Some(Backing::Qcow2(b)) => cur = b,
            Some(Backing::Raw(r)) => {
                push(r.file.file(), r.file.path());
                break;
            }
            None => break,
        }
    }
    out
}

/// The chain file that `m` (the metadata of a target) is, if any.
fn member<'a>(m: &std::fs::Metadata, chain: &'a [ChainFile]) -> Option<&'a ChainFile> {
    chain.iter().find(|c| c.dev == m.dev() && c.ino == m.ino())
}

/// QEMU's lock refusal for `path`.
fn lock_refusal(path: &Path) -> String {
    format!("Failed to get \"write\" lock\nIs another process using the image [{}]?", path.display())
}

/// Refuses `path` as the output of a conversion of `chain` when it is a file of that chain.
/// With the input locked (no `-U`), QEMU would have refused it with its lock message (it
/// locks raw backing files too); with `-U` QEMU would overwrite the input, quring refuses.
pub fn check_not_input(
    path: &Path,
    m: &std::fs::Metadata,
    chain: &[ChainFile],
    force_share: bool,
) -> Result<(), String> {
    let Some(c) = member(m, chain) else { return Ok(()) };
    if !force_share {
        return Err(lock_refusal(path));
    }
    let what = if std::ptr::eq(c, &chain[0]) { "the input image" } else { "a file of the input's backing chain" };
    Err(format!("'{}' is {what}: refusing to overwrite it (even with -U)", path.display()))
}

/// Opens `path` for a command to overwrite (created when missing, never truncated here),
/// holding QEMU's write lock, after checking that it is no file of the input `chain`. The
/// caller truncates it through the returned file; the lock lasts as long as the guard.
pub fn open_output(path: &Path, chain: &[ChainFile], force_share: bool) -> Result<(File, ImageLock), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("Could not create '{}': {e}", path.display()))?;
    let lock = ImageLock::acquire(&f, path, LockMode::ReadWrite, false).map_err(|e| e.to_string())?;
    let m = f.metadata().map_err(|e| format!("Could not stat '{}': {e}", path.display()))?;
    check_not_input(path, &m, chain, force_share)?;
    Ok((f, lock))
}

/// Checks the existing file at `path` (if any) against `chain` before it is replaced by a
/// new image (the library's `create` then takes the write lock before truncating).
pub fn check_replace(path: &Path, chain: &[ChainFile], force_share: bool) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) => check_not_input(path, &m, chain, force_share),
        Err(_) => Ok(()),
    }
}

/// `path` as an absolute path with its directory resolved (the file itself need not exist).
fn normalized(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (dir.canonicalize(), path.file_name()) {
        (Ok(d), Some(n)) => d.join(n),
        _ => path.to_path_buf(),
    }
}

/// Do `a` and `b` name the same file? The same inode when both exist, else the same
/// normalized path.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => normalized(a) == normalized(b),
    }
}

/// `create`'s check of a new image at `target` whose backing file is `backing` (the name
/// as given, resolved relative to the target like QEMU) and, when the backing file was
/// opened, its chain.
pub fn check_create_target(target: &Path, backing: &str, chain: &[ChainFile]) -> Result<(), String> {
    let resolved = quring::image::resolve_backing_path(target, backing);
    if target.as_os_str() == backing || same_file(target, &resolved) {
        return Err("Error: Trying to create an image with the same filename as the backing file".into());
    }
    if let Ok(m) = std::fs::metadata(target)
        && let Some(c) = member(&m, chain)
    {
        return Err(format!(
            "Error: Trying to create an image over a file of its own backing chain ('{}')",
            c.path.display()
        ));
    }
    Ok(())
}
