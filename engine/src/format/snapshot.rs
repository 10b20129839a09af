//! The internal snapshot table (spec: "Snapshots"). Entries are kept with their extra data
//! verbatim so that a rewrite preserves what QEMU stored.

use super::bytes::{be16, be32, be64};
use super::types::HostOffset;
use crate::{Error, Result};

/// Size of the fixed part of a snapshot table entry.
pub const FIXED_LEN: usize = 40;
/// Largest extra data QEMU accepts per entry.
pub const MAX_EXTRA: u32 = 1024;

/// One snapshot table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: HostOffset,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name string.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// VM clock at creation, ns.
    pub vm_clock_nsec: u64,
    /// VM state size (32-bit field).
    pub vm_state_size: u32,
    /// Extra data (v3: u64 vm state size, u64 virtual disk size, optional u64 icount).
    pub extra: Vec<u8>,
}

/// Length of the extra data QEMU writes for every snapshot (v2 and v3 alike): the 64-bit
/// VM state size, the virtual disk size and the icount.
pub const EXTRA_LEN: usize = 24;
/// The icount value meaning "not recorded".
pub const NO_ICOUNT: u64 = u64::MAX;
/// Largest snapshot table QEMU writes or reads (`QCOW_MAX_SNAPSHOTS_SIZE`: 1 KiB per
/// snapshot at the snapshot limit, 64 MiB).
pub const MAX_TABLE_BYTES: u64 = 1024 * super::header::MAX_SNAPSHOTS as u64;

impl Snapshot {
    /// Virtual disk size recorded in the extra data, if present.
    pub fn disk_size(&self) -> Option<u64> {
        (self.extra.len() >= 16).then(|| be64(&self.extra, 8))
    }

    /// The VM state size: the 64-bit field of the extra data when present, else the 32-bit
    /// one (spec: "Snapshot table entry", extra data bytes 0-7).
    pub fn vm_state_size(&self) -> u64 {
        if self.extra.len() >= 8 { be64(&self.extra, 0) } else { self.vm_state_size as u64 }
    }

    /// The icount recorded in the extra data (None: not recorded, or the field is absent).
    pub fn icount(&self) -> Option<u64> {
        (self.extra.len() >= 24).then(|| be64(&self.extra, 16)).filter(|&i| i != NO_ICOUNT)
    }

    /// The extra data QEMU writes: 64-bit VM state size, virtual disk size, icount
    /// ([`NO_ICOUNT`] when not recorded), each big-endian.
    pub fn v3_extra(vm_state_size: u64, disk_size: u64, icount: Option<u64>) -> Vec<u8> {
        let mut e = Vec::with_capacity(EXTRA_LEN);
        e.extend_from_slice(&vm_state_size.to_be_bytes());
        e.extend_from_slice(&disk_size.to_be_bytes());
        e.extend_from_slice(&icount.unwrap_or(NO_ICOUNT).to_be_bytes());
        e
    }

    /// The extra data as QEMU rewrites it: an entry read with less than [`EXTRA_LEN`] bytes
    /// gets the missing fields (the VM state size from the 32-bit field, `disk_size` for the
    /// virtual size it had, no icount); longer extra data is kept as it is, QEMU keeps the
    /// bytes it does not know.
    pub fn upgrade_extra(&mut self, disk_size: u64) {
        if self.extra.len() >= EXTRA_LEN {
            return;
        }
        let vm = self.vm_state_size();
        let disk = self.disk_size().unwrap_or(disk_size);
        self.extra = Self::v3_extra(vm, disk, None);
    }
}

/// The ID QEMU gives a new snapshot: one more than the largest numeric ID (IDs that are
/// not numbers count as 0).
pub fn next_id(snaps: &[Snapshot]) -> String {
    let max = snaps.iter().map(|s| s.id.parse::<u64>().unwrap_or(0)).max().unwrap_or(0);
    (max + 1).to_string()
}

/// The index of the snapshot `key` names, as QEMU's `find_snapshot_by_id_or_name`: an ID
/// match first, then the first snapshot with that name.
pub fn find(snaps: &[Snapshot], key: &str) -> Option<usize> {
    snaps.iter().position(|s| s.id == key).or_else(|| snaps.iter().position(|s| s.name == key))
}

/// Bytes the table takes on disk ([`serialize_table`]'s length).
pub fn table_len(snaps: &[Snapshot]) -> u64 {
    snaps.iter().map(|s| (FIXED_LEN + s.extra.len() + s.id.len() + s.name.len()).div_ceil(8) as u64 * 8).sum()
}

/// Length of an entry without its trailing padding, given its fixed part (QEMU does not
/// write the padding after the last entry, so the table may end unpadded).
pub fn entry_len(fixed: &[u8]) -> Result<usize> {
    if fixed.len() < FIXED_LEN {
        return Err(Error::corrupt("snapshot table", "entry is truncated"));
    }
    let id_len = be16(fixed, 12) as usize;
    let name_len = be16(fixed, 14) as usize;
    let extra = be32(fixed, 36);
    if extra > MAX_EXTRA {
        return Err(Error::corrupt(
            "snapshot extra_data_size",
            format!("{extra} bytes exceed the limit of {MAX_EXTRA}"),
        ));
    }
    Ok(FIXED_LEN + extra as usize + id_len + name_len)
}

/// Parses one entry from `buf`, which must hold at least [`entry_len`] bytes. Returns the
/// entry and its padded length (the offset of the next entry).
pub fn parse_entry(buf: &[u8]) -> Result<(Snapshot, usize)> {
    let len = entry_len(buf)?;
    if buf.len() < len {
        return Err(Error::corrupt("snapshot table", "entry is truncated"));
    }
    let id_len = be16(buf, 12) as usize;
    let name_len = be16(buf, 14) as usize;
    let extra_len = be32(buf, 36) as usize;
    let mut o = FIXED_LEN;
    let extra = buf[o..o + extra_len].to_vec();
    o += extra_len;
    let id = String::from_utf8_lossy(&buf[o..o + id_len]).into_owned();
    o += id_len;
    let name = String::from_utf8_lossy(&buf[o..o + name_len]).into_owned();
    let s = Snapshot {
        l1_table_offset: HostOffset(be64(buf, 0)),
        l1_size: be32(buf, 8),
        id,
        name,
        date_sec: be32(buf, 16),
        date_nsec: be32(buf, 20),
        vm_clock_nsec: be64(buf, 24),
        vm_state_size: be32(buf, 32),
        extra,
    };
    Ok((s, len.div_ceil(8) * 8))
}

/// Parses a whole table of `n` entries from `buf`.
pub fn parse_table(buf: &[u8], n: u32) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let mut off = 0;
    for i in 0..n {
        if buf.len() < off + FIXED_LEN {
            return Err(Error::corrupt("snapshot table", format!("entry {i} lies past the end of the table")));
        }
        let (s, len) = parse_entry(&buf[off..])?;
        out.push(s);
        off += len;
    }
    Ok(out)
}

/// Serializes one entry.
pub fn serialize_entry(s: &Snapshot, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&s.l1_table_offset.0.to_be_bytes());
    out.extend_from_slice(&s.l1_size.to_be_bytes());
    out.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
    out.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
    out.extend_from_slice(&s.date_sec.to_be_bytes());
    out.extend_from_slice(&s.date_nsec.to_be_bytes());
    out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
    out.extend_from_slice(&s.vm_state_size.to_be_bytes());
    out.extend_from_slice(&(s.extra.len() as u32).to_be_bytes());
    out.extend_from_slice(&s.extra);
    out.extend_from_slice(s.id.as_bytes());
    out.extend_from_slice(s.name.as_bytes());
    let len = out.len() - start;
    out.resize(start + len.div_ceil(8) * 8, 0);
}

/// Serializes a whole table.
pub fn serialize_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snaps {
        serialize_entry(s, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(snaps in proptest::collection::vec((any::<u64>(), any::<u32>(), "[0-9]{1,5}", "[a-z ]{0,30}",
                    any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..5)) {
            let v: Vec<Snapshot> = snaps.into_iter().map(|(l1, l1s, id, name, ds, dn, vc, vs, extra)| Snapshot {
                l1_table_offset: HostOffset(l1), l1_size: l1s, id, name, date_sec: ds, date_nsec: dn,
                vm_clock_nsec: vc, vm_state_size: vs, extra }).collect();
            let bytes = serialize_table(&v);
            prop_assert_eq!(bytes.len() % 8, 0);
            prop_assert_eq!(parse_table(&bytes, v.len() as u32).unwrap(), v);
        }
    }

    #[test]
    fn ids_names_and_extra() {
        let mk = |id: &str, name: &str| Snapshot {
            l1_table_offset: HostOffset(0x10000),
            l1_size: 1,
            id: id.into(),
            name: name.into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 7,
            extra: Vec::new(),
        };
        let v = vec![mk("1", "a"), mk("3", "b"), mk("x", "3")];
        assert_eq!(next_id(&v), "4");
        assert_eq!(find(&v, "3"), Some(1)); // the ID wins over the name
        assert_eq!(find(&v, "b"), Some(1));
        assert_eq!(find(&v, "c"), None);
        let mut s = mk("1", "a");
        s.upgrade_extra(1 << 20);
        assert_eq!((s.vm_state_size(), s.disk_size(), s.icount()), (7, Some(1 << 20), None));
        assert_eq!(table_len(&[s.clone()]), serialize_table(&[s]).len() as u64);
    }

    #[test]
    fn truncated_refused() {
        assert!(parse_table(&[0u8; 20], 1).is_err());
        let mut e = vec![0u8; 40];
        e[36..40].copy_from_slice(&5000u32.to_be_bytes());
        assert!(parse_table(&e, 1).unwrap_err().to_string().contains("extra_data_size"));
    }
}
