//! Random differential plans over the whole qcow2 matrix.
//!
//! A [`Config`] fixes the image geometry and features (cluster size, extended L2,
//! refcount width, v2/v3, lazy refcounts, compression type, preallocation, backing chain,
//! snapshots, what the starting image holds); [`plan`] turns it into files and a stream of
//! commands whose offsets and lengths are drawn by alignment class relative to the
//! image's subclusters and clusters.
//!
//! Requests land in a few windows of the virtual disk: its start, its end (the last
//! cluster is partial when the size is not cluster-aligned) and, when the image is made
//! that large, around the boundary between the first two L2 tables. Small windows make
//! requests overlap each other and the starting image's special clusters often.

use super::*;
use crate::common::Rng;
use std::fmt::Write as _;

/// Every cluster size QEMU allows.
pub const CLUSTER_SIZES: [u64; 13] =
    [512, KIB, 2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, MIB, 2 * MIB];

pub const REFCOUNT_BITS: [u32; 7] = [1, 2, 4, 8, 16, 32, 64];

/// The (cluster size, extended L2) cells of the matrix: every cluster size without
/// extended L2, and every size QEMU allows with it (16 KiB and up).
pub fn cells() -> Vec<(u64, bool)> {
    let mut v: Vec<(u64, bool)> = CLUSTER_SIZES.iter().map(|&c| (c, false)).collect();
    v.extend(CLUSTER_SIZES.iter().filter(|&&c| c >= 16 * KIB).map(|&c| (c, true)));
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    None,
    /// A raw backing file.
    Raw,
    /// A qcow2 backing file (its own cluster size, compressed and zero clusters).
    Qcow2,
    /// raw base <- qcow2 middle (data, zero clusters) <- image under test.
    Chain,
}

/// The matrix point of one plan.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub cluster: u64,
    pub extended_l2: bool,
    pub refcount_bits: u32,
    /// compat=0.10 (version 2).
    pub v2: bool,
    pub lazy: bool,
    pub zstd: bool,
    /// `metadata` or `falloc`.
    pub prealloc: Option<&'static str>,
    pub backing: Backing,
    /// The (first) backing file ends before the overlay does.
    pub backing_short: bool,
    /// Snapshots taken while building the starting image (0..=2).
    pub snapshots: u32,
    /// The starting image holds compressed clusters.
    pub compressed: bool,
    /// The starting image holds zero clusters (plain and preallocated).
    pub zeros: bool,
    /// Commands in the stream.
    pub ops: usize,
    /// Mean commands between two reopens.
    pub reopen_every: u64,
    /// The image is made large enough to span two L2 tables.
    pub l2_boundary: bool,
    /// quring io runs with `-t writethrough`.
    pub writethrough: bool,
    /// quring io's L2 cache size in bytes (small ones force slice evictions).
    pub l2_cache: Option<u64>,
    /// The image under test keeps its data in an external data file (`data_file`);
    /// `Some(true)`: `data_file_raw=on`. See [`Config::with_data_file`] for what QEMU allows
    /// with it.
    pub data_file: Option<bool>,
}

impl Config {
    pub fn subcluster(&self) -> u64 {
        if self.extended_l2 { self.cluster / 32 } else { self.cluster }
    }

    fn l2_span(&self) -> u64 {
        let entries = self.cluster / if self.extended_l2 { 16 } else { 8 };
        entries * self.cluster
    }

    /// QEMU's `-o` string.
    pub fn create_options(&self) -> String {
        let mut o = vec![format!("cluster_size={}", self.cluster), format!("refcount_bits={}", self.refcount_bits)];
        if self.v2 {
            o.push("compat=0.10".into());
        } else {
            o.push("compat=1.1".into());
            o.push(format!("extended_l2={}", if self.extended_l2 { "on" } else { "off" }));
            o.push(format!("lazy_refcounts={}", if self.lazy { "on" } else { "off" }));
            if self.zstd {
                o.push("compression_type=zstd".into());
            }
        }
        if let Some(p) = self.prealloc {
            o.push(format!("preallocation={p}"));
        }
        o.join(",")
    }

    /// A random point of the matrix; the cell (cluster size, extended L2) cycles with the
    /// seed so that consecutive seeds cover every cluster size.
    pub fn random(seed: u64) -> Config {
        let cells = cells();
        let (cluster, extended_l2) = cells[(seed % cells.len() as u64) as usize];
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1ff_0012);
        let v2 = !extended_l2 && r.percent(20);
        let refcount_bits = if v2 || r.percent(40) { 16 } else { REFCOUNT_BITS[r.below(7) as usize] };
        let lazy = !v2 && r.percent(30);
        let zstd = !v2 && r.percent(30);
        let backing = match r.below(10) {
            0..=3 => Backing::None,
            4 | 5 => Backing::Raw,
            6 | 7 => Backing::Qcow2,
            _ => Backing::Chain,
        };
        let snapshots = if refcount_bits == 1 {
            0
        } else {
            match r.below(10) {
                0..=6 => 0,
                7 | 8 => 1,
                _ => 2,
            }
        };
        let mut c = Config {
            seed,
            cluster,
            extended_l2,
            refcount_bits,
            v2,
            lazy,
            zstd,
            prealloc: None,
            backing,
            backing_short: backing != Backing::None && r.percent(40),
            snapshots,
            compressed: r.percent(45),
            zeros: r.percent(60),
            ops: r.range(60, 160) as usize,
            reopen_every: r.range(4, 30),
            l2_boundary: r.percent(35),
            writethrough: r.percent(20),
            l2_cache: if r.percent(25) { Some([1, 4096, 16384][r.below(3) as usize]) } else { None },
            data_file: None,
        };
        if c.l2_span() > 4 * GIB {
            c.l2_boundary = false;
        }
        // Preallocation only where the whole image stays small.
        if !c.l2_boundary && r.percent(15) {
            c.prealloc = Some(if r.percent(70) { "metadata" } else { "falloc" });
        }
        // With 2-bit refcounts, a host cluster holding three compressed clusters is at the
        // largest refcount already: QEMU's own `snapshot -c` then fails ("Invalid
        // argument"), so the starting image cannot be built (seed 500070).
        if c.refcount_bits == 2 && c.compressed {
            c.snapshots = 0;
        }
        c.normalize()
    }

    /// Drops combinations QEMU refuses: preallocation over a backing file needs extended
    /// L2 entries.
    fn normalize(mut self) -> Config {
        if self.backing != Backing::None && !self.extended_l2 {
            self.prealloc = None;
        }
        self
    }

    /// The suite's point for cell `i` of [`cells`]: the other axes cycle with `i` so that
    /// the suite covers every value of every axis.
    pub fn suite(i: usize) -> Config {
        let cells = cells();
        let (cluster, extended_l2) = cells[i % cells.len()];
        let mut c = Config::random(i as u64 + 1000 * (i / cells.len()) as u64);
        c.cluster = cluster;
        c.extended_l2 = extended_l2;
        c.v2 = !extended_l2 && i % 5 == 1;
        c.refcount_bits = if c.v2 { 16 } else { REFCOUNT_BITS[i % 7] };
        c.lazy = !c.v2 && i % 4 == 3;
        c.zstd = !c.v2 && i % 3 == 2;
        c.backing = [Backing::None, Backing::Raw, Backing::Qcow2, Backing::Chain][i % 4];
        c.backing_short = c.backing != Backing::None && i.is_multiple_of(3);
        c.snapshots = if c.refcount_bits == 1 { 0 } else { [0, 1, 0, 2][(i / 2) % 4] };
        c.compressed = i.is_multiple_of(2);
        c.zeros = i % 3 != 1;
        c.ops = 72;
        c.reopen_every = [6, 12, 48][i % 3];
        c.l2_boundary = i.is_multiple_of(3) && c.l2_span() <= 4 * GIB;
        c.writethrough = i % 4 == 1;
        c.l2_cache = [None, Some(1), None, Some(16384), None][i % 5];
        c.prealloc = if c.l2_boundary { None } else { [None, None, Some("metadata"), None, Some("falloc")][i % 5] };
        c.normalize()
    }

    /// The same point with an external data file (`raw`: `data_file_raw=on`), reduced to
    /// what QEMU allows with one: version 3 (the incompatible bit), no compressed
    /// clusters (`write -c` is refused), no internal snapshots (`snapshot -c` is refused),
    /// and `data_file_raw` only without a backing file (`qemu-img create` refuses the
    /// pair). Preallocation stays: QEMU takes `metadata` and `falloc` with a data file
    /// (and implies `metadata` with `data_file_raw`).
    pub fn with_data_file(mut self, raw: bool) -> Config {
        self.data_file = Some(raw);
        self.v2 = false;
        self.compressed = false;
        self.snapshots = 0;
        if raw {
            self.backing = Backing::None;
            self.backing_short = false;
        }
        self.normalize()
    }

    /// The data-file plans of the suite: cluster sizes 512 B, 4 KiB, 64 KiB and 2 MiB,
    /// extended L2 off and (where QEMU allows it) on, `data_file_raw` off and on; the other
    /// axes cycle as in [`Config::suite`]. `ops` commands per stream.
    pub fn data_file_suite(ops: usize) -> Vec<Config> {
        let mut v = Vec::new();
        let mut i = 0usize;
        for cluster in [512, 4 * KIB, 64 * KIB, 2 * MIB] {
            for extended_l2 in [false, true] {
                if extended_l2 && cluster < 16 * KIB {
                    continue;
                }
                for raw in [false, true] {
                    let mut c = Config::random(7000 + i as u64);
                    c.cluster = cluster;
                    c.extended_l2 = extended_l2;
                    c.refcount_bits = [16, 1, 64, 8, 2, 32, 4][i % 7];
                    c.lazy = i % 4 == 1;
                    c.zstd = i % 3 == 2;
                    c.backing = [Backing::Raw, Backing::Qcow2, Backing::Chain, Backing::None][(i / 2) % 4];
                    c.backing_short = i.is_multiple_of(3);
                    c.zeros = i % 3 != 2;
                    c.ops = ops;
                    c.reopen_every = [4, 8, 16][i % 3];
                    c.l2_boundary = i.is_multiple_of(5) && c.l2_span() <= 4 * GIB;
                    c.writethrough = i % 4 == 2;
                    c.l2_cache = [None, Some(1), None, Some(16384), None][i % 5];
                    c.prealloc =
                        if c.l2_boundary { None } else { [None, Some("metadata"), None, Some("falloc")][i % 4] };
                    v.push(c.with_data_file(raw));
                    i += 1;
                }
            }
        }
        v
    }

    pub fn describe(&self) -> String {
        let mut d = self.describe_base();
        if let Some(raw) = self.data_file {
            let _ = write!(d, " data_file=on data_file_raw={raw}");
        }
        d
    }

    fn describe_base(&self) -> String {
        format!(
            "seed={} cluster_size={} extended_l2={} refcount_bits={} compat={} lazy={} zstd={} prealloc={:?} \
             backing={:?}{} snapshots={} compressed={} zeros={} ops={} reopen_every~{} l2_boundary={} \
             writethrough={} l2_cache={:?}",
            self.seed,
            self.cluster,
            self.extended_l2,
            self.refcount_bits,
            if self.v2 { "0.10" } else { "1.1" },
            self.lazy,
            self.zstd,
            self.prealloc,
            self.backing,
            if self.backing_short { " (short)" } else { "" },
            self.snapshots,
            self.compressed,
            self.zeros,
            self.ops,
            self.reopen_every,
            self.l2_boundary,
            self.writethrough,
            self.l2_cache
        )
    }
}

/// Where requests go: the virtual size and the windows (cluster-aligned starts).
#[derive(Debug, Clone)]
pub struct Layout {
    pub virt: u64,
    pub cluster: u64,
    pub sub: u64,
    pub windows: Vec<(u64, u64)>,
}

impl Layout {
    fn new(c: &Config, r: &mut Rng) -> Layout {
        let cs = c.cluster;
        // Window width in clusters; more for tiny clusters so that requests also span L2
        // tables and refcount blocks of small images.
        let w = if cs <= 2 * KIB { r.range(16, 48) } else { r.range(3, 8) };
        let tail = if cs > 512 && r.percent(60) { r.range(1, cs / 512 - 1) * 512 } else { 0 };
        let mut windows = Vec::new();
        let virt = if c.l2_boundary {
            let span = c.l2_span();
            let virt = span + r.range(1, w) * cs + tail;
            windows.push((0, w * cs));
            windows.push((span - (w / 2).max(1) * cs, span + (w / 2).max(1) * cs));
            virt
        } else {
            let n = r.range(w, 3 * w);
            n * cs + tail
        };
        // The end: the last w clusters, the partial one included.
        let end_start = (virt.saturating_sub(w * cs)) / cs * cs;
        windows.push((end_start, virt));
        if !c.l2_boundary {
            windows.push((0, (w * cs).min(virt)));
        }
        for wnd in &mut windows {
            wnd.1 = wnd.1.min(virt);
        }
        Layout { virt, cluster: cs, sub: c.subcluster(), windows }
    }

    /// A cluster-aligned anchor inside a random window.
    fn anchor(&self, r: &mut Rng) -> u64 {
        let (a, b) = self.windows[r.below(self.windows.len() as u64) as usize];
        let a = a / self.cluster * self.cluster;
        let n = b.saturating_sub(a).div_ceil(self.cluster).max(1);
        (a + r.below(n) * self.cluster).min(self.last_cluster())
    }

    /// Start of the last cluster (partial when the size is not cluster-aligned).
    fn last_cluster(&self) -> u64 {
        (self.virt - 1) / self.cluster * self.cluster
    }

    /// A request (offset, length) of a random alignment class. `bytes` allows offsets
    /// and lengths that are not sector multiples (qemu-io and quring io both take them).
    pub fn request(&self, r: &mut Rng, bytes: bool) -> (u64, u64) {
        let (cs, sc) = (self.cluster, self.sub);
        let secs_sc = sc / 512;
        let secs_cs = cs / 512;
        let c0 = self.anchor(r);
        let nsub = cs / sc;
        let sub0 = c0 + r.below(nsub) * sc;
        let class = r.below(if bytes { 10 } else { 9 });
        let (off, len) = match class {
            // Inside one subcluster (a strict part of it when it has more than one sector).
            0 | 1 => {
                if secs_sc == 1 {
                    (sub0, 512)
                } else {
                    let a = r.below(secs_sc);
                    let b = r.range(1, (secs_sc - a).min(secs_sc - 1).max(1));
                    (sub0 + a * 512, b * 512)
                }
            }
            // Exactly one subcluster.
            2 => (sub0, sc),
            // Straddling a subcluster boundary inside a cluster (or, without subclusters,
            // any sector range inside one cluster).
            3 => {
                if nsub > 1 {
                    let first = r.below(nsub - 1);
                    let last = r.range(first + 1, (first + 3).min(nsub - 1));
                    let a = r.below(secs_sc);
                    let b = r.range(1, secs_sc);
                    (c0 + first * sc + a * 512, (last - first) * sc - a * 512 + b * 512)
                } else {
                    let a = r.below(secs_cs);
                    let b = r.range(1, secs_cs - a);
                    (c0 + a * 512, b * 512)
                }
            }
            // Straddling a cluster boundary.
            4 => {
                let a = r.range(1, secs_cs);
                let b = r.range(1, secs_cs);
                let off = (c0 + cs).saturating_sub(a * 512);
                (off, (a + b) * 512)
            }
            // Whole clusters.
            5 => (c0, cs * r.range(1, 3)),
            // A multi-cluster run with unaligned ends.
            6 => {
                let a = r.below(secs_cs);
                let n = r.range(2, 4);
                let b = r.below(secs_cs);
                (c0 + a * 512, n * cs - a * 512 + b * 512)
            }
            // The last cluster, to the end of the image (whole or from a subcluster or
            // sector inside it).
            7 => {
                let lc = self.last_cluster();
                let off = match r.below(3) {
                    0 => lc,
                    1 => lc + r.below(nsub) * sc,
                    _ => lc + r.below(secs_cs) * 512,
                };
                let off = off.min(self.virt - 512);
                (off, self.virt - off)
            }
            // Subcluster-aligned runs of several subclusters (possibly across clusters).
            8 => (sub0, sc * r.range(2, 40)),
            // Any bytes.
            _ => {
                let off = c0 + r.below(cs + sc);
                (off, r.range(1, 2 * sc.max(4096)))
            }
        };
        let off = off.min(self.virt - 1);
        let off = if bytes { off } else { off / 512 * 512 };
        let len = len.max(1).min(self.virt - off);
        let len = if bytes { len } else { (len / 512).max(1) * 512 };
        (off, len.min(self.virt - off))
    }
}

/// Pattern bytes: distinct for each command of a plan, never zero.
pub struct Pat(usize);
impl Pat {
    pub fn next(&mut self) -> String {
        self.0 += 1;
        format!("0x{:02x}", pattern_byte(self.0))
    }
}

/// How a range is emptied before a compressed write: QEMU writes compressed data only
/// into clusters without a host cluster (`write -c` elsewhere fails with EIO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmap {
    /// v3: `write -z -u` of whole clusters leaves zero clusters without host clusters.
    ZeroWrite,
    /// v2 without a backing file: a discard leaves the clusters unallocated.
    Discard,
    /// v2 over a backing file: nothing empties a cluster, so no compressed writes.
    Impossible,
}

impl Unmap {
    pub fn of(c: &Config) -> Unmap {
        match (c.v2, c.backing) {
            (false, _) => Unmap::ZeroWrite,
            (true, Backing::None) => Unmap::Discard,
            (true, _) => Unmap::Impossible,
        }
    }
}

/// A compressed write (whole clusters at cluster-aligned offsets, or the partial last
/// cluster), preceded by the command that frees its clusters; empty if impossible.
fn compressed_write(l: &Layout, r: &mut Rng, p: &mut Pat, how: Unmap) -> Vec<String> {
    let (off, len) = if r.percent(20) {
        let lc = l.last_cluster();
        (lc, l.virt - lc)
    } else {
        let c0 = l.anchor(r);
        let n = r.range(1, 2);
        if c0 + n * l.cluster > l.virt {
            let lc = l.last_cluster();
            (lc, l.virt - lc)
        } else {
            (c0, n * l.cluster)
        }
    };
    // A zero write does not free a partial last cluster whose end is not subcluster
    // aligned (QEMU writes explicit zeros there); a discard of it does.
    let partial_end = off + len == l.virt && !l.virt.is_multiple_of(l.sub);
    let free = match how {
        Unmap::ZeroWrite if !partial_end => format!("write -z -u {off} {len}"),
        Unmap::ZeroWrite => format!("discard {off} {len}"),
        Unmap::Discard => format!("discard {off} {len}"),
        Unmap::Impossible => return vec![],
    };
    vec![free, format!("write -c -P {} {off} {len}", p.next())]
}

/// Commands that shape a starting image (or a backing file) with qemu-io.
fn shape(l: &Layout, r: &mut Rng, p: &mut Pat, n: usize, compressed: Option<Unmap>, zeros: bool) -> Vec<String> {
    let mut v = Vec::new();
    for _ in 0..n {
        let k = r.below(100);
        if let Some(how) = compressed
            && k < 20
        {
            v.extend(compressed_write(l, r, p, how));
        } else if zeros && k < 35 {
            // A zero cluster where nothing was, or a preallocated zero cluster (data first,
            // then zeroed without unmap).
            let (off, len) = l.request(r, false);
            if r.percent(50) {
                v.push(format!("write -P {} {off} {len}", p.next()));
            }
            v.push(format!("write -z {off} {len}"));
        } else if zeros && k < 42 {
            let (off, len) = l.request(r, false);
            v.push(format!("write -z -u {off} {len}"));
        } else if k < 50 {
            let (off, len) = l.request(r, false);
            v.push(format!("discard {off} {len}"));
        } else {
            let bytes = r.percent(10);
            let (off, len) = l.request(r, bytes);
            v.push(format!("write -P {} {off} {len}", p.next()));
        }
    }
    v
}

/// Backing data: mostly covering the windows so that copy-on-write has something to copy.
fn backing_fill(l: &Layout, size: u64, r: &mut Rng, p: &mut Pat) -> Vec<String> {
    let mut v = Vec::new();
    for &(a, b) in &l.windows {
        let b = b.min(size);
        if a >= b {
            continue;
        }
        // A few big pattern writes covering most of the window.
        let mut off = a;
        while off < b {
            let len = (r.range(1, 4) * l.cluster).min(b - off);
            if r.percent(85) {
                v.push(format!("write -P {} {off} {len}", p.next()));
            }
            off += len;
        }
    }
    // Odd pieces.
    for _ in 0..3 {
        let (off, len) = l.request(r, false);
        if off < size {
            v.push(format!("write -P {} {off} {}", p.next(), len.min(size - off)));
        }
    }
    v
}

/// The plan for a configuration.
pub fn plan(c: &Config) -> Plan {
    let mut r = Rng(c.seed.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ 0x5eed);
    let l = Layout::new(c, &mut r);
    let mut p = Pat(r.below(200) as usize);
    let mut files = Vec::new();
    let mut desc = c.describe();
    let _ = write!(desc, " virtual={} windows={:?}", l.virt, l.windows);
    let bsize = if c.backing_short {
        let (a, b) = *l.windows.iter().max_by_key(|w| w.1).unwrap();
        (a + r.below((b - a) / 512) * 512).max(512)
    } else {
        l.virt
    };
    let backing = match c.backing {
        Backing::None => None,
        Backing::Raw => {
            let acts = backing_fill(&l, bsize, &mut r, &mut p).into_iter().map(Action::Io).collect();
            files.push(FileSpec { name: "base.raw".into(), kind: FileKind::Raw, size: bsize, actions: acts });
            Some(("base.raw".to_string(), "raw".to_string()))
        }
        Backing::Qcow2 => {
            let bcs = CLUSTER_SIZES[r.below(13) as usize];
            let bl = Layout { cluster: bcs, sub: bcs, windows: l.windows.clone(), virt: bsize };
            let mut acts: Vec<String> = backing_fill(&l, bsize, &mut r, &mut p);
            for _ in 0..r.range(1, 4) {
                if bsize >= bcs {
                    acts.extend(compressed_write(&bl, &mut r, &mut p, Unmap::ZeroWrite));
                }
                let (off, len) = bl.request(&mut r, false);
                acts.push(format!("write -z {off} {len}"));
            }
            files.push(FileSpec {
                name: "base.qcow2".into(),
                kind: FileKind::Qcow2 { opts: format!("cluster_size={bcs}"), backing: None },
                size: bsize,
                actions: acts.into_iter().map(Action::Io).collect(),
            });
            Some(("base.qcow2".to_string(), "qcow2".to_string()))
        }
        Backing::Chain => {
            let acts = backing_fill(&l, bsize, &mut r, &mut p).into_iter().map(Action::Io).collect();
            files.push(FileSpec { name: "base.raw".into(), kind: FileKind::Raw, size: bsize, actions: acts });
            // The middle layer: the same geometry as the top, its own data and zeros.
            let n = r.range(4, 10) as usize;
            let acts = shape(&l, &mut r, &mut p, n, None, true).into_iter().map(Action::Io).collect();
            files.push(FileSpec {
                name: "mid.qcow2".into(),
                kind: FileKind::Qcow2 {
                    opts: Config { prealloc: None, ..c.clone() }.create_options(),
                    backing: Some(("base.raw".into(), "raw".into())),
                },
                size: l.virt,
                actions: acts,
            });
            Some(("mid.qcow2".to_string(), "qcow2".to_string()))
        }
    };
    let opts = c.create_options();
    let mut acts: Vec<Action> = Vec::new();
    let n = r.range(4, 14) as usize;
    acts.extend(shape(&l, &mut r, &mut p, n, c.compressed.then(|| Unmap::of(c)), c.zeros).into_iter().map(Action::Io));
    for k in 0..c.snapshots {
        acts.push(Action::Snapshot(format!("s{}", k + 1)));
        let n = r.range(2, 8) as usize;
        acts.extend(
            shape(&l, &mut r, &mut p, n, c.compressed.then(|| Unmap::of(c)), c.zeros).into_iter().map(Action::Io),
        );
    }
    files.push(FileSpec {
        name: "img.qcow2".into(),
        kind: FileKind::Qcow2 { opts, backing },
        size: l.virt,
        actions: acts,
    });
    let steps = stream(c, &l, &mut r, &mut p);
    let mut quring_opts = Vec::new();
    if c.writethrough {
        quring_opts.extend(["-t".to_string(), "writethrough".into()]);
    }
    if let Some(n) = c.l2_cache {
        quring_opts.extend(["--l2-cache-size".to_string(), n.to_string()]);
    }
    Plan {
        name: format!("seed {}", c.seed),
        desc,
        files,
        steps,
        corrupt: false,
        quring_opts,
        data_file: c.data_file.map(|raw| DataFile { raw }),
    }
}

/// The largest refcount a width can hold (each snapshot adds a reference).
fn max_refcount(bits: u32) -> u32 {
    if bits >= 32 { u32::MAX } else { (1u32 << bits) - 1 }
}

/// The command stream: writes, zero writes with and without unmap, discards, flushes,
/// reopens, and now and then a compressed write or a snapshot by QEMU on both copies.
pub fn stream(c: &Config, l: &Layout, r: &mut Rng, p: &mut Pat) -> Vec<Step> {
    let mut v = Vec::new();
    // Snapshots in the image: those of the starting image, then those the stream makes.
    let mut snaps: Vec<String> = (1..=c.snapshots).map(|k| format!("s{k}")).collect();
    let mut made = 0;
    // QEMU packs compressed clusters into a host cluster byte by byte until its refcount
    // is at the largest value the width allows, so once compressed clusters exist, one host
    // cluster may carry that many references per L1 table, and a snapshot's extra
    // reference overflows it: QEMU's own `snapshot -c` / `-a` fail ("Invalid argument";
    // seed 715073: 2 KiB clusters, 2-bit refcounts, two snapshots, `snapshot -a`). With 8
    // bits and more, the few compressed writes of one stream cannot fill a host cluster's
    // references that far.
    let mut packed = c.compressed;
    let room = |packed: bool| !packed || c.refcount_bits >= 8;
    let snap = |args: [&str; 2], name: &str| Step::Img(vec![args[0].into(), args[1].into(), name.to_string()]);
    for _ in 0..c.ops {
        let k = r.below(100);
        let step = if k < 35 {
            let bytes = r.percent(8);
            let (off, len) = l.request(r, bytes);
            Step::Io(format!("write -P {} {off} {len}", p.next()))
        } else if k < 55 {
            let bytes = r.percent(5);
            let (off, len) = l.request(r, bytes);
            Step::Io(format!("write -z {off} {len}"))
        } else if k < 70 {
            let (off, len) = l.request(r, false);
            Step::Io(format!("write -z -u {off} {len}"))
        } else if k < 91 {
            let bytes = r.percent(5);
            let (off, len) = l.request(r, bytes);
            Step::Io(format!("discard {off} {len}"))
        } else if k < 93 {
            Step::Io("flush".into())
        } else if k < 94 && c.lazy {
            // QEMU writes to both copies and dies before its refcounts reach the disk: the
            // next quring open must rebuild them (lazy refcounts leave the image dirty).
            let (off, len) = l.request(r, false);
            Step::Both(format!("write -P {} {off} {len} ; sigraise 9", p.next()))
        } else if k < 97 && c.data_file.is_none() {
            for cmd in compressed_write(l, r, p, Unmap::of(c)) {
                v.push(Step::Both(cmd));
            }
            packed = true;
            continue;
        } else if k < 98
            && made < 2
            && c.data_file.is_none()
            && room(packed)
            && snaps.len() as u32 + 1 < max_refcount(c.refcount_bits)
        {
            // QEMU takes a snapshot of both copies: the clusters quring wrote become shared.
            made += 1;
            snaps.push(format!("t{made}"));
            snap(["snapshot", "-c"], snaps.last().unwrap())
        } else if k < 99 && !snaps.is_empty() && room(packed) && snaps.len() as u32 + 2 <= max_refcount(c.refcount_bits)
        {
            // QEMU reverts both copies to a snapshot: the active tables become copies that
            // share every cluster with it (it takes the new references before dropping the
            // old ones, so it needs one refcount more).
            let name = snaps[r.below(snaps.len() as u64) as usize].clone();
            snap(["snapshot", "-a"], &name)
        } else if !snaps.is_empty() {
            // QEMU deletes a snapshot: clusters only it shared become the active layer's
            // alone again (COPIED set again).
            let name = snaps.remove(r.below(snaps.len() as u64) as usize);
            snap(["snapshot", "-d"], &name)
        } else {
            Step::Io("flush".into())
        };
        v.push(step);
        if r.below(c.reopen_every) == 0 {
            v.push(Step::Reopen);
        }
    }
    v
}
