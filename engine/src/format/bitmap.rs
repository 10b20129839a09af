//! Persistent dirty bitmaps (spec: "Bitmaps extension", "Bitmap directory", "Bitmap table",
//! "Bitmap data"): the header extension that locates the directory, the directory entries,
//! the table entries and the bit order of the data clusters. Pure: every parser checks each
//! bound (counts, sizes against the file and the cluster size, alignment, flags, name
//! length, granularity, overlaps) and names the field and value it refuses.
//!
//! Limits are QEMU's (a larger value is refused by QEMU too): 65535 bitmaps, a directory of
//! at most 1024 bytes per bitmap, names of 1..=1023 bytes, granularity 2^9..=2^31 bytes,
//! tables of at most 2^27 entries and bitmap data of at most 512 MiB.

use super::bytes::{be16, be32, be64};
use super::extension::{EXT_BITMAPS, Extension};
use super::types::HostOffset;
use crate::{Error, Result};

/// Length of the bitmaps extension's payload.
pub const EXT_LEN: usize = 24;
/// Most bitmaps an image may have (QEMU's limit).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (QEMU's limit: 1024 bytes per bitmap).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Longest bitmap name.
pub const MAX_NAME_SIZE: usize = 1023;
/// Smallest granularity, log2 bytes (QEMU's limit).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity, log2 bytes (QEMU's limit).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Most bitmap table entries (QEMU's limit).
pub const MAX_TABLE_SIZE: u32 = 0x0800_0000;
/// Most bytes of bitmap data clusters per bitmap (QEMU's limit).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Directory entry flag bit 0: the bitmap was in use when the image was last written and
/// may be inconsistent.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap is enabled (tracks writes).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag bit 2: the extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// The flags the spec defines.
pub const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// Bitmap type 1: dirty tracking bitmap (the only type defined).
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Fixed part of a directory entry.
pub const ENTRY_FIXED: usize = 24;

/// Table entry bit 0 (with offset 0): the cluster's bits are all ones.
const TE_ALL_ONES: u64 = 1;
/// Table entry offset bits 9-55.
const TE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved table entry bits: 1-8 and 56-63.
const TE_RESERVED: u64 = 0xff00_0000_0000_01fe;

/// The bitmaps header extension (type 0x23852875).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory (1..=65535).
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Offset of the directory (cluster aligned).
    pub directory_offset: HostOffset,
}

impl BitmapsExt {
    /// Parses and validates the extension payload against the cluster size and the file.
    pub fn parse(data: &[u8], cluster_size: u64, file_len: u64) -> Result<BitmapsExt> {
        if data.len() != EXT_LEN {
            return Err(Error::corrupt(
                "bitmaps extension",
                format!("length {} is not {EXT_LEN} (invalid extension length)", data.len()),
            ));
        }
        let reserved = be32(data, 4);
        if reserved != 0 {
            return Err(Error::corrupt("bitmaps extension reserved field", format!("{reserved:#x} is not zero")));
        }
        let e = BitmapsExt {
            nb_bitmaps: be32(data, 0),
            directory_size: be64(data, 8),
            directory_offset: HostOffset(be64(data, 16)),
        };
        if e.nb_bitmaps == 0 {
            return Err(Error::corrupt("nb_bitmaps", "0: a bitmaps extension with zero bitmaps"));
        }
        if e.nb_bitmaps > MAX_BITMAPS {
            return Err(Error::corrupt(
                "nb_bitmaps",
                format!("{} exceeds the supported maximum of {MAX_BITMAPS}", e.nb_bitmaps),
            ));
        }
        if e.directory_size > MAX_DIRECTORY_SIZE {
            return Err(Error::corrupt(
                "bitmap_directory_size",
                format!("{} exceeds the maximum supported size ({MAX_DIRECTORY_SIZE})", e.directory_size),
            ));
        }
        if e.directory_size < ENTRY_FIXED as u64 * e.nb_bitmaps as u64 {
            return Err(Error::corrupt(
                "bitmap_directory_size",
                format!("{} is too small for {} entries", e.directory_size, e.nb_bitmaps),
            ));
        }
        let off = e.directory_offset.0;
        if off == 0 || !off.is_multiple_of(cluster_size) {
            return Err(Error::corrupt(
                "bitmap_directory_offset",
                format!("{off:#x} is not a non-zero multiple of the cluster size {cluster_size}"),
            ));
        }
        if off.checked_add(e.directory_size).is_none_or(|end| end > file_len) {
            return Err(Error::corrupt(
                "bitmap_directory_offset",
                format!(
                    "directory at {off:#x} of {} bytes lies past the end of the file ({file_len} bytes)",
                    e.directory_size
                ),
            ));
        }
        Ok(e)
    }

    /// The extension as stored.
    pub fn to_extension(&self) -> Extension {
        let mut d = Vec::with_capacity(EXT_LEN);
        d.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&self.directory_size.to_be_bytes());
        d.extend_from_slice(&self.directory_offset.0.to_be_bytes());
        Extension { kind: EXT_BITMAPS, data: d }
    }
}

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Offset of the bitmap table (cluster aligned).
    pub table_offset: HostOffset,
    /// Number of table entries.
    pub table_size: u32,
    /// Flags ([`FLAG_IN_USE`], [`FLAG_AUTO`], [`FLAG_EXTRA_DATA_COMPATIBLE`]).
    pub flags: u32,
    /// Bitmap type (1).
    pub kind: u8,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// The name (unique in the image).
    pub name: String,
    /// Extra data, kept verbatim.
    pub extra: Vec<u8>,
}

impl DirEntry {
    /// Was the bitmap in use (possibly inconsistent)?
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    /// Is the bitmap enabled (tracks writes)?
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    /// Bytes one bit covers.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }
    /// May the bitmap be used and changed by this implementation? Not with extra data it
    /// does not understand (unless flagged compatible).
    pub fn usable(&self) -> bool {
        self.extra.is_empty() || self.flags & FLAG_EXTRA_DATA_COMPATIBLE != 0
    }
    /// Bytes the entry takes in the directory, padding included.
    pub fn encoded_len(&self) -> usize {
        (ENTRY_FIXED + self.extra.len() + self.name.len()).div_ceil(8) * 8
    }

    /// Checks the entry against the image: table alignment and size, flags, type,
    /// granularity, name length, and (for a bitmap not in use) that the table has exactly
    /// the entries `disk_size` bytes need (as QEMU requires when it loads the bitmap).
    pub fn validate(&self, cluster_size: u64, file_len: u64, disk_size: u64) -> Result<()> {
        let name = &self.name;
        let field = |what: &'static str, detail: String| Error::corrupt(what, format!("bitmap '{name}': {detail}"));
        if self.name.is_empty() || self.name.len() > MAX_NAME_SIZE {
            return Err(field("bitmap name_size", format!("{} is not in 1..={MAX_NAME_SIZE}", self.name.len())));
        }
        if self.flags & !FLAGS_KNOWN != 0 {
            return Err(field("bitmap flags", format!("{:#x} has reserved bits set", self.flags)));
        }
        if self.kind != TYPE_DIRTY_TRACKING {
            return Err(field("bitmap type", format!("{} is not 1 (dirty tracking bitmap)", self.kind)));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return Err(field(
                "bitmap granularity_bits",
                format!("{} is not in {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}", self.granularity_bits),
            ));
        }
        let off = self.table_offset.0;
        if off == 0 || !off.is_multiple_of(cluster_size) {
            return Err(field(
                "bitmap_table_offset",
                format!("{off:#x} is not a non-zero multiple of the cluster size {cluster_size}"),
            ));
        }
        if self.table_size == 0 || self.table_size > MAX_TABLE_SIZE {
            return Err(field("bitmap_table_size", format!("{} is not in 1..={MAX_TABLE_SIZE}", self.table_size)));
        }
        let phys = self.table_size as u64 * cluster_size;
        if phys > MAX_PHYS_SIZE {
            return Err(field(
                "bitmap_table_size",
                format!("{} clusters of data ({phys} bytes) exceed the maximum of {MAX_PHYS_SIZE}", self.table_size),
            ));
        }
        if off.checked_add(self.table_size as u64 * 8).is_none_or(|e| e > file_len) {
            return Err(field(
                "bitmap_table_offset",
                format!("table at {off:#x} of {} entries lies past the end of the file", self.table_size),
            ));
        }
        let need = table_size_for(disk_size, self.granularity_bits, cluster_size);
        if !self.in_use() && self.table_size as u64 != need {
            // QEMU loads a consistent bitmap only with exactly the table the disk needs
            // ("Could not read bitmap ...: Invalid argument").
            return Err(field(
                "bitmap_table_size",
                format!(
                    "{} entries, but the disk size {disk_size} at granularity {} needs {need}",
                    self.table_size,
                    self.granularity()
                ),
            ));
        }
        Ok(())
    }

    /// The clusters of the table: (first cluster offset, number of clusters).
    pub fn table_clusters(&self, cluster_size: u64) -> (u64, u64) {
        (self.table_offset.0, (self.table_size as u64 * 8).div_ceil(cluster_size))
    }
}

/// Granules (bits) of a bitmap over `disk_size` bytes.
pub fn granules(disk_size: u64, granularity_bits: u8) -> u64 {
    disk_size.div_ceil(1u64 << granularity_bits)
}

/// Table entries a bitmap over `disk_size` bytes needs (one per data cluster).
pub fn table_size_for(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    granules(disk_size, granularity_bits).div_ceil(8).div_ceil(cluster_size)
}

/// Checks that a new bitmap of `granularity_bits` over `disk_size` bytes stays within the
/// limits (QEMU: "Too much space will be occupied by the bitmap").
pub fn check_new(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> Result<()> {
    let entries = table_size_for(disk_size, granularity_bits, cluster_size);
    if entries > MAX_TABLE_SIZE as u64 || entries.saturating_mul(cluster_size) > MAX_PHYS_SIZE {
        return Err(Error::InvalidRequest(
            "Too much space will be occupied by the bitmap. Use larger granularity".into(),
        ));
    }
    Ok(())
}

/// Parses a directory of `nb` entries from `buf` (the directory's bytes). Checks that the
/// entries fill exactly `buf` (the directory size), that names are unique UTF-8, and the
/// per-entry structure; [`DirEntry::validate`] checks each against the image.
pub fn parse_directory(buf: &[u8], nb: u32) -> Result<Vec<DirEntry>> {
    let mut out: Vec<DirEntry> = Vec::with_capacity(nb.min(MAX_BITMAPS) as usize);
    let mut off = 0usize;
    for i in 0..nb {
        if buf.len() - off < ENTRY_FIXED {
            return Err(Error::corrupt(
                "bitmap directory",
                format!("entry {i} at byte {off} runs past the directory size {}", buf.len()),
            ));
        }
        let e = &buf[off..];
        let name_size = be16(e, 18) as usize;
        let extra_size = be32(e, 20) as usize;
        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(Error::corrupt(
                "bitmap name_size",
                format!("entry {i}: {name_size} is not in 1..={MAX_NAME_SIZE}"),
            ));
        }
        let len = ENTRY_FIXED.checked_add(extra_size).and_then(|l| l.checked_add(name_size));
        let Some(len) = len.filter(|&l| l <= e.len()) else {
            return Err(Error::corrupt(
                "bitmap extra_data_size",
                format!(
                    "entry {i}: {extra_size} bytes of extra data and a {name_size}-byte name run past the directory size {}",
                    buf.len()
                ),
            ));
        };
        let name_bytes = &e[ENTRY_FIXED + extra_size..len];
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| Error::corrupt("bitmap name", format!("entry {i}: the name is not UTF-8")))?;
        if out.iter().any(|o| o.name == name) {
            return Err(Error::corrupt("bitmap name", format!("entry {i}: '{name}' appears twice")));
        }
        out.push(DirEntry {
            table_offset: HostOffset(be64(e, 0)),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            kind: e[16],
            granularity_bits: e[17],
            name,
            extra: e[ENTRY_FIXED..ENTRY_FIXED + extra_size].to_vec(),
        });
        off += len.div_ceil(8) * 8;
        if off > buf.len() && i + 1 < nb {
            return Err(Error::corrupt(
                "bitmap directory",
                format!("entry {i}'s padding runs past the directory size {}", buf.len()),
            ));
        }
    }
    if off.min(buf.len()) != buf.len() {
        return Err(Error::corrupt(
            "bitmap_directory_size",
            format!("{} bytes, but the {nb} entries take {off}", buf.len()),
        ));
    }
    Ok(out)
}

/// Serializes a directory (entries padded to 8 bytes).
pub fn serialize_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(DirEntry::encoded_len).sum());
    for e in entries {
        out.extend_from_slice(&e.table_offset.0.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.kind);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out
}

/// Checks that no two bitmap tables share a cluster and that none overlaps the directory
/// (`dir` = offset and size).
pub fn check_overlaps(entries: &[DirEntry], dir: (u64, u64), cluster_size: u64) -> Result<()> {
    let mut ranges: Vec<(u64, u64, &str)> = entries
        .iter()
        .map(|e| {
            let (o, n) = e.table_clusters(cluster_size);
            (o, o.saturating_add(n.saturating_mul(cluster_size)), e.name.as_str())
        })
        .collect();
    ranges.push((dir.0, dir.0.saturating_add(dir.1.div_ceil(cluster_size) * cluster_size), "(the directory)"));
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::corrupt(
                "bitmap_table_offset",
                format!("bitmap '{}' table at {:#x} overlaps bitmap '{}' at {:#x}", w[1].2, w[1].0, w[0].2, w[0].0),
            ));
        }
    }
    Ok(())
}

/// A bitmap table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEntry {
    /// The cluster's bits are all zero (no data cluster).
    Zeros,
    /// The cluster's bits are all one (no data cluster).
    Ones,
    /// The bits are in the data cluster at this offset.
    Data(HostOffset),
}

impl TableEntry {
    /// Decodes and validates a table entry (entry `i` of bitmap `name`): reserved bits
    /// clear, offset cluster aligned and inside the file, the all-ones bit only without an
    /// offset.
    pub fn decode(raw: u64, cluster_size: u64, file_len: u64, name: &str, i: u64) -> Result<TableEntry> {
        let bad = |detail: String| Error::corrupt("bitmap table entry", format!("bitmap '{name}' entry {i}: {detail}"));
        if raw & TE_RESERVED != 0 {
            return Err(bad(format!("{raw:#018x} has reserved bits set")));
        }
        let off = raw & TE_OFFSET_MASK;
        if off == 0 {
            return Ok(if raw & TE_ALL_ONES != 0 { TableEntry::Ones } else { TableEntry::Zeros });
        }
        if raw & TE_ALL_ONES != 0 {
            return Err(bad(format!("{raw:#018x} has both a data offset and the all-ones bit")));
        }
        if !off.is_multiple_of(cluster_size) {
            return Err(bad(format!("offset {off:#x} is not cluster aligned")));
        }
        if off.checked_add(cluster_size).is_none_or(|e| e > file_len) {
            return Err(bad(format!("offset {off:#x} lies past the end of the file ({file_len} bytes)")));
        }
        Ok(TableEntry::Data(HostOffset(off)))
    }

    /// The entry as stored.
    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => TE_ALL_ONES,
            TableEntry::Data(o) => o.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            table_offset: HostOffset(0x30000),
            table_size: 1,
            flags: FLAG_AUTO,
            kind: 1,
            granularity_bits: 16,
            name: name.into(),
            extra: Vec::new(),
        }
    }

    proptest! {
        #[test]
        fn directory_roundtrip(v in proptest::collection::vec(
            (any::<u64>(), any::<u32>(), 0u32..8, any::<u8>(), any::<u8>(), "[a-z0-9]{1,40}", proptest::collection::vec(any::<u8>(), 0..20)), 0..10)) {
            let mut entries: Vec<DirEntry> = Vec::new();
            for (i, (o, s, f, k, g, n, x)) in v.into_iter().enumerate() {
                entries.push(DirEntry { table_offset: HostOffset(o), table_size: s, flags: f, kind: k,
                    granularity_bits: g, name: format!("{n}-{i}"), extra: x });
            }
            let bytes = serialize_directory(&entries);
            prop_assert_eq!(bytes.len(), entries.iter().map(DirEntry::encoded_len).sum::<usize>());
            prop_assert_eq!(parse_directory(&bytes, entries.len() as u32).unwrap(), entries);
        }

        #[test]
        fn ext_roundtrip(nb in 1u32..=MAX_BITMAPS, size in 0u64..=MAX_DIRECTORY_SIZE, off in 1u64..1000) {
            let size = size.max(nb as u64 * ENTRY_FIXED as u64).min(MAX_DIRECTORY_SIZE);
            prop_assume!(nb as u64 * ENTRY_FIXED as u64 <= MAX_DIRECTORY_SIZE);
            let e = BitmapsExt { nb_bitmaps: nb, directory_size: size, directory_offset: HostOffset(off << 16) };
            let x = e.to_extension();
            prop_assert_eq!(BitmapsExt::parse(&x.data, 65536, u64::MAX).unwrap(), e);
        }

        #[test]
        fn table_entry_roundtrip(c in 0u64..(1 << 30), ones in any::<bool>()) {
            let e = if c == 0 { if ones { TableEntry::Ones } else { TableEntry::Zeros } } else { TableEntry::Data(HostOffset(c << 16)) };
            prop_assert_eq!(TableEntry::decode(e.encode(), 65536, u64::MAX, "b", 0).unwrap(), e);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), nb in 0u32..10) {
            let _ = parse_directory(&bytes, nb);
            let _ = BitmapsExt::parse(&bytes, 512, 1 << 20);
        }
    }

    #[test]
    fn refusals_name_field() {
        let cs = 65536;
        let check = |e: DirEntry, what: &str| {
            let s = e.validate(cs, 1 << 30, 1 << 30).unwrap_err().to_string();
            assert!(s.contains(what), "{s}");
        };
        check(DirEntry { granularity_bits: 8, ..entry("a") }, "granularity_bits");
        check(DirEntry { granularity_bits: 32, ..entry("a") }, "granularity_bits");
        check(DirEntry { flags: 8, ..entry("a") }, "flags");
        check(DirEntry { kind: 2, ..entry("a") }, "type");
        check(DirEntry { table_offset: HostOffset(0x30200), ..entry("a") }, "bitmap_table_offset");
        check(DirEntry { table_size: 0, ..entry("a") }, "bitmap_table_size");
        check(DirEntry { table_size: MAX_TABLE_SIZE + 1, ..entry("a") }, "bitmap_table_size");
        check(DirEntry { name: "x".repeat(1024), ..entry("a") }, "name_size");
        // 1 GiB at 64 KiB granularity = 16384 bits = 2 KiB: one table entry suffices.
        assert!(entry("a").validate(cs, 1 << 30, 1 << 30).is_ok());
        // 1 TiB at 512 bytes needs 2^31 bits = 4096 clusters.
        let e = DirEntry { granularity_bits: 9, ..entry("a") };
        let s = e.validate(cs, 1 << 41, 1 << 40).unwrap_err().to_string();
        assert!(s.contains("bitmap_table_size"), "{s}");
        // A longer table than the disk needs is refused too (QEMU cannot load it).
        let long = DirEntry { table_size: 2, ..entry("a") };
        let s = long.validate(cs, 1 << 30, 1 << 30).unwrap_err().to_string();
        assert!(s.contains("bitmap_table_size") && s.contains("needs 1"), "{s}");
        let mut in_use = e.clone();
        in_use.flags |= FLAG_IN_USE;
        assert!(in_use.validate(cs, 1 << 41, 1 << 40).is_ok(), "an in-use bitmap may be short");
    }

    #[test]
    fn ext_refusals() {
        let good = BitmapsExt { nb_bitmaps: 1, directory_size: 32, directory_offset: HostOffset(0x10000) };
        let mut x = good.to_extension().data;
        assert!(BitmapsExt::parse(&x, 65536, 1 << 20).is_ok());
        x[23] = 1;
        assert!(BitmapsExt::parse(&x, 65536, 1 << 20).unwrap_err().to_string().contains("bitmap_directory_offset"));
        let mut x = good.to_extension().data;
        x[0..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(BitmapsExt::parse(&x, 65536, 1 << 20).unwrap_err().to_string().contains("nb_bitmaps"));
        let mut x = good.to_extension().data;
        x[8..16].copy_from_slice(&(MAX_DIRECTORY_SIZE + 1).to_be_bytes());
        assert!(BitmapsExt::parse(&x, 65536, 1 << 30).unwrap_err().to_string().contains("bitmap_directory_size"));
        let x = good.to_extension().data;
        assert!(BitmapsExt::parse(&x, 65536, 0x10010).unwrap_err().to_string().contains("past the end"));
        assert!(BitmapsExt::parse(&x[..20], 65536, 1 << 20).unwrap_err().to_string().contains("length"));
    }

    #[test]
    fn directory_refusals() {
        let d = serialize_directory(&[entry("a"), entry("b")]);
        assert!(parse_directory(&d, 3).unwrap_err().to_string().contains("bitmap directory"));
        assert!(parse_directory(&d, 1).unwrap_err().to_string().contains("bitmap_directory_size"));
        let d = serialize_directory(&[entry("a"), entry("a")]);
        assert!(parse_directory(&d, 2).unwrap_err().to_string().contains("twice"));
        let mut d = serialize_directory(&[entry("a")]);
        d[18..20].copy_from_slice(&0u16.to_be_bytes());
        assert!(parse_directory(&d, 1).unwrap_err().to_string().contains("name_size"));
        let mut d = serialize_directory(&[entry("a")]);
        d[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_directory(&d, 1).unwrap_err().to_string().contains("extra_data_size"));
    }

    #[test]
    fn overlaps_and_table_entries() {
        let mut b = entry("b");
        b.table_offset = HostOffset(0x30000);
        let s = check_overlaps(&[entry("a"), b], (0x50000, 64), 65536).unwrap_err().to_string();
        assert!(s.contains("overlaps"), "{s}");
        let s = check_overlaps(&[entry("a")], (0x30000, 64), 65536).unwrap_err().to_string();
        assert!(s.contains("directory"), "{s}");
        assert!(check_overlaps(&[entry("a")], (0x40000, 64), 65536).is_ok());
        for (raw, what) in
            [(2u64, "reserved"), (0x10001, "all-ones"), (0x10200, "aligned"), (0x1_0000_0000, "past the end")]
        {
            let s = TableEntry::decode(raw, 65536, 1 << 20, "b", 3).unwrap_err().to_string();
            assert!(s.contains(what) && s.contains("bitmap table entry"), "{s}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(granules(64 << 20, 16), 1024);
        assert_eq!(table_size_for(64 << 20, 16, 65536), 1);
        assert_eq!(table_size_for(1 << 40, 9, 65536), 4096);
        // 4 TiB at 512 bytes: 1 GiB of bitmap data, over the 512 MiB limit.
        assert!(check_new(1 << 42, 9, 512).is_err());
        assert!(check_new(1 << 40, 9, 512).is_ok());
        assert!(check_new(1 << 40, 16, 65536).is_ok());
    }
}
