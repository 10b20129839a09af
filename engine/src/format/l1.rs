//! L1 table entries (spec: "Cluster mapping", L1 table entry layout).

use super::geometry::OFFSET_MASK;
use super::types::HostOffset;
use crate::{Error, Result};

/// Bit 63: the L2 table's refcount is exactly one.
pub const L1_COPIED: u64 = 1 << 63;
/// Bit 62 (reserved in the qcow2 spec): quring's L2-less contiguous range; only valid when
/// incompatible bit 61 is set. See `docs/l2-less.md`.
pub const L1_CONTIGUOUS: u64 = 1 << 62;
/// Bits the spec reserves (0-8 and 56-62).
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// One raw L1 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at an L2 table.
    pub fn new(l2: HostOffset, copied: bool) -> Self {
        L1Entry((l2.0 & OFFSET_MASK) | if copied { L1_COPIED } else { 0 })
    }
    /// The L2 table offset (0 = no table).
    #[inline]
    pub fn l2_offset(self) -> HostOffset {
        HostOffset(self.0 & OFFSET_MASK)
    }
    /// Is the COPIED flag set?
    #[inline]
    pub fn copied(self) -> bool {
        self.0 & L1_COPIED != 0
    }
    /// Is this an L2-less contiguous range?
    #[inline]
    pub fn contiguous(self) -> bool {
        self.0 & L1_CONTIGUOUS != 0
    }
    /// Reserved bits that are set, given whether the L2-less extension is enabled.
    pub fn reserved_bits(self, l2less: bool) -> u64 {
        let mask = if l2less { L1_RESERVED & !L1_CONTIGUOUS } else { L1_RESERVED };
        self.0 & mask
    }
    /// Validates the entry against the image's cluster size and features.
    pub fn validate(self, index: u64, cluster_size: u64, l2less: bool) -> Result<()> {
        let r = self.reserved_bits(l2less);
        if r != 0 {
            return Err(Error::corrupt(
                "L1 entry",
                format!("entry {index} ({:#018x}) has reserved bits {r:#x} set", self.0),
            ));
        }
        if !self.l2_offset().0.is_multiple_of(cluster_size) {
            return Err(Error::corrupt(
                "L1 entry",
                format!("entry {index} points to unaligned L2 table offset {:#x}", self.l2_offset().0),
            ));
        }
        Ok(())
    }
}

/// Decodes a big-endian L1 table.
pub fn decode_table(bytes: &[u8]) -> Vec<L1Entry> {
    super::bytes::be64_words(bytes).map(L1Entry).collect()
}

/// Encodes an L1 table as big-endian bytes.
pub fn encode_table(entries: &[L1Entry]) -> Vec<u8> {
    super::bytes::to_be64_bytes(entries.iter().map(|e| e.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(v in proptest::collection::vec(any::<u64>(), 0..64)) {
            let e: Vec<L1Entry> = v.iter().map(|&x| L1Entry(x)).collect();
            prop_assert_eq!(decode_table(&encode_table(&e)), e);
        }
        #[test]
        fn new_keeps_fields(off in 0u64..(1 << 40), copied in any::<bool>()) {
            let off = off << 16;
            let e = L1Entry::new(HostOffset(off), copied);
            prop_assert_eq!(e.l2_offset(), HostOffset(off));
            prop_assert_eq!(e.copied(), copied);
            prop_assert!(e.validate(0, 1 << 16, false).is_ok());
        }
    }

    #[test]
    fn reserved_bits_refused() {
        assert!(L1Entry(0x30000 | 1).validate(3, 65536, false).is_err());
        assert!(L1Entry(0x30000 | L1_CONTIGUOUS).validate(3, 65536, false).is_err());
        assert!(L1Entry(0x30000 | L1_CONTIGUOUS).validate(3, 65536, true).is_ok());
        assert!(L1Entry(0x30200).validate(3, 65536, false).is_err());
    }
}
