//! L2 table entries (spec: "Cluster mapping", standard and extended L2 entries, compressed
//! cluster descriptors). Decoding turns raw words into a [`ClusterKind`]; for a byte range
//! inside a cluster, [`classify`] returns what the guest sees and for how long.

use super::geometry::{Geometry, OFFSET_MASK, SUBCLUSTERS};
use super::types::HostOffset;
use crate::{Error, Result};

/// Bit 63: COPIED (refcount exactly one).
pub const L2_COPIED: u64 = 1 << 63;
/// Bit 62: compressed cluster descriptor.
pub const L2_COMPRESSED: u64 = 1 << 62;
/// Bit 0: reads as zero (standard entries, v3).
pub const L2_ZERO: u64 = 1;
/// Reserved bits of an uncompressed entry (1-8 and 56-61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// One raw L2 entry word (the whole entry for standard L2, the first half for extended).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct L2Entry(pub u64);

/// The subcluster bitmap of an extended L2 entry: bits 0-31 allocated, 32-63 zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Allocation bits (bit i: subcluster i reads from the host cluster).
    #[inline]
    pub fn alloc(self) -> u32 {
        self.0 as u32
    }
    /// Zero bits (bit i: subcluster i reads as zero).
    #[inline]
    pub fn zero(self) -> u32 {
        (self.0 >> 32) as u32
    }
    /// Builds a bitmap from its halves.
    #[inline]
    pub fn from_parts(alloc: u32, zero: u32) -> Self {
        SubclusterBitmap(alloc as u64 | (zero as u64) << 32)
    }
}

/// What a whole cluster is, from its L2 entry word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// Entry 0: read the backing file (or zeros).
    Unallocated,
    /// Zero flag without an offset: reads zeros, never the backing file.
    ZeroPlain,
    /// Zero flag with an offset: reads zeros, the host cluster stays allocated.
    ZeroAlloc {
        /// Host byte offset.
        host: HostOffset,
        /// The COPIED flag.
        copied: bool,
    },
    /// A host cluster (for extended L2, the bitmap says which subclusters are data).
    Normal {
        /// Host byte offset.
        host: HostOffset,
        /// The COPIED flag.
        copied: bool,
    },
    /// A compressed cluster: `len` bytes at byte offset `host`.
    Compressed {
        /// Host byte offset.
        host: HostOffset,
        /// Length in bytes.
        len: u64,
    },
}

impl L2Entry {
    /// An entry mapping a host cluster.
    pub fn normal(host: HostOffset, copied: bool) -> Self {
        L2Entry((host.0 & OFFSET_MASK) | if copied { L2_COPIED } else { 0 })
    }

    /// A compressed descriptor for `len` bytes at byte offset `host`.
    pub fn compressed(g: &Geometry, host: HostOffset, len: u64) -> Self {
        let x = 62 - (g.cluster_bits - 8);
        let end = host.0 + len;
        let sectors = end.div_ceil(512) - host.0 / 512; // 512-byte sectors touched
        L2Entry(L2_COMPRESSED | ((sectors - 1) << x) | host.0)
    }

    /// The host offset field of a compressed descriptor: bits 0 to x-1, where
    /// x = 62 - (cluster_bits - 8) (spec: "Compressed Clusters Descriptor").
    #[inline]
    pub fn compressed_offset_field(self, g: &Geometry) -> u64 {
        self.0 & ((1u64 << (62 - (g.cluster_bits - 8))) - 1)
    }

    /// The host offset bits (9-55).
    #[inline]
    pub fn host_offset(self) -> HostOffset {
        HostOffset(self.0 & OFFSET_MASK)
    }

    /// Is COPIED set?
    #[inline]
    pub fn copied(self) -> bool {
        self.0 & L2_COPIED != 0
    }

    /// Decodes the entry word. With extended L2 the zero flag (bit 0) must be clear.
    pub fn decode(self, g: &Geometry) -> Result<ClusterKind> {
        let e = self.0;
        if e & L2_COMPRESSED != 0 {
            if g.external_data {
                return Err(Error::corrupt(
                    "L2 entry",
                    format!("compressed cluster descriptor {e:#018x} in an image with an external data file"),
                ));
            }
            if e & L2_COPIED != 0 {
                return Err(Error::corrupt(
                    "L2 entry",
                    format!("compressed cluster descriptor {e:#018x} has the COPIED bit set"),
                ));
            }
            let x = 62 - (g.cluster_bits - 8);
            let host = e & ((1u64 << x) - 1);
            let sectors = ((e >> x) & ((1u64 << (g.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (host & 511);
            return Ok(ClusterKind::Compressed { host: HostOffset(host), len });
        }
        let host = self.host_offset();
        let copied = self.copied();
        if e & L2_RESERVED != 0 {
            return Err(Error::corrupt(
                "L2 entry",
                format!("entry {e:#018x} has reserved bits {:#x} set", e & L2_RESERVED),
            ));
        }
        if !g.extended_l2 && e & L2_ZERO != 0 {
            if host.0 == 0 {
                return Ok(ClusterKind::ZeroPlain);
            }
            // A write turns a preallocated zero cluster into data at its host offset, so an
            // unaligned one must not be trusted (QEMU: "Preallocated zero cluster offset ...
            // unaligned" on writes, "Cluster allocation offset ... unaligned" on reads).
            if !g.is_cluster_aligned(host.0) {
                return Err(Error::corrupt(
                    "L2 entry",
                    format!("preallocated zero cluster entry {e:#018x} points to unaligned host offset {:#x}", host.0),
                ));
            }
            return Ok(ClusterKind::ZeroAlloc { host, copied });
        }
        if host.0 == 0 {
            // With an external data file 0 is a valid host offset: every data cluster there
            // has COPIED set (QEMU's qcow2_get_cluster_type), which tells it apart.
            if g.external_data && copied {
                return Ok(ClusterKind::Normal { host, copied });
            }
            return Ok(ClusterKind::Unallocated);
        }
        if !g.is_cluster_aligned(host.0) {
            return Err(Error::corrupt(
                "L2 entry",
                format!("entry {e:#018x} points to unaligned host offset {:#x}", host.0),
            ));
        }
        Ok(ClusterKind::Normal { host, copied })
    }
}

/// What a byte range reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Not allocated in this image: read from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data at this host offset (already adjusted for the offset inside the cluster).
    Data(HostOffset),
    /// A compressed cluster (decompress the whole cluster, then take the range).
    Compressed {
        /// Host byte offset.
        host: HostOffset,
        /// Length in bytes.
        len: u64,
    },
}

/// Classifies `len` bytes starting `in_cluster` bytes into a cluster with L2 entry `entry`
/// (and `bitmap` for extended L2). Returns the extent and how many bytes (<= len) share it.
pub fn classify(
    g: &Geometry,
    entry: L2Entry,
    bitmap: SubclusterBitmap,
    in_cluster: u64,
    len: u64,
) -> Result<(Extent, u64)> {
    debug_assert!(in_cluster + len <= g.cluster_size());
    let kind = entry.decode(g)?;
    if !g.extended_l2 {
        let ext = match kind {
            ClusterKind::Unallocated => Extent::Unallocated,
            ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc { .. } => Extent::Zero,
            ClusterKind::Normal { host, .. } => Extent::Data(host + in_cluster),
            ClusterKind::Compressed { host, len } => Extent::Compressed { host, len },
        };
        return Ok((ext, len));
    }
    if let ClusterKind::Compressed { host, len: clen } = kind {
        return Ok((Extent::Compressed { host, len: clen }, len));
    }
    if entry.0 & L2_ZERO != 0 {
        return Err(Error::corrupt(
            "L2 entry",
            format!("extended L2 entry {:#018x} has bit 0 (reserved with subclusters) set", entry.0),
        ));
    }
    let alloc = bitmap.alloc();
    let zero = bitmap.zero();
    if alloc & zero != 0 {
        return Err(Error::corrupt(
            "L2 bitmap",
            format!(
                "subcluster bitmap {:#018x} marks subclusters {:#x} both allocated and zero",
                bitmap.0,
                alloc & zero
            ),
        ));
    }
    let host = match kind {
        ClusterKind::Normal { host, .. } => Some(host),
        _ => None,
    };
    if host.is_none() && alloc != 0 {
        return Err(Error::corrupt(
            "L2 bitmap",
            format!(
                "subcluster bitmap {:#018x} marks subclusters allocated in a cluster without a host offset",
                bitmap.0
            ),
        ));
    }
    let sc_size = g.subcluster_size();
    let state = |sc: u32| -> u8 {
        if alloc >> sc & 1 != 0 {
            2
        } else if zero >> sc & 1 != 0 {
            1
        } else {
            0
        }
    };
    let first = g.subcluster_index(in_cluster);
    let s = state(first);
    let mut end = (first as u64 + 1) * sc_size;
    let mut sc = first + 1;
    while sc < SUBCLUSTERS && end < in_cluster + len && state(sc) == s {
        end += sc_size;
        sc += 1;
    }
    let run = end.min(in_cluster + len) - in_cluster;
    let ext = match s {
        2 => Extent::Data(host.unwrap() + in_cluster),
        1 => Extent::Zero,
        _ => Extent::Unallocated,
    };
    Ok((ext, run))
}

/// Does QEMU treat this entry as a (fatal) corruption event when a read meets it? Its
/// `qcow2_get_host_offset`, which reads use, marks the image corrupt for a cluster with a
/// host offset that is not cluster aligned ("Cluster allocation offset ... unaligned") and,
/// with extended L2 entries, for a bitmap that marks a subcluster both allocated and zero
/// or that marks subclusters allocated in a cluster without a host offset ("Invalid cluster
/// entry found"). Reserved bits, compressed descriptors and offsets past the end of the file
/// are not events on a read (QEMU does not look at them there).
pub fn signals_corruption_on_read(g: &Geometry, entry: L2Entry, bitmap: SubclusterBitmap) -> bool {
    if entry.0 & L2_COMPRESSED != 0 {
        return false;
    }
    let host = entry.host_offset().0;
    if !g.extended_l2 {
        return host != 0 && !g.is_cluster_aligned(host);
    }
    if host == 0 { bitmap.alloc() != 0 } else { !g.is_cluster_aligned(host) || bitmap.alloc() & bitmap.zero() != 0 }
}

/// Reads entry `index` of a raw big-endian L2 table (or slice) buffer.
#[inline]
pub fn read_entry(g: &Geometry, buf: &[u8], index: usize) -> (L2Entry, SubclusterBitmap) {
    if g.extended_l2 {
        let o = index * 16;
        (
            L2Entry(u64::from_be_bytes(buf[o..o + 8].try_into().unwrap())),
            SubclusterBitmap(u64::from_be_bytes(buf[o + 8..o + 16].try_into().unwrap())),
        )
    } else {
        let o = index * 8;
        (L2Entry(u64::from_be_bytes(buf[o..o + 8].try_into().unwrap())), SubclusterBitmap(0))
    }
}

/// Writes entry `index` into a raw big-endian L2 table buffer.
#[inline]
pub fn write_entry(g: &Geometry, buf: &mut [u8], index: usize, entry: L2Entry, bitmap: SubclusterBitmap) {
    if g.extended_l2 {
        let o = index * 16;
        buf[o..o + 8].copy_from_slice(&entry.0.to_be_bytes());
        buf[o + 8..o + 16].copy_from_slice(&bitmap.0.to_be_bytes());
    } else {
        let o = index * 8;
        buf[o..o + 8].copy_from_slice(&entry.0.to_be_bytes());
    }
}

/// The subcluster bitmap mask of subclusters `first..=last` (bit `i` for subcluster `i`).
pub fn subcluster_mask(first: u32, last: u32) -> u32 {
    debug_assert!(first <= last && last < 32);
    let n = last - first + 1;
    if n >= 32 { u32::MAX } else { ((1u32 << n) - 1) << first }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressed_descriptor_roundtrip_64k() {
        let g = Geometry::new(16, false, 4).unwrap();
        let e = L2Entry::compressed(&g, HostOffset(0x50123), 3000);
        match e.decode(&g).unwrap() {
            ClusterKind::Compressed { host, len } => {
                assert_eq!(host, HostOffset(0x50123));
                assert!((3000..3000 + 512).contains(&len), "{len}");
            }
            k => panic!("{k:?}"),
        }
    }

    proptest! {
        #[test]
        fn compressed_roundtrip(cb in 9u32..=21, off in 0u64..(1u64 << 40), len in 1u64..4096) {
            let g = Geometry::new(cb, false, 4).unwrap();
            let len = len.min(g.cluster_size());
            let e = L2Entry::compressed(&g, HostOffset(off), len);
            let ClusterKind::Compressed { host, len: l } = e.decode(&g).unwrap() else { panic!() };
            prop_assert_eq!(host.0, off);
            prop_assert!(l >= len && l < len + 512);
        }

        #[test]
        fn normal_roundtrip(cb in 9u32..=21, c in 1u64..(1u64 << 30), copied in any::<bool>()) {
            let g = Geometry::new(cb, false, 4).unwrap();
            let off = c << cb;
            prop_assume!(off < (1u64 << 56));
            let e = L2Entry::normal(HostOffset(off), copied);
            prop_assert_eq!(e.decode(&g).unwrap(), ClusterKind::Normal { host: HostOffset(off), copied });
        }

        #[test]
        fn table_entry_roundtrip(ext in any::<bool>(), v in any::<u64>(), b in any::<u64>(), idx in 0usize..64) {
            let g = Geometry::new(16, ext, 4).unwrap();
            let mut buf = vec![0u8; 64 * 16];
            write_entry(&g, &mut buf, idx, L2Entry(v), SubclusterBitmap(b));
            let (e, bm) = read_entry(&g, &buf, idx);
            prop_assert_eq!(e, L2Entry(v));
            prop_assert_eq!(bm, SubclusterBitmap(if ext { b } else { 0 }));
        }

        #[test]
        fn classify_covers_range(alloc in any::<u32>(), zero in any::<u32>(), start in 0u64..65536, len in 1u64..65536) {
            let g = Geometry::new(16, true, 4).unwrap();
            let zero = zero & !alloc;
            let len = len.min(65536 - start);
            let e = L2Entry::normal(HostOffset(0x100000), true);
            let bm = SubclusterBitmap::from_parts(alloc, zero);
            let mut pos = start;
            while pos < start + len {
                let (ext, run) = classify(&g, e, bm, pos, start + len - pos).unwrap();
                prop_assert!(run > 0);
                let sc = (pos / 2048) as u32;
                let expect = if alloc >> sc & 1 != 0 { Extent::Data(HostOffset(0x100000 + pos)) }
                    else if zero >> sc & 1 != 0 { Extent::Zero } else { Extent::Unallocated };
                prop_assert_eq!(ext, expect);
                pos += run;
            }
        }
    }

    /// With an external data file, host offset 0 with COPIED is the data file's first
    /// cluster (QEMU's qcow2_get_cluster_type), and compressed entries are corrupt.
    #[test]
    fn external_data_kinds() {
        for ext in [false, true] {
            let mut g = Geometry::new(16, ext, 4).unwrap();
            g.external_data = true;
            assert_eq!(
                L2Entry(L2_COPIED).decode(&g).unwrap(),
                ClusterKind::Normal { host: HostOffset(0), copied: true }
            );
            assert_eq!(L2Entry(0).decode(&g).unwrap(), ClusterKind::Unallocated);
            let e = L2Entry(L2_COMPRESSED | 0x1000).decode(&g).unwrap_err().to_string();
            assert!(e.contains("external data file"), "{e}");
        }
        let mut g = Geometry::new(16, false, 4).unwrap();
        g.external_data = true;
        // The zero flag wins over offset 0 (a zero cluster without an offset).
        assert_eq!(L2Entry(L2_COPIED | 1).decode(&g).unwrap(), ClusterKind::ZeroPlain);
        // Without a data file, COPIED alone is still unallocated.
        g.external_data = false;
        assert_eq!(L2Entry(L2_COPIED).decode(&g).unwrap(), ClusterKind::Unallocated);
    }

    #[test]
    fn standard_kinds() {
        let g = Geometry::new(16, false, 4).unwrap();
        assert_eq!(L2Entry(0).decode(&g).unwrap(), ClusterKind::Unallocated);
        assert_eq!(L2Entry(1).decode(&g).unwrap(), ClusterKind::ZeroPlain);
        assert_eq!(
            L2Entry(0x50000 | 1 | L2_COPIED).decode(&g).unwrap(),
            ClusterKind::ZeroAlloc { host: HostOffset(0x50000), copied: true }
        );
        assert!(L2Entry(0x50200).decode(&g).is_err());
        // A preallocated zero cluster at an unaligned host offset is corrupt too.
        assert!(L2Entry(0x52a00 | 1 | L2_COPIED).decode(&g).is_err());
        assert!(L2Entry(L2_COMPRESSED | L2_COPIED | 0x1234).decode(&g).is_err());
    }

    #[test]
    fn read_corruption_events() {
        let g = Geometry::new(16, false, 4).unwrap();
        let none = SubclusterBitmap(0);
        assert!(signals_corruption_on_read(&g, L2Entry(L2_COPIED | 0x50200), none));
        assert!(!signals_corruption_on_read(&g, L2Entry(L2_COPIED | 0x50000), none));
        assert!(!signals_corruption_on_read(&g, L2Entry(0x50000 | 1 << 56), none)); // reserved bit
        assert!(!signals_corruption_on_read(&g, L2Entry(L2_COMPRESSED | 0x50200), none));
        let x = Geometry::new(16, true, 4).unwrap();
        let e = L2Entry::normal(HostOffset(0x50000), true);
        assert!(signals_corruption_on_read(&x, e, SubclusterBitmap::from_parts(1, 1)));
        assert!(!signals_corruption_on_read(&x, e, SubclusterBitmap::from_parts(1, 2)));
        assert!(signals_corruption_on_read(&x, L2Entry(0), SubclusterBitmap::from_parts(4, 0)));
        assert!(!signals_corruption_on_read(&x, L2Entry(0), SubclusterBitmap::from_parts(0, 4)));
    }

    #[test]
    fn extended_invalid_bitmaps() {
        let g = Geometry::new(16, true, 4).unwrap();
        let e = L2Entry::normal(HostOffset(0x100000), true);
        assert!(classify(&g, e, SubclusterBitmap::from_parts(1, 1), 0, 10).is_err());
        assert!(classify(&g, L2Entry(0), SubclusterBitmap::from_parts(1, 0), 0, 10).is_err());
        // qemu-img: 4 KiB write at 4 KiB in a 64 KiB cluster gives alloc mask 0xc.
        let (ext, run) = classify(&g, e, SubclusterBitmap::from_parts(0xc, 0), 4096, 8192).unwrap();
        assert_eq!((ext, run), (Extent::Data(HostOffset(0x100000 + 4096)), 4096));
    }
}
