//! Overlap checks on a live image: L2 slices checked as they are loaded, entries that
//! would put guest data on metadata (the rules are in [`crate::meta::overlap`]).

use super::Image;
use crate::Error;
use crate::format::l2::{ClusterKind, L2_COMPRESSED, L2Entry};
use crate::format::types::{GuestOffset, HostOffset};
use crate::meta::overlap::*;

impl Image {
    /// Validates an L2 slice that was just read from disk at host offset `key`, before the
    /// cache publishes it; `word(i)` is its i-th 64-bit word (host-endian).
    ///
    /// Checks that the slice's table is not another kind of metadata (the L1 entry's target)
    /// and that no entry maps guest data (standard, zero-with-offset, extended or
    /// compressed) onto a metadata cluster or past the end of the file. Entries that are
    /// malformed in other ways (reserved bits, misalignment) are left to the per-request
    /// decoding, which names them when they are used.
    ///
    /// QEMU checks the same ranges on every host write and not at all on reads (a read of
    /// such a mapping returns the metadata's bytes). quring refuses the whole slice instead,
    /// so a read of it fails clearly as well; marking the image corrupt is left to the
    /// caller, which does it only for writes ([`Image::signal_corruption`]), as QEMU does.
    pub(crate) fn check_l2_slice(&self, key: u64, word: impl Fn(usize) -> u64) -> crate::Result<()> {
        self.check_l2_entries(key, 0..self.slice_entries as usize, word)
    }

    /// [`Image::check_l2_slice`] for the entries `entries` of the slice only (a part read
    /// on its own); `word(i)` is still the slice's i-th word.
    pub(crate) fn check_l2_entries(
        &self,
        key: u64,
        entries: std::ops::Range<usize>,
        word: impl Fn(usize) -> u64,
    ) -> crate::Result<()> {
        match self.check_l2_slice_once(key, entries.clone(), &word) {
            Err(Some(e)) => Err(e),
            Err(None) => self.check_l2_slice_once(key, entries, &word).map_err(|e| {
                e.unwrap_or_else(|| Error::corrupt("L2 table", format!("slice at {key:#x} keeps growing")))
            }),
            Ok(()) => Ok(()),
        }
    }

    /// One pass of [`Image::check_l2_slice`]. `Err(None)`: an entry points past the end of
    /// the file as this image knew it, but the file has grown since (a read-only image
    /// shared with a writer, `-U`): the known length was updated, check again.
    fn check_l2_slice_once(
        &self,
        key: u64,
        entries: std::ops::Range<usize>,
        word: &impl Fn(usize) -> u64,
    ) -> Result<(), Option<Error>> {
        let g = &self.geo;
        let cs = g.cluster_size();
        let file_len = self.file_len();
        let eof = g.clusters_for(file_len);
        let table = key & !(cs - 1);
        let m = self.overlap.read();
        let tc = g.cluster_index(table);
        let table_conflict = if tc >= eof {
            Some(Conflict::PastEof { file_len })
        } else {
            m.kind(tc).filter(|k| !k.is_l2()).map(|kind| Conflict::Metadata { kind, cluster: HostOffset(table) })
        };
        if let Some(conflict) = table_conflict {
            if self.refresh_file_len(conflict, file_len) {
                return Err(None);
            }
            let l1i = self.l1_index_of(table);
            let guest = l1i.map(|i| GuestOffset(i * g.l1_coverage()));
            return Err(Some(Error::corrupt(
                "L1 entry",
                format!(
                    "entry {} ({}) points to an L2 table at {table:#x}, which {conflict}",
                    l1i.map_or("?".into(), |i| i.to_string()),
                    guest.map_or("guest offset unknown".into(), |o| format!("guest offset {o}")),
                ),
            )));
        }
        if g.external_data {
            // The entries point into the external data file, which holds no metadata.
            return Ok(());
        }
        let step = (g.l2_entry_size() / 8) as usize;
        for i in entries {
            let e = word(i * step);
            if e & L2_COMPRESSED == 0 {
                let host = e & crate::format::geometry::OFFSET_MASK;
                if host == 0 {
                    continue;
                }
                let c = g.cluster_index(host);
                if c < eof && !m.is_meta(c) {
                    continue;
                }
                let conflict = self.overlap.check_data(&m, HostOffset(g.cluster_bytes(c)), cs, file_len);
                if let Some(conflict) = conflict {
                    drop(m);
                    return Err(self.l2_conflict(key, i, L2Entry(e), conflict, file_len));
                }
            } else if let Ok(ClusterKind::Compressed { host, len }) = L2Entry(e).decode(g)
                && let Some(conflict) = self.overlap.check_data(&m, host, len, file_len)
            {
                drop(m);
                return Err(self.l2_conflict(key, i, L2Entry(e), conflict, file_len));
            }
        }
        Ok(())
    }

    /// After a past-the-end conflict on a read-only image: has the file grown since its
    /// length was taken? (A writer that shares it may have appended clusters.) Records the
    /// new length. Cold path: one stat.
    fn refresh_file_len(&self, conflict: Conflict, known: u64) -> bool {
        if !matches!(conflict, Conflict::PastEof { .. }) || self.meta.is_some() {
            return false;
        }
        match self.file.len() {
            Ok(n) if n > known => {
                self.file_len.fetch_max(n, std::sync::atomic::Ordering::AcqRel);
                true
            }
            _ => false,
        }
    }

    /// The error for entry `i` of the slice at `key`: names the entry, its guest offset,
    /// where it points and what is there.
    fn l2_conflict(&self, key: u64, i: usize, e: L2Entry, conflict: Conflict, file_len: u64) -> Option<Error> {
        if self.refresh_file_len(conflict, file_len) {
            return None;
        }
        let g = &self.geo;
        let table = key & !(g.cluster_size() - 1);
        let index = (key - table) / g.l2_entry_size() + i as u64;
        let guest = self.l1_index_of(table).map_or("guest offset unknown".into(), |l1i| {
            format!("guest offset {}", GuestOffset(g.cluster_bytes(l1i * g.l2_entries() + index)))
        });
        let target = match e.decode(g) {
            Ok(ClusterKind::Compressed { host, len }) => {
                format!("compressed cluster descriptor {:#018x}: {len} bytes at host offset {host}", e.0)
            }
            _ => format!("host offset {}", e.host_offset()),
        };
        Some(Error::corrupt(
            "L2 entry",
            format!("entry {index} of the L2 table at {table:#x} ({guest}) maps to {target}, which {conflict}"),
        ))
    }

    /// The active L1 index whose L2 table is at `table` (messages only: a linear scan).
    fn l1_index_of(&self, table: u64) -> Option<u64> {
        (0..self.l1.len() as u64).find(|&i| {
            let e = self.l1_entry(i);
            !e.contiguous() && e.l2_offset().0 == table
        })
    }

    /// Checks quring's L2-less ranges (L1 entries that map a whole range to one host
    /// extent, which no L2 slice load would see) at open: each extent must lie inside the
    /// file and on no metadata.
    pub(crate) fn check_contiguous_ranges(&self) -> crate::Result<()> {
        if !self.l2less {
            return Ok(());
        }
        let g = &self.geo;
        let file_len = self.file_len();
        let m = self.overlap.read();
        for i in 0..self.l1.len() as u64 {
            let e = self.l1_entry(i);
            if !e.contiguous() || e.l2_offset().0 == 0 {
                continue;
            }
            let off = e.l2_offset();
            let len = g.cluster_bytes(self.range_clusters(i));
            let conflict = if off.0.saturating_add(len) > file_len.div_ceil(g.cluster_size()) * g.cluster_size() {
                Some(Conflict::PastEof { file_len })
            } else {
                self.overlap.check_data(&m, off, len, file_len)
            };
            if let Some(conflict) = conflict {
                return Err(Error::corrupt(
                    "L1 entry",
                    format!(
                        "entry {i} (guest offset {}) maps an L2-less range of {len} bytes to host offset {off}, which {conflict}",
                        GuestOffset(i * g.l1_coverage())
                    ),
                ));
            }
        }
        Ok(())
    }
}
