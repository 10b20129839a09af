//! The long differential campaign (`scripts/diff-campaign.sh`): generated plans
//! (`tests/differential/generator.rs`) for consecutive seeds, each seed's cell of the
//! matrix (cluster size, extended L2) cycling with the seed, for a given number of
//! minutes. Resumable: a state file keeps the next seed and the totals so far, updated
//! after every plan; failures are appended to a log with their seed and a minimized,
//! self-contained reproduction script.
//!
//! ```text
//! diff_campaign --minutes M --state FILE --log FILE [--seed-base N] [--minimize-secs N]
//! diff_campaign --seed N            # one seed, report on stderr (exit 1 if it fails)
//! ```
//!
//! Without arguments (as `cargo test` runs it) it runs one short plan as a smoke test.

mod common;
mod differential;

use differential::generator::{Config, plan};
use differential::*;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    next_seed: u64,
    seconds: f64,
    plans: u64,
    ops: u64,
    segments: u64,
    failures: u64,
    /// Plans whose starting files QEMU's own tools could not build (no quring involved).
    unbuildable: u64,
    first_seed: Option<u64>,
    runs: u64,
}

impl State {
    fn load(p: &PathBuf) -> State {
        let Ok(t) = std::fs::read_to_string(p) else { return State::default() };
        let m: BTreeMap<&str, &str> = t.lines().filter_map(|l| l.split_once('=')).collect();
        let num = |k: &str| m.get(k).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0);
        State {
            next_seed: num("next_seed") as u64,
            seconds: num("seconds"),
            plans: num("plans") as u64,
            ops: num("ops") as u64,
            segments: num("segments") as u64,
            failures: num("failures") as u64,
            unbuildable: num("unbuildable") as u64,
            first_seed: m.get("first_seed").and_then(|v| v.trim().parse().ok()),
            runs: num("runs") as u64,
        }
    }

    fn save(&self, p: &PathBuf) {
        let tmp = p.with_extension("tmp");
        let t = format!(
            "next_seed={}\nfirst_seed={}\nseconds={:.1}\nplans={}\nops={}\nsegments={}\nfailures={}\nunbuildable={}\nruns={}\n",
            self.next_seed,
            self.first_seed.unwrap_or(self.next_seed),
            self.seconds,
            self.plans,
            self.ops,
            self.segments,
            self.failures,
            self.unbuildable,
            self.runs
        );
        std::fs::write(&tmp, t).expect("write state");
        std::fs::rename(&tmp, p).expect("rename state");
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = RunOpts::default();
    if let Some(seed) = arg(&args, "--seed") {
        let seed: u64 = seed.parse().expect("--seed N");
        let c = Config::random(seed);
        let p = plan(&c);
        let budget = arg(&args, "--minimize-secs").map(|s| Duration::from_secs(s.parse().unwrap()));
        match run_and_report(&p, &opts, budget) {
            Ok(st) => eprintln!("seed {seed}: ok ({} ops, {} segments)\n  {}", st.ops, st.segments, c.describe()),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let Some(minutes) = arg(&args, "--minutes") else {
        // Smoke run under `cargo test`: one short plan of a fixed seed.
        let mut c = Config::random(7);
        c.ops = 12;
        let p = plan(&c);
        if let Err(e) = run_and_report(&p, &opts, None) {
            eprintln!("{e}");
            std::process::exit(1);
        }
        eprintln!("diff_campaign smoke run passed (use scripts/diff-campaign.sh for campaigns)");
        return;
    };
    let minutes: f64 = minutes.parse().expect("--minutes M");
    let state_path = PathBuf::from(arg(&args, "--state").expect("--state FILE"));
    let log_path = PathBuf::from(arg(&args, "--log").expect("--log FILE"));
    let budget = Duration::from_secs(arg(&args, "--minimize-secs").map(|s| s.parse().unwrap()).unwrap_or(600));
    let fresh = !state_path.exists();
    let mut st = State::load(&state_path);
    if fresh && let Some(b) = arg(&args, "--seed-base") {
        st.next_seed = b.parse().expect("--seed-base N");
    }
    if st.first_seed.is_none() {
        st.first_seed = Some(st.next_seed);
    }
    st.runs += 1;
    let t0 = Instant::now();
    // Minutes count the run's wall clock (plans, minimization and the runner's overhead).
    let base_seconds = st.seconds;
    let deadline = Duration::from_secs_f64(minutes * 60.0);
    let (mut plans, mut ops, mut fails) = (0u64, 0u64, 0u64);
    let first = st.next_seed;
    while t0.elapsed() < deadline {
        let seed = st.next_seed;
        let c = Config::random(seed);
        let p = plan(&c);
        let t = Instant::now();
        let r = run_and_report(&p, &opts, Some(budget));
        st.next_seed += 1;
        st.plans += 1;
        plans += 1;
        match r {
            Ok(s) => {
                st.ops += s.ops;
                st.segments += s.segments;
                ops += s.ops;
                eprintln!(
                    "seed {seed}: ok, {} ops, {} segments, {:.1}s (cluster {} ext_l2 {}), space quring {} KiB qemu {} KiB",
                    s.ops,
                    s.segments,
                    t.elapsed().as_secs_f64(),
                    c.cluster,
                    c.extended_l2,
                    s.space.0 / 1024,
                    s.space.1 / 1024
                );
            }
            Err(e) if differential::is_build_failure(&e) => {
                // A generator gap, not a quring result: logged, counted apart, not a failure.
                st.unbuildable += 1;
                eprintln!("seed {seed}: not buildable by QEMU's tools, skipped; see {}", log_path.display());
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("open log");
                let _ = writeln!(f, "==== seed {seed} (not buildable, skipped) ({})\n{e}\n", c.describe());
            }
            Err(e) => {
                st.failures += 1;
                fails += 1;
                st.ops += p.ops();
                ops += p.ops();
                eprintln!("seed {seed}: FAILED ({:.1}s), see {}", t.elapsed().as_secs_f64(), log_path.display());
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("open log");
                let _ = writeln!(f, "==== seed {seed} ({})\n{e}\n", c.describe());
            }
        }
        st.seconds = base_seconds + t0.elapsed().as_secs_f64();
        st.save(&state_path);
    }
    println!(
        "this run: {:.1} min, seeds {first}..{}, {plans} plans, {ops} ops, {fails} failures",
        t0.elapsed().as_secs_f64() / 60.0,
        st.next_seed.saturating_sub(1)
    );
    println!(
        "total: {:.1} min over {} runs, seeds {}..{}, {} plans, {} ops, {} compare points, {} failures, {} not buildable by QEMU",
        st.seconds / 60.0,
        st.runs,
        st.first_seed.unwrap_or(0),
        st.next_seed.saturating_sub(1),
        st.plans,
        st.ops,
        st.segments,
        st.failures,
        st.unbuildable
    );
    if fails > 0 {
        std::process::exit(1);
    }
}
