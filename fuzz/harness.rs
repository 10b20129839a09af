// Shared bodies of the fuzz targets. Compiled into each cargo-fuzz target (fuzz/fuzz_targets/*.rs)
// and into the regression test (tests/fuzz_regressions.rs) with `#[path = ...] mod harness;`,
// so the corpus replays through exactly the code the fuzzer ran. Errors are expected on
// hostile input; the only failures are panics, hangs, aborts and huge allocations.

#![allow(dead_code)]

use quring::check::{MetaRead, check};
use quring::format::compress::decompress;
use quring::format::extension::parse_extensions;
use quring::format::feature::parse_feature_table;
use quring::format::geometry::SUBCLUSTERS;
use quring::format::header::{CompressionType, Header};
use quring::format::l2::{self, L2Entry, SubclusterBitmap};
use quring::format::{Geometry, refcount, snapshot};
use quring::image::{BackingPolicy, Image, Options};
use quring::io::AlignedBuf;
use quring::queue::{Queue, QueueOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The scratch image file of this fuzz process (one per target binary): on /dev/shm when
/// there is one, named by `tag` and the process id so that parallel fuzzers do not meet.
pub fn scratch(tag: &str) -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        dir.join(format!("quring-fuzz-{tag}-{}.qcow2", std::process::id()))
    })
}

// The `quring` tool's own parsers, compiled here from the tool's source files (they use
// only the library's public API): the `cli` target runs exactly the tool's code.
#[path = "../cli/src/io_lang.rs"]
mod io_lang;
#[path = "../cli/src/util.rs"]
mod util;

/// Largest virtual size the image target reads in full.
pub const MAX_READ_SIZE: u64 = 4 << 20;
/// Read requests of the image target are at most this long.
const READ_CHUNK: u64 = 256 << 10;

fn be32(b: &[u8], o: usize) -> Option<u32> {
    b.get(o..o + 4).map(|s| u32::from_be_bytes(s.try_into().unwrap()))
}

/// Target `header`: the input is the start of an image file (cluster 0).
pub fn fuzz_header(data: &[u8]) {
    for file_len in [data.len() as u64, 1 << 40] {
        if let Ok(mut h) = Header::parse(data, file_len) {
            let _ = h.geometry();
            let _ = h.feature_table();
            let _ = h.backing_format();
            let _ = h.lazy_refcounts();
            // External data file: an accepted image with bit 2 names its data file.
            let _ = h.data_file_raw();
            if h.has_data_file() {
                assert!(matches!(h.data_file(), Ok(Some(_))), "bit 2 accepted without a valid data file name");
            }
            // quring's identity extension: accepted ones survive a rewrite unchanged.
            if let Ok(Some(id)) = h.identity() {
                let _ = id.backing_current(h.backing_file.as_deref());
                let mut h2 = h.clone();
                h2.set_identity(Some(&id));
                if let Ok(bytes) = h2.serialize()
                    && let Ok(back) = Header::parse(&bytes, file_len.max(bytes.len() as u64))
                {
                    assert_eq!(back.identity().ok().flatten(), Some(id), "identity changed by a rewrite");
                }
            }
            // A header the engine accepted must also be writable back.
            let _ = h.serialize();
        }
    }
    let _ = Header::peek_cluster_size(data);
    let _ = parse_feature_table(data);
    let _ = quring::format::data_file::parse_name(data);
    // Extensions from where v2 and v3 headers end, and from the header_length field.
    let mut starts = vec![72usize, 104, 112];
    if let Some(hl) = be32(data, 100) {
        starts.push(hl as usize);
    }
    for start in starts {
        if start <= data.len() {
            let _ = parse_extensions(data, start, data.len());
            let _ = parse_extensions(data, start, data.len() / 2);
        }
    }
    // The feature-name table and identity payloads as the extension parser returns them.
    if let Ok((exts, _)) = parse_extensions(data, 0, data.len()) {
        for e in exts {
            let _ = parse_feature_table(&e.data);
            if let Ok(id) = quring::format::identity::Identity::parse(&e.data) {
                assert_eq!(quring::format::identity::Identity::parse(&id.to_extension().data).ok(), Some(id));
            }
        }
    }
    let _ = quring::format::identity::Identity::parse(data);
}

/// Target `decode`: byte 0 picks the decoder, the rest is its input.
pub fn fuzz_decode(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 5 {
        0 => fuzz_l2(rest),
        1 => fuzz_refcount(rest),
        2 => {
            // n from the input, unchecked: the parser must bound its work by the buffer.
            let Some(n) = be32(rest, 0) else { return };
            let _ = snapshot::parse_table(&rest[4..], n);
            let _ = snapshot::parse_table(&rest[4..], n % 8);
            let _ = snapshot::entry_len(&rest[4..]);
            // The same bytes as a bitmap directory, extension and table.
            use quring::format::bitmap as bm;
            let _ = bm::parse_directory(&rest[4..], n % 16);
            let _ = bm::BitmapsExt::parse(&rest[4..], 512 << (n % 13), u64::MAX);
            for (i, w) in rest[4..].chunks_exact(8).take(512).enumerate() {
                let _ =
                    bm::TableEntry::decode(u64::from_be_bytes(w.try_into().unwrap()), 65536, 1 << 40, "f", i as u64);
            }
        }
        3 => fuzz_decompress(CompressionType::Deflate, rest),
        _ => fuzz_decompress(CompressionType::Zstd, rest),
    }
}

fn fuzz_decompress(kind: CompressionType, input: &[u8]) {
    let mut out = vec![0u8; 64 << 10];
    let _ = decompress(kind, input, &mut out);
    // A smaller cluster, as with 4 KiB-cluster images.
    let _ = decompress(kind, input, &mut out[..4096]);
}

/// [geometry byte] then 16-byte records: entry, bitmap (with extended L2), then the records
/// double as a raw L2 table for `read_entry`.
fn fuzz_l2(data: &[u8]) {
    let Some((&gb, rest)) = data.split_first() else { return };
    let cluster_bits = 9 + (gb & 15) as u32;
    let extended = gb & 16 != 0;
    let Ok(mut g) = Geometry::new(cluster_bits, extended, 4) else { return };
    // External data file geometry (host offset 0 with COPIED is data, compressed refused).
    g.external_data = gb & 32 != 0;
    let cs = g.cluster_size();
    for rec in rest.chunks_exact(16).take(256) {
        let entry = L2Entry(u64::from_be_bytes(rec[0..8].try_into().unwrap()));
        let bitmap = SubclusterBitmap(u64::from_be_bytes(rec[8..16].try_into().unwrap()));
        let _ = entry.decode(&g);
        let _ = entry.host_offset();
        let _ = entry.copied();
        let _ = (bitmap.alloc(), bitmap.zero());
        // A range inside the cluster chosen by the bitmap bits (classify's contract:
        // in_cluster + len <= cluster size, len > 0).
        let in_cluster = (bitmap.0 >> 32) % cs;
        let len = 1 + (bitmap.0 & 0xffff_ffff) % (cs - in_cluster);
        for (ic, l) in [(in_cluster, len), (0, cs), (cs - 1, 1)] {
            if let Ok((ext, n)) = l2::classify(&g, entry, bitmap, ic, l) {
                assert!(n >= 1 && n <= l, "classify returned run {n} for a {l}-byte range ({ext:?})");
            }
        }
    }
    let esize = g.l2_entry_size() as usize;
    for i in 0..(rest.len() / esize).min(256) {
        let (e, b) = l2::read_entry(&g, rest, i);
        let _ = l2::classify(&g, e, b, 0, cs);
    }
    let _ = SUBCLUSTERS;
}

/// [order byte] then a refcount block: every entry is read at every order, and a write at
/// one index must read back (masked) without changing its neighbours.
fn fuzz_refcount(data: &[u8]) {
    let Some((&ob, block)) = data.split_first() else { return };
    if block.is_empty() {
        return;
    }
    let block = &block[..block.len().min(4096)];
    for order in 0..=6u32 {
        let entries = (block.len() as u64 * 8) >> order;
        for i in 0..entries {
            let v = refcount::get(block, i, order);
            assert!(v <= refcount::max_value(order));
        }
        if entries == 0 {
            continue;
        }
        let mut b = block.to_vec();
        let idx = ob as u64 % entries;
        let mut v8 = [0u8; 8];
        let k = block.len().min(8);
        v8[..k].copy_from_slice(&block[..k]);
        let value = u64::from_le_bytes(v8);
        refcount::set(&mut b, idx, order, value);
        assert_eq!(refcount::get(&b, idx, order), value & refcount::max_value(order), "order {order} index {idx}");
        for j in [idx.wrapping_sub(1), idx + 1] {
            if j < entries {
                assert_eq!(refcount::get(&b, j, order), refcount::get(block, j, order), "set({idx}) changed entry {j}");
            }
        }
    }
    let _ = refcount::decode_table(block);
}

/// A plain pread file for the checker.
pub struct PreadFile {
    file: File,
    len: u64,
}

impl PreadFile {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(PreadFile { file, len })
    }
}

impl MetaRead for PreadFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> quring::Result<usize> {
        let mut done = 0;
        while done < buf.len() && off + (done as u64) < self.len {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(quring::Error::io("pread", e)),
            }
        }
        Ok(done)
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// Target `image`: the input is a whole image file, written to `path`, opened read-only
/// (backing files ignored, the bitmap directory parsed and validated), read in full (when its
/// virtual size is at most 4 MiB), queried with block_status, its bitmaps exported, and
/// checked.
pub fn fuzz_image(data: &[u8], path: &Path) {
    std::fs::write(path, data).expect("cannot write the fuzz image");
    let opts = Options { read_only: true, backing: BackingPolicy::Ignore, ..Default::default() };
    if let Ok(img) = Image::open(path, &opts) {
        let size = img.size();
        if size <= MAX_READ_SIZE {
            if let Ok(mut q) = Queue::new(&img, &QueueOptions::default()) {
                let end = size.div_ceil(512) * 512;
                let mut buf = AlignedBuf::new(READ_CHUNK as usize);
                let mut off = 0;
                while off < end {
                    let n = (end - off).min(READ_CHUNK) as usize;
                    let _ = q.read_at(&mut buf[..n], off);
                    off += n as u64;
                }
            }
            let mut off = 0;
            let mut steps = 0;
            while off < size && steps < 100_000 {
                match img.block_status(off, size - off) {
                    Ok(bs) if bs.len > 0 => off += bs.len,
                    Ok(bs) => panic!("block_status({off}, {}) returned a zero-length range: {bs:?}", size - off),
                    Err(_) => off = (off / 512 + 1) * 512,
                }
                steps += 1;
            }
            // The bitmaps' tables and data clusters (read and validated only on export;
            // bounded by the small disk: one bit per granule).
            for b in img.bitmaps() {
                let _ = img.dirty_ranges(&b.name);
            }
        }
        let _ = img.close();
    }
    if let Ok(r) = PreadFile::open(path)
        && let Ok(rep) = check(&r)
    {
        let _ = rep.exit_code();
        let _ = rep.to_json("fuzz.qcow2");
        let _ = rep.to_human();
    }
}

/// Disk size of the image the `cli` target runs commands on.
pub const CLI_DISK: u64 = 1 << 20;
/// Commands the `cli` target runs per input (all lines are parsed).
const CLI_MAX_RUN: usize = 32;
/// Largest disk the `cli` target plans a `create` layout for.
const CLI_MAX_PLAN: u64 = 64 << 20;

/// Target `cli`: the option values and the command language of the `quring` tool. The
/// input is text (lossy UTF-8), one item per line:
///
/// 1. an `--l2-cache-size` value (qemu-img size syntax; anything unparsable: the default),
/// 2. a refcount cache size (likewise),
/// 3. a `create -o` option list, applied to `CreateOptions`,
/// 4. a disk size for those options, whose layout is planned when it is at most 64 MiB,
/// 5. and on: `quring io` commands.
///
/// Every line also goes through the number and pattern parsers. The commands that parse
/// run in order (at most 32) on a fresh 1 MiB image opened with the cache sizes of lines
/// 1-2, as `quring io` runs them. Nothing may panic, and (with the fuzzer's malloc limit)
/// nothing may allocate more than such a small image needs, whatever the numbers say.
pub fn fuzz_cli(data: &[u8], path: &Path) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.split('\n').collect();
    let line = |i: usize| lines.get(i).copied().unwrap_or("");
    for l in &lines {
        if let Ok(v) = io_lang::cvtnum(l) {
            assert!(v <= i64::MAX as u64, "cvtnum({l:?}) = {v} above INT64_MAX");
        }
        let _ = io_lang::parse_pattern(l);
        let _ = util::parse_size(l);
    }
    // Option values.
    let l2 = util::parse_size(line(0)).ok();
    let rc = util::parse_size(line(1)).ok();
    let mut co = quring::format::layout::CreateOptions::default();
    if util::apply_create_opts(&mut co, &[line(2).to_string()]).is_ok()
        && let Ok(size) = util::parse_size(line(3))
        && size <= CLI_MAX_PLAN
    {
        co.size = size;
        co.backing_file = None;
        let _ = quring::format::layout::plan_create(&co);
    }
    // Commands.
    let mut cmds = Vec::new();
    for l in lines.iter().skip(4) {
        if let Ok(c) = io_lang::parse(l) {
            if let io_lang::Cmd::Read { off, len, .. } | io_lang::Cmd::Discard { off, len, .. } = c {
                assert!(off <= i64::MAX as u64 && len <= io_lang::MAX_REQUEST, "{l:?} parsed to {c:?}");
            }
            if let io_lang::Cmd::Write { off, len, zero, .. } = c {
                assert!(off <= i64::MAX as u64 && (zero || len <= io_lang::MAX_REQUEST), "{l:?} parsed to {c:?}");
            }
            cmds.push(c);
        }
    }
    if cmds.is_empty() {
        return;
    }
    // A fresh image per input: the bytes of one made once (faster than creating it).
    static FRESH: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let fresh = FRESH.get_or_init(|| {
        let new = quring::format::layout::CreateOptions { size: CLI_DISK, ..Default::default() };
        quring::image::create(path, &new, true).expect("cannot create the fuzz image");
        std::fs::read(path).expect("cannot read the fuzz image")
    });
    std::fs::write(path, fresh).expect("cannot write the fuzz image");
    let opts = Options { l2_cache_size: l2, refcount_cache_size: rc, ..Default::default() };
    let Ok(img) = Image::open(path, &opts) else { return };
    let Ok(mut q) = Queue::new(&img, &QueueOptions::default()) else { return };
    let size = img.size();
    let (mut out, mut err) = (std::io::sink(), std::io::sink());
    for c in cmds.iter().take(CLI_MAX_RUN) {
        io_lang::run(&mut q, size, c, &mut out, &mut err);
    }
    drop(q);
    let _ = img.close();
}
