//! The benchmark matrix: image modes, workloads, sides, devices and presets.

use serde::{Deserialize, Serialize};

/// A qcow2 layout under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    pub id: &'static str,
    pub title: &'static str,
    /// `-o` options for image creation.
    pub create_opts: &'static str,
    /// Only `quring create` can make this layout (qemu-img does not know it).
    pub quring_only: bool,
    /// Guest data in an external raw data file beside the image (`data_file=IMAGE.data,
    /// data_file_raw=on`; see `plan::create_qcow2` for overlays).
    pub data_file_raw: bool,
}

pub const MODES: &[Mode] = &[
    Mode {
        id: "standard",
        title: "64 KiB clusters, 16-bit refcounts",
        create_opts: "cluster_size=64k,refcount_bits=16",
        quring_only: false,
        data_file_raw: false,
    },
    Mode {
        id: "xl2-2m",
        title: "extended_l2, 2 MiB clusters (64 KiB subclusters)",
        create_opts: "cluster_size=2M,extended_l2=on",
        quring_only: false,
        data_file_raw: false,
    },
    Mode {
        id: "xl2-64k",
        title: "extended_l2, 64 KiB clusters (2 KiB subclusters)",
        create_opts: "cluster_size=64k,extended_l2=on",
        quring_only: false,
        data_file_raw: false,
    },
    Mode {
        id: "rc1",
        title: "64 KiB clusters, refcount_bits=1",
        create_opts: "cluster_size=64k,refcount_bits=1",
        quring_only: false,
        data_file_raw: false,
    },
    Mode {
        id: "lazy",
        title: "64 KiB clusters, lazy_refcounts=on",
        create_opts: "cluster_size=64k,lazy_refcounts=on",
        quring_only: false,
        data_file_raw: false,
    },
    Mode {
        id: "l2less",
        title: "L2-less ranges",
        create_opts: "cluster_size=64k,l2_less=on",
        quring_only: true,
        data_file_raw: false,
    },
    Mode {
        id: "datafile-raw",
        title: "64 KiB clusters, external raw data file (data_file_raw=on; overlays: data_file, raw off)",
        create_opts: "cluster_size=64k",
        quring_only: false,
        data_file_raw: true,
    },
];

/// What the image holds before a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageState {
    /// Every cluster allocated and written (0x5a); shared by the runs of a mode.
    Full,
    /// Freshly created, nothing allocated; a new image for every run.
    Empty,
    /// Fresh qcow2 overlay over a full raw backing file; a new overlay for every run.
    Overlay,
}

/// Offset sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Scattered: qemu-img bench's step pattern with a large odd step (qemu-img, quring
    /// bench), seeded random offsets (fio).
    Random,
    /// Consecutive requests.
    Sequential,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub id: &'static str,
    pub title: &'static str,
    pub write: bool,
    pub bs: u64,
    pub depth: u32,
    pub image: ImageState,
    pub pattern: Pattern,
    /// Every write waits for its metadata to be stable (quring/QEMU: cache=directsync,
    /// raw: O_DSYNC).
    pub writethrough: bool,
    /// Each block is touched at most once (allocating workloads): the request count is
    /// capped so that the step pattern never wraps.
    pub single_pass: bool,
    /// Rough IOPS used for the warm-up run's request count before calibration.
    pub assumed_iops: u64,
}

const K4: u64 = 4096;
const M1: u64 = 1 << 20;

pub const WORKLOADS: &[Workload] = &[
    Workload {
        id: "randread-4k",
        title: "4k random read QD32, full image",
        write: false,
        bs: K4,
        depth: 32,
        image: ImageState::Full,
        pattern: Pattern::Random,
        writethrough: false,
        single_pass: false,
        assumed_iops: 100_000,
    },
    Workload {
        id: "randwrite-4k",
        title: "4k random write QD32, full image",
        write: true,
        bs: K4,
        depth: 32,
        image: ImageState::Full,
        pattern: Pattern::Random,
        writethrough: false,
        single_pass: false,
        assumed_iops: 80_000,
    },
    Workload {
        id: "firsttouch-4k",
        title: "4k first-touch random write QD32, empty image",
        write: true,
        bs: K4,
        depth: 32,
        image: ImageState::Empty,
        pattern: Pattern::Random,
        writethrough: false,
        single_pass: true,
        assumed_iops: 50_000,
    },
    Workload {
        id: "overlay-4k",
        title: "4k random write QD32, overlay over a full backing file",
        write: true,
        bs: K4,
        depth: 32,
        image: ImageState::Overlay,
        pattern: Pattern::Random,
        writethrough: false,
        single_pass: true,
        assumed_iops: 20_000,
    },
    Workload {
        id: "seqread-1m",
        title: "1M sequential read QD8, full image",
        write: false,
        bs: M1,
        depth: 8,
        image: ImageState::Full,
        pattern: Pattern::Sequential,
        writethrough: false,
        single_pass: false,
        assumed_iops: 3_000,
    },
    Workload {
        id: "seqwrite-1m",
        title: "1M sequential write QD8, empty image",
        write: true,
        bs: M1,
        depth: 8,
        image: ImageState::Empty,
        pattern: Pattern::Sequential,
        writethrough: false,
        single_pass: true,
        assumed_iops: 2_000,
    },
    Workload {
        id: "wt-alloc-qd1",
        title: "4k writethrough allocating write QD1, empty image",
        write: true,
        bs: K4,
        depth: 1,
        image: ImageState::Empty,
        pattern: Pattern::Random,
        writethrough: true,
        single_pass: true,
        assumed_iops: 5_000,
    },
    Workload {
        id: "wt-alloc-qd32",
        title: "4k writethrough allocating write QD32, empty image",
        write: true,
        bs: K4,
        depth: 32,
        image: ImageState::Empty,
        pattern: Pattern::Random,
        writethrough: true,
        single_pass: true,
        assumed_iops: 20_000,
    },
];

/// Who serves the I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The quring engine (`quring bench` or fio with the quring plugin).
    Quring,
    /// fio's io_uring engine, O_DIRECT, on a raw file: the limit.
    Raw,
    /// QEMU's qcow2 driver through `qemu-img bench`: the peer.
    Qemu,
}

impl Side {
    pub const ALL: [Side; 3] = [Side::Quring, Side::Raw, Side::Qemu];
    pub fn name(self) -> &'static str {
        match self {
            Side::Quring => "quring",
            Side::Raw => "raw",
            Side::Qemu => "qemu",
        }
    }
}

/// How the quring side is driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuringDriver {
    /// `quring bench` (qemu-img bench's step pattern).
    Bench,
    /// fio with `ioengine=external:libquring_fio.so` (fio's random pattern).
    Fio,
}

/// Where the images live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// tmpfs (/dev/shm): the engine's CPU cost without device latency.
    Shm,
    /// the disk (/var/tmp).
    Disk,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Shm => "shm",
            Device::Disk => "disk",
        }
    }
    pub fn default_dir(self) -> &'static str {
        match self {
            Device::Shm => "/dev/shm",
            Device::Disk => "/var/tmp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Shm,
    Disk,
    Both,
}

impl DeviceChoice {
    pub fn devices(self) -> Vec<Device> {
        match self {
            DeviceChoice::Shm => vec![Device::Shm],
            DeviceChoice::Disk => vec![Device::Disk],
            DeviceChoice::Both => vec![Device::Shm, Device::Disk],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PresetName {
    Quick,
    Full,
}

/// Defaults of a preset; every field can be overridden on the command line.
#[derive(Clone, Debug)]
pub struct Preset {
    pub name: &'static str,
    pub devices: DeviceChoice,
    pub rounds: u32,
    pub seconds: f64,
    pub image_size: u64,
    pub modes: Vec<&'static str>,
    pub workloads: Vec<&'static str>,
}

impl Preset {
    pub fn get(p: PresetName) -> Preset {
        match p {
            PresetName::Quick => Preset {
                name: "quick",
                devices: DeviceChoice::Shm,
                rounds: 3,
                seconds: 1.5,
                image_size: 256 << 20,
                modes: MODES.iter().map(|m| m.id).collect(),
                workloads: vec!["randread-4k", "randwrite-4k", "firsttouch-4k", "seqread-1m", "wt-alloc-qd32"],
            },
            PresetName::Full => Preset {
                name: "full",
                devices: DeviceChoice::Both,
                rounds: 3,
                seconds: 2.5,
                image_size: 1 << 30,
                modes: MODES.iter().map(|m| m.id).collect(),
                workloads: WORKLOADS.iter().map(|w| w.id).collect(),
            },
        }
    }
}

pub fn mode(id: &str) -> Option<&'static Mode> {
    MODES.iter().find(|m| m.id == id)
}

pub fn workload(id: &str) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_name_known_modes_and_workloads() {
        for p in [PresetName::Quick, PresetName::Full] {
            let p = Preset::get(p);
            assert!(p.modes.iter().all(|m| mode(m).is_some()));
            assert!(p.workloads.iter().all(|w| workload(w).is_some()));
        }
    }

    #[test]
    fn ids_unique() {
        let mut m: Vec<_> = MODES.iter().map(|m| m.id).collect();
        m.sort();
        m.dedup();
        assert_eq!(m.len(), MODES.len());
        let mut w: Vec<_> = WORKLOADS.iter().map(|w| w.id).collect();
        w.sort();
        w.dedup();
        assert_eq!(w.len(), WORKLOADS.len());
    }
}
