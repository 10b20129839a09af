//! Feature bits (header bytes 72-95) and the feature name table extension
//! (spec: "Header", "Feature name table").

use crate::{Error, Result};

/// Incompatible bit 0: refcounts may be inconsistent (lazy refcounts in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: the image is corrupt; no writes allowed.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: the compression type field is used.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible bit 61: quring's L2-less (contiguous) L1 ranges, see `docs/l2-less.md`.
pub const INCOMPAT_L2LESS: u64 = 1 << 61;
/// The incompatible bits this implementation understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2 | INCOMPAT_L2LESS;

/// Compatible bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear bit 0: persistent bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is raw-consistent.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Which of the three feature bitmaps a name-table entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureKind {
    /// Incompatible features (type 0).
    Incompatible,
    /// Compatible features (type 1).
    Compatible,
    /// Autoclear features (type 2).
    Autoclear,
}

impl FeatureKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Incompatible),
            1 => Some(Self::Compatible),
            2 => Some(Self::Autoclear),
            _ => None,
        }
    }
    fn to_u8(self) -> u8 {
        match self {
            Self::Incompatible => 0,
            Self::Compatible => 1,
            Self::Autoclear => 2,
        }
    }
}

/// One 48-byte entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// Which bitmap the bit belongs to. Entries of unknown type are kept with `None`.
    pub kind: Option<FeatureKind>,
    /// Raw type byte (kept to re-serialize unknown types).
    pub raw_kind: u8,
    /// Bit number 0..63.
    pub bit: u8,
    /// Feature name (NUL padding stripped).
    pub name: String,
}

/// Size of one feature name table entry.
pub const FEATURE_ENTRY_SIZE: usize = 48;

/// Parses the feature name table extension payload.
pub fn parse_feature_table(data: &[u8]) -> Result<Vec<FeatureName>> {
    if !data.len().is_multiple_of(FEATURE_ENTRY_SIZE) {
        return Err(Error::corrupt(
            "feature name table",
            format!("length {} is not a multiple of {FEATURE_ENTRY_SIZE}", data.len()),
        ));
    }
    Ok(data
        .chunks_exact(FEATURE_ENTRY_SIZE)
        .map(|e| {
            let name_bytes = &e[2..];
            let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(name_bytes.len());
            FeatureName {
                kind: FeatureKind::from_u8(e[0]),
                raw_kind: e[0],
                bit: e[1],
                name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
            }
        })
        .collect())
}

/// Serializes a feature name table (names longer than 46 bytes are truncated).
pub fn serialize_feature_table(entries: &[FeatureName]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * FEATURE_ENTRY_SIZE);
    for e in entries {
        let mut rec = [0u8; FEATURE_ENTRY_SIZE];
        rec[0] = e.kind.map(FeatureKind::to_u8).unwrap_or(e.raw_kind);
        rec[1] = e.bit;
        let n = e.name.as_bytes();
        let l = n.len().min(FEATURE_ENTRY_SIZE - 2);
        rec[2..2 + l].copy_from_slice(&n[..l]);
        out.extend_from_slice(&rec);
    }
    out
}

/// The feature name table QEMU 10 writes, plus quring's own L2-less entry when asked.
pub fn default_feature_table(with_l2less: bool) -> Vec<FeatureName> {
    let mut v = vec![
        fname(FeatureKind::Incompatible, 0, "dirty bit"),
        fname(FeatureKind::Incompatible, 1, "corrupt bit"),
        fname(FeatureKind::Incompatible, 2, "external data file"),
        fname(FeatureKind::Incompatible, 3, "compression type"),
        fname(FeatureKind::Incompatible, 4, "extended L2 entries"),
        fname(FeatureKind::Compatible, 0, "lazy refcounts"),
        fname(FeatureKind::Autoclear, 0, "bitmaps"),
        fname(FeatureKind::Autoclear, 1, "raw external data"),
    ];
    if with_l2less {
        v.push(fname(FeatureKind::Incompatible, 61, "quring l2-less ranges"));
    }
    v
}

fn fname(kind: FeatureKind, bit: u8, name: &str) -> FeatureName {
    FeatureName { kind: Some(kind), raw_kind: kind.to_u8(), bit, name: name.to_string() }
}

/// Describes the unknown incompatible bits in `bits`, naming each from `table` when it has
/// an entry, as QEMU does ("Unknown incompatible feature: NAME").
pub fn describe_unknown_incompatible(bits: u64, table: &[FeatureName]) -> String {
    let mut parts = Vec::new();
    for bit in 0..64u8 {
        if bits & (1u64 << bit) == 0 {
            continue;
        }
        let name = table
            .iter()
            .find(|f| f.kind == Some(FeatureKind::Incompatible) && f.bit == bit)
            .map(|f| f.name.clone())
            .unwrap_or_else(|| format!("Unknown incompatible feature: bit {bit}"));
        if name.starts_with("Unknown") {
            parts.push(name);
        } else {
            parts.push(format!("{name} (bit {bit})"));
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn table_roundtrip(entries in proptest::collection::vec((0u8..3, any::<u8>(), "[a-zA-Z0-9 _-]{0,46}"), 0..20)) {
            let v: Vec<FeatureName> = entries.into_iter().map(|(k, bit, name)| FeatureName {
                kind: FeatureKind::from_u8(k), raw_kind: k, bit, name }).collect();
            let bytes = serialize_feature_table(&v);
            prop_assert_eq!(parse_feature_table(&bytes).unwrap(), v);
        }
    }

    #[test]
    fn names_unknown_bits() {
        let t = vec![fname(FeatureKind::Incompatible, 9, "frobnication")];
        let s = describe_unknown_incompatible(1 << 9 | 1 << 12, &t);
        assert!(s.contains("frobnication"), "{s}");
        assert!(s.contains("bit 12"), "{s}");
    }
}
