//! The qcow2 header (spec: "Header"), versions 2 and 3, with its extensions and the backing
//! file name. Parsing validates every field before any of it is used; serializing keeps
//! unknown header bytes (beyond byte 105) and unknown extensions byte for byte.

use super::bytes::{be32, be64};
use super::extension::{self, EXT_BACKING_FORMAT, EXT_CRYPTO, EXT_DATA_FILE, EXT_FEATURE_TABLE, Extension};
use super::feature::{self, FeatureName};
use super::geometry::{Geometry, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use super::types::HostOffset;
use crate::{Error, Result};

/// The magic `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Header length of version 2 images.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Minimum header length of version 3 images.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Header length QEMU 10 writes (compression type byte plus padding).
pub const V3_HEADER_LENGTH: u32 = 112;
/// Longest backing file name the spec allows.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Most snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Compression type (header byte 104).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (window bits -12).
    #[default]
    Deflate,
    /// zstd frames.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Deflate => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// A parsed qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0 (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Active L1 table entries.
    pub l1_size: u32,
    /// Active L1 table offset.
    pub l1_table_offset: HostOffset,
    /// Refcount table offset.
    pub refcount_table_offset: HostOffset,
    /// Refcount table size in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: HostOffset,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Compression type (byte 104 when header_length > 104).
    pub compression_type: CompressionType,
    /// Header bytes from 105 up to header_length (after the compression type byte), kept
    /// verbatim: padding, or fields of a newer spec.
    pub extra: Vec<u8>,
    /// Header extensions in file order.
    pub extensions: Vec<Extension>,
    /// Backing file name, as stored (not NUL-terminated on disk).
    pub backing_file: Option<String>,
}

impl Header {
    /// Reads just the magic, version and cluster_bits from the first bytes of a file, to
    /// learn how much to read for a full [`Header::parse`]. Returns the cluster size.
    pub fn peek_cluster_size(buf: &[u8]) -> Result<u64> {
        // No magic (a raw or empty file): QEMU's "Image is not in qcow2 format".
        if buf.len() < 4 || be32(buf, 0) != MAGIC {
            return Err(Error::NotQcow2);
        }
        if buf.len() < V2_HEADER_LENGTH as usize {
            return Err(Error::corrupt(
                "header",
                format!("file is {} bytes, shorter than the {V2_HEADER_LENGTH}-byte qcow2 header", buf.len()),
            ));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Error::corrupt("magic", format!("{magic:#010x} is not the qcow2 magic QFI\\xfb")));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::corrupt(
                "version",
                format!("unsupported qcow2 version {version} (2 and 3 are supported)"),
            ));
        }
        let cb = be32(buf, 20);
        Geometry::new(cb, false, 0)?;
        Ok(1u64 << cb)
    }

    /// Parses a header from `buf`, which holds the start of the file: all of cluster 0, or
    /// the whole file when it is shorter. `file_len` is the image file's length.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        let cluster_size = Self::peek_cluster_size(buf)?;
        let version = be32(buf, 4);
        let cluster_bits = be32(buf, 20);
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: HostOffset(be64(buf, 40)),
            refcount_table_offset: HostOffset(be64(buf, 48)),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: HostOffset(be64(buf, 64)),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: CompressionType::Deflate,
            extra: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        let cs = cluster_size as usize;
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LENGTH as usize {
                return Err(Error::corrupt(
                    "header",
                    format!(
                        "file is {} bytes, shorter than the {V3_MIN_HEADER_LENGTH}-byte version 3 header",
                        buf.len()
                    ),
                ));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LENGTH {
                return Err(Error::corrupt(
                    "header_length",
                    format!("{} is below the version 3 minimum of {V3_MIN_HEADER_LENGTH}", h.header_length),
                ));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(Error::corrupt("header_length", format!("{} is not a multiple of 8", h.header_length)));
            }
            if h.header_length as u64 > cluster_size {
                return Err(Error::corrupt(
                    "header_length",
                    format!("{} exceeds the cluster size {cluster_size}", h.header_length),
                ));
            }
            if buf.len() < h.header_length as usize {
                return Err(Error::corrupt(
                    "header_length",
                    format!("{} runs past the end of the file ({} bytes)", h.header_length, buf.len()),
                ));
            }
            let ct = if h.header_length > V3_MIN_HEADER_LENGTH { buf[V3_MIN_HEADER_LENGTH as usize] } else { 0 };
            if h.header_length > V3_MIN_HEADER_LENGTH {
                h.extra = buf[V3_MIN_HEADER_LENGTH as usize + 1..h.header_length as usize].to_vec();
            }
            let has_bit = h.incompatible_features & feature::INCOMPAT_COMPRESSION != 0;
            h.compression_type = match (ct, has_bit) {
                (0, false) => CompressionType::Deflate,
                (0, true) => {
                    return Err(Error::corrupt(
                        "compression_type",
                        "incompatible bit 3 (compression type) is set but compression_type is 0 (deflate)",
                    ));
                }
                (1, true) => CompressionType::Zstd,
                (1, false) => {
                    return Err(Error::corrupt(
                        "compression_type",
                        "compression_type is 1 (zstd) but incompatible bit 3 (compression type) is not set",
                    ));
                }
                (n, _) => {
                    return Err(Error::corrupt("compression_type", format!("unknown compression type {n}")));
                }
            };
        }
        // Geometry validation (cluster_bits, refcount_order, extended L2 minimum).
        let geometry =
            Geometry::new(cluster_bits, h.incompatible_features & feature::INCOMPAT_EXTL2 != 0, h.refcount_order)?;

        // Extensions live between header_length and the end of cluster 0.
        let ext_end = cs.min(buf.len());
        if h.version == 3 || ext_end > V2_HEADER_LENGTH as usize {
            // v2 images may have extensions too (QEMU writes backing format on v2).
            let (exts, _) = extension::parse_extensions(buf, h.header_length as usize, ext_end)?;
            h.extensions = exts;
        }
        // quring's identity extension: validated here, so a bad one fails every open.
        h.identity()?;
        let table = h.feature_table()?;
        let unknown = h.incompatible_features & !feature::INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "incompatible feature(s) not supported: {}",
                feature::describe_unknown_incompatible(unknown, &table)
            )));
        }
        // External data file: the name extension is validated whenever it is present, and
        // the raw bit needs the bit (QEMU: "data-file-raw requires a data file"). The bit
        // without a name is a valid header (`qemu-img amend -o data_file=` writes it; QEMU
        // then needs the data file given another way): opening the data file refuses it
        // (`image::data_file::open`), describing the image does not.
        if h.incompatible_features & feature::INCOMPAT_DATA_FILE != 0 {
            // (Without the bit the extension names nothing and is kept as it is, as QEMU does.)
            h.data_file()?;
            if h.incompatible_features & feature::INCOMPAT_L2LESS != 0 {
                return Err(Error::corrupt(
                    "incompatible_features",
                    "incompatible bits 2 (external data file) and 61 (quring L2-less ranges) cannot be combined",
                ));
            }
        } else if h.autoclear_features & feature::AUTOCLEAR_DATA_FILE_RAW != 0 && h.version >= 3 {
            return Err(Error::corrupt(
                "autoclear_features",
                "autoclear bit 1 (raw external data) is set but incompatible bit 2 (external data file) is not",
            ));
        }
        if h.crypt_method != 0 || h.extensions.iter().any(|e| e.kind == EXT_CRYPTO) {
            return Err(Error::Unsupported(format!(
                "encrypted images (crypt_method {}) are not supported",
                h.crypt_method
            )));
        }

        // Backing file name.
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME {
                return Err(Error::corrupt(
                    "backing_file_size",
                    format!("backing file name is {} bytes, longer than {MAX_BACKING_NAME}", h.backing_file_size),
                ));
            }
            let end = h.backing_file_offset.checked_add(h.backing_file_size as u64);
            match end {
                Some(end) if end <= cluster_size && end <= buf.len() as u64 => {
                    let name = &buf[h.backing_file_offset as usize..end as usize];
                    h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
                }
                _ => {
                    return Err(Error::corrupt(
                        "backing_file_offset",
                        format!(
                            "backing file name at {:#x} (+{} bytes) lies outside the header cluster",
                            h.backing_file_offset, h.backing_file_size
                        ),
                    ));
                }
            }
        }

        // Tables: alignment and size limits (the end-of-file check happens when read).
        let check_table = |what: &'static str, off: HostOffset, bytes: u64| -> Result<()> {
            if !geometry.is_cluster_aligned(off.0) {
                return Err(Error::corrupt(what, format!("offset {:#x} is not cluster aligned", off.0)));
            }
            match off.0.checked_add(bytes) {
                Some(end) if end <= i64::MAX as u64 => {}
                _ => {
                    return Err(Error::corrupt(what, format!("offset {:#x} + {bytes} bytes overflows", off.0)));
                }
            }
            if bytes > 0 && off.0.saturating_add(bytes) > file_len {
                return Err(Error::corrupt(
                    what,
                    format!(
                        "table at {:#x} ({bytes} bytes) extends past the end of the file ({file_len} bytes)",
                        off.0
                    ),
                ));
            }
            Ok(())
        };
        let l1_bytes = h.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(
                "l1_size",
                format!("{} entries exceed the limit of {}", h.l1_size, MAX_L1_BYTES / 8),
            ));
        }
        let needed = geometry
            .l1_entries_for(h.size)
            .ok_or_else(|| Error::corrupt("size", format!("{} is too large", h.size)))?;
        if needed > MAX_L1_BYTES / 8 || h.size > i64::MAX as u64 {
            return Err(Error::corrupt(
                "size",
                format!("virtual size {} is too large for cluster size {cluster_size}", h.size),
            ));
        }
        if (h.l1_size as u64) < needed {
            return Err(Error::corrupt(
                "l1_size",
                format!("{} entries are too few for virtual size {} (need {needed})", h.l1_size, h.size),
            ));
        }
        check_table("l1_table_offset", h.l1_table_offset, l1_bytes)?;
        let rt_bytes = h.refcount_table_clusters as u64 * cluster_size;
        if rt_bytes > MAX_REFTABLE_BYTES.max(cluster_size) {
            return Err(Error::corrupt(
                "refcount_table_clusters",
                format!("{} clusters exceed the 8 MiB refcount table limit", h.refcount_table_clusters),
            ));
        }
        if h.refcount_table_clusters == 0 {
            return Err(Error::corrupt("refcount_table_clusters", "0: the image has no refcount table"));
        }
        check_table("refcount_table_offset", h.refcount_table_offset, rt_bytes)?;
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt(
                "nb_snapshots",
                format!("{} exceeds the limit of {MAX_SNAPSHOTS}", h.nb_snapshots),
            ));
        }
        // Entries are at least 40 bytes. Like QEMU, the offset must be valid even when
        // there are no snapshots.
        check_table("snapshots_offset", h.snapshots_offset, h.nb_snapshots as u64 * 40)?;
        if h.version == 2 && h.refcount_order != 4 {
            return Err(Error::corrupt("refcount_order", "version 2 images must use 16-bit refcounts"));
        }
        Ok(h)
    }

    /// The image geometry described by this header.
    pub fn geometry(&self) -> Geometry {
        // Validated in parse; constructing by hand bypasses only for headers we built.
        Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.incompatible_features & feature::INCOMPAT_EXTL2 != 0,
            refcount_order: self.refcount_order,
            external_data: self.incompatible_features & feature::INCOMPAT_DATA_FILE != 0,
        }
    }

    /// The external data file's name from its extension (validated; None: no extension).
    /// It names the data file only when incompatible bit 2 is set ([`Header::has_data_file`]).
    pub fn data_file(&self) -> Result<Option<String>> {
        let mut it = self.extensions.iter().filter(|e| e.kind == EXT_DATA_FILE);
        let Some(e) = it.next() else { return Ok(None) };
        if it.next().is_some() {
            return Err(Error::corrupt("data file name extension", "the header has more than one"));
        }
        super::data_file::parse_name(&e.data).map(Some)
    }

    /// Does guest data live in an external data file (incompatible bit 2)?
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & feature::INCOMPAT_DATA_FILE != 0
    }

    /// Is the external data file a raw image of the disk (autoclear bit 1)?
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear_features & feature::AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// The feature name table, empty when the extension is absent.
    pub fn feature_table(&self) -> Result<Vec<FeatureName>> {
        match self.extensions.iter().find(|e| e.kind == EXT_FEATURE_TABLE) {
            Some(e) => feature::parse_feature_table(&e.data),
            None => Ok(Vec::new()),
        }
    }

    /// The backing file format from its extension, if present.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions.iter().find(|e| e.kind == EXT_BACKING_FORMAT).map(|e| {
            let end = e.data.iter().position(|&b| b == 0).unwrap_or(e.data.len());
            String::from_utf8_lossy(&e.data[..end]).into_owned()
        })
    }

    /// Sets or removes the backing format extension.
    pub fn set_backing_format(&mut self, fmt: Option<&str>) {
        self.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT);
        if let Some(f) = fmt {
            self.extensions.insert(0, Extension { kind: EXT_BACKING_FORMAT, data: f.as_bytes().to_vec() });
        }
    }

    /// quring's identity extension (docs/identity.md), if present.
    pub fn identity(&self) -> Result<Option<super::identity::Identity>> {
        use super::identity::{EXT_IDENTITY, Identity};
        let mut it = self.extensions.iter().filter(|e| e.kind == EXT_IDENTITY);
        let Some(e) = it.next() else { return Ok(None) };
        if it.next().is_some() {
            return Err(Error::corrupt("identity extension", "the header has more than one"));
        }
        Identity::parse(&e.data).map(Some)
    }

    /// Sets (or, with None, removes) the identity extension; it goes after the backing
    /// format and feature table, before unknown extensions keep their order.
    pub fn set_identity(&mut self, id: Option<&super::identity::Identity>) {
        use super::identity::EXT_IDENTITY;
        let at = self.extensions.iter().position(|e| e.kind == EXT_IDENTITY);
        self.extensions.retain(|e| e.kind != EXT_IDENTITY);
        if let Some(id) = id {
            let at = at.unwrap_or(self.extensions.len()).min(self.extensions.len());
            self.extensions.insert(at, id.to_extension());
        }
    }

    /// Are lazy refcounts enabled (compatible bit 0)?
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & feature::COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Serializes the header, its extensions and the backing file name into the bytes of
    /// cluster 0 (only as many as are used). Fails when they do not fit in one cluster.
    /// `backing_file_offset` and `backing_file_size` are recomputed.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let cluster_size = 1usize << self.cluster_bits;
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&[0u8; 12]); // backing offset/size, patched below
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.0.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.0.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.0.to_be_bytes());
        if self.version >= 3 {
            out.extend_from_slice(&self.incompatible_features.to_be_bytes());
            out.extend_from_slice(&self.compatible_features.to_be_bytes());
            out.extend_from_slice(&self.autoclear_features.to_be_bytes());
            out.extend_from_slice(&self.refcount_order.to_be_bytes());
            out.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > V3_MIN_HEADER_LENGTH {
                out.push(match self.compression_type {
                    CompressionType::Deflate => 0,
                    CompressionType::Zstd => 1,
                });
                let mut extra = self.extra.clone();
                extra.resize(self.header_length as usize - V3_MIN_HEADER_LENGTH as usize - 1, 0);
                out.extend_from_slice(&extra);
            }
        }
        debug_assert_eq!(out.len(), self.header_length as usize);
        extension::serialize_extensions(&self.extensions, &mut out);
        match &self.backing_file {
            Some(name) => {
                if name.len() > MAX_BACKING_NAME as usize {
                    return Err(Error::InvalidRequest(format!(
                        "backing file name is {} bytes, longer than {MAX_BACKING_NAME}",
                        name.len()
                    )));
                }
                self.backing_file_offset = out.len() as u64;
                self.backing_file_size = name.len() as u32;
                out.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        out[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        if out.len() > cluster_size {
            return Err(Error::InvalidRequest(format!(
                "header, extensions and backing file name take {} bytes, more than one cluster ({cluster_size})",
                out.len()
            )));
        }
        Ok(out)
    }

    /// A fresh header for a new image with no tables placed yet.
    pub fn new_v3(size: u64, geometry: Geometry, compression: CompressionType) -> Header {
        let mut incompat = 0;
        if geometry.extended_l2 {
            incompat |= feature::INCOMPAT_EXTL2;
        }
        if compression == CompressionType::Zstd {
            incompat |= feature::INCOMPAT_COMPRESSION;
        }
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: geometry.cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: HostOffset(0),
            refcount_table_offset: HostOffset(0),
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: HostOffset(0),
            incompatible_features: incompat,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: geometry.refcount_order,
            header_length: V3_HEADER_LENGTH,
            compression_type: compression,
            extra: vec![0u8; 7],
            extensions: vec![Extension {
                kind: EXT_FEATURE_TABLE,
                data: feature::serialize_feature_table(&feature::default_feature_table(false)),
            }],
            backing_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        let g = Geometry::new(16, false, 4).unwrap();
        let mut h = Header::new_v3(1 << 30, g, CompressionType::Deflate);
        h.l1_size = 2;
        h.l1_table_offset = HostOffset(0x30000);
        h.refcount_table_offset = HostOffset(0x10000);
        h.refcount_table_clusters = 1;
        h
    }

    #[test]
    fn roundtrip_basic() {
        let mut h = sample();
        h.backing_file = Some("base.raw".into());
        h.set_backing_format(Some("raw"));
        let bytes = h.serialize().unwrap();
        let back = Header::parse(&bytes, 1 << 20).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.backing_format().as_deref(), Some("raw"));
    }

    proptest! {
        #[test]
        fn roundtrip_any(cb in 9u32..=21, order in 0u32..=6, size in 0u64..(1u64 << 40), ext_l2 in any::<bool>(),
                         lazy in any::<bool>(), zstd in any::<bool>(), extra_len in 0usize..4,
                         unknown in proptest::collection::vec((0x1000u32..0x2000, proptest::collection::vec(any::<u8>(), 0..40)), 0..3),
                         compat_unknown in any::<u64>(), autoclear in any::<u64>(),
                         backing in proptest::option::of("[a-z./]{1,40}")) {
            let ext_l2 = ext_l2 && cb >= 14;
            let g = Geometry::new(cb, ext_l2, order).unwrap();
            let mut h = Header::new_v3(size, g, if zstd { CompressionType::Zstd } else { CompressionType::Deflate });
            h.l1_size = g.l1_entries_for(size).unwrap() as u32;
            prop_assume!(h.l1_size as u64 * 8 <= MAX_L1_BYTES);
            h.l1_table_offset = HostOffset(3 << cb);
            h.refcount_table_offset = HostOffset(1 << cb);
            h.refcount_table_clusters = 1;
            h.compatible_features = compat_unknown | if lazy { 1 } else { 0 };
            // (The raw-external-data bit needs a data file: tested on its own.)
            h.autoclear_features = autoclear & !feature::AUTOCLEAR_DATA_FILE_RAW;
            h.header_length = V3_HEADER_LENGTH + 8 * extra_len as u32;
            h.extra = (0..h.header_length as usize - 105).map(|i| i as u8).collect();
            for (kind, data) in unknown {
                h.extensions.push(Extension { kind, data });
            }
            h.backing_file = backing;
            let bytes = match h.serialize() {
                Ok(b) => b,
                Err(_) => return Ok(()), // did not fit in a small cluster
            };
            let file_len = (4u64 << cb) + h.l1_size as u64 * 8;
            let back = Header::parse(&bytes, file_len).unwrap();
            prop_assert_eq!(&back, &h);
            // Re-serializing gives the same bytes.
            let mut back = back;
            prop_assert_eq!(back.serialize().unwrap(), bytes);
        }
    }

    #[test]
    fn refuses_bad_fields() {
        let mut h = sample();
        let good = h.serialize().unwrap();
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (0, vec![0, 0, 0, 0], "not in qcow2 format"),
            (4, 4u32.to_be_bytes().to_vec(), "version"),
            (20, 8u32.to_be_bytes().to_vec(), "cluster_bits"),
            (96, 7u32.to_be_bytes().to_vec(), "refcount_order"),
            (100, 96u32.to_be_bytes().to_vec(), "header_length"),
            (36, (1u32 << 31).to_be_bytes().to_vec(), "l1_size"),
            (40, 0x30001u64.to_be_bytes().to_vec(), "l1_table_offset"),
            (72, (1u64 << 20).to_be_bytes().to_vec(), "bit 20"),
        ];
        for (off, bytes, want) in cases {
            let mut b = good.clone();
            b[off..off + bytes.len()].copy_from_slice(&bytes);
            let e = Header::parse(&b, 1 << 20).unwrap_err().to_string();
            assert!(e.contains(want), "patch at {off}: {e}");
        }
    }
}
