//! Crash-consistency harness shared by `tests/crash.rs` and `tests/io_errors.rs`.
//!
//! - [`Recorder`] is an [`IoHook`]: it logs every device write (kind, offset, bytes), its
//!   completion, and every device flush with its outcome, in order; it can also fail the Nth
//!   write of a kind or the Nth flush with an errno.
//! - [`Model`] is the guest-level view: every guest request with the event-log marks taken
//!   when it was submitted and when it completed, and its data. From it, for any crash point,
//!   each 512-byte sector gets the set of values it may hold and whether one of them is
//!   durable (acknowledged, then a guest flush completed; or acknowledged in writethrough).
//! - [`materialize`] builds a crash state from the starting file and the log: every durable
//!   device write (completed before a flush that completed ok before the crash point), then a
//!   random subset of the other writes issued before the crash point, in issue order, some
//!   torn into 4 KiB pieces.
//! - [`check_state`] runs the checks on one state: quring repair open (lazy refcounts),
//!   `qemu-img check` / `quring check` (L2-less), then a full read through quring compared
//!   sector by sector with the model.
#![allow(dead_code)]

use crate::common::*;
use quring::image::{CacheMode, Image, Options};
use quring::io::hook::{Hook, IoHook, WriteData, WriteKind};
use quring::queue::{Completion, Op, Queue, QueueOptions, Request};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub const SECTOR: u64 = 512;
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Random numbers

/// The harness's seeded random sequence (the seed is mixed as it always was, so recorded
/// seeds replay the same runs).
pub fn harness_rng(seed: u64) -> Rng {
    Rng(seed ^ 0x6372_6173_6821)
}

// ---------------------------------------------------------------------------
// The recorder

#[derive(Clone, Debug)]
pub enum Ev {
    Write { token: u64, kind: WriteKind, off: u64, len: u64, data: Option<Arc<Vec<u8>>> },
    WriteDone { token: u64 },
    FlushStart { token: u64 },
    FlushDone { token: u64, ok: bool },
}

/// Which I/O to fail.
#[derive(Clone, Debug, Default)]
pub struct FailPlan {
    /// Fail the `nth` (1-based) write of this kind with `errno`.
    pub write: Option<(WriteKind, u64, i32)>,
    /// Fail the `nth` (1-based) device flush with `errno`.
    pub flush: Option<(u64, i32)>,
}

/// An injected failure: what, and the event-log position when it happened.
#[derive(Clone, Debug)]
pub struct Injected {
    pub what: String,
    pub errno: i32,
    pub at: usize,
    /// Index of the guest request running then (`usize::MAX`: none, e.g. close).
    pub op: usize,
}

#[derive(Default)]
pub struct Recorder {
    pub events: Mutex<Vec<Ev>>,
    next: AtomicU64,
    pub plan: Mutex<FailPlan>,
    counts: Mutex<HashMap<WriteKind, u64>>,
    flushes: AtomicU64,
    pub injected: Mutex<Vec<Injected>>,
    /// The guest request being run (set by [`run_plan`]).
    pub cur_op: std::sync::atomic::AtomicUsize,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder {
            next: AtomicU64::new(1),
            cur_op: std::sync::atomic::AtomicUsize::new(usize::MAX),
            ..Default::default()
        })
    }
    pub fn with_plan(plan: FailPlan) -> Arc<Self> {
        let r = Self::new();
        *r.plan.lock().unwrap() = plan;
        r
    }
    /// Number of events so far (a mark).
    pub fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }
    pub fn events(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }
    /// Writes seen so far per kind (including failed ones).
    pub fn count(&self, kind: WriteKind) -> u64 {
        self.counts.lock().unwrap().get(&kind).copied().unwrap_or(0)
    }
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
    pub fn injected(&self) -> Vec<Injected> {
        self.injected.lock().unwrap().clone()
    }
}

impl IoHook for Recorder {
    fn fail_write(&self, kind: WriteKind, off: u64, len: u64) -> Option<i32> {
        let n = {
            let mut c = self.counts.lock().unwrap();
            let e = c.entry(kind).or_insert(0);
            *e += 1;
            *e
        };
        let plan = self.plan.lock().unwrap().write;
        if let Some((k, nth, errno)) = plan
            && k == kind
            && n == nth
        {
            let at = self.len();
            self.injected.lock().unwrap().push(Injected {
                what: format!("write #{n} of kind {kind:?} at {off:#x}+{len:#x}"),
                errno,
                at,
                op: self.cur_op.load(Ordering::SeqCst),
            });
            return Some(errno);
        }
        None
    }

    fn fail_flush(&self) -> Option<i32> {
        let n = self.flushes.fetch_add(1, Ordering::SeqCst) + 1;
        let plan = self.plan.lock().unwrap().flush;
        if let Some((nth, errno)) = plan
            && n == nth
        {
            let at = self.len();
            self.injected.lock().unwrap().push(Injected {
                what: format!("device flush #{n}"),
                errno,
                at,
                op: self.cur_op.load(Ordering::SeqCst),
            });
            return Some(errno);
        }
        None
    }

    fn issued(&self, kind: WriteKind, off: u64, data: WriteData<'_>) -> u64 {
        let token = self.next.fetch_add(1, Ordering::SeqCst);
        let (len, data) = match data {
            WriteData::Bytes(b) => (b.len() as u64, Some(Arc::new(b.to_vec()))),
            WriteData::Zeros(n) => (n, None),
        };
        self.events.lock().unwrap().push(Ev::Write { token, kind, off, len, data });
        token
    }

    fn completed(&self, token: u64) {
        self.events.lock().unwrap().push(Ev::WriteDone { token });
    }

    fn flush_issued(&self) -> u64 {
        let token = self.next.fetch_add(1, Ordering::SeqCst);
        self.events.lock().unwrap().push(Ev::FlushStart { token });
        token
    }

    fn flush_completed(&self, token: u64, ok: bool) {
        self.events.lock().unwrap().push(Ev::FlushDone { token, ok });
    }
}

// ---------------------------------------------------------------------------
// Crash states

/// One device write of the log, with where it was issued and completed.
#[derive(Clone, Debug)]
pub struct DevWrite {
    pub token: u64,
    pub kind: WriteKind,
    pub off: u64,
    pub len: u64,
    pub data: Option<Arc<Vec<u8>>>,
    pub issued_at: usize,
    pub done_at: Option<usize>,
}

/// The log digested: writes and flushes with their positions.
pub struct Log {
    pub writes: Vec<DevWrite>,
    /// (FlushStart index, FlushDone index, ok)
    pub flushes: Vec<(usize, Option<usize>, bool)>,
    pub len: usize,
}

impl Log {
    pub fn new(events: &[Ev]) -> Log {
        let mut writes = Vec::new();
        let mut by_token: HashMap<u64, usize> = HashMap::new();
        let mut flushes = Vec::new();
        let mut fl_by_token: HashMap<u64, usize> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            match e {
                Ev::Write { token, kind, off, len, data } => {
                    by_token.insert(*token, writes.len());
                    writes.push(DevWrite {
                        token: *token,
                        kind: *kind,
                        off: *off,
                        len: *len,
                        data: data.clone(),
                        issued_at: i,
                        done_at: None,
                    });
                }
                Ev::WriteDone { token } => {
                    if let Some(&w) = by_token.get(token) {
                        writes[w].done_at = Some(i);
                    }
                }
                Ev::FlushStart { token } => {
                    fl_by_token.insert(*token, flushes.len());
                    flushes.push((i, None, false));
                }
                Ev::FlushDone { token, ok } => {
                    if let Some(&f) = fl_by_token.get(token) {
                        flushes[f].1 = Some(i);
                        flushes[f].2 = *ok;
                    }
                }
            }
        }
        Log { writes, flushes, len: events.len() }
    }

    /// Start index of the last flush that completed ok before crash point `c` (0: none).
    pub fn durable_barrier(&self, c: usize) -> usize {
        self.flushes.iter().filter(|(_, d, ok)| *ok && d.is_some_and(|d| d < c)).map(|(s, _, _)| *s).max().unwrap_or(0)
    }

    pub fn is_durable(&self, w: &DevWrite, barrier: usize) -> bool {
        w.done_at.is_some_and(|d| d < barrier)
    }
}

/// A non-durable write applied to a state: (token, kind, off, len, torn pieces applied or
/// None = whole).
pub type Applied = (u64, WriteKind, u64, u64, Option<Vec<u64>>);

/// How a crash state was built (for reproduction messages).
#[derive(Clone, Debug, Default)]
pub struct StateDesc {
    pub crash_point: usize,
    pub durable: usize,
    /// The writes landed in a random order allowed by their issue and completion marks
    /// (otherwise: every durable write, then the others in issue order).
    pub reordered: bool,
    /// Non-durable writes applied.
    pub applied: Vec<Applied>,
    /// Non-durable writes issued before the crash point and left out.
    pub dropped: Vec<(u64, WriteKind, u64, u64)>,
}

impl std::fmt::Display for StateDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "crash point: event {} ({} durable writes applied{})",
            self.crash_point,
            self.durable,
            if self.reordered { ", writes landing in a random order within their issue..completion" } else { "" }
        )?;
        let data = self.applied.iter().filter(|a| a.1 == WriteKind::Data).count();
        writeln!(f, "non-durable writes applied (token kind off+len [torn 4K pieces at]), {data} of them Data:")?;
        for (t, k, o, l, p) in &self.applied {
            if data > 40 && *k == WriteKind::Data {
                continue;
            }
            match p {
                None => writeln!(f, "  #{t} {k:?} {o:#x}+{l:#x}")?,
                Some(p) => writeln!(f, "  #{t} {k:?} {o:#x}+{l:#x} torn: {:x?}", p)?,
            }
        }
        let data = self.dropped.iter().filter(|a| a.1 == WriteKind::Data).count();
        writeln!(f, "non-durable writes dropped, {data} of them Data:")?;
        for (t, k, o, l) in &self.dropped {
            if data > 40 && *k == WriteKind::Data {
                continue;
            }
            writeln!(f, "  #{t} {k:?} {o:#x}+{l:#x}")?;
        }
        Ok(())
    }
}

fn apply(img: &mut Vec<u8>, off: u64, len: u64, data: &Option<Arc<Vec<u8>>>, piece: Option<(u64, u64)>) {
    let (s, e) = piece.unwrap_or((off, off + len));
    if img.len() < e as usize {
        img.resize(e as usize, 0);
    }
    match data {
        Some(d) => img[s as usize..e as usize].copy_from_slice(&d[(s - off) as usize..(e - off) as usize]),
        None => img[s as usize..e as usize].fill(0),
    }
}

/// 4 KiB-aligned pieces of a write.
fn pieces(off: u64, len: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut p = off;
    let end = off + len;
    while p < end {
        let n = ((p / 4096 + 1) * 4096).min(end);
        v.push((p, n));
        p = n;
    }
    v
}

/// Builds the crash state at `c` (events `0..c` happened) from the starting file.
pub fn materialize(start: &[u8], log: &Log, c: usize, rng: &mut Rng) -> (Vec<u8>, StateDesc) {
    let barrier = log.durable_barrier(c);
    let mut img = start.to_vec();
    let mut desc = StateDesc { crash_point: c, ..Default::default() };
    // How this state picks its subset: none, all, or each with a probability.
    let p = match rng.below(4) {
        0 => 0.0,
        1 => 1.0,
        _ => 0.2 + 0.6 * (rng.below(100) as f64 / 100.0),
    };
    let torn_p = if rng.chance(0.5) { 0.3 } else { 0.0 };
    // In half the states the writes land in another order than they were issued: each at a
    // random moment between its issue and its completion (or the crash point), so writes in
    // flight at the same time (several queues' write-backs, a stage's parallel writes) land
    // in any order, and a write issued after another completed still lands after it.
    let reorder = rng.chance(0.5);
    let mut order: Vec<&DevWrite> = log.writes.iter().filter(|w| w.issued_at < c).collect();
    if reorder {
        let mut keyed: Vec<(u64, &DevWrite)> = order
            .iter()
            .map(|w| {
                let until = w.done_at.unwrap_or(c).min(c).max(w.issued_at + 1);
                // Landing time in [issued_at, until), scaled so ties stay in issue order.
                let t = w.issued_at as u64 * 1024 + rng.below((until - w.issued_at) as u64 * 1024);
                (t, *w)
            })
            .collect();
        keyed.sort_by_key(|&(t, _)| t);
        order = keyed.into_iter().map(|(_, w)| w).collect();
        desc.reordered = true;
    }
    for w in order {
        if log.is_durable(w, barrier) {
            apply(&mut img, w.off, w.len, &w.data, None);
            desc.durable += 1;
            continue;
        }
        if !rng.chance(p) {
            desc.dropped.push((w.token, w.kind, w.off, w.len));
            continue;
        }
        let ps = pieces(w.off, w.len);
        if ps.len() > 1 && rng.chance(torn_p) {
            let mut got = Vec::new();
            for pc in ps {
                if rng.chance(0.5) {
                    apply(&mut img, w.off, w.len, &w.data, Some(pc));
                    got.push(pc.0);
                }
            }
            desc.applied.push((w.token, w.kind, w.off, w.len, Some(got)));
        } else {
            apply(&mut img, w.off, w.len, &w.data, None);
            desc.applied.push((w.token, w.kind, w.off, w.len, None));
        }
    }
    (img, desc)
}

/// The events from `from` to `to` (exclusive), one a line, without data.
pub fn event_listing(events: &[Ev], from: usize, to: usize) -> String {
    listing(events, from, to, true)
}

/// Like [`event_listing`] without guest data writes and completions (metadata and flushes).
pub fn meta_listing(events: &[Ev], from: usize, to: usize) -> String {
    listing(events, from, to, false)
}

fn listing(events: &[Ev], from: usize, to: usize, data: bool) -> String {
    let mut out = String::new();
    let data_tokens: std::collections::HashSet<u64> = events
        .iter()
        .filter_map(|e| match e {
            Ev::Write { token, kind: WriteKind::Data, .. } => Some(*token),
            _ => None,
        })
        .collect();
    for (i, e) in events.iter().enumerate().take(to.min(events.len())).skip(from) {
        if !data {
            match e {
                Ev::Write { token, .. } | Ev::WriteDone { token } if data_tokens.contains(token) => continue,
                Ev::WriteDone { .. } => continue,
                _ => {}
            }
        }
        let line = match e {
            Ev::Write { token, kind, off, len, data } => {
                format!(
                    "{i}: issue #{token} {kind:?} {off:#x}+{len:#x}{}",
                    if data.is_none() { " (zeros)" } else { "" }
                )
            }
            Ev::WriteDone { token } => format!("{i}: done #{token}"),
            Ev::FlushStart { token } => format!("{i}: FLUSH start #{token}"),
            Ev::FlushDone { token, ok } => format!("{i}: FLUSH done #{token} ok={ok}"),
        };
        out += &line;
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// The guest model

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GKind {
    Write,
    Zero { unmap: bool },
    Discard,
    Flush,
}

#[derive(Clone, Debug)]
pub struct GuestOp {
    pub kind: GKind,
    pub off: u64,
    pub len: u64,
    /// Bytes for writes (None: zeros / no data).
    pub data: Option<Vec<u8>>,
    /// Event-log mark when submitted.
    pub start: usize,
    /// Event-log mark when its completion was seen.
    pub end: usize,
    /// Position of its submission in the harness's own order of submissions and
    /// completions (device events cannot order two requests that issued none).
    pub submitted: usize,
    /// Position of its completion in that order.
    pub completed: usize,
    /// Completed without error.
    pub ok: bool,
    /// The error's errno when it failed.
    pub errno: i32,
}

impl GuestOp {
    pub fn describe(&self) -> String {
        format!(
            "{:?} {:#x}+{:#x} (marks {}..{}, {})",
            self.kind,
            self.off,
            self.len,
            self.start,
            self.end,
            if self.ok { "ok".to_string() } else { format!("failed errno {}", self.errno) }
        )
    }
}

/// What counts as durable when checking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledged, then a guest flush was submitted and completed ok.
    Flushed,
    /// Acknowledged (writethrough; or reading back from the live image).
    Acked,
    /// [`Durability::Flushed`] for ops of several queues run at once: the flush must have
    /// been submitted strictly after the op's completion mark (an equal mark, taken on
    /// another thread, does not order them).
    FlushedAcrossQueues,
}

pub struct Model {
    pub size: u64,
    /// Starting content of the virtual disk.
    pub base: Vec<u8>,
    pub ops: Vec<GuestOp>,
    pub durability: Durability,
    /// The order of submissions and completions ([`GuestOp::submitted`]), shared by the
    /// models of queues that run at once (clone it), so their marks compare.
    pub clock: Clock,
}

/// A logical clock: every submission and completion takes the next position.
#[derive(Clone, Default)]
pub struct Clock(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Model {
    /// Takes the next position in the order of submissions and completions.
    fn tick(&mut self) -> usize {
        self.clock.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    fn sector_value(&self, op: Option<usize>, s: u64) -> Option<&[u8]> {
        let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
        match op {
            None => Some(&self.base[r]),
            Some(i) => {
                let o = &self.ops[i];
                match (&o.kind, &o.data) {
                    (GKind::Write, Some(d)) => {
                        let a = (s * SECTOR - o.off) as usize;
                        Some(&d[a..a + SECTOR as usize])
                    }
                    _ => None, // zeros
                }
            }
        }
    }

    fn is_durable(&self, i: usize, c: usize) -> bool {
        let o = &self.ops[i];
        if !o.ok || !matches!(o.kind, GKind::Write | GKind::Zero { .. }) || o.end > c {
            return false;
        }
        match self.durability {
            Durability::Acked => true,
            Durability::Flushed => {
                self.ops.iter().any(|f| f.kind == GKind::Flush && f.ok && f.start >= o.end && f.end <= c)
            }
            Durability::FlushedAcrossQueues => {
                self.ops.iter().any(|f| f.kind == GKind::Flush && f.ok && f.start > o.end && f.end <= c)
            }
        }
    }

    /// Per sector, the ops touching it, in op order.
    fn sector_index(&self) -> Vec<Vec<u32>> {
        let n = (self.size / SECTOR) as usize;
        let mut v = vec![Vec::new(); n];
        for (i, o) in self.ops.iter().enumerate() {
            if o.kind == GKind::Flush {
                continue;
            }
            for s in o.off / SECTOR..(o.off + o.len).div_ceil(SECTOR) {
                v[s as usize].push(i as u32);
            }
        }
        v
    }

    /// Compares the disk content `disk` of a state at crash point `c` with the model.
    /// Returns the first violation.
    pub fn verify(&self, disk: &[u8], c: usize) -> Result<(), String> {
        let idx = self.sector_index();
        let durable: Vec<bool> = (0..self.ops.len()).map(|i| self.is_durable(i, c)).collect();
        let zero = [0u8; SECTOR as usize];
        for s in 0..self.size / SECTOR {
            let actual = &disk[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
            let touching: Vec<usize> =
                idx[s as usize].iter().map(|&i| i as usize).filter(|&i| self.ops[i].start < c).collect();
            let ds: Vec<usize> = touching.iter().copied().filter(|&i| durable[i]).collect();
            // An op is allowed unless a durable op to this sector was submitted after it
            // completed. (Not by event marks: two requests that issued no device event,
            // such as zero writes over zeros, share their marks and would each rule the
            // other out.)
            let allowed = |i: usize| !ds.iter().any(|&d| d != i && self.ops[d].submitted > self.ops[i].completed);
            let mut cands: Vec<Option<usize>> = Vec::new();
            if ds.is_empty() {
                cands.push(None);
            }
            cands.extend(touching.iter().copied().filter(|&i| allowed(i)).map(Some));
            let matches = |cand: &Option<usize>| match cand {
                None => self.sector_value(None, s) == Some(actual),
                Some(i) => match self.sector_value(Some(*i), s) {
                    Some(v) => v == actual,
                    None => actual == zero,
                },
            };
            if cands.iter().any(matches) {
                continue;
            }
            // Explain.
            let mut msg = format!(
                "sector {s} (guest offset {:#x}) holds a value that is not allowed\n  actual (first 32 bytes): {:02x?}{}\n",
                s * SECTOR,
                &actual[..32],
                if actual == zero { " (all zeros)" } else { "" }
            );
            msg += &format!(
                "  starting content{}: {:02x?}\n",
                if ds.is_empty() { " (allowed)" } else { " (superseded by a durable write)" },
                &self.base[(s * SECTOR) as usize..(s * SECTOR) as usize + 32]
            );
            for &i in &touching {
                msg += &format!(
                    "  op #{i} {}: durable={} allowed={} matches={}\n",
                    self.ops[i].describe(),
                    durable[i],
                    allowed(i),
                    matches(&Some(i))
                );
            }
            // Does it match any other op anywhere (stale data from elsewhere)?
            for (i, o) in self.ops.iter().enumerate() {
                if let Some(d) = &o.data
                    && let Some(p) = d.chunks(SECTOR as usize).position(|ch| ch == actual)
                {
                    msg += &format!(
                        "  the bytes are op #{i}'s data for guest offset {:#x} ({})\n",
                        o.off + p as u64 * SECTOR,
                        o.describe()
                    );
                }
            }
            if let Some(p) = self.base.chunks(SECTOR as usize).position(|ch| ch == actual)
                && actual != zero
            {
                msg += &format!("  the bytes are the starting content of guest offset {:#x}\n", p as u64 * SECTOR);
            }
            return Err(msg);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Running guest requests

/// A guest request to run.
#[derive(Clone, Debug)]
pub struct Planned {
    pub kind: GKind,
    pub off: u64,
    pub len: u64,
    /// Submit together with the following requests (queue depth > 1) up to a non-batched one.
    pub batch: bool,
}

fn errno_of(e: &quring::Error) -> i32 {
    e.raw_os_error()
}

/// Runs `plan` on `q`, recording marks in `model`. `data_seed` seeds the write data.
pub fn run_plan(q: &mut Queue, rec: &Recorder, model: &mut Model, plan: &[Planned], data_seed: u64) {
    let mut i = 0;
    while i < plan.len() {
        // A batch: consecutive requests with `batch` set (plus the one ending it).
        let mut j = i;
        while j < plan.len() && plan[j].batch && j - i < 7 {
            j += 1;
        }
        let batch_end = (j + 1).min(plan.len());
        rec.cur_op.store(model.ops.len(), Ordering::SeqCst);
        if batch_end - i == 1 {
            let p = &plan[i];
            let data = (p.kind == GKind::Write).then(|| pattern_bytes(data_seed ^ (i as u64 * 0x9e37), p.len as usize));
            let start = rec.len();
            let submitted = model.tick();
            let r = match p.kind {
                GKind::Write => q.write_at(data.as_ref().unwrap(), p.off),
                GKind::Zero { unmap } => q.write_zeroes(p.off, p.len, unmap),
                GKind::Discard => q.discard(p.off, p.len),
                GKind::Flush => q.flush(),
            };
            let end = rec.len();
            let completed = model.tick();
            model.ops.push(GuestOp {
                kind: p.kind,
                off: p.off,
                len: p.len,
                data,
                start,
                end,
                submitted,
                completed,
                ok: r.is_ok(),
                errno: r.as_ref().err().map_or(0, errno_of),
            });
        } else {
            let first = model.ops.len();
            for (k, p) in plan[i..batch_end].iter().enumerate() {
                let data = (p.kind == GKind::Write)
                    .then(|| pattern_bytes(data_seed ^ ((i + k) as u64 * 0x9e37), p.len as usize));
                model.ops.push(GuestOp {
                    kind: p.kind,
                    off: p.off,
                    len: p.len,
                    data,
                    start: rec.len(),
                    end: usize::MAX,
                    submitted: 0,
                    completed: usize::MAX,
                    ok: false,
                    errno: 0,
                });
                let t = model.tick();
                model.ops.last_mut().unwrap().submitted = t;
                let o = model.ops.last().unwrap();
                let op = match p.kind {
                    GKind::Write => {
                        let d = o.data.as_ref().unwrap();
                        Op::Write { offset: p.off, buf: d.as_ptr(), len: d.len() }
                    }
                    GKind::Zero { unmap } => Op::WriteZeroes { offset: p.off, len: p.len, unmap },
                    GKind::Discard => Op::Discard { offset: p.off, len: p.len },
                    GKind::Flush => Op::Flush,
                };
                // SAFETY: the data buffers live in `model.ops` (heap, not moved or dropped)
                // until every completion of this batch has been reaped below.
                unsafe { q.submit(Request { op, user_data: (first + k) as u64 }).expect("submit") };
            }
            q.commit().expect("commit");
            let mut left = batch_end - i;
            let mut out: Vec<Completion> = Vec::new();
            while left > 0 {
                out.clear();
                q.reap(&mut out, 1, None).expect("reap");
                let mark = rec.len();
                for c in &out {
                    let t = model.tick();
                    let o = &mut model.ops[c.user_data as usize];
                    o.end = mark;
                    o.completed = t;
                    o.ok = c.result == 0;
                    o.errno = -c.result;
                    left -= 1;
                }
            }
        }
        i = batch_end;
    }
    rec.cur_op.store(usize::MAX, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------
// Image helpers

/// Reads the whole virtual disk through quring (read-only).
pub fn read_disk(path: &Path) -> Result<Vec<u8>, String> {
    let img = Image::open(path, &Options { read_only: true, force_share: true, ..Default::default() })
        .map_err(|e| format!("read-only open of {} failed: {e}", path.display()))?;
    let size = img.size();
    let mut q = Queue::new(&img, &QueueOptions::default()).map_err(|e| format!("queue: {e}"))?;
    let mut out = vec![0u8; size as usize];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(MIB);
        q.read_at(&mut out[off as usize..(off + n) as usize], off)
            .map_err(|e| format!("read {off:#x}+{n:#x} failed: {e}"))?;
        off += n;
    }
    drop(q);
    img.close().map_err(|e| format!("close after read: {e}"))?;
    Ok(out)
}

/// What kind of image a scenario uses, for the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckMode {
    /// `qemu-img check` exit 0 or 3.
    Eager,
    /// quring read-write open (repair) + close, then `qemu-img check` exit 0.
    Lazy,
    /// `quring check` exit 0 or 3.
    L2Less,
}

/// Runs the checks on a crash state file. `c`: the crash point for the model.
pub fn check_state(path: &Path, mode: CheckMode, model: &Model, c: usize) -> Result<(), String> {
    check_image(path, mode, false)?;
    let disk = read_disk(path)?;
    model.verify(&disk, c)
}

/// The consistency part of [`check_state`].
/// `leaks_ok`: accept exit 3 in lazy mode too (after I/O errors, leaks are allowed).
pub fn check_image(path: &Path, mode: CheckMode, leaks_ok: bool) -> Result<(), String> {
    if mode == CheckMode::Lazy {
        let img = Image::open(path, &Options::default())
            .map_err(|e| format!("read-write (repair) open of the lazy-refcount state failed: {e}"))?;
        img.close().map_err(|e| format!("close after repair open failed: {e}"))?;
        drop(img);
    }
    let r = match mode {
        CheckMode::L2Less => quring(["check", &s(path)]),
        _ => qemu_img(["check", &s(path)]),
    };
    let ok = match mode {
        CheckMode::Lazy if !leaks_ok => r.code == Some(0),
        _ => matches!(r.code, Some(0) | Some(3)),
    };
    if !ok {
        let errors: Vec<&str> =
            r.stdout.lines().chain(r.stderr.lines()).filter(|l| l.contains("ERROR")).take(12).collect();
        return Err(format!(
            "image check failed ({mode:?}), exit {:?}; error lines:\n    {}\n{}",
            r.code,
            errors.join("\n    "),
            r.describe()
        ));
    }
    Ok(())
}

/// A fresh directory on tmpfs (falls back to the default temp dir).
pub fn shm_dir() -> tempfile::TempDir {
    let b = tempfile::Builder::new().prefix("quring-crash-").tempdir_in("/dev/shm");
    match b {
        Ok(d) => d,
        Err(_) => tempdir(),
    }
}

/// Opens `path` read-write with the recorder.
pub fn open_recorded(path: &Path, rec: &Arc<Recorder>, cache: CacheMode) -> Arc<Image> {
    Image::open(path, &Options { cache, hook: Some(Hook(rec.clone())), ..Default::default() })
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Copies a file, keeping the failure path for reproduction.
pub fn keep_copy(src: &Path, name: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(name);
    let _ = std::fs::copy(src, &dst);
    dst
}
