//! The external data file of an image (spec: incompatible bit 2, autoclear bit 1, header
//! extension 0x44415441; codec in [`crate::format::data_file`]).
//!
//! The data file is opened beside the image, with the same O_DIRECT file layer and QEMU's
//! lock protocol in the same mode, and every queue addresses it by its fd exactly as it
//! addresses the image file for data: reads, writes and copy-on-write fills of guest data
//! go to [`Image::data_fd`], metadata to the image file.
//!
//! A relative name is opened as QEMU 10 opens it: relative to the current directory of the
//! process, not to the image's directory as backing files are (`qemu-io` run from another
//! directory fails with "Could not open 'NAME'"). Resolving it otherwise would let quring
//! and QEMU, run from one directory, use two different data files for one image.
//!
//! Data clusters are placed at their guest offset (QEMU's `do_alloc_cluster_offset` with a
//! data file) and have no refcounts in the qcow2 file, so freeing an L2 entry frees nothing
//! there; dropped mappings are punched in the data file (QEMU passes the discard through).
//! With `data_file_raw`, zero writes also zero the data file, so that it stays a raw image
//! of the disk.

use super::Image;
use crate::format::header::Header;
use crate::io::ImageFile;
use crate::io::lock::{ImageLock, LockMode};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// An open external data file.
#[derive(Debug)]
pub struct DataFile {
    file: ImageFile,
    _lock: ImageLock,
    /// The name as the header stores it.
    name: String,
    /// The path it was opened at.
    path: PathBuf,
    /// `data_file_raw` (autoclear bit 1).
    raw: bool,
}

impl DataFile {
    /// The name as stored in the header extension.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path it was opened at (the name as stored: relative names are relative to the
    /// current directory, as in QEMU).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Is the data file kept a raw image of the disk?
    pub fn raw(&self) -> bool {
        self.raw
    }

    /// The open file.
    pub fn file(&self) -> &ImageFile {
        &self.file
    }
}

/// Opens the data file `header` names (None: the image has none).
pub(super) fn open(header: &Header, read_only: bool, force_share: bool) -> Result<Option<DataFile>> {
    if !header.has_data_file() {
        return Ok(None);
    }
    let name = header.data_file()?.ok_or_else(|| {
        Error::corrupt(
            "incompatible_features",
            "incompatible bit 2 (external data file) is set but the header has no data file name extension (0x44415441)",
        )
    })?;
    let path = PathBuf::from(&name);
    let file = ImageFile::open(&path, !read_only)
        .map_err(|e| Error::InvalidRequest(format!("Could not open data file '{}': {e}", path.display())))?;
    let mode = if read_only { LockMode::ReadOnly } else { LockMode::ReadWrite };
    let lock = ImageLock::acquire(file.file(), &path, mode, force_share && read_only)?;
    Ok(Some(DataFile { file, _lock: lock, name, path, raw: header.data_file_raw() }))
}

impl Image {
    /// The fd guest data is read from and written to: the external data file's, or the
    /// image file's.
    #[inline]
    pub(crate) fn data_fd(&self) -> i32 {
        match &self.data_file {
            Some(d) => d.file.fd(),
            None => self.file.fd(),
        }
    }

    /// Why the data file the header names could not be opened, when the image was opened
    /// without it ([`super::DataFilePolicy::MetadataOnly`]); None when it is open or there
    /// is none.
    pub fn data_file_unavailable(&self) -> Option<&str> {
        self.data_file_error.as_deref()
    }

    /// The external data file, if the image has one.
    pub fn data_file(&self) -> Option<&DataFile> {
        self.data_file.as_ref()
    }

    /// Makes the data file's writes durable (before the metadata that points to them).
    pub(crate) fn sync_data_file(&self) -> Result<()> {
        match &self.data_file {
            Some(d) => self.sync.fdatasync(d.file.fd()),
            None => Ok(()),
        }
    }

    /// `data_file_raw`: maps every guest cluster of `[from, to)` that maps nothing at its
    /// guest offset (COPIED), as qemu-img preallocates the metadata of a raw data file at
    /// creation and when the disk grows, so that data written to the data file directly is
    /// what the image reads. Metadata lock held; the entries reach the disk at the next
    /// write-back.
    pub(crate) fn map_raw_range(&self, st: &mut super::MetaState, from: u64, to: u64) -> Result<()> {
        use crate::format::l2::L2Entry;
        use crate::format::types::{GuestOffset, HostOffset};
        let g = self.geo;
        let cs = g.cluster_size();
        let mut off = from / cs * cs;
        while off < to {
            let l1i = g.l1_index(g.guest_cluster(GuestOffset(off)));
            if !self.write_l1_ready(l1i) {
                self.ensure_l2_table(st, l1i, &self.counters)?;
            }
            let at = self.l2_slot(GuestOffset(off))?.ok_or_else(|| {
                Error::InvalidRequest(format!("no L2 table for guest offset {:#x} after making one", off))
            })?;
            self.load_slice_sync(at.key)?;
            // Evicted between the load and the pin: load it again.
            let Some(slot) = self.l2_cache.pin(at.key) else { continue };
            if self.l2_cache.load_word(slot, at.word) == 0 {
                self.l2_cache.cas_word(slot, at.word, 0, L2Entry::normal(HostOffset(off), true).0);
            }
            self.l2_cache.unpin(slot);
            off += cs;
        }
        Ok(())
    }

    /// Deallocates `len` bytes at `off` in the data file (reads zeros afterwards). A data
    /// file on a filesystem that cannot punch holes gets zeros written instead only when
    /// it must stay raw-consistent.
    pub(crate) fn punch_data(&self, off: u64, len: u64) -> Result<()> {
        let Some(d) = &self.data_file else { return Ok(()) };
        match self.sync.punch(crate::io::hook::WriteKind::Data, &d.file, off, len) {
            Ok(()) => Ok(()),
            // Only space is lost: the L2 entry no longer maps these bytes.
            Err(_) if !d.raw => Ok(()),
            Err(_) => {
                let zeros = crate::io::AlignedBuf::new(len.min(1 << 20) as usize);
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.sync.write_kind(crate::io::hook::WriteKind::Data, d.file.fd(), off + done, &zeros[..n])?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}
