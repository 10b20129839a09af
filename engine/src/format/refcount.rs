//! Refcount blocks and the refcount table (spec: "Host cluster management"). Entries of
//! 8 bits and wider are big-endian integers; narrower ones are packed starting at the least
//! significant bit of each byte.

use super::geometry::OFFSET_MASK;
use super::types::HostOffset;
use crate::{Error, Result};

/// Reads refcount entry `index` from a refcount block of width `1 << order` bits.
#[inline]
pub fn get(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let bit = index * bits;
            let byte = block[(bit / 8) as usize];
            ((byte >> (bit % 8)) as u64) & ((1 << bits) - 1)
        }
        3 => block[index as usize] as u64,
        4 => {
            let o = index as usize * 2;
            u16::from_be_bytes([block[o], block[o + 1]]) as u64
        }
        5 => {
            let o = index as usize * 4;
            u32::from_be_bytes(block[o..o + 4].try_into().unwrap()) as u64
        }
        _ => {
            let o = index as usize * 8;
            u64::from_be_bytes(block[o..o + 8].try_into().unwrap())
        }
    }
}

/// Writes refcount entry `index`. `value` must fit the width (checked by the caller via
/// [`max_value`]); excess bits are masked off.
#[inline]
pub fn set(block: &mut [u8], index: u64, order: u32, value: u64) {
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let bit = index * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut block[(bit / 8) as usize];
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        3 => block[index as usize] = value as u8,
        4 => {
            let o = index as usize * 2;
            block[o..o + 2].copy_from_slice(&(value as u16).to_be_bytes());
        }
        5 => {
            let o = index as usize * 4;
            block[o..o + 4].copy_from_slice(&(value as u32).to_be_bytes());
        }
        _ => {
            let o = index as usize * 8;
            block[o..o + 8].copy_from_slice(&value.to_be_bytes());
        }
    }
}

/// Largest refcount of width `1 << order`.
pub fn max_value(order: u32) -> u64 {
    if order >= 6 { u64::MAX } else { (1u64 << (1u32 << order)) - 1 }
}

/// Reserved bits of a refcount table entry (bits 0-8).
pub const REFTABLE_RESERVED: u64 = 0x1ff;

/// One refcount table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RefTableEntry(pub u64);

impl RefTableEntry {
    /// Offset of the refcount block (0 = not allocated).
    #[inline]
    pub fn block_offset(self) -> HostOffset {
        HostOffset(self.0 & !REFTABLE_RESERVED)
    }
    /// Validates the entry: reserved bits 0-8 clear, cluster aligned.
    pub fn validate(self, index: u64, cluster_size: u64) -> Result<()> {
        if self.0 & REFTABLE_RESERVED != 0 {
            return Err(Error::corrupt(
                "refcount table entry",
                format!("entry {index} ({:#x}) has reserved bits 0-8 set", self.0),
            ));
        }
        if !self.0.is_multiple_of(cluster_size) {
            return Err(Error::corrupt(
                "refcount table entry",
                format!("entry {index} points to unaligned refcount block offset {:#x}", self.0),
            ));
        }
        if self.0 & !OFFSET_MASK & !REFTABLE_RESERVED != 0 && self.0 > (1u64 << 56) {
            return Err(Error::corrupt(
                "refcount table entry",
                format!("entry {index} offset {:#x} is beyond the addressable range", self.0),
            ));
        }
        Ok(())
    }
}

/// Decodes a big-endian refcount table.
pub fn decode_table(bytes: &[u8]) -> Vec<RefTableEntry> {
    super::bytes::be64_words(bytes).map(RefTableEntry).collect()
}

/// Encodes a refcount table.
pub fn encode_table(entries: &[RefTableEntry]) -> Vec<u8> {
    super::bytes::to_be64_bytes(entries.iter().map(|e| e.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spec_examples() {
        // Seven clusters at refcount 1.
        let mut b1 = [0u8; 4];
        let mut b2 = [0u8; 4];
        let mut b4 = [0u8; 4];
        for i in 0..7 {
            set(&mut b1, i, 0, 1);
            set(&mut b2, i, 1, 1);
            set(&mut b4, i, 2, 1);
        }
        assert_eq!(b1[0], 0x7f);
        assert_eq!(&b2[..2], &[0x55, 0x15]);
        assert_eq!(b4, [0x11, 0x11, 0x11, 0x01]);
    }

    proptest! {
        #[test]
        fn roundtrip_every_width(order in 0u32..=6, ops in proptest::collection::vec((0u64..512, any::<u64>()), 1..200)) {
            let mut block = vec![0u8; 4096];
            let mut model = std::collections::HashMap::new();
            let max = max_value(order);
            for (i, v) in ops {
                let v = v & max;
                set(&mut block, i, order, v);
                model.insert(i, v);
            }
            for (i, v) in model {
                prop_assert_eq!(get(&block, i, order), v);
            }
        }

        #[test]
        fn table_roundtrip(v in proptest::collection::vec(any::<u64>(), 0..64)) {
            let t: Vec<RefTableEntry> = v.into_iter().map(RefTableEntry).collect();
            prop_assert_eq!(decode_table(&encode_table(&t)), t);
        }
    }
}
