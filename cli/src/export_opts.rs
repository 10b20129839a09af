//! What an export does with a client's discards and zero writes: `--discard` and
//! `--detect-zeroes`, spelled as qemu-nbd and QEMU's `-blockdev` spell them, parsed once for
//! both front ends of `quring serve` (NBD and vhost-user-blk).
//!
//! QEMU's rules, which both front ends follow:
//! * `--discard=ignore` (the default): a discard (NBD_CMD_TRIM, VIRTIO_BLK_T_DISCARD)
//!   succeeds and changes nothing, and a zero write never deallocates (QEMU drops
//!   BDRV_REQ_MAY_UNMAP without BDRV_O_UNMAP). `unmap`: discards free clusters and a zero
//!   write the client allows to unmap (no NBD_CMD_FLAG_NO_HOLE, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
//!   may deallocate.
//! * `--detect-zeroes=on`: a write whose payload is all zeros becomes a zero write; `unmap`:
//!   one that may deallocate, which needs `--discard=unmap` (QEMU refuses it otherwise).

/// `--discard` and `--detect-zeroes` (flattened into `quring serve`'s arguments).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ZeroArgs {
    /// What a client's discard does: nothing (ignore) or free clusters (unmap); with
    /// ignore, zero writes never deallocate either.
    #[arg(long = "discard", value_enum, default_value_t = Discard::Ignore)]
    discard: Discard,
    /// Turn writes of zeros into zero writes (unmap: deallocating ones, needs
    /// --discard=unmap).
    #[arg(long = "detect-zeroes", value_enum, default_value_t = DetectZeroes::Off)]
    detect_zeroes: DetectZeroes,
}

/// `--discard`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Discard {
    Ignore,
    Unmap,
}

/// `--detect-zeroes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectZeroes {
    Off,
    On,
    Unmap,
}

/// The checked options, as the front ends use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroPolicy {
    /// `--discard=unmap`.
    pub discard_unmap: bool,
    /// `--detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
}

impl ZeroArgs {
    /// Checks the combination (QEMU's rule: detect-zeroes=unmap needs discard=unmap).
    pub fn policy(&self) -> Result<ZeroPolicy, String> {
        if self.detect_zeroes == DetectZeroes::Unmap && self.discard != Discard::Unmap {
            return Err("--detect-zeroes=unmap needs --discard=unmap".into());
        }
        Ok(ZeroPolicy { discard_unmap: self.discard == Discard::Unmap, detect_zeroes: self.detect_zeroes })
    }
}

impl ZeroPolicy {
    /// Whether discards are carried out.
    pub fn discards(&self) -> bool {
        self.discard_unmap
    }

    /// Whether a zero write the client allows to deallocate (`may_unmap`) may deallocate.
    pub fn zero_unmap(&self, may_unmap: bool) -> bool {
        may_unmap && self.discard_unmap
    }

    /// What a write of `payload` becomes: `None`, a write; `Some(unmap)`, a zero write
    /// (`--detect-zeroes` and a payload of zeros).
    pub fn detected_zero(&self, payload_is_zero: impl FnOnce() -> bool) -> Option<bool> {
        if self.detect_zeroes == DetectZeroes::Off || !payload_is_zero() {
            return None;
        }
        Some(self.detect_zeroes == DetectZeroes::Unmap && self.discard_unmap)
    }
}

/// Whether a payload is all zeros (`--detect-zeroes`).
pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, mid, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_follows_qemu() {
        let a = ZeroArgs { discard: Discard::Ignore, detect_zeroes: DetectZeroes::Unmap };
        assert!(a.policy().is_err());
        let p = ZeroArgs { discard: Discard::Ignore, detect_zeroes: DetectZeroes::On }.policy().unwrap();
        assert!(!p.discards());
        assert!(!p.zero_unmap(true));
        assert_eq!(p.detected_zero(|| true), Some(false));
        assert_eq!(p.detected_zero(|| false), None);
        let p = ZeroArgs { discard: Discard::Unmap, detect_zeroes: DetectZeroes::Unmap }.policy().unwrap();
        assert!(p.discards());
        assert!(p.zero_unmap(true));
        assert!(!p.zero_unmap(false));
        assert_eq!(p.detected_zero(|| true), Some(true));
        let p = ZeroArgs { discard: Discard::Unmap, detect_zeroes: DetectZeroes::Off }.policy().unwrap();
        assert_eq!(p.detected_zero(|| panic!("not asked when off")), None);
    }

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[3] = 1;
        assert!(!is_zero(&b[1..]));
    }
}
