//! quring's identity extension (docs/identity.md): the image's GUID, its backing image's
//! GUID and the backing length, in a header extension of its own type that QEMU keeps and
//! ignores. Pure codec: parsing validates the length, the GUIDs and the backing length.

use super::extension::Extension;
use crate::{Error, Result};

/// Header extension type of the identity extension ("qrid").
pub const EXT_IDENTITY: u32 = 0x7172_6964;
/// Length of the fields this version defines (longer extensions keep the rest verbatim).
pub const IDENTITY_LEN: usize = 48;

/// A 16-byte GUID (an RFC 4122 UUID; quring makes random version 4 ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// A new random GUID (version 4, from the operating system's random source).
    pub fn random() -> Guid {
        Guid(*uuid::Uuid::new_v4().as_bytes())
    }

    /// The all-zero GUID ("none recorded").
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", uuid::Uuid::from_bytes(self.0).hyphenated())
    }
}

/// The identity extension's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// This image's GUID (never nil).
    pub guid: Guid,
    /// The GUID of the backing image when it was recorded (nil: the backing image had no
    /// identity, or there is no backing file).
    pub backing_guid: Guid,
    /// Bytes of the backing image this image shows: guest offsets at or past it read as
    /// zeros where this image has no data. 0 without a backing file.
    pub backing_len: u64,
    /// FNV-1a (64-bit) of the backing file name as stored in the header when the fields
    /// above were written (0 without a backing file): a tool that changes the backing file
    /// without knowing this extension (`qemu-img rebase`, `amend -o backing_file=`) leaves
    /// a name that no longer matches, and the backing fields are known to be stale.
    pub backing_name_hash: u64,
    /// Bytes past the defined fields, kept verbatim (a later version's fields).
    pub rest: Vec<u8>,
}

/// FNV-1a, 64 bits, of a backing file name (the identity extension's name hash).
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

impl Identity {
    /// A new image's identity: a random GUID, no backing fields.
    pub fn generate() -> Identity {
        Identity {
            guid: Guid::random(),
            backing_guid: Guid::default(),
            backing_len: 0,
            backing_name_hash: 0,
            rest: Vec::new(),
        }
    }

    /// Records the backing image: its GUID (nil when it has none), its length and the
    /// backing file name as the header stores it.
    pub fn set_backing(&mut self, guid: Guid, len: u64, name: &str) {
        self.backing_guid = guid;
        self.backing_len = len;
        self.backing_name_hash = name_hash(name);
    }

    /// Do the backing fields describe the backing file the header names (`name`)? False
    /// when another tool changed the backing file since they were written.
    pub fn backing_current(&self, name: Option<&str>) -> bool {
        match name {
            Some(n) => self.backing_name_hash == name_hash(n),
            None => true,
        }
    }

    /// Parses the extension's payload.
    pub fn parse(data: &[u8]) -> Result<Identity> {
        if data.len() < IDENTITY_LEN {
            return Err(Error::corrupt(
                "identity extension",
                format!(
                    "length {} is shorter than the {IDENTITY_LEN} bytes of its fields (image GUID, backing GUID, backing length, backing name hash)",
                    data.len()
                ),
            ));
        }
        let mut g = [0u8; 16];
        g.copy_from_slice(&data[0..16]);
        let guid = Guid(g);
        if guid.is_nil() {
            return Err(Error::corrupt("identity extension", "the image GUID is all zeros"));
        }
        g.copy_from_slice(&data[16..32]);
        let backing_len = super::bytes::be64(data, 32);
        if backing_len > i64::MAX as u64 {
            return Err(Error::corrupt("identity extension", format!("backing length {backing_len} is too large")));
        }
        Ok(Identity {
            guid,
            backing_guid: Guid(g),
            backing_len,
            backing_name_hash: super::bytes::be64(data, 40),
            rest: data[IDENTITY_LEN..].to_vec(),
        })
    }

    /// The extension record.
    pub fn to_extension(&self) -> Extension {
        let mut data = Vec::with_capacity(IDENTITY_LEN + self.rest.len());
        data.extend_from_slice(&self.guid.0);
        data.extend_from_slice(&self.backing_guid.0);
        data.extend_from_slice(&self.backing_len.to_be_bytes());
        data.extend_from_slice(&self.backing_name_hash.to_be_bytes());
        data.extend_from_slice(&self.rest);
        Extension { kind: EXT_IDENTITY, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(g in any::<[u8; 16]>(), b in any::<[u8; 16]>(), len in 0..=i64::MAX as u64, nh in any::<u64>(), rest in proptest::collection::vec(any::<u8>(), 0..16)) {
            prop_assume!(g != [0; 16]);
            let id = Identity { guid: Guid(g), backing_guid: Guid(b), backing_len: len, backing_name_hash: nh, rest };
            prop_assert_eq!(Identity::parse(&id.to_extension().data).unwrap(), id);
        }

        #[test]
        fn any_bytes_parse_or_fail_cleanly(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Identity::parse(&data);
        }
    }

    #[test]
    fn bad_payloads_are_named() {
        for (data, want) in [
            (vec![1u8; 16], "shorter"),
            (vec![1u8; 40], "shorter"),
            (vec![1u8; 47], "shorter"),
            (vec![0u8; 48], "all zeros"),
            ([vec![1u8; 32], vec![0xff; 16]].concat(), "too large"),
        ] {
            let e = Identity::parse(&data).unwrap_err().to_string();
            assert!(e.contains("identity extension") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn random_guids_differ_and_print_as_uuids() {
        let (a, b) = (Guid::random(), Guid::random());
        assert_ne!(a, b);
        let s = a.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(s.as_bytes()[14], b'4', "{s}");
    }
}
