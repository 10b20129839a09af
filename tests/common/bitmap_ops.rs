//! Shared by the bitmap tests (tests/bitmaps.rs): seeded guest streams of writes, zero
//! writes and discards, their model as dirty extents, running them through quring (one or
//! several queues), reading a stored bitmap back (`quring map --bitmap`, `qemu-img info`),
//! and a QMP client for `qemu-system-x86_64 -machine none`, QEMU's own block layer as the
//! oracle for bitmaps.

use super::*;
use quring::image::{Image, Options};
use quring::queue::{Queue, QueueOptions};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;

/// One guest operation of a stream.
#[derive(Clone, Copy, Debug)]
pub enum GuestOp {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

impl GuestOp {
    pub fn range(self) -> (u64, u64) {
        match self {
            GuestOp::Write(o, l, _) | GuestOp::Zero(o, l, _) | GuestOp::Discard(o, l) => (o, l),
        }
    }

    pub fn qemu_io(self) -> String {
        match self {
            GuestOp::Write(o, l, p) => format!("write -P {p} {o} {l}"),
            GuestOp::Zero(o, l, true) => format!("write -z -u {o} {l}"),
            GuestOp::Zero(o, l, false) => format!("write -z {o} {l}"),
            GuestOp::Discard(o, l) => format!("discard {o} {l}"),
        }
    }
}

/// A seeded stream over a disk of `size` bytes: sub-granule, granule-straddling and
/// whole-cluster ranges (`g` the smallest granularity in play, `cs` the cluster size).
pub fn stream(seed: u64, n: usize, size: u64, g: u64, cs: u64) -> Vec<GuestOp> {
    let mut st = seed;
    let mut rnd = |m: u64| splitmix64(&mut st) % m.max(1);
    let mut out = Vec::new();
    while out.len() < n {
        let (off, len) = match rnd(3) {
            // Inside one granule.
            0 => {
                let base = rnd(size / g) * g;
                let o = base + rnd(g / 512) * 512;
                (o, 512 * (1 + rnd((base + g - o) / 512)))
            }
            // Across a granule boundary.
            1 => {
                let b = (1 + rnd(size / g - 1)) * g;
                let before = 512 * (1 + rnd(g.min(8192) / 512));
                (b - before, before + 512 * (1 + rnd(g.min(8192) / 512)))
            }
            // Whole clusters.
            _ => (rnd(size / cs) * cs, cs * (1 + rnd(3))),
        };
        let len = len.min(size - off);
        if len == 0 {
            continue;
        }
        out.push(match rnd(4) {
            0 | 1 => GuestOp::Write(off, len, 1 + rnd(250) as u8),
            2 => GuestOp::Zero(off, len, rnd(2) == 0),
            _ => GuestOp::Discard(off, len),
        });
    }
    out
}

/// The dirty extents a stream leaves in a bitmap of granularity `g` over `size` bytes
/// (merged, clipped to the disk).
pub fn model(ops: &[GuestOp], g: u64, size: u64) -> Vec<(u64, u64)> {
    let mut bits = vec![false; size.div_ceil(g) as usize];
    for op in ops {
        let (o, l) = op.range();
        for k in o / g..=(o + l - 1) / g {
            bits[k as usize] = true;
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (k, &b) in bits.iter().enumerate() {
        if !b {
            continue;
        }
        let start = k as u64 * g;
        let end = (start + g).min(size);
        match out.last_mut() {
            Some((o, l)) if *o + *l == start => *l = end - *o,
            _ => out.push((start, end - start)),
        }
    }
    out
}

/// Runs `ops` through quring on `queues` queues (one thread each, ops dealt round-robin),
/// then closes the image.
pub fn run_quring(path: &Path, ops: &[GuestOp], queues: usize) {
    let img = Image::open(path, &Options::default()).unwrap();
    std::thread::scope(|sc| {
        for t in 0..queues {
            let img = img.clone();
            sc.spawn(move || {
                let mut q = Queue::new(&img, &QueueOptions::default()).unwrap();
                for (i, op) in ops.iter().skip(t).step_by(queues).enumerate() {
                    // Guest flushes along the way: asynchronous write-backs (joined across
                    // queues) run while the other queues keep writing and marking.
                    if i % 8 == 7 {
                        q.flush().unwrap();
                    }
                    match *op {
                        GuestOp::Write(o, l, p) => q.write_at(&vec![p; l as usize], o).unwrap(),
                        GuestOp::Zero(o, l, u) => q.write_zeroes(o, l, u).unwrap(),
                        GuestOp::Discard(o, l) => q.discard(o, l).unwrap(),
                    }
                }
                q.flush().unwrap();
            });
        }
    });
    img.close().unwrap();
}

/// quring's `map --bitmap NAME --output=json`, as the dirty extents.
pub fn quring_dirty(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let r = quring(["map", "--bitmap", name, "--output=json", &s(path)]).ok();
    let v = r.json();
    let mut out = Vec::new();
    for e in v.as_array().unwrap() {
        if e["dirty"].as_bool().unwrap() {
            out.push((e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()));
        }
    }
    out
}

/// The bitmaps `qemu-img info --output=json` lists: (name, granularity, flags).
pub fn qemu_bitmaps(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let v = qemu_img(["info", "--output=json", "-U", &s(path)]).ok().json();
    bitmap_list(&v)
}

pub fn bitmap_list(v: &Value) -> Vec<(String, u64, Vec<String>)> {
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap().to_string(),
                        b["granularity"].as_u64().unwrap(),
                        b["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[track_caller]
pub fn check_clean(path: &Path, when: &str) {
    let r = qemu_img(["check", &s(path)]);
    assert_eq!(r.code, Some(0), "qemu-img check after {when}:\n{}", r.describe());
}

#[track_caller]
pub fn qemu_bitmap(args: &[&str]) {
    let mut a = vec!["bitmap"];
    a.extend_from_slice(args);
    qemu_img(&a).ok();
}

#[track_caller]
pub fn quring_bitmap(args: &[&str]) {
    let mut a = vec!["bitmap"];
    a.extend_from_slice(args);
    quring(&a).ok();
}

/// QEMU's view of a stored bitmap: `qemu-nbd --bitmap NAME` and `qemu-img map` with
/// `x-dirty-bitmap`; dirty extents are reported as `"data": false`.
pub fn qemu_nbd_dirty(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = tempdir();
    let sock = dir.path().join("nbd.sock");
    let mut child = std::process::Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "--bitmap", name, "-k", &s(&sock), &s(path)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let opts = format!("driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}", s(&sock));
    let r = qemu_img(["map", "--output=json", "--image-opts", &opts]);
    let _ = child.kill();
    let _ = child.wait();
    let v = r.ok().json();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if !e["data"].as_bool().unwrap() {
            let (o, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match out.last_mut() {
                Some((a, b)) if *a + *b == o => *b += l,
                _ => out.push((o, l)),
            }
        }
    }
    out
}

/// A `qemu-system-x86_64 -machine none` driven over QMP on its stdin and stdout: QEMU's
/// block layer without a guest (blockdev-add, block-dirty-bitmap-add, `qemu-io` through
/// the human monitor, block_resize, blockdev-del). Killed when dropped.
pub struct Qmp {
    child: std::process::Child,
    input: std::process::ChildStdin,
    out: BufReader<std::process::ChildStdout>,
    text: String,
}

impl Qmp {
    /// Starts QEMU and enters command mode.
    pub fn start() -> Qmp {
        let mut child = std::process::Command::new("qemu-system-x86_64")
            .args(["-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/ensure-deps.sh installs it)");
        let input = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut q = Qmp { child, input, out, text: String::new() };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
        q.ok("qmp_capabilities", json!({}));
        q
    }

    /// The next QMP message; text QEMU prints on stdout between them (qemu-io's output
    /// in the human monitor) is collected in `self.text`.
    fn line(&mut self) -> Value {
        loop {
            let mut l = String::new();
            let n = self.out.read_line(&mut l).unwrap();
            assert!(n > 0, "QEMU closed QMP");
            if l.starts_with('{') {
                return serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP line {l:?}: {e}"));
            }
            self.text.push_str(&l);
        }
    }

    /// Runs `cmd`: its return value, or QEMU's error description (events are skipped).
    pub fn cmd(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.input, "{msg}").unwrap();
        self.input.flush().unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e["desc"].as_str().unwrap_or_default().to_string());
            }
        }
    }

    /// Runs `cmd`, which must succeed.
    #[track_caller]
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.cmd(cmd, args.clone()).unwrap_or_else(|e| panic!("QMP {cmd} {args}: {e}"))
    }

    /// Opens `path` as qcow2 node `node`, read-write, discards passed down (as qemu-io).
    pub fn add(&mut self, node: &str, path: &Path) {
        self.ok(
            "blockdev-add",
            json!({ "node-name": node, "driver": "qcow2", "discard": "unmap",
                    "file": { "driver": "file", "filename": s(path) } }),
        );
    }

    /// One qemu-io command on `node` through the human monitor; its output must not
    /// report a failure.
    #[track_caller]
    pub fn io(&mut self, node: &str, cmd: &str) {
        self.text.clear();
        let r = self.ok("human-monitor-command", json!({ "command-line": format!("qemu-io {node} \"{cmd}\"") }));
        let text = format!("{}{}", self.text, r.as_str().unwrap_or_default());
        assert!(
            !text.contains("error") && !text.contains("failed") && !text.contains("Invalid"),
            "qemu-io {node} {cmd:?}: {text}"
        );
    }

    /// Closes `node` (persistent bitmaps are stored).
    pub fn del(&mut self, node: &str) {
        self.ok("blockdev-del", json!({ "node-name": node }));
    }

    /// The dirty bitmaps QEMU has on `node`: (name, granularity, recording, inconsistent).
    pub fn bitmaps(&mut self, node: &str) -> Vec<(String, u64, bool, bool)> {
        let nodes = self.ok("query-named-block-nodes", json!({ "flat": true }));
        let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node).expect("node listed").clone();
        let mut out: Vec<(String, u64, bool, bool)> = n["dirty-bitmaps"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|b| {
                        (
                            b["name"].as_str().unwrap().to_string(),
                            b["granularity"].as_u64().unwrap(),
                            b["recording"].as_bool().unwrap(),
                            b["inconsistent"].as_bool().unwrap_or(false),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Quits QEMU and waits for it.
    pub fn quit(mut self) {
        let _ = self.cmd("quit", json!({}));
        let _ = self.child.wait();
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until no process holds `path`'s image lock (up to 10 s). A writer killed with
/// SIGKILL releases its file only when the kernel has torn its io_uring down, which may
/// be a moment after `wait` returned.
pub fn wait_unlocked(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = qemu_img(["info", &s(path)]);
        if r.code == Some(0) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the image stays locked:\n{}", r.describe());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
