//! Compressed writes ([`Queue::write_compressed`]), for backup tools, image converters and
//! VMMs that store cold data compressed: whole clusters, compressed on the calling thread
//! with the image's compression type (raw deflate or zstd), stored as compressed clusters
//! by the image (`image/compressed.rs`). As QEMU does, a cluster whose compressed form does
//! not save space is written uncompressed.

use super::*;
use crate::image::compressed::Payload;

/// Clusters compressed ahead of their write by [`Queue::compress_clusters`] (on any thread,
/// with no lock held: a converter compresses its next chunk while another thread writes),
/// stored by [`Queue::write_compressed_clusters`] on a queue of the same image.
pub struct CompressedClusters {
    /// The image whose cluster size and compression type made them.
    image: Arc<Image>,
    offset: u64,
    len: u64,
    /// Per cluster: guest offset, bytes, compressed (else stored whole).
    items: Vec<(u64, Vec<u8>, bool)>,
}

impl CompressedClusters {
    /// Checks the range and compresses each cluster of `data` (at guest `offset` of `image`)
    /// on the calling thread, touching no image state: [`Queue::compress_clusters`] without
    /// a queue, for helper threads.
    pub fn new(image: &Arc<Image>, offset: u64, data: &[u8]) -> Result<CompressedClusters> {
        compress_for(image, offset, data)
    }

    /// The guest range they cover.
    pub fn range(&self) -> (u64, u64) {
        (self.offset, self.len)
    }
}

impl Queue {
    /// Writes `data` at `offset` as compressed clusters, blocking until done. `offset` must be
    /// cluster-aligned and `data` whole clusters (the last one may end at the end of the
    /// image; it is compressed padded with zeros, as QEMU does). The clusters must not be
    /// allocated (QEMU's rule: compression cannot overwrite); they may be unallocated or
    /// zero clusters without a host cluster. Clusters that do not compress to less than a
    /// cluster are stored uncompressed.
    pub fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let c = self.compress_clusters(offset, data)?;
        self.write_compressed_clusters(c)
    }

    /// The compression half of [`Queue::write_compressed`]: checks the range and compresses
    /// each cluster on the calling thread, touching neither the queue nor the image's state.
    pub fn compress_clusters(&self, offset: u64, data: &[u8]) -> Result<CompressedClusters> {
        compress_for(&self.image, offset, data)
    }

    /// The storing half of [`Queue::write_compressed`]: stores clusters compressed by
    /// [`Queue::compress_clusters`] on a queue of the same image, blocking until done.
    pub fn write_compressed_clusters(&mut self, c: CompressedClusters) -> Result<()> {
        let img = self.image.clone();
        if !Arc::ptr_eq(&img, &c.image) {
            return Err(Error::InvalidRequest("compressed clusters made for another image".into()));
        }
        img.check_writable()?;
        // Tracked bitmaps see the write before it can complete (it runs with the queue
        // busy, so no bitmap operation runs meanwhile).
        self.mark_bitmaps(c.offset, c.len);
        let items: Vec<Payload<'_>> =
            c.items.iter().map(|(g, d, z)| Payload { guest: *g, data: d, compressed: *z }).collect();
        img.store_compressed(&items, &self.counters)?;
        Counters::add(&self.counters.guest_writes, 1);
        Counters::add(&self.counters.write_bytes, c.len);
        Ok(())
    }
}

/// [`CompressedClusters::new`] and [`Queue::compress_clusters`].
fn compress_for(img: &Arc<Image>, offset: u64, data: &[u8]) -> Result<CompressedClusters> {
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
    let mut padded = Vec::new();
    let mut items: Vec<(u64, Vec<u8>, bool)> = Vec::new();
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
            Some(c) => items.push((offset + pos as u64, c, true)),
            None => items.push((offset + pos as u64, input.to_vec(), false)),
        }
        pos += n;
    }
    Ok(CompressedClusters { image: img.clone(), offset, len, items })
}
