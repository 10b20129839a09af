//! Pure planner for `quring create`: computes every byte `qemu-img create -f qcow2` (QEMU 10)
//! writes, without doing any I/O.
//!
//! QEMU does not lay a new image out from a formula: it writes a minimal image (header,
//! a one-cluster refcount table at cluster 1, an empty refcount block at cluster 2), opens it
//! and then grows it through its ordinary cluster allocator (L1 table, preallocated L2 tables
//! and data clusters, extra refcount blocks, a relocated refcount table). To reproduce its
//! placement exactly, this module replays that allocator on an in-memory model of the file:
//! the first-fit free cluster search, refcount block allocation (self-describing or not), the
//! "try again" restarts after a new refcount block, and the refcount table growth. The model
//! keeps what is left behind on disk too (a freed old refcount table keeps its bytes).

use std::collections::{BTreeMap, HashMap};

use super::extension::{EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, Extension};
use super::feature;
use super::geometry::{Geometry, MAX_L1_BYTES, OFFSET_MASK};
use super::header::{CompressionType, Header, MAX_BACKING_NAME, V2_HEADER_LENGTH};
use super::l1::L1_COPIED;
use super::l2::{self, L2Entry, SubclusterBitmap};
use super::refcount;
use super::types::HostOffset;
use crate::{Error, Result};

/// Preallocation mode (qemu-img's `preallocation=` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Only the header, refcount structures and L1 table.
    #[default]
    Off,
    /// Also every L2 table and every data cluster's refcount and L2 entry (data not written).
    Metadata,
    /// Like metadata; the data area is additionally fallocated by the caller.
    Falloc,
    /// Like metadata; the data area is additionally written with zeros by the caller.
    Full,
}

impl Preallocation {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Metadata => "metadata",
            Self::Falloc => "falloc",
            Self::Full => "full",
        }
    }
}

/// Options of a new image, with qemu-img's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to a multiple of 512, as qemu-img does).
    pub size: u64,
    /// Cluster size in bytes (power of two, 512..=2 MiB).
    pub cluster_size: u64,
    /// Extended L2 entries (subclusters); needs cluster_size >= 16 KiB.
    pub extended_l2: bool,
    /// Refcount width in bits (power of two, 1..=64).
    pub refcount_bits: u32,
    /// Compatible feature bit 0.
    pub lazy_refcounts: bool,
    /// Version 2 image (`compat=0.10`).
    pub compat_v2: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format (backing format header extension).
    pub backing_fmt: Option<String>,
    /// Compression type for compressed clusters.
    pub compression: CompressionType,
    /// quring's L2-less ranges: sets incompatible bit 61 and its feature table entry.
    pub l2_less: bool,
    /// quring's identity extension (docs/identity.md): the new image's GUID and its backing
    /// image's GUID and length. None (the default) keeps the file byte-identical to
    /// `qemu-img create`'s; left out when it does not fit in cluster 0.
    pub identity: Option<super::identity::Identity>,
    /// External data file name (`data_file`): incompatible bit 2 and the data file name
    /// extension ([`super::data_file`]); the caller creates the file itself.
    pub data_file: Option<String>,
    /// `data_file_raw`: autoclear bit 1, with every cluster mapped at its guest offset
    /// (metadata preallocated, as qemu-img does).
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            extended_l2: false,
            refcount_bits: 16,
            lazy_refcounts: false,
            compat_v2: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_fmt: None,
            compression: CompressionType::Deflate,
            l2_less: false,
            identity: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

/// What to write to a new, empty file to create the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatePlan {
    /// Non-overlapping `(host offset, bytes)` writes in ascending offset order. Ranges not
    /// covered read as zeros (holes).
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Final file length (set with ftruncate after the writes).
    pub file_len: u64,
    /// Preallocated data clusters `(offset, len)`: for `Falloc` the caller fallocates them,
    /// for `Full` it writes zeros there. Empty for `Off` and `Metadata`.
    pub data_ranges: Vec<(u64, u64)>,
    /// The final header (for callers that want the table offsets).
    pub header: Header,
}

/// Largest image length QEMU's block layer accepts (`BDRV_MAX_LENGTH`).
pub const MAX_IMAGE_LENGTH: u64 = (i64::MAX as u64) & !((1u64 << 30) - 1);
/// Highest host offset a qcow2 cluster may have (`QCOW_MAX_CLUSTER_OFFSET`).
const MAX_CLUSTER_OFFSET: u64 = (1u64 << 56) - 1;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE` (compared against entry counts, as QEMU does).
const MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// `BDRV_REQUEST_MAX_BYTES`.
const REQUEST_MAX_BYTES: u64 = (i32::MAX as u64) & !511;
/// Most metadata bytes (refcount blocks, tables, L2 tables) a plan may hold in memory.
pub const MAX_PLAN_METADATA: u64 = 1 << 30;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidRequest(msg.into())
}

/// Validates `o` and computes the image qemu-img would create.
pub fn plan_create(o: &CreateOptions) -> Result<CreatePlan> {
    let cs = o.cluster_size;
    if !(512..=(2 << 20)).contains(&cs) || !cs.is_power_of_two() {
        return Err(invalid("Cluster size must be a power of two between 512 and 2048k"));
    }
    let cluster_bits = cs.trailing_zeros();
    if o.extended_l2 && cs < 16384 {
        return Err(invalid("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"));
    }
    if o.refcount_bits == 0 || o.refcount_bits > 64 || !o.refcount_bits.is_power_of_two() {
        return Err(invalid("Refcount width must be a power of two and may not exceed 64 bits"));
    }
    if o.compat_v2 {
        if o.refcount_bits != 16 {
            return Err(invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
            ));
        }
        if o.compression != CompressionType::Deflate {
            return Err(invalid(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if o.lazy_refcounts {
            return Err(invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if o.extended_l2 {
            return Err(invalid(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if o.l2_less {
            return Err(invalid(
                "L2-less ranges are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
    }
    if o.backing_fmt.is_some() && o.backing_file.is_none() {
        return Err(invalid("Backing format cannot be used without backing file"));
    }
    if let Some(b) = &o.backing_file {
        if b.is_empty() {
            return Err(invalid("Backing file name must not be empty"));
        }
        if b.len() > MAX_BACKING_NAME as usize {
            return Err(invalid(format!(
                "Backing file name is {} bytes, longer than the {MAX_BACKING_NAME} bytes qcow2 allows",
                b.len()
            )));
        }
        if o.preallocation != Preallocation::Off && !o.extended_l2 {
            return Err(invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
    }
    if o.data_file_raw && o.data_file.is_none() {
        return Err(invalid("Parameter 'data-file-raw' requires 'data-file'"));
    }
    if let Some(d) = &o.data_file {
        super::data_file::parse_name(d.as_bytes()).map_err(|e| invalid(format!("Invalid data file name: {e}")))?;
        if o.compat_v2 {
            return Err(invalid(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if o.l2_less {
            return Err(invalid("L2-less ranges cannot be combined with an external data file (data_file)"));
        }
        if o.data_file_raw && o.backing_file.is_some() {
            return Err(invalid("Backing file and data-file-raw cannot be used at the same time"));
        }
    }
    if let Some(f) = &o.backing_fmt
        && f.is_empty()
    {
        return Err(invalid("Backing format must not be empty"));
    }
    let size = o.size.checked_next_multiple_of(512).filter(|&s| s <= MAX_IMAGE_LENGTH).ok_or_else(|| {
        invalid(format!("Could not resize image: offset({}) exceeds maximum({MAX_IMAGE_LENGTH})", o.size))
    })?;
    let mut g = Geometry::new(cluster_bits, o.extended_l2, o.refcount_bits.trailing_zeros())?;
    g.external_data = o.data_file.is_some();
    let l1_entries = g.l1_entries_for(size).filter(|&n| n <= MAX_L1_BYTES / 8).ok_or_else(|| {
        invalid("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
    })?;
    let prealloc_meta = o.preallocation != Preallocation::Off || o.data_file_raw;
    if prealloc_meta {
        // L2 tables alone; refcount blocks are checked as they are created.
        let l2_bytes = l1_entries.saturating_mul(cs);
        if l2_bytes > MAX_PLAN_METADATA {
            return Err(invalid(format!(
                "preallocating metadata for {size} bytes needs {l2_bytes} bytes of L2 tables, more than the planner's limit of {MAX_PLAN_METADATA}"
            )));
        }
    }

    // The header QEMU ends up with (tables are filled in below).
    let mut header = Header::new_v3(size, g, o.compression);
    if o.compat_v2 {
        header.version = 2;
        header.header_length = V2_HEADER_LENGTH;
        header.extra.clear();
        header.extensions.clear();
    }
    if o.lazy_refcounts {
        header.compatible_features |= feature::COMPAT_LAZY_REFCOUNTS;
    }
    // QEMU omits the feature name table for clusters of 4 KiB and less, to leave room for
    // the backing file name.
    if cs <= 4096 {
        header.extensions.clear();
    }
    header.backing_file = o.backing_file.clone();
    header.set_backing_format(o.backing_fmt.as_deref());
    if let Some(d) = &o.data_file {
        // QEMU writes it right after the backing format extension.
        header.incompatible_features |= feature::INCOMPAT_DATA_FILE;
        if o.data_file_raw {
            header.autoclear_features |= feature::AUTOCLEAR_DATA_FILE_RAW;
        }
        let at = header.extensions.iter().position(|e| e.kind != EXT_BACKING_FORMAT).unwrap_or(header.extensions.len());
        header.extensions.insert(at, super::data_file::to_extension(d));
    }
    if o.l2_less {
        header.incompatible_features |= feature::INCOMPAT_L2LESS;
        // quring's own bit is named whenever the table fits, so that other implementations
        // refuse the image with a readable message.
        let table = Extension {
            kind: EXT_FEATURE_TABLE,
            data: feature::serialize_feature_table(&feature::default_feature_table(true)),
        };
        header.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
        header.extensions.push(table);
        if header.clone().serialize().is_err() {
            header.extensions.pop();
        }
    }
    if let Some(id) = &o.identity {
        header.set_identity(Some(id));
        if header.clone().serialize().is_err() {
            header.set_identity(None);
        }
    }
    // Fail early when header, extensions and name do not fit in cluster 0.
    header.serialize()?;

    let mut sim = Sim::new(g);
    // qcow2_co_create: clusters 0-2 (header, refcount table, refcount block) get refcount 1.
    sim.alloc_clusters(3 * cs)?;
    // qcow2_co_truncate: grow the L1 table to its exact size.
    sim.grow_l1(l1_entries)?;
    match o.preallocation {
        // qemu-img maps every cluster of a raw data file at its guest offset.
        _ if o.data_file.is_some() && prealloc_meta => sim.preallocate_external(size)?,
        Preallocation::Off => {}
        Preallocation::Metadata => sim.preallocate_metadata(size)?,
        Preallocation::Falloc | Preallocation::Full => sim.preallocate_data(size)?,
    }

    header.l1_size = l1_entries as u32;
    header.l1_table_offset = HostOffset(sim.l1_offset);
    header.refcount_table_offset = HostOffset(sim.reftable_offset);
    header.refcount_table_clusters = (sim.reftable.len() as u64 / (cs / 8)) as u32;
    let mut hbytes = header.serialize()?;
    hbytes.resize(cs as usize, 0);
    sim.write(0, &hbytes);
    sim.finish(header)
}

mod sim;
use sim::Sim;

#[cfg(test)]
mod tests;
