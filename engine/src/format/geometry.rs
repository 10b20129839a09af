//! Image geometry: every piece of index math (cluster, L1/L2 index, subcluster, refcount
//! block entry) lives here, derived once from the header's `cluster_bits`, extended-L2 bit
//! and `refcount_order` (spec sections "Host cluster management" and "Cluster mapping").

use super::types::{GuestCluster, GuestOffset, HostCluster, HostOffset};
use crate::{Error, Result};

/// Smallest cluster_bits the spec allows (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Largest L1 table QEMU accepts, in bytes (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Mask of the host offset bits (9-55) in L1, L2 and refcount table entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Derived sizes and index math for one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries (128-bit, with subcluster bitmaps).
    pub extended_l2: bool,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Guest data lives in an external data file (incompatible bit 2, see
    /// [`super::data_file`]): host offset 0 with COPIED is data, compressed entries are
    /// invalid, data clusters have no refcounts.
    pub external_data: bool,
}

impl Geometry {
    /// Validates and builds a geometry.
    pub fn new(cluster_bits: u32, extended_l2: bool, refcount_order: u32) -> Result<Self> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(
                "cluster_bits",
                format!("{cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
            ));
        }
        if extended_l2 && cluster_bits < 14 {
            return Err(Error::corrupt(
                "cluster_bits",
                format!("{cluster_bits} is below 14, the minimum with extended L2 entries"),
            ));
        }
        if refcount_order > 6 {
            return Err(Error::corrupt("refcount_order", format!("{refcount_order} is above 6 (64-bit refcounts)")));
        }
        Ok(Geometry { cluster_bits, extended_l2, refcount_order, external_data: false })
    }

    /// Cluster size in bytes.
    #[inline]
    pub const fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Bytes of one L2 entry (8, or 16 with extended L2).
    #[inline]
    pub const fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }
    /// log2 of the number of entries in one L2 table.
    #[inline]
    pub const fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }
    /// Entries in one L2 table.
    #[inline]
    pub const fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }
    /// Guest bytes covered by one L1 entry.
    #[inline]
    pub const fn l1_coverage(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }
    /// Subcluster size in bytes (the cluster size without extended L2).
    #[inline]
    pub const fn subcluster_size(&self) -> u64 {
        if self.extended_l2 { self.cluster_size() / SUBCLUSTERS as u64 } else { self.cluster_size() }
    }
    /// Refcount width in bits.
    #[inline]
    pub const fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Largest refcount value representable.
    #[inline]
    pub const fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 { u64::MAX } else { (1u64 << self.refcount_bits()) - 1 }
    }
    /// log2 of refcount entries per refcount block.
    #[inline]
    pub const fn refblock_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }
    /// Refcount entries per refcount block.
    #[inline]
    pub const fn refblock_entries(&self) -> u64 {
        1 << self.refblock_bits()
    }
    /// Refcount table entries per refcount table cluster.
    #[inline]
    pub const fn reftable_entries_per_cluster(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// The guest cluster containing `off`.
    #[inline]
    pub const fn guest_cluster(&self, off: GuestOffset) -> GuestCluster {
        GuestCluster(off.0 >> self.cluster_bits)
    }
    /// The host cluster containing `off`.
    #[inline]
    pub const fn host_cluster(&self, off: HostOffset) -> HostCluster {
        HostCluster(off.0 >> self.cluster_bits)
    }
    /// Byte offset of `off` inside its cluster.
    #[inline]
    pub const fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }
    /// Is `off` cluster aligned?
    #[inline]
    pub const fn is_cluster_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }
    /// L1 index of a guest cluster.
    #[inline]
    pub const fn l1_index(&self, c: GuestCluster) -> u64 {
        c.0 >> self.l2_bits()
    }
    /// L2 index (inside its table) of a guest cluster.
    #[inline]
    pub const fn l2_index(&self, c: GuestCluster) -> u64 {
        c.0 & (self.l2_entries() - 1)
    }
    /// Subcluster index (0..32) of a byte offset inside its cluster.
    #[inline]
    pub const fn subcluster_index(&self, off: u64) -> u32 {
        (self.offset_in_cluster(off) / self.subcluster_size()) as u32
    }
    /// Host offset of the start of a host cluster.
    #[inline]
    pub const fn host_offset(&self, c: HostCluster) -> HostOffset {
        HostOffset(c.0 << self.cluster_bits)
    }
    /// Guest offset of the start of a guest cluster.
    #[inline]
    pub const fn guest_offset(&self, c: GuestCluster) -> GuestOffset {
        GuestOffset(c.0 << self.cluster_bits)
    }
    /// Refcount table index of a host cluster.
    #[inline]
    pub const fn reftable_index(&self, c: HostCluster) -> u64 {
        c.0 >> self.refblock_bits()
    }
    /// Index inside its refcount block of a host cluster.
    #[inline]
    pub const fn refblock_index(&self, c: HostCluster) -> u64 {
        c.0 & (self.refblock_entries() - 1)
    }
    /// The index of the cluster containing byte `off` (guest or host: the caller's
    /// newtype says which; see [`Geometry::guest_cluster`] and [`Geometry::host_cluster`]).
    #[inline]
    pub const fn cluster_index(&self, off: u64) -> u64 {
        off >> self.cluster_bits
    }
    /// Bytes in `n` clusters; also the byte offset of cluster index `n`.
    #[inline]
    pub const fn cluster_bytes(&self, n: u64) -> u64 {
        n << self.cluster_bits
    }
    /// L1 entries needed for a virtual size (None on overflow).
    pub fn l1_entries_for(&self, size: u64) -> Option<u64> {
        let clusters = size.checked_add(self.cluster_size() - 1)? >> self.cluster_bits;
        Some(clusters.div_ceil(self.l2_entries()))
    }
    /// Clusters needed to hold `bytes` bytes.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_64k() {
        let g = Geometry::new(16, false, 4).unwrap();
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l1_coverage(), 512 << 20);
        assert_eq!(g.refblock_entries(), 32768);
        assert_eq!(g.l1_entries_for(1 << 30), Some(2));
        assert_eq!(g.l2_index(g.guest_cluster(GuestOffset(3 << 16))), 3);
    }

    #[test]
    fn extended_2m() {
        let g = Geometry::new(21, true, 0).unwrap();
        assert_eq!(g.l2_entries(), 1 << 17);
        assert_eq!(g.subcluster_size(), 64 << 10);
        assert_eq!(g.subcluster_index(3 << 16), 3);
        assert_eq!(g.refblock_entries(), 1 << 24);
        assert_eq!(g.refcount_max(), 1);
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(Geometry::new(8, false, 4).is_err());
        assert!(Geometry::new(22, false, 4).is_err());
        assert!(Geometry::new(13, true, 4).is_err());
        assert!(Geometry::new(16, false, 7).is_err());
        assert_eq!(Geometry::new(9, false, 6).unwrap().refcount_max(), u64::MAX);
    }
}
