//! `quring-bench`: runs the benchmark matrix (modes x workloads x sides quring / raw / QEMU,
//! alternating rounds) and writes `results.json`, `report.md` and SVG charts.

mod chart;
mod config;
mod machine;
mod parse;
mod plan;
mod report;
mod results;
mod runner;
mod stats;

use clap::{Parser, Subcommand};
use config::{DeviceChoice, Preset, PresetName, QuringDriver};
use results::{Results, RunRecord, SCHEMA, Skip};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
#[command(name = "quring-bench", version, about = "quring benchmark matrix: quring vs raw io_uring vs QEMU's qcow2")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the matrix and write results.json, report.md and charts into --out.
    Run(Box<RunArgs>),
    /// Render report.md and the charts again from DIR/results.json.
    Report {
        /// The folder holding results.json.
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Preset: quick (a few minutes, /dev/shm, a subset of workloads) or full.
    #[arg(long, value_enum, default_value = "quick")]
    preset: PresetName,
    /// Output folder (created).
    #[arg(long, required_unless_present = "dry_run")]
    out: Option<PathBuf>,
    /// Where the images live (default: the preset's).
    #[arg(long, value_enum)]
    device: Option<DeviceChoice>,
    /// Measured rounds per cell (plus one warm-up round).
    #[arg(long)]
    rounds: Option<u32>,
    /// Target seconds per run.
    #[arg(long)]
    seconds: Option<f64>,
    /// Image size (e.g. 256M, 2G).
    #[arg(long)]
    size: Option<String>,
    /// Modes to run (comma-separated ids; default: the preset's).
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Workloads to run (comma-separated ids; default: the preset's).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Workloads whose quring side runs through fio + libquring_fio.so instead of
    /// `quring bench` (comma-separated ids, or "all").
    #[arg(long, value_delimiter = ',')]
    quring_fio: Vec<String>,
    /// Random seed (fio randseed).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Folder with quring and libquring_fio.so (env QURING_BIN_DIR; default: this program's
    /// folder when it holds quring, else <workspace>/target/release).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The quring binary (env QURING_BIN).
    #[arg(long)]
    quring: Option<PathBuf>,
    /// The fio plugin (env QURING_FIO).
    #[arg(long)]
    fio_plugin: Option<PathBuf>,
    /// fio (env FIO).
    #[arg(long)]
    fio: Option<String>,
    /// qemu-img (env QEMU_IMG).
    #[arg(long)]
    qemu_img: Option<String>,
    /// qemu-io (env QEMU_IO).
    #[arg(long)]
    qemu_io: Option<String>,
    /// Folder for the shm device (default /dev/shm).
    #[arg(long)]
    shm_dir: Option<PathBuf>,
    /// Folder for the disk device (default /var/tmp).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// Print the planned command lines without running anything.
    #[arg(long)]
    dry_run: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(format!("bad size suffix in '{s}'")),
            };
            (&s[..i], mul)
        }
        _ => (s, 1),
    };
    num.parse::<u64>().map(|n| n * mul).map_err(|_| format!("bad size '{s}'"))
}

fn env_or<T: From<String>>(arg: Option<T>, var: &str, default: impl FnOnce() -> T) -> T {
    arg.or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty()).map(T::from)).unwrap_or_else(default)
}

fn default_bin_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
        && dir.join("quring").is_file()
    {
        return dir.to_path_buf();
    }
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("release");
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("release")
}

fn command_line() -> String {
    plan::shell_join(&std::env::args().collect::<Vec<_>>())
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// results.json, the charts and report.md.
fn write_outputs(out: &Path, res: &Results) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let json = serde_json::to_string_pretty(res).map_err(|e| e.to_string())?;
    std::fs::write(out.join("results.json"), json + "\n").map_err(|e| format!("results.json: {e}"))?;
    let cells = report::cells(res);
    let mut charts = BTreeMap::new();
    for device in &res.config.devices {
        let dcells: Vec<&report::Cell> = cells.iter().filter(|c| &c.device == device).collect();
        if dcells.is_empty() {
            continue;
        }
        let name = format!("ratios-{device}.svg");
        let svg =
            chart::ratio_chart(&format!("quring IOPS ratios on {device} (preset {})", res.config.preset), &dcells)?;
        std::fs::write(out.join(&name), svg).map_err(|e| format!("{name}: {e}"))?;
        charts.insert(device.clone(), name);
    }
    let mut md = report::render(res, &charts);
    // A hand-written analysis kept beside the results (the runner can measure, not explain)
    // becomes the report's last section every time the report is rendered again.
    if let Ok(analysis) = std::fs::read_to_string(out.join("analysis.md")) {
        md.push_str(&report::analysis_section(&analysis));
    }
    std::fs::write(out.join("report.md"), md).map_err(|e| format!("report.md: {e}"))?;
    Ok(())
}

fn run(a: RunArgs) -> Result<(), String> {
    let preset = Preset::get(a.preset);
    let devices = a.device.unwrap_or(preset.devices).devices();
    let mode_ids = if a.modes.is_empty() { preset.modes.iter().map(|s| s.to_string()).collect() } else { a.modes };
    let modes = mode_ids
        .iter()
        .map(|m| {
            config::mode(m)
                .ok_or_else(|| format!("unknown mode '{m}' (known: {})", ids(config::MODES.iter().map(|m| m.id))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let wl_ids =
        if a.workloads.is_empty() { preset.workloads.iter().map(|s| s.to_string()).collect() } else { a.workloads };
    let workloads = wl_ids
        .iter()
        .map(|w| {
            config::workload(w).ok_or_else(|| {
                format!("unknown workload '{w}' (known: {})", ids(config::WORKLOADS.iter().map(|w| w.id)))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    for w in &a.quring_fio {
        if w != "all" && config::workload(w).is_none() {
            return Err(format!("--quring-fio: unknown workload '{w}'"));
        }
    }
    let size = match &a.size {
        Some(s) => parse_size(s)?,
        None => preset.image_size,
    };
    if size < (4 << 20) || size % (1 << 20) != 0 {
        return Err("--size must be a multiple of 1 MiB, at least 4 MiB".into());
    }
    let seconds = a.seconds.unwrap_or(preset.seconds);
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err("--seconds must be positive".into());
    }
    let bin_dir = env_or(a.bin_dir, "QURING_BIN_DIR", default_bin_dir);
    let tools = plan::Tools {
        quring: env_or(a.quring, "QURING_BIN", || bin_dir.join("quring")),
        plugin: env_or(a.fio_plugin, "QURING_FIO", || bin_dir.join("libquring_fio.so")),
        fio: env_or(a.fio, "FIO", || "fio".into()),
        qemu_img: env_or(a.qemu_img, "QEMU_IMG", || "qemu-img".into()),
        qemu_io: env_or(a.qemu_io, "QEMU_IO", || "qemu-io".into()),
    };
    let dirs: Vec<(config::Device, PathBuf)> = devices
        .iter()
        .map(|&d| {
            let custom = match d {
                config::Device::Shm => a.shm_dir.clone(),
                config::Device::Disk => a.disk_dir.clone(),
            };
            (d, custom.unwrap_or_else(|| PathBuf::from(d.default_dir())))
        })
        .collect();
    let plan = runner::Plan {
        devices: dirs,
        modes,
        workloads,
        rounds: a.rounds.unwrap_or(preset.rounds),
        seconds,
        size,
        seed: a.seed,
        quring_fio: a.quring_fio,
        tools,
        dry_run: a.dry_run,
        preset: preset.name.to_string(),
    };
    let uses_bench = plan.workloads.iter().any(|w| plan.driver(w) == QuringDriver::Bench);
    let uses_plugin = plan.workloads.iter().any(|w| plan.driver(w) == QuringDriver::Fio);
    if plan.dry_run {
        println!(
            "# quring-bench dry run: preset {}, {} runs planned ({} measured rounds + 1 warm-up per cell; \
             sides run alternately quring, raw, QEMU)",
            plan.preset,
            plan.total_runs(),
            plan.rounds
        );
        println!(
            "# request counts (-c) shown are the warm-up's; measured rounds use the warm-up's IOPS x {} s",
            plan.seconds
        );
    } else {
        if uses_bench && !plan.tools.quring.is_file() {
            return Err(format!(
                "{} not found: run `cargo build --release` first (or pass --quring)",
                plan.tools.quring.display()
            ));
        }
        if uses_plugin && !plan.tools.plugin.is_file() {
            return Err(format!(
                "{} not found: run `cargo build --release` first (or pass --fio-plugin)",
                plan.tools.plugin.display()
            ));
        }
        for (d, p) in &plan.devices {
            if !p.is_dir() {
                return Err(format!("{} folder {} does not exist", d.name(), p.display()));
            }
        }
    }
    let out = a.out.clone();
    let started_unix = now_unix();
    let t0 = Instant::now();
    let tools_desc: BTreeMap<String, String> = if plan.dry_run {
        BTreeMap::new()
    } else {
        [
            ("fio".to_string(), machine::tool_version(&plan.tools.fio, "--version")),
            ("qemu-img".to_string(), machine::tool_version(&plan.tools.qemu_img, "--version")),
            (
                "quring".to_string(),
                format!(
                    "{} ({})",
                    machine::tool_version(&plan.tools.quring.display().to_string(), "--version"),
                    plan.tools.quring.display()
                ),
            ),
        ]
        .into()
    };
    let dir_refs: Vec<(String, &Path)> =
        plan.devices.iter().map(|(d, p)| (d.name().to_string(), p.as_path())).collect();
    let machine = machine::describe(&dir_refs, tools_desc);
    let mut notes = vec![format!(
        "Images are made by {} (the switch to `quring create` is plan::CREATE_WITH_QURING) and filled with \
         `qemu-io -c 'write -P 0x5a 0 SIZE'`; full images are shared by all runs of a mode, empty images \
         and overlays are made fresh for every run.",
        if plan::CREATE_WITH_QURING { "quring create" } else { "qemu-img create" }
    )];
    let fio_wls: Vec<&str> =
        plan.workloads.iter().filter(|w| plan.driver(w) == QuringDriver::Fio).map(|w| w.id).collect();
    notes.push(if fio_wls.is_empty() {
        "The quring side ran through `quring bench` in every workload.".to_string()
    } else {
        format!(
            "The quring side ran through fio + libquring_fio.so in: {} (the plugin may still run on its stand-in \
             engine); through `quring bench` elsewhere.",
            fio_wls.join(", ")
        )
    });
    let base = |records: &[RunRecord], skipped: &[Skip], dur: f64| Results {
        schema: SCHEMA.into(),
        command: command_line(),
        started_unix,
        duration_s: dur,
        machine: machine.clone(),
        config: plan.config(),
        patterns: plan.patterns(),
        skipped: skipped.to_vec(),
        notes: notes.clone(),
        runs: records.to_vec(),
    };
    let partial_out = out.clone().filter(|_| !plan.dry_run);
    let mut r = runner::Runner::new(
        &plan,
        Box::new(|records: &[RunRecord], skipped: &[Skip]| {
            if let Some(o) = &partial_out {
                let res = base(records, skipped, t0.elapsed().as_secs_f64());
                let _ = std::fs::create_dir_all(o);
                if let Ok(j) = serde_json::to_string_pretty(&res) {
                    let _ = std::fs::write(o.join("results.json"), j + "\n");
                }
            }
        }),
    );
    r.run();
    if plan.dry_run {
        return Ok(());
    }
    let records = std::mem::take(&mut r.records);
    let skipped = std::mem::take(&mut r.skipped);
    drop(r);
    let res = base(&records, &skipped, t0.elapsed().as_secs_f64());
    let out = out.ok_or("--out is required")?;
    write_outputs(&out, &res)?;
    let failed = res.runs.iter().filter(|r| r.error.is_some()).count();
    eprintln!(
        "quring-bench: {} runs ({} failed) in {:.0} s; wrote {}/results.json, report.md and charts",
        res.runs.len(),
        failed,
        res.duration_s,
        out.display()
    );
    Ok(())
}

fn ids<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(*a),
        Cmd::Report { dir } => std::fs::read_to_string(dir.join("results.json"))
            .map_err(|e| format!("{}/results.json: {e}", dir.display()))
            .and_then(|t| serde_json::from_str::<Results>(&t).map_err(|e| format!("results.json: {e}")))
            .and_then(|res| write_outputs(&dir, &res)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quring-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2x").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from(["quring-bench", "run", "--dry-run", "--modes", "standard,rc1"]).unwrap();
        let Cmd::Run(a) = c.cmd else { panic!() };
        assert_eq!(a.modes, vec!["standard", "rc1"]);
        assert!(Cli::try_parse_from(["quring-bench", "run"]).is_err(), "--out required without --dry-run");
    }
}
