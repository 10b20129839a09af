//! Cache sizes from the options, capped at what the image can use (QEMU's
//! `read_cache_sizes`).

use super::{DEFAULT_L2_CACHE_MAX, Options};
use crate::format::Geometry;
use crate::{Error, Result};

/// The L2 and refcount cache sizes in bytes for an image of `vsize` bytes in a file of
/// `file_len` bytes, from the options, as QEMU's `read_cache_sizes` does it: a cache is never
/// larger than what the image can use, whatever the option says.
///
/// * L2: what the image can use is room for every L2 slice of the whole disk, twice over
///   (the cache is set-associative) plus one set. The default is that, at most
///   [`DEFAULT_L2_CACHE_MAX`]; an `l2-cache-size` above it is cut down to it (QEMU caps at the
///   L2 tables of the whole disk). What remains is allocated at open, so a size larger than
///   the machine's memory is refused ("L2 cache size too big") instead of aborting.
/// * Refcounts: what the image can use is the refcount blocks covering a file of
///   `file_len + 2 * vsize` bytes (the file as it is plus a fully allocated disk and its
///   metadata, or a second copy for snapshots), at least 4 clusters. The default is a quarter
///   of the L2 cache, at least 256 KiB, within that. (The refcount cache only holds blocks
///   it has read, so this bounds a count, not an allocation.)
pub(crate) fn cache_sizes(
    geo: &Geometry,
    vsize: u64,
    file_len: u64,
    entry_size: u64,
    opts: &Options,
) -> Result<(u64, u64)> {
    let whole = geo.clusters_for(vsize).saturating_mul(geo.l2_entry_size());
    let l2_need = whole.saturating_mul(2).saturating_add(crate::meta::cache::WAYS as u64 * entry_size).max(entry_size);
    let l2 = match opts.l2_cache_size {
        Some(s) => s.min(l2_need),
        None => l2_need.min(DEFAULT_L2_CACHE_MAX),
    };
    if let Some(mem) = crate::io::buf::physical_memory()
        && l2 > mem
    {
        return Err(Error::InvalidRequest(format!(
            "L2 cache size too big: l2-cache-size {} makes a {l2}-byte cache for this image (whose L2 \
             tables need {l2_need}), more than this machine's memory ({mem} bytes)",
            opts.l2_cache_size.unwrap_or(l2)
        )));
    }
    let host = file_len.saturating_add(vsize.saturating_mul(2));
    let blocks = geo.clusters_for(host).div_ceil(geo.refblock_entries()).max(4);
    let rc_need = blocks.saturating_mul(geo.cluster_size());
    let rc = opts.refcount_cache_size.unwrap_or((l2 / 4).max(256 << 10)).min(rc_need);
    Ok((l2, rc))
}

/// The `l2-cache-entry-size` used when the option is not given: 4 KiB (or the cluster
/// size, if smaller) when the L2 cache can hold every L2 table of the disk, one 512-byte
/// sector when it cannot.
///
/// A cache that holds everything loads each slice once, and larger slices warm it with
/// fewer reads. A cache that cannot (a large disk, or a small `l2-cache-size`) misses on a
/// share of random requests however its slices are cut, since it holds the same share of
/// the entries either way; then each miss loads, checks and copies only the sector it
/// needs, and the cache has eight times as many slots, so fewer misses find their set
/// taken by loads in flight (4k random reads QD32 with 8 queues on an 8 GiB image and
/// `l2-cache-size=256k` on tmpfs: 14% less CPU per read than with 4 KiB slices).
pub(crate) fn default_l2_entry_size(geo: &Geometry, vsize: u64, opts: &Options) -> u64 {
    let whole = geo.clusters_for(vsize).saturating_mul(geo.l2_entry_size());
    let cache = opts.l2_cache_size.unwrap_or(DEFAULT_L2_CACHE_MAX);
    if cache < whole { 512 } else { geo.cluster_size().min(4096) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(cluster_bits: u32, vsize: u64, l2: Option<u64>, rc: Option<u64>) -> Result<(u64, u64)> {
        let geo = Geometry::new(cluster_bits, false, 4).unwrap();
        let opts = Options { l2_cache_size: l2, refcount_cache_size: rc, ..Options::default() };
        cache_sizes(&geo, vsize, 0, geo.cluster_size().min(4096), &opts)
    }

    #[test]
    fn caches_are_capped_at_what_the_image_can_use() {
        // 16 MiB of 64 KiB clusters: 256 L2 entries (2 KiB), twice over plus a set of 4 KiB
        // slices.
        let need = 2 * 2048 + crate::meta::cache::WAYS as u64 * 4096;
        assert_eq!(sizes(16, 16 << 20, None, None).unwrap().0, need);
        for asked in [2 << 30, 8 << 30, 1 << 40, u64::MAX] {
            let (l2, rc) = sizes(16, 16 << 20, Some(asked), Some(asked)).unwrap();
            assert_eq!(l2, need, "l2-cache-size {asked}");
            // 16 MiB + 32 MiB of 64 KiB clusters fit in one refcount block: 4 clusters minimum.
            assert_eq!(rc, 4 << 16, "refcount-cache-size {asked}");
        }
        // Smaller than the need: taken as is.
        assert_eq!(sizes(16, 16 << 20, Some(4096), None).unwrap().0, 4096);
        // The default stays at 32 MiB for large disks.
        assert_eq!(sizes(16, 1 << 50, None, None).unwrap().0, DEFAULT_L2_CACHE_MAX);
    }

    #[test]
    fn slices_are_one_sector_when_the_cache_cannot_hold_every_table() {
        let geo = Geometry::new(16, false, 4).unwrap();
        let with = |l2: Option<u64>| Options { l2_cache_size: l2, ..Options::default() };
        // 8 GiB of 64 KiB clusters: 1 MiB of L2 entries.
        assert_eq!(default_l2_entry_size(&geo, 8 << 30, &with(Some(256 << 10))), 512);
        assert_eq!(default_l2_entry_size(&geo, 8 << 30, &with(Some(1 << 20))), 4096);
        assert_eq!(default_l2_entry_size(&geo, 8 << 30, &with(None)), 4096);
        // 1 TiB: 128 MiB of L2 entries, more than the default cache.
        assert_eq!(default_l2_entry_size(&geo, 1 << 40, &with(None)), 512);
        // Clusters smaller than 4 KiB: the cluster size.
        let small = Geometry::new(10, false, 4).unwrap();
        assert_eq!(default_l2_entry_size(&small, 1 << 20, &with(None)), 1024);
    }

    #[test]
    fn a_cache_larger_than_memory_is_an_error() {
        // 2^60 bytes of 512-byte clusters would need 2^54 bytes of L2 tables.
        let e = sizes(9, 1 << 60, Some(1 << 53), None).unwrap_err();
        assert!(e.to_string().contains("L2 cache size too big"), "{e}");
    }
}
