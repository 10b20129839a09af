//! Header extensions (spec: "Header extensions"): a list of (type, length, data) records
//! after the fixed header, each padded to 8 bytes, ended by type 0. Every extension is kept
//! as raw bytes in file order, so unknown ones survive a rewrite byte for byte.

use super::bytes::be32;
use crate::{Error, Result};

/// End of the header extension area.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// One header extension as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Payload (without padding).
    pub data: Vec<u8>,
}

/// Parses extensions from `buf[start..end]` (end = cluster size or file end, whichever is
/// smaller). Returns the list and the offset just after the end marker (or `end` when the
/// area ends without one, which QEMU tolerates).
pub fn parse_extensions(buf: &[u8], start: usize, end: usize) -> Result<(Vec<Extension>, usize)> {
    let end = end.min(buf.len());
    let mut off = start;
    let mut out = Vec::new();
    loop {
        if off + 8 > end {
            // QEMU stops quietly when no room is left for another header.
            return Ok((out, off));
        }
        let kind = be32(buf, off);
        let len = be32(buf, off + 4) as usize;
        off += 8;
        if kind == EXT_END {
            return Ok((out, off));
        }
        if len > end - off {
            return Err(Error::corrupt(
                "header extension",
                format!(
                    "extension {kind:#010x} at offset {} has length {len}, which overruns the header cluster (ends at {end})",
                    off - 8
                ),
            ));
        }
        out.push(Extension { kind, data: buf[off..off + len].to_vec() });
        off += len.div_ceil(8) * 8;
    }
}

/// Serializes extensions plus the end marker.
pub fn serialize_extensions(exts: &[Extension], out: &mut Vec<u8>) {
    for e in exts {
        out.extend_from_slice(&e.kind.to_be_bytes());
        out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.data);
        let pad = e.data.len().div_ceil(8) * 8 - e.data.len();
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend_from_slice(&[0u8; 8]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(exts in proptest::collection::vec((1u32.., proptest::collection::vec(any::<u8>(), 0..100)), 0..8)) {
            let exts: Vec<Extension> = exts.into_iter().map(|(kind, data)| Extension { kind, data }).collect();
            let mut buf = vec![0u8; 16];
            serialize_extensions(&exts, &mut buf);
            let len = buf.len();
            let (back, end) = parse_extensions(&buf, 16, len).unwrap();
            prop_assert_eq!(back, exts);
            prop_assert_eq!(end, len);
        }
    }

    #[test]
    fn overrun_is_refused() {
        let mut buf = vec![0u8; 64];
        buf[0..4].copy_from_slice(&0x1234u32.to_be_bytes());
        buf[4..8].copy_from_slice(&1000u32.to_be_bytes());
        let e = parse_extensions(&buf, 0, 64).unwrap_err().to_string();
        assert!(e.contains("overruns"), "{e}");
    }
}
