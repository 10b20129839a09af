//! From the runs to the summaries and the Markdown report.

use crate::config::Side;
use crate::results::{Results, RunRecord};
use crate::stats::{Summary, median, pairwise_ratios, summarize};
use std::collections::BTreeMap;
use std::fmt::Write;

/// One side of one cell (device x workload x mode), measured rounds only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SideSummary {
    pub iops: Option<Summary>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub rounds: usize,
    pub failures: usize,
    pub first_error: Option<String>,
    /// Median per-request value of each counter (counter / guest requests of the run).
    pub counters_per_request: BTreeMap<String, f64>,
    /// `(round, iops)` of the successful measured rounds.
    pub by_round: Vec<(u32, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub device: String,
    pub workload: String,
    pub mode: String,
    pub quring: SideSummary,
    pub raw: SideSummary,
    pub qemu: SideSummary,
    /// Pair-wise quring/raw ratios summarized.
    pub vs_raw: Option<Summary>,
    pub vs_qemu: Option<Summary>,
}

fn side_summary(runs: &[&RunRecord]) -> SideSummary {
    let measured: Vec<&&RunRecord> = runs.iter().filter(|r| !r.warmup).collect();
    let ok: Vec<&&RunRecord> = measured.iter().copied().filter(|r| r.error.is_none() && r.iops.is_some()).collect();
    let by_round: Vec<(u32, f64)> = ok.iter().map(|r| (r.round, r.iops.unwrap_or(0.0))).collect();
    let iops: Vec<f64> = by_round.iter().map(|x| x.1).collect();
    let lat = |f: fn(&RunRecord) -> Option<f64>| median(&ok.iter().filter_map(|r| f(r)).collect::<Vec<_>>());
    let mut per_req: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in &ok {
        if let Some(c) = &r.counters {
            let reqs = c.get("guest_writes").copied().unwrap_or(0) + c.get("guest_reads").copied().unwrap_or(0);
            if reqs > 0 {
                for (k, v) in c {
                    per_req.entry(k.clone()).or_default().push(*v as f64 / reqs as f64);
                }
            }
        }
    }
    SideSummary {
        iops: summarize(&iops),
        p50_us: lat(|r| r.lat_p50_us),
        p99_us: lat(|r| r.lat_p99_us),
        p999_us: lat(|r| r.lat_p999_us),
        rounds: measured.len(),
        failures: measured.len() - ok.len(),
        first_error: measured
            .iter()
            .chain(runs.iter().filter(|r| r.warmup).collect::<Vec<_>>().iter())
            .find_map(|r| r.error.clone()),
        counters_per_request: per_req.into_iter().filter_map(|(k, v)| Some((k, median(&v)?))).collect(),
        by_round,
    }
}

/// The cells in the order of the configuration (device, workload, mode).
pub fn cells(res: &Results) -> Vec<Cell> {
    let mut out = Vec::new();
    for device in &res.config.devices {
        for workload in &res.config.workloads {
            for mode in &res.config.modes {
                let runs: Vec<&RunRecord> = res
                    .runs
                    .iter()
                    .filter(|r| &r.device == device && &r.workload == workload && &r.mode == mode)
                    .collect();
                if runs.is_empty() {
                    continue;
                }
                let of =
                    |s: Side| side_summary(&runs.iter().copied().filter(|r| r.side == Some(s)).collect::<Vec<_>>());
                let (quring, raw, qemu) = (of(Side::Quring), of(Side::Raw), of(Side::Qemu));
                let vs_raw = summarize(&pairwise_ratios(&quring.by_round, &raw.by_round));
                let vs_qemu = summarize(&pairwise_ratios(&quring.by_round, &qemu.by_round));
                out.push(Cell {
                    device: device.clone(),
                    workload: workload.clone(),
                    mode: mode.clone(),
                    quring,
                    raw,
                    qemu,
                    vs_raw,
                    vs_qemu,
                });
            }
        }
    }
    out
}

/// 1234567 -> "1.23M", 45678 -> "45.7k", 950 -> "950".
pub fn fmt_iops(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.2}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// A failure message short enough for a table cell (the full text is in results.json and in
/// the "Not compared" list).
fn short(msg: &str) -> String {
    const MAX: usize = 100;
    let m = md_escape(msg);
    if m.chars().count() <= MAX { m } else { format!("{}…", m.chars().take(MAX).collect::<String>()) }
}

fn fmt_side(s: &SideSummary) -> String {
    match (&s.iops, &s.first_error) {
        (Some(i), err) => {
            let mut t = format!("{} ({}–{})", fmt_iops(i.median), fmt_iops(i.min), fmt_iops(i.max));
            if s.failures > 0 {
                let _ = write!(t, "; {}/{} failed: {}", s.failures, s.rounds, short(err.as_deref().unwrap_or("?")));
            }
            t
        }
        (None, Some(e)) => format!("failed: {}", short(e)),
        (None, None) => "—".into(),
    }
}

fn fmt_ratio(r: &Option<Summary>) -> String {
    match r {
        Some(r) => format!("**{:.2}** ({:.2}–{:.2}, n={})", r.median, r.min, r.max, r.n),
        None => "—".into(),
    }
}

fn fmt_lat(s: &SideSummary) -> String {
    let f = |x: Option<f64>| {
        x.map(|v| if v < 10.0 { format!("{v:.1}") } else { format!("{v:.0}") }).unwrap_or_else(|| "–".into())
    };
    if s.p50_us.is_none() && s.p99_us.is_none() {
        return "—".into();
    }
    format!("{} / {} / {}", f(s.p50_us), f(s.p99_us), f(s.p999_us))
}

/// Civil date (UTC) of a unix time, "YYYY-MM-DD HH:MM UTC".
pub fn utc(t: u64) -> String {
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    // Howard Hinnant's days-to-civil
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", secs / 3600, secs % 3600 / 60)
}

const WT_COUNTERS: &[&str] = &[
    "data_writes",
    "l2_writes",
    "refblock_writes",
    "reftable_writes",
    "l1_writes",
    "header_writes",
    "device_flushes",
    "write_bytes",
    "cow_bytes",
    "clusters_allocated",
];

/// Device bytes per guest byte written, from quring's counters (issue 15, item 2): `data`
/// is every data byte written (guest bytes plus copy-on-write and zero fills), `cow` the
/// copy-on-write part of it (bytes read and copied), `zero fill` the zeros written around
/// guest data where nothing had to be copied, `metadata` the L2, refcount, L1 and header
/// bytes. `None` when the cell wrote no guest bytes or recorded no counters.
pub fn device_bytes(x: &Cell) -> Option<[f64; 5]> {
    let c = &x.quring.counters_per_request;
    let guest = *c.get("write_bytes")?;
    if guest <= 0.0 {
        return None;
    }
    let get = |k: &str| c.get(k).copied().unwrap_or(0.0);
    let data = get("data_write_bytes");
    let meta = get("l2_write_bytes") + get("refcount_write_bytes") + get("l1_header_write_bytes");
    Some([data / guest, get("cow_bytes") / guest, get("zero_fill_bytes") / guest, meta / guest, (data + meta) / guest])
}

fn device_bytes_section(o: &mut String, cells: &[Cell]) {
    let rows: Vec<(&Cell, [f64; 5])> = cells.iter().filter_map(|x| Some((x, device_bytes(x)?))).collect();
    let _ = writeln!(o, "## Device bytes per guest byte\n");
    if rows.is_empty() {
        let _ = writeln!(o, "No write workload with counters in this run.\n");
        return;
    }
    let _ = writeln!(
        o,
        "What quring wrote to the device per byte the guest wrote (median counters over the measured \
         runs): data (guest bytes, copy-on-write and zero fills), of which copy-on-write (bytes read \
         and copied) and zero fill (zeros the format requires around the guest's bytes, nothing \
         copied), metadata (L2, refcount, L1 and header), and the total.\n"
    );
    let _ = writeln!(o, "| device | workload | mode | data | cow | zero fill | metadata | total |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for (x, [d, c, z, m, t]) in rows {
        let _ =
            writeln!(o, "| {} | {} | {} | {d:.3} | {c:.3} | {z:.3} | {m:.3} | {t:.3} |", x.device, x.workload, x.mode);
    }
    let _ = writeln!(o);
}

/// The report's closing section made from a hand-written `analysis.md` (whose own first
/// heading, if any, is replaced by the section's).
pub fn analysis_section(text: &str) -> String {
    let body = match text.trim_start().strip_prefix("# ") {
        Some(rest) => rest.split_once('\n').map_or("", |(_, b)| b),
        None => text,
    };
    format!(
        "\n## Analysis\n\nWritten by hand from this run's numbers and counters (`analysis.md`).\n\n{}\n",
        body.trim()
    )
}

/// The Markdown report. `charts` maps a device to its chart file name (relative to the report).
pub fn render(res: &Results, charts: &BTreeMap<String, String>) -> String {
    let cells = cells(res);
    let mut o = String::new();
    let c = &res.config;
    let _ = writeln!(o, "# quring benchmark report\n");
    let _ = writeln!(
        o,
        "Preset `{}`, started {}, took {:.0} s ({} runs recorded, {} failed). Produced by:\n\n```sh\n{}\n```\n",
        c.preset,
        utc(res.started_unix),
        res.duration_s,
        res.runs.len(),
        res.runs.iter().filter(|r| r.error.is_some()).count(),
        res.command
    );
    let _ = writeln!(o, "## Machine\n");
    let m = &res.machine;
    let _ = writeln!(o, "- CPU: {} ({} online CPUs)", m.cpu, m.nproc);
    let _ = writeln!(o, "- memory: {}", m.memory);
    let _ = writeln!(o, "- kernel: {}", m.kernel);
    for (d, desc) in &m.test_dirs {
        let _ = writeln!(o, "- test directory `{d}`: {desc}");
    }
    for (t, v) in &m.tools {
        let _ = writeln!(o, "- {t}: {v}");
    }
    let _ = writeln!(
        o,
        "\n## How to read this\n\n\
         Every workload x mode cell ran the three sides alternately (quring, raw, QEMU, quring, raw, QEMU, ...): \
         one warm-up round (discarded; it also calibrates the request count of the count-based tools to \
         {:.1} s), then {} measured rounds; images of {} MiB. IOPS cells show the median and (min–max) over the \
         measured rounds. Ratios are computed pair by pair (round i quring / round i raw or QEMU) and shown as \
         the median of the pairs, (min–max) and the number of pairs; a ratio above 1 means quring is faster. \
         **raw** is fio's io_uring engine with O_DIRECT on a raw file (the limit), **QEMU** is \
         `qemu-img bench -f qcow2 -i io_uring` on the same qcow2 image as quring (the peer). \
         Writethrough workloads use cache=directsync for quring and QEMU and O_DSYNC for raw.\n",
        c.seconds,
        c.rounds,
        c.image_size >> 20
    );
    for device in &c.devices {
        let dcells: Vec<&Cell> = cells.iter().filter(|x| &x.device == device).collect();
        let dir = m.test_dirs.get(device).cloned().unwrap_or_default();
        let _ = writeln!(o, "## Results on `{device}` {dir}\n");
        if dcells.is_empty() {
            let _ = writeln!(o, "No runs.\n");
            continue;
        }
        let _ = writeln!(o, "| workload | mode | quring IOPS | raw IOPS | QEMU IOPS | quring/raw | quring/QEMU |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|");
        for x in &dcells {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                x.workload,
                x.mode,
                fmt_side(&x.quring),
                fmt_side(&x.raw),
                fmt_side(&x.qemu),
                fmt_ratio(&x.vs_raw),
                fmt_ratio(&x.vs_qemu)
            );
        }
        if let Some(ch) = charts.get(device) {
            let _ = writeln!(o, "\n![quring/raw and quring/QEMU ratios on {device}]({ch})");
        }
        let _ = writeln!(
            o,
            "\nLatency, median over the measured rounds, µs p50 / p99 / p99.9 (qemu-img bench reports none):\n"
        );
        let _ = writeln!(o, "| workload | mode | quring | raw |");
        let _ = writeln!(o, "|---|---|---|---|");
        for x in &dcells {
            let _ = writeln!(o, "| {} | {} | {} | {} |", x.workload, x.mode, fmt_lat(&x.quring), fmt_lat(&x.raw));
        }
        let _ = writeln!(o);
    }

    let _ = writeln!(o, "## Slower than QEMU\n");
    let slower: Vec<&Cell> = cells.iter().filter(|x| x.vs_qemu.is_some_and(|r| r.median < 1.0)).collect();
    let compared = cells.iter().filter(|x| x.vs_qemu.is_some()).count();
    if slower.is_empty() {
        let _ =
            writeln!(o, "None of the {compared} compared cells has a pair-wise median quring/QEMU ratio below 1.\n");
    } else {
        let _ = writeln!(
            o,
            "quring is slower than QEMU (pair-wise median ratio < 1) in {} of {compared} compared cells:\n",
            slower.len()
        );
        for x in &slower {
            let r = x.vs_qemu.unwrap_or(Summary { median: 0.0, min: 0.0, max: 0.0, n: 0 });
            let hint: Vec<String> = ["meta_loads", "l2_misses", "device_flushes", "cow_bytes"]
                .iter()
                .filter_map(|k| x.quring.counters_per_request.get(*k).map(|v| format!("{k} {v:.3}")))
                .collect();
            let _ = writeln!(
                o,
                "- `{}` {} / {}: {:.2} ({:.2}–{:.2}); quring latency p50/p99/p99.9 {} µs; counters per request: {}. \
                 Why: see the Analysis section when the run has one (`analysis.md`).",
                x.device,
                x.workload,
                x.mode,
                r.median,
                r.min,
                r.max,
                fmt_lat(&x.quring),
                if hint.is_empty() { "none recorded".to_string() } else { hint.join(", ") }
            );
        }
        let _ = writeln!(o);
    }
    let not_compared: Vec<&Cell> = cells.iter().filter(|x| x.vs_qemu.is_none() || x.vs_raw.is_none()).collect();
    if !not_compared.is_empty() {
        let _ = writeln!(
            o,
            "## Not compared\n\nCells without a quring/raw or quring/QEMU ratio (no round where both sides succeeded):\n"
        );
        for x in not_compared {
            let why = [("quring", &x.quring), ("raw", &x.raw), ("QEMU", &x.qemu)]
                .iter()
                .filter(|(_, s)| s.iops.is_none())
                .map(|(n, s)| format!("{n} failed: {}", md_escape(s.first_error.as_deref().unwrap_or("no runs"))))
                .collect::<Vec<_>>()
                .join("; ");
            let _ = writeln!(o, "- `{}` {} / {}: {why}", x.device, x.workload, x.mode);
        }
        let _ = writeln!(o);
    }

    let _ = writeln!(o, "## Writethrough study\n");
    let wt: Vec<&Cell> = cells.iter().filter(|x| x.workload.starts_with("wt-")).collect();
    if wt.is_empty() {
        let _ = writeln!(o, "No writethrough workload in this run.\n");
    } else {
        let _ = writeln!(o, "Engine counters per guest write (median over the measured quring runs):\n");
        let _ = writeln!(o, "| device | workload | mode | quring IOPS | {} |", WT_COUNTERS.join(" | "));
        let _ = writeln!(o, "|---|---|---|---|{}", "---|".repeat(WT_COUNTERS.len()));
        for x in wt {
            let vals: Vec<String> = WT_COUNTERS
                .iter()
                .map(|k| x.quring.counters_per_request.get(*k).map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into()))
                .collect();
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                x.device,
                x.workload,
                x.mode,
                fmt_side(&x.quring),
                vals.join(" | ")
            );
        }
        let _ = writeln!(o);
    }

    device_bytes_section(&mut o, &cells);

    let _ = writeln!(o, "## Access patterns\n");
    for w in &c.workloads {
        let _ = writeln!(o, "- **{w}**");
        for p in res.patterns.iter().filter(|p| &p.workload == w) {
            let _ = writeln!(o, "  - {}: {}", p.side.name(), p.pattern);
        }
    }
    let _ = writeln!(o);
    if !res.skipped.is_empty() {
        let _ = writeln!(o, "## Skipped modes\n");
        for s in &res.skipped {
            let _ = writeln!(o, "- `{}` {}: {}", s.device, s.mode, md_escape(&s.reason));
        }
        let _ = writeln!(o);
    }
    if !res.notes.is_empty() {
        let _ = writeln!(o, "## Notes\n");
        for n in &res.notes {
            let _ = writeln!(o, "- {n}");
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(o, "Every run, with its exact command line, is in `results.json`.");
    o
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::results::{Machine, PatternNote, RunConfig, SCHEMA, Skip};

    fn run(side: Side, mode: &str, workload: &str, round: u32, iops: Option<f64>, err: Option<&str>) -> RunRecord {
        RunRecord {
            device: "shm".into(),
            mode: mode.into(),
            workload: workload.into(),
            side: Some(side),
            driver: "x".into(),
            round,
            warmup: round == 0,
            command: format!("{} r{round}", side.name()),
            iops,
            lat_p50_us: iops.map(|_| 10.0 + f64::from(round)),
            error: err.map(str::to_string),
            ..RunRecord::default()
        }
    }

    /// A fixed result set: randread in standard (all sides fine; quring slower than QEMU in
    /// round 2 only, faster on the median) and rc1 (quring slower than QEMU), randwrite with
    /// quring failing.
    pub fn fixture() -> Results {
        let mut runs = Vec::new();
        for (mode, q, r, e) in [
            ("standard", [100.0, 150.0, 90.0, 160.0], [200.0, 200.0, 200.0, 200.0], [110.0, 120.0, 100.0, 150.0]),
            ("rc1", [100.0, 80.0, 90.0, 70.0], [200.0, 200.0, 200.0, 200.0], [110.0, 100.0, 100.0, 100.0]),
        ] {
            for round in 0..4u32 {
                let i = round as usize;
                runs.push(run(Side::Quring, mode, "randread-4k", round, Some(q[i]), None));
                runs.push(run(Side::Raw, mode, "randread-4k", round, Some(r[i]), None));
                runs.push(run(Side::Qemu, mode, "randread-4k", round, Some(e[i]), None));
            }
        }
        for round in 0..4u32 {
            runs.push(run(
                Side::Quring,
                "standard",
                "randwrite-4k",
                round,
                None,
                Some("quring: unsupported: writes are not implemented yet (exit status: 1)"),
            ));
            runs.push(run(Side::Raw, "standard", "randwrite-4k", round, Some(1000.0), None));
            runs.push(run(Side::Qemu, "standard", "randwrite-4k", round, Some(500.0), None));
        }
        let mut c = BTreeMap::new();
        c.insert("guest_writes".to_string(), 100);
        c.insert("l2_writes".to_string(), 50);
        c.insert("device_flushes".to_string(), 200);
        c.insert("write_bytes".to_string(), 409600);
        c.insert("data_write_bytes".to_string(), 819200);
        c.insert("cow_bytes".to_string(), 409600);
        c.insert("l2_write_bytes".to_string(), 40960);
        for round in 0..2u32 {
            let mut r = run(Side::Quring, "standard", "wt-alloc-qd1", round, Some(5000.0), None);
            r.counters = Some(c.clone());
            runs.push(r);
        }
        Results {
            schema: SCHEMA.into(),
            command: "quring-bench run --preset quick --out /tmp/x".into(),
            started_unix: 1_700_000_000,
            duration_s: 12.0,
            machine: Machine {
                cpu: "Test CPU".into(),
                nproc: 2,
                memory: "4.0 GiB".into(),
                kernel: "6.1.0".into(),
                test_dirs: [("shm".to_string(), "/dev/shm (tmpfs)".to_string())].into(),
                tools: BTreeMap::new(),
            },
            config: RunConfig {
                preset: "quick".into(),
                devices: vec!["shm".into()],
                modes: vec!["standard".into(), "rc1".into(), "l2less".into()],
                workloads: vec!["randread-4k".into(), "randwrite-4k".into(), "wt-alloc-qd1".into()],
                rounds: 3,
                seconds: 1.5,
                image_size: 256 << 20,
                seed: 1,
                quring_fio_workloads: vec![],
            },
            patterns: vec![PatternNote { workload: "randread-4k".into(), side: Side::Raw, pattern: "uniform".into() }],
            skipped: vec![Skip { device: "shm".into(), mode: "l2less".into(), reason: "not implemented: x".into() }],
            notes: vec!["a note".into()],
            runs,
        }
    }

    #[test]
    fn cell_summaries() {
        let res = fixture();
        let cs = cells(&res);
        assert_eq!(cs.len(), 4);
        let std = &cs[0];
        assert_eq!((std.workload.as_str(), std.mode.as_str()), ("randread-4k", "standard"));
        // warm-up (round 0) is discarded
        assert_eq!(std.quring.iops, Some(Summary { median: 150.0, min: 90.0, max: 160.0, n: 3 }));
        // pairs: 150/120 = 1.25, 90/100 = 0.9, 160/150 = 1.0667
        let r = std.vs_qemu.unwrap();
        assert!((r.median - 160.0 / 150.0).abs() < 1e-9);
        assert!((r.min - 0.9).abs() < 1e-9 && (r.max - 1.25).abs() < 1e-9);
        assert_eq!(std.vs_raw.unwrap().median, 0.75);
        assert_eq!(std.quring.p50_us, Some(12.0));
        let rc1 = &cs[1];
        assert!(rc1.vs_qemu.unwrap().median < 1.0);
        let w = &cs[2];
        assert!(w.quring.iops.is_none() && w.vs_raw.is_none());
        assert_eq!(w.quring.failures, 3);
        let wt = &cs[3];
        assert_eq!(wt.quring.counters_per_request["device_flushes"], 2.0);
    }

    #[test]
    fn report_rendering() {
        let md = render(&fixture(), &[("shm".to_string(), "chart-shm.svg".to_string())].into());
        assert!(md.contains("quring-bench run --preset quick --out /tmp/x"));
        assert!(md.contains("- CPU: Test CPU (2 online CPUs)"));
        assert!(md.contains("2023-11-14 22:13 UTC"));
        assert!(
            md.contains("| randread-4k | standard | 150 (90–160) | 200 (200–200) | 120 (100–150) | **0.75** (0.45–0.80, n=3) | **1.07** (0.90–1.25, n=3) |"),
            "{md}"
        );
        assert!(md.contains(
            "| randwrite-4k | standard | failed: quring: unsupported: writes are not implemented yet (exit status: 1) |"
        ));
        assert!(md.contains("![quring/raw and quring/QEMU ratios on shm](chart-shm.svg)"));
        assert!(md.contains("| shm | wt-alloc-qd1 | standard | 2.000 | 1.000 | 0.000 | 0.100 | 2.100 |"), "{md}");
        let a = analysis_section("# Analysis of run X\n\nseqwrite is slower because ...\n");
        assert!(a.starts_with("\n## Analysis\n"));
        assert!(a.contains("seqwrite is slower because ..."));
        assert!(!a.contains("run X"));
        let slower = md.split("## Slower than QEMU").nth(1).unwrap();
        assert!(slower.contains("in 1 of 2 compared cells"));
        assert!(slower.contains("`shm` randread-4k / rc1: 0.80"));
        assert!(!slower.split("## Not compared").next().unwrap().contains("/ standard:"));
        assert!(md.contains("- `shm` randwrite-4k / standard: quring failed: quring: unsupported"));
        assert!(md.contains("- `shm` l2less: not implemented: x"));
        assert!(md.contains("| shm | wt-alloc-qd1 | standard | 5.00k (5.00k–5.00k) | – | 0.500 |"), "{md}");
        assert!(md.contains("  - raw: uniform"));
    }

    #[test]
    fn formatting() {
        assert_eq!(short(&"x".repeat(150)).chars().count(), 101);
        assert_eq!(short("a|b"), "a\\|b");
        assert_eq!(fmt_iops(1_234_567.0), "1.23M");
        assert_eq!(fmt_iops(45_678.0), "45.7k");
        assert_eq!(fmt_iops(4_567.0), "4.57k");
        assert_eq!(fmt_iops(950.4), "950");
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
    }
}
