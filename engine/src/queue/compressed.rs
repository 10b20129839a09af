//! Compressed writes ([`Queue::write_compressed`]), for backup tools, image converters and
//! VMMs that store cold data compressed: whole clusters, compressed on the calling thread
//! with the image's compression type (raw deflate or zstd), stored as compressed clusters
//! by the image (`image/compressed.rs`). As QEMU does, a cluster whose compressed form does
//! not save space is written uncompressed.

use super::*;
use crate::image::compressed::Payload;

impl Queue {
    /// Writes `data` at `offset` as compressed clusters, blocking until done. `offset` must be
    /// cluster-aligned and `data` whole clusters (the last one may end at the end of the
    /// image; it is compressed padded with zeros, as QEMU does). The clusters must not be
    /// allocated (QEMU's rule: compression cannot overwrite); they may be unallocated or
    /// zero clusters without a host cluster. Clusters that do not compress to less than a
    /// cluster are stored uncompressed.
    pub fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let img = self.image.clone();
        img.check_writable()?;
        if img.l2less {
            return Err(Error::Unsupported("compressed writes on an L2-less image".into()));
        }
        let cs = img.geo.cluster_size();
        let size = img.vsize();
        let len = data.len() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= size).ok_or_else(|| {
            Error::InvalidRequest(format!("range {offset}+{len} is past the end of the image ({size} bytes)"))
        })?;
        if !offset.is_multiple_of(cs) || (!len.is_multiple_of(cs) && end != size) {
            return Err(Error::InvalidRequest(format!(
                "compressed writes take whole clusters: offset {offset} and length {len} are not multiples of \
                 the cluster size {cs} (only the last cluster may end at the end of the image)"
            )));
        }
        // Tracked bitmaps see the write before it can complete (it runs with the queue
        // busy, so no bitmap operation runs meanwhile).
        self.mark_bitmaps(offset, len);
        let mut padded = Vec::new();
        let mut packed: Vec<(u64, Vec<u8>, bool)> = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let n = (data.len() - pos).min(cs as usize);
            let input = if n == cs as usize {
                &data[pos..pos + n]
            } else {
                padded.clear();
                padded.extend_from_slice(&data[pos..pos + n]);
                padded.resize(cs as usize, 0);
                &padded[..]
            };
            // Clusters that do not compress are stored whole, allocated in the same
            // sequence (as QEMU's fallback to a normal write allocates the next cluster).
            match crate::format::compress::compress(img.compression, input)? {
                Some(c) => packed.push((offset + pos as u64, c, true)),
                None => packed.push((offset + pos as u64, input.to_vec(), false)),
            }
            pos += n;
        }
        let items: Vec<Payload<'_>> =
            packed.iter().map(|(g, c, z)| Payload { guest: *g, data: c, compressed: *z }).collect();
        img.store_compressed(&items, &self.counters)?;
        Counters::add(&self.counters.guest_writes, 1);
        Counters::add(&self.counters.write_bytes, len);
        Ok(())
    }
}
