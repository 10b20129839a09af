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
