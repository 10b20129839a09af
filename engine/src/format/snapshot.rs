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

impl Snapshot {
    /// Virtual disk size recorded in the extra data, if present.
    pub fn disk_size(&self) -> Option<u64> {
        (self.extra.len() >= 16).then(|| be64(&self.extra, 8))
    }
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
    fn truncated_refused() {
        assert!(parse_table(&[0u8; 20], 1).is_err());
        let mut e = vec![0u8; 40];
        e[36..40].copy_from_slice(&5000u32.to_be_bytes());
        assert!(parse_table(&e, 1).unwrap_err().to_string().contains("extra_data_size"));
    }
}
