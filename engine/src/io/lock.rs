//! QEMU-compatible image locking (the file-posix protocol), so that quring and QEMU tools
//! exclude each other exactly as two QEMU processes do.
//!
//! # Protocol
//!
//! QEMU describes what an opener does with a node as a set of *permissions* it holds and a set
//! of permissions it lets others hold ("shared"). The bits are
//! [`perm::CONSISTENT_READ`] (0x1), [`perm::WRITE`] (0x2), [`perm::WRITE_UNCHANGED`] (0x4) and
//! [`perm::RESIZE`] (0x8). On the image file they become one-byte **shared** (`F_RDLCK`)
//! open-file-description locks (`F_OFD_SETLK`):
//!
//! * byte [`LOCK_BASE_PERM`] + bit for every permission held;
//! * byte [`LOCK_BASE_SHARED`] + bit for every permission *not* shared.
//!
//! Because every lock is shared, taking them never fails; exclusion comes from the check that
//! follows: an opener tests (`F_OFD_GETLK` with `F_WRLCK`, i.e. "would an exclusive lock on
//! this byte conflict?") byte 200 + bit for each permission it wants to hold (someone refuses
//! to share it), then byte 100 + bit for each permission it refuses to share (someone holds
//! it). On a conflict every lock taken is dropped again and the open fails.
//!
//! Observed with QEMU 10.0 (`strace` of the tools, `/proc/locks` of a running `qemu-io`):
//!
//! | opener                    | holds (100+) | unshares (200+) | checks          |
//! |---------------------------|--------------|-----------------|-----------------|
//! | `qemu-io` (read-write)    | 100 101 103  | 201 203         | 200 201 203 101 103 |
//! | `qemu-io -r`              | 100          | 201 203         | 200 101 103     |
//! | `qemu-io -r -U`           | 100          | —               | 200             |
//! | `qemu-img info`           | —            | 201 203         | 101 103         |
//! | `qemu-img info -U`        | —            | —               | —               |
//!
//! [`LockMode::ReadWrite`] mirrors `qemu-io`, [`LockMode::ReadOnly`] mirrors `qemu-io -r`, and
//! `force_share` with `ReadOnly` mirrors `qemu-io -r -U`. Like QEMU, force-share is refused
//! for read-write opens.
//!
//! OFD locks belong to the open file description: they last as long as any fd referring to it
//! (the [`ImageLock`] keeps a `dup` of the caller's fd), never conflict with other locks of the
//! same description, but do conflict with locks taken through a separate `open()` of the same
//! file — even in the same process, which is what keeps two writers in one process apart.

use crate::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// First lock byte for held permissions (QEMU's `RAW_LOCK_PERM_BASE`).
pub const LOCK_BASE_PERM: i64 = 100;
/// First lock byte for permissions not shared (QEMU's `RAW_LOCK_SHARED_BASE`).
pub const LOCK_BASE_SHARED: i64 = 200;

/// QEMU's block permission bits (`BLK_PERM_*`).
pub mod perm {
    /// A reader sees consistent data.
    pub const CONSISTENT_READ: u64 = 0x1;
    /// Guest-visible writes.
    pub const WRITE: u64 = 0x2;
    /// Writes that do not change the guest-visible content.
    pub const WRITE_UNCHANGED: u64 = 0x4;
    /// Changing the file's size.
    pub const RESIZE: u64 = 0x8;
    /// Every permission QEMU knows (`BLK_PERM_ALL`).
    pub const ALL: u64 = 0xf;
}

/// The number of permission bits (bytes per lock range).
const PERM_BITS: u32 = perm::ALL.count_ones();

/// QEMU's name for one permission bit, as used in its lock error messages.
pub fn perm_name(bit: u64) -> &'static str {
    match bit {
        perm::CONSISTENT_READ => "consistent read",
        perm::WRITE => "write",
        perm::WRITE_UNCHANGED => "write unchanged",
        perm::RESIZE => "resize",
        _ => "unknown",
    }
}

/// How the image is going to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Reading only (like `qemu-io -r`): holds consistent-read, refuses to share write/resize.
    ReadOnly,
    /// Reading and writing (like `qemu-io`): holds consistent-read, write and resize, refuses
    /// to share write/resize.
    ReadWrite,
}

impl LockMode {
    /// `(held, shared)` permission masks QEMU uses for this kind of open of a qcow2 file.
    pub fn perms(self, force_share: bool) -> (u64, u64) {
        let held = match self {
            LockMode::ReadOnly => perm::CONSISTENT_READ,
            LockMode::ReadWrite => perm::CONSISTENT_READ | perm::WRITE | perm::RESIZE,
        };
        let shared = if force_share { perm::ALL } else { perm::ALL & !(perm::WRITE | perm::RESIZE) };
        (held, shared)
    }
}

/// QEMU-compatible locks held on an image file. Dropping it releases them.
#[derive(Debug)]
pub struct ImageLock {
    /// A `dup` of the caller's fd: same open file description, so the locks stay valid for
    /// as long as this value lives even if the caller closes its own fd.
    file: File,
    path: PathBuf,
    mode: LockMode,
    held: u64,
    shared: u64,
    /// False when the filesystem does not support OFD locks and nothing was taken.
    active: bool,
}

impl ImageLock {
    /// Takes QEMU-compatible locks on `file` (an already-open `File` of the image at `path`;
    /// `path` is only used in messages).
    ///
    /// `force_share` is QEMU's `-U`/`force-share=on`: every permission is shared, so nobody
    /// else is refused, and only an opener refusing to share consistent-read (which QEMU's
    /// tools never do for a plain open) makes it fail. It is rejected for `ReadWrite`, as QEMU
    /// does ("force-share=on can only be used with read-only images").
    ///
    /// Fails with [`Error::Locked`] carrying QEMU's message, e.g.
    /// `Failed to get "write" lock` / `Is another process using the image [PATH]?`.
    pub fn acquire(file: &File, path: &Path, mode: LockMode, force_share: bool) -> Result<ImageLock> {
        if force_share && mode == LockMode::ReadWrite {
            return Err(Error::InvalidRequest(format!(
                "{}: force-share=on can only be used with read-only images",
                path.display()
            )));
        }
        let (held, shared) = mode.perms(force_share);
        let file = file.try_clone().map_err(|e| Error::io(format!("dup {}", path.display()), e))?;
        let mut lock = ImageLock { file, path: path.to_path_buf(), mode, held, shared, active: false };
        if !lock.supported()? {
            return Ok(lock);
        }
        lock.active = true;
        // On error, dropping `lock` unlocks every byte it may have taken.
        lock.apply().and_then(|()| lock.check())?;
        Ok(lock)
    }

    /// The mode the lock was taken for.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Permissions held (`BLK_PERM_*` mask).
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Permissions shared with other openers (`BLK_PERM_*` mask).
    pub fn shared(&self) -> u64 {
        self.shared
    }

    /// Whether locks are actually held (false on filesystems without OFD lock support).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The image path the lock was taken for.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The byte offsets this lock holds read locks on, in ascending order.
    pub fn locked_bytes(&self) -> Vec<i64> {
        if !self.active {
            return Vec::new();
        }
        let held = bits(self.held).map(|(i, _)| LOCK_BASE_PERM + i);
        let unshared = bits(perm::ALL & !self.shared).map(|(i, _)| LOCK_BASE_SHARED + i);
        held.chain(unshared).collect()
    }

    /// Probes OFD lock support the way QEMU's `qemu_has_file_lock` does (a whole-file
    /// `F_OFD_GETLK`); `Ok(false)` when the filesystem or kernel does not support it.
    fn supported(&self) -> Result<bool> {
        let mut fl = flock(libc::F_WRLCK, 0, 0);
        match fcntl(self.file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl)) {
            Ok(_) => Ok(true),
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::ENOLCK) => Ok(false),
            Err(e) => Err(Error::errno(format!("probing locks on {}", self.path.display()), e as i32)),
        }
    }

    /// `raw_apply_lock_bytes`: a shared lock per held permission and per unshared permission.
    fn apply(&self) -> Result<()> {
        for off in self.locked_bytes() {
            if let Err(e) = set(&self.file, libc::F_RDLCK, off) {
                return Err(self.lock_error(e, format!("Failed to lock byte {off}")));
            }
        }
        Ok(())
    }

    /// `raw_check_lock_bytes`: nobody refuses to share what we hold, nobody holds what we
    /// refuse to share.
    fn check(&self) -> Result<()> {
        for (i, bit) in bits(self.held) {
            self.test(LOCK_BASE_SHARED + i, || format!("Failed to get \"{}\" lock", perm_name(bit)))?;
        }
        for (i, bit) in bits(perm::ALL & !self.shared) {
            self.test(LOCK_BASE_PERM + i, || format!("Failed to get shared \"{}\" lock", perm_name(bit)))?;
        }
        Ok(())
    }

    /// `qemu_lock_fd_test(fd, off, 1, exclusive = true)`: fails when any other open file
    /// description holds a lock on byte `off`.
    fn test(&self, off: i64, msg: impl FnOnce() -> String) -> Result<()> {
        let mut fl = flock(libc::F_WRLCK, off, 1);
        let r = loop {
            match fcntl(self.file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl)) {
                Err(Errno::EINTR) => continue,
                r => break r,
            }
        };
        match r {
            Ok(_) if fl.l_type == libc::F_UNLCK as libc::c_short => Ok(()),
            Ok(_) => Err(self.lock_error(Errno::EAGAIN, msg())),
            Err(e) => Err(self.lock_error(e, msg())),
        }
    }

    /// QEMU's `raw_lock_error_setg_errno` plus the "another process" hint: a conflict is
    /// [`Error::Locked`], any other errno an I/O error.
    fn lock_error(&self, e: Errno, msg: String) -> Error {
        match e {
            Errno::EAGAIN | Errno::EACCES => {
                Error::Locked(format!("{msg}\nIs another process using the image [{}]?", self.path.display()))
            }
            e => Error::errno(format!("{msg} on {}", self.path.display()), e as i32),
        }
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        // Other fds may still share this open file description, so release explicitly
        // rather than relying on the close. Unlocking a byte that is not locked is a no-op.
        for off in self.locked_bytes() {
            let _ = set(&self.file, libc::F_UNLCK, off);
        }
    }
}

/// `(index, bit)` for every set bit of `mask` within QEMU's permission range.
fn bits(mask: u64) -> impl Iterator<Item = (i64, u64)> {
    (0..PERM_BITS).map(|i| (i64::from(i), 1u64 << i)).filter(move |&(_, bit)| mask & bit != 0)
}

fn flock(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

/// One-byte `F_OFD_SETLK` of type `kind` at `off`, retried on EINTR.
fn set(file: &File, kind: libc::c_int, off: i64) -> std::result::Result<(), Errno> {
    let fl = flock(kind, off, 1);
    loop {
        match fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl)) {
            Err(Errno::EINTR) => continue,
            r => return r.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_lock_bytes() {
        let dir = std::env::temp_dir().join(format!("quring-lock-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let f = File::options().read(true).write(true).open(&path).unwrap();
        let rw = ImageLock::acquire(&f, &path, LockMode::ReadWrite, false).unwrap();
        assert_eq!(rw.locked_bytes(), vec![100, 101, 103, 201, 203]);
        drop(rw);
        let ro = ImageLock::acquire(&f, &path, LockMode::ReadOnly, false).unwrap();
        assert_eq!(ro.locked_bytes(), vec![100, 201, 203]);
        drop(ro);
        let ro_u = ImageLock::acquire(&f, &path, LockMode::ReadOnly, true).unwrap();
        assert_eq!(ro_u.locked_bytes(), vec![100]);
        drop(ro_u);
        assert!(matches!(ImageLock::acquire(&f, &path, LockMode::ReadWrite, true), Err(Error::InvalidRequest(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
