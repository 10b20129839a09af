//! Big-endian field access for the codecs (every qcow2 field is big-endian).
//!
//! Reads past the end of the slice return 0 instead of panicking: callers check lengths
//! against the structure's size before they trust a field, and a short buffer from a corrupt
//! image must never crash the engine.

/// The big-endian `u16` at `off`, or 0 past the end of `b`.
#[inline]
pub fn be16(b: &[u8], off: usize) -> u16 {
    b.get(off..off.wrapping_add(2)).and_then(|s| s.try_into().ok()).map(u16::from_be_bytes).unwrap_or(0)
}

/// The big-endian `u32` at `off`, or 0 past the end of `b`.
#[inline]
pub fn be32(b: &[u8], off: usize) -> u32 {
    b.get(off..off.wrapping_add(4)).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes).unwrap_or(0)
}

/// The big-endian `u64` at `off`, or 0 past the end of `b`.
#[inline]
pub fn be64(b: &[u8], off: usize) -> u64 {
    b.get(off..off.wrapping_add(8)).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0)
}

/// The big-endian 64-bit words of a table (a trailing partial word is ignored).
pub fn be64_words(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.chunks_exact(8).map(|c| be64(c, 0))
}

/// A table of 64-bit words as big-endian bytes.
pub fn to_be64_bytes(words: impl IntoIterator<Item = u64>) -> Vec<u8> {
    words.into_iter().flat_map(u64::to_be_bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_short_buffers() {
        let b = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01];
        assert_eq!(be16(&b, 0), 0x1234);
        assert_eq!(be32(&b, 1), 0x3456_789a);
        assert_eq!(be64(&b, 1), 0x3456_789a_bcde_f001);
        assert_eq!(be64(&b, 2), 0, "one byte short");
        assert_eq!(be32(&b, usize::MAX), 0, "offset overflow");
    }
}
