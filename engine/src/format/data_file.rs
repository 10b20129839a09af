//! The external data file (spec: "Header", incompatible bit 2 and autoclear bit 1; "Header
//! extensions", type 0x44415441): the name of the file that holds the guest data, stored
//! as the extension's payload without a terminating NUL. With a data file, an L2 entry's
//! host offset is an offset into the data file (0 is a valid one, told apart from an
//! unallocated entry by the COPIED flag), data clusters have no refcounts in the qcow2
//! file, and compressed clusters are not allowed. With `data_file_raw` (autoclear bit 1)
//! every data cluster sits at its guest offset, so the data file alone is a raw image of
//! the disk.

use super::extension::{EXT_DATA_FILE, Extension};
use crate::{Error, Result};

/// Longest data file name accepted (Linux's PATH_MAX without the terminating NUL).
pub const MAX_DATA_FILE_NAME: usize = 4095;

/// Validates a data file name extension payload and returns the name.
pub fn parse_name(data: &[u8]) -> Result<String> {
    if data.is_empty() {
        return Err(Error::corrupt("data file name extension", "length 0: the name is empty"));
    }
    if data.len() > MAX_DATA_FILE_NAME {
        return Err(Error::corrupt(
            "data file name extension",
            format!("length {} exceeds the limit of {MAX_DATA_FILE_NAME} bytes", data.len()),
        ));
    }
    if let Some(i) = data.iter().position(|&b| b == 0) {
        return Err(Error::corrupt("data file name extension", format!("the name has a NUL byte at offset {i}")));
    }
    String::from_utf8(data.to_vec())
        .map_err(|e| Error::corrupt("data file name extension", format!("the name is not valid UTF-8 ({e})")))
}

/// The extension that stores `name`.
pub fn to_extension(name: &str) -> Extension {
    Extension { kind: EXT_DATA_FILE, data: name.as_bytes().to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(name in "[a-zA-Z0-9 ./_-]{1,200}") {
            prop_assert_eq!(parse_name(&to_extension(&name).data).unwrap(), name);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = parse_name(&data);
        }
    }

    #[test]
    fn names_the_field() {
        for bad in [&b""[..], b"a\0b", &[0xff, 0xfe], &[b'a'; 5000]] {
            let e = parse_name(bad).unwrap_err().to_string();
            assert!(e.contains("data file name"), "{e}");
        }
    }
}
