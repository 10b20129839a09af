//! The sizes `qemu-img measure` reports for a qcow2 image (QEMU 10's `qcow2_measure()`):
//! a fully allocated image is its data plus header, L2 tables, L1 table and the refcount
//! structure covering all of them; the required size keeps the metadata of the fully
//! allocated image and only the data clusters that hold data.

/// Refcount metadata (blocks and table, in bytes) that covers `clusters` clusters and
/// itself: the fixed point QEMU's `qcow2_refcount_metadata_size()` finds.
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_table = cluster_size / 8;
    let per_block = (cluster_size * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = clusters.saturating_add(table).saturating_add(blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table);
        n = clusters.saturating_add(blocks).saturating_add(table);
        if n == last {
            return (blocks + table).saturating_mul(cluster_size);
        }
    }
}

/// Size of a fully allocated image of `size` virtual bytes (QEMU's
/// `qcow2_calc_prealloc_size()`): header cluster, L2 tables for every cluster, the L1
/// table in whole clusters, the refcount structure, and the data rounded up to clusters.
pub fn fully_allocated_size(size: u64, cluster_size: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = size.div_ceil(cluster_size).saturating_mul(cluster_size);
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cluster_size;
    let nl2e = (aligned / cluster_size).div_ceil(cluster_size / l2e) * (cluster_size / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cluster_size).div_ceil(cluster_size / 8) * (cluster_size / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cluster_size, cluster_size, refcount_order);
    meta + aligned
}

/// Space the persistent bitmaps of an image of `virtual_size` bytes take in a new image of
/// `cluster_size` clusters (QEMU's `qcow2_get_persistent_dirty_bitmap_size()`): each
/// bitmap's data clusters as if fully allocated, its bitmap table in whole clusters, and the
/// directory (entries without extra data) in whole clusters. `directory` is the bitmap
/// directory of the input image (spec: "Bitmap directory"), `count` its entries; a
/// truncated directory counts the entries it holds.
pub fn bitmaps_size(directory: &[u8], count: u32, virtual_size: u64, cluster_size: u64) -> u64 {
    let mut total = 0u64;
    let mut dir = 0u64;
    let mut pos = 0usize;
    for _ in 0..count {
        let Some(e) = directory.get(pos..pos + 24) else { break };
        let granularity_bits = e[17] as u32;
        let name_size = u16::from_be_bytes([e[18], e[19]]) as u64;
        let extra = u32::from_be_bytes([e[20], e[21], e[22], e[23]]) as u64;
        if granularity_bits >= 64 {
            break;
        }
        let bits = virtual_size.div_ceil(1u64 << granularity_bits);
        let clusters = bits.div_ceil(8).div_ceil(cluster_size);
        total += clusters * cluster_size + (clusters * 8).div_ceil(cluster_size) * cluster_size;
        dir += (24 + name_size).next_multiple_of(8);
        pos = match usize::try_from((24 + extra + name_size).next_multiple_of(8)) {
            Ok(n) => pos.saturating_add(n),
            Err(_) => break,
        };
    }
    total + dir.div_ceil(cluster_size) * cluster_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_measure_figures() {
        // qemu-img 10.0.2: measure -O qcow2 --size 1G; -o cluster_size=2M,extended_l2=on --size 100G.
        assert_eq!(fully_allocated_size(1 << 30, 65536, 4, false), 1074135040);
        assert_eq!(fully_allocated_size(100 << 30, 2 << 20, 4, true), 107384668160);
    }
}
