//! Running the matrix: images, alternating rounds, calibration, failures, progress.

use crate::config::{Device, ImageState, Mode, QuringDriver, Side, Workload};
use crate::parse::{self, Measured};
use crate::plan::{self, Tools, shell_join};
use crate::results::{PatternNote, RunConfig, RunRecord, Skip};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Plan {
    pub devices: Vec<(Device, PathBuf)>,
    pub modes: Vec<&'static Mode>,
    pub workloads: Vec<&'static Workload>,
    pub rounds: u32,
    pub seconds: f64,
    pub size: u64,
    pub seed: u64,
    /// Workload ids whose quring side runs through fio + plugin.
    pub quring_fio: Vec<String>,
    pub tools: Tools,
    pub dry_run: bool,
    pub preset: String,
}

impl Plan {
    pub fn driver(&self, w: &Workload) -> QuringDriver {
        if self.quring_fio.iter().any(|x| x == w.id || x == "all") { QuringDriver::Fio } else { QuringDriver::Bench }
    }

    pub fn total_runs(&self) -> u64 {
        (self.devices.len() * self.modes.len() * self.workloads.len() * Side::ALL.len()) as u64
            * u64::from(self.rounds + 1)
    }

    pub fn config(&self) -> RunConfig {
        RunConfig {
            preset: self.preset.clone(),
            devices: self.devices.iter().map(|(d, _)| d.name().to_string()).collect(),
            modes: self.modes.iter().map(|m| m.id.to_string()).collect(),
            workloads: self.workloads.iter().map(|w| w.id.to_string()).collect(),
            rounds: self.rounds,
            seconds: self.seconds,
            image_size: self.size,
            seed: self.seed,
            quring_fio_workloads: self.quring_fio.clone(),
        }
    }

    pub fn patterns(&self) -> Vec<PatternNote> {
        let mut v = Vec::new();
        for w in &self.workloads {
            for side in Side::ALL {
                v.push(PatternNote {
                    workload: w.id.to_string(),
                    side,
                    pattern: plan::pattern_description(side, self.driver(w), w, self.size, self.seed),
                });
            }
        }
        v
    }
}

/// What a command did.
struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
    status: String,
    elapsed: f64,
}

/// Run a command with its output in files (no pipe can fill up), killing it after `timeout`.
fn execute(argv: &[String], logdir: &Path, timeout: Duration) -> Outcome {
    let out_path = logdir.join("cmd.stdout");
    let err_path = logdir.join("cmd.stderr");
    let t0 = Instant::now();
    let fail = |msg: String| Outcome {
        ok: false,
        stdout: String::new(),
        stderr: msg,
        status: "not started".into(),
        elapsed: t0.elapsed().as_secs_f64(),
    };
    let (Ok(out), Ok(err)) = (std::fs::File::create(&out_path), std::fs::File::create(&err_path)) else {
        return fail(format!("cannot create output files in {}", logdir.display()));
    };
    let mut child = match Command::new(&argv[0]).args(&argv[1..]).stdin(Stdio::null()).stdout(out).stderr(err).spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot run {}: {e}", argv[0])),
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if t0.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {:.0} s", timeout.as_secs_f64()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(format!("wait failed: {e}")),
        }
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let (ok, status) = match status {
        Ok(st) if st.success() => (true, st.to_string()),
        Ok(st) => (false, st.to_string()),
        Err(e) => (false, e),
    };
    Outcome { ok, stdout, stderr, status, elapsed }
}

/// Called after every finished cell with the records and skips so far.
pub type CellHook<'a> = Box<dyn FnMut(&[RunRecord], &[Skip]) + 'a>;

/// A lazily made image shared by several runs: its path, or why it could not be made.
type Shared = Option<Result<PathBuf, String>>;

pub struct Runner<'a> {
    plan: &'a Plan,
    pub records: Vec<RunRecord>,
    pub skipped: Vec<Skip>,
    pb: ProgressBar,
    tty: bool,
    done: u64,
    /// Called after every finished cell (workload x mode) with the records so far.
    on_cell: CellHook<'a>,
}

impl<'a> Runner<'a> {
    pub fn new(plan: &'a Plan, on_cell: CellHook<'a>) -> Runner<'a> {
        let tty = std::io::stderr().is_terminal() && !plan.dry_run;
        let pb = ProgressBar::with_draw_target(
            Some(plan.total_runs()),
            if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
        );
        pb.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] run {pos}/{len} ETA {eta} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Runner { plan, records: Vec::new(), skipped: Vec::new(), pb, tty, done: 0, on_cell }
    }

    fn say(&self, msg: &str) {
        if self.plan.dry_run {
            println!("{msg}");
        } else if self.tty {
            self.pb.println(msg);
        } else {
            eprintln!("{msg}");
        }
    }

    /// A preparation command; `Err` with the tool's message when it fails.
    fn prep(&self, argv: &[String], dir: &Path) -> Result<(), String> {
        if self.plan.dry_run {
            println!("  prep: {}", shell_join(argv));
            return Ok(());
        }
        let o = execute(argv, dir, Duration::from_secs(1800));
        if o.ok {
            Ok(())
        } else {
            Err(format!("{}: {}", shell_join(argv), parse::failure_message(&o.stderr, &o.stdout, &o.status)))
        }
    }

    fn shared(&self, slot: &mut Shared, make: impl FnOnce() -> Result<PathBuf, String>) -> Result<PathBuf, String> {
        slot.get_or_insert_with(make).clone()
    }

    pub fn run(&mut self) {
        let plan = self.plan;
        for (device, base) in &plan.devices {
            let tmp = if plan.dry_run {
                None
            } else {
                match tempfile::Builder::new().prefix("quring-bench.").tempdir_in(base) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.say(&format!(
                            "{}: cannot make a temporary directory in {}: {e}",
                            device.name(),
                            base.display()
                        ));
                        None
                    }
                }
            };
            let dir = tmp.as_ref().map(|t| t.path().to_path_buf()).unwrap_or_else(|| base.join("quring-bench.XXXXXX"));
            if plan.dry_run {
                println!("# device {} (temporary directory {})", device.name(), dir.display());
            }
            let mut raw_full: Shared = None;
            let mut backing: Shared = None;
            if tmp.is_none() && !plan.dry_run {
                raw_full = Some(Err(format!("no temporary directory in {}", base.display())));
                backing = raw_full.clone();
            }
            for mode in &plan.modes {
                if let Err(reason) = self.probe_mode(*device, mode, &dir) {
                    let n = (plan.workloads.len() * Side::ALL.len()) as u64 * u64::from(plan.rounds + 1);
                    self.pb.set_length(self.pb.length().unwrap_or(0).saturating_sub(n));
                    self.say(&format!("{} {}: skipped: {reason}", device.name(), mode.id));
                    self.skipped.push(Skip { device: device.name().into(), mode: mode.id.into(), reason });
                    (self.on_cell)(&self.records, &self.skipped);
                    continue;
                }
                let mut mode_full: Shared = raw_full.as_ref().filter(|r| r.is_err()).cloned();
                for w in &plan.workloads {
                    self.cell(*device, mode, w, &dir, &mut mode_full, &mut raw_full, &mut backing);
                    (self.on_cell)(&self.records, &self.skipped);
                }
                if let Some(Ok(p)) = &mode_full
                    && !plan.dry_run
                {
                    let _ = std::fs::remove_file(p);
                    let _ = std::fs::remove_file(plan::data_file_of(p));
                }
            }
            drop(tmp);
        }
        self.pb.finish_and_clear();
    }

    /// Modes only quring can create: try `quring create` once.
    fn probe_mode(&self, device: Device, mode: &Mode, dir: &Path) -> Result<(), String> {
        if !mode.quring_only {
            return Ok(());
        }
        let probe = dir.join(format!("probe-{}.qcow2", mode.id));
        let argv = plan::create_qcow2(&self.plan.tools, mode, &probe, 1 << 20, None);
        if self.plan.dry_run {
            println!("  probe (mode {} skipped on {} if it fails): {}", mode.id, device.name(), shell_join(&argv));
            return Ok(());
        }
        let r = self.prep(&argv, dir).map_err(|_| {
            let o = execute(&argv, dir, Duration::from_secs(60));
            format!(
                "not implemented: `{}` fails: {}",
                shell_join(&argv),
                parse::failure_message(&o.stderr, &o.stdout, &o.status)
            )
        });
        let _ = std::fs::remove_file(plan::data_file_of(&probe));
        let _ = std::fs::remove_file(&probe);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn cell(
        &mut self,
        device: Device,
        mode: &Mode,
        w: &Workload,
        dir: &Path,
        mode_full: &mut Shared,
        raw_full: &mut Shared,
        backing: &mut Shared,
    ) {
        let plan = self.plan;
        let t = &plan.tools;
        let size = plan.size;
        let driver = plan.driver(w);
        let mut calibrated: HashMap<Side, f64> = HashMap::new();
        if plan.dry_run {
            println!("## {} / {} / {}", device.name(), mode.id, w.id);
        }
        for round in 0..=plan.rounds {
            for side in Side::ALL {
                // the image
                let mut fresh: Option<PathBuf> = None;
                let image: Result<PathBuf, String> = match (side, w.image) {
                    (Side::Raw, ImageState::Full | ImageState::Overlay) => self.shared(raw_full, || {
                        let f = dir.join("raw-full.raw");
                        self.prep(&plan::create_raw(&f, size), dir)?;
                        self.prep(&plan::fill(t, "raw", &f, size, false), dir)?;
                        Ok(f)
                    }),
                    (Side::Raw, ImageState::Empty) => {
                        let f = dir.join(format!("{}-raw-r{round}.raw", w.id));
                        fresh = Some(f.clone());
                        self.prep(&plan::create_raw(&f, size), dir).map(|_| f)
                    }
                    (_, ImageState::Full) => self.shared(mode_full, || {
                        let f = dir.join(format!("{}-full.qcow2", mode.id));
                        self.prep(&plan::create_qcow2(t, mode, &f, size, None), dir)?;
                        self.prep(
                            &plan::fill(t, "qcow2", &f, size, mode.quring_only || plan::CREATE_WITH_QURING),
                            dir,
                        )?;
                        Ok(f)
                    }),
                    (_, ImageState::Empty) => {
                        let f = dir.join(format!("{}-{}-{}-r{round}.qcow2", mode.id, w.id, side.name()));
                        fresh = Some(f.clone());
                        self.prep(&plan::create_qcow2(t, mode, &f, size, None), dir).map(|_| f)
                    }
                    (_, ImageState::Overlay) => {
                        let b = self.shared(backing, || {
                            let f = dir.join("backing.raw");
                            self.prep(&plan::create_raw(&f, size), dir)?;
                            self.prep(&plan::fill(t, "raw", &f, size, false), dir)?;
                            Ok(f)
                        });
                        let f = dir.join(format!("{}-{}-{}-r{round}.qcow2", mode.id, w.id, side.name()));
                        fresh = Some(f.clone());
                        b.and_then(|b| self.prep(&plan::create_qcow2(t, mode, &f, size, Some(&b)), dir).map(|_| f))
                    }
                };
                let counted = plan::count_based(side, driver);
                let count = plan::count(w, size, plan.seconds, calibrated.get(&side).copied());
                let img_for_cmd = image.clone().unwrap_or_else(|_| dir.join("unavailable"));
                let argv = plan::run_command(t, side, driver, w, &img_for_cmd, size, count, plan.seconds, plan.seed);
                let mut rec = RunRecord {
                    device: device.name().into(),
                    mode: mode.id.into(),
                    workload: w.id.into(),
                    side: Some(side),
                    driver: plan::driver_name(side, driver).into(),
                    round,
                    warmup: round == 0,
                    command: shell_join(&argv),
                    count: counted.then_some(count),
                    ..RunRecord::default()
                };
                if plan.dry_run {
                    println!(
                        "  {} r{round}{}: {}",
                        side.name(),
                        if round == 0 { " (warm-up)" } else { "" },
                        rec.command
                    );
                    continue;
                }
                match image {
                    Err(e) => rec.error = Some(format!("image preparation failed: {e}")),
                    Ok(_) => {
                        let timeout = Duration::from_secs_f64(120.0 + 30.0 * plan.seconds);
                        let o = execute(&argv, dir, timeout);
                        rec.elapsed_s = o.elapsed;
                        let parsed: Result<Measured, String> = if !o.ok {
                            Err(parse::failure_message(&o.stderr, &o.stdout, &o.status))
                        } else if side == Side::Raw {
                            parse::fio_json(&o.stdout)
                        } else if driver == QuringDriver::Fio && side == Side::Quring {
                            parse::fio_json(&o.stdout)
                                .map(|m| parse::Measured { counters: parse::plugin_counters(&o.stderr), ..m })
                        } else if side == Side::Qemu {
                            parse::qemu_bench(&o.stdout, count)
                        } else {
                            parse::quring_bench(&o.stdout)
                        };
                        match parsed {
                            Ok(m) => {
                                rec.iops = Some(m.iops);
                                rec.lat_p50_us = m.lat_p50_us;
                                rec.lat_p99_us = m.lat_p99_us;
                                rec.lat_p999_us = m.lat_p999_us;
                                rec.counters = m.counters;
                                if round == 0 && counted {
                                    calibrated.insert(side, m.iops);
                                }
                            }
                            Err(e) => rec.error = Some(e),
                        }
                    }
                }
                if let Some(f) = fresh {
                    let _ = std::fs::remove_file(plan::data_file_of(&f));
                    let _ = std::fs::remove_file(f);
                }
                self.done += 1;
                self.pb.inc(1);
                let what = match (&rec.iops, &rec.error) {
                    (Some(i), _) => format!("{i:.0} IOPS"),
                    (_, Some(e)) => format!("failed: {e}"),
                    _ => String::new(),
                };
                let label = format!(
                    "{} {} {} {} r{round}{}",
                    device.name(),
                    mode.id,
                    w.id,
                    side.name(),
                    if round == 0 { " (warm-up)" } else { "" }
                );
                self.pb.set_message(label.clone());
                if !self.tty {
                    let eta = self.pb.eta().as_secs();
                    eprintln!(
                        "[{}/{} ETA {}m{:02}s] {label}: {what}",
                        self.done,
                        self.pb.length().unwrap_or(0),
                        eta / 60,
                        eta % 60
                    );
                }
                self.records.push(rec);
            }
        }
    }
}
