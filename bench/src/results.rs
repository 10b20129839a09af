//! `results.json`: every run with its command line, plus what is needed to render the report
//! again (`quring-bench report DIR`).

use crate::config::Side;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const SCHEMA: &str = "quring-bench/1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub schema: String,
    /// The command line that produced this file.
    pub command: String,
    pub started_unix: u64,
    pub duration_s: f64,
    pub machine: Machine,
    pub config: RunConfig,
    /// Which offsets each side visits, per workload.
    pub patterns: Vec<PatternNote>,
    /// Modes not run, and why.
    pub skipped: Vec<Skip>,
    /// Free-form notes (baseline caveats, driver choices).
    pub notes: Vec<String>,
    pub runs: Vec<RunRecord>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub nproc: usize,
    pub memory: String,
    pub kernel: String,
    /// device name -> "DIR (fstype)"
    pub test_dirs: BTreeMap<String, String>,
    pub tools: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunConfig {
    pub preset: String,
    pub devices: Vec<String>,
    pub modes: Vec<String>,
    pub workloads: Vec<String>,
    pub rounds: u32,
    pub seconds: f64,
    pub image_size: u64,
    pub seed: u64,
    /// Workloads whose quring side runs through fio and the plugin (the rest use `quring bench`).
    pub quring_fio_workloads: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PatternNote {
    pub workload: String,
    pub side: Side,
    pub pattern: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Skip {
    pub device: String,
    pub mode: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub device: String,
    pub mode: String,
    pub workload: String,
    pub side: Option<Side>,
    /// "quring bench", "fio+quring plugin", "fio io_uring", "qemu-img bench"
    pub driver: String,
    /// 0 is the warm-up run (discarded), then 1..=rounds.
    pub round: u32,
    pub warmup: bool,
    /// The exact command line (shell-quoted).
    pub command: String,
    /// Requests issued (count-based drivers).
    pub count: Option<u64>,
    pub iops: Option<f64>,
    pub lat_p50_us: Option<f64>,
    pub lat_p99_us: Option<f64>,
    pub lat_p999_us: Option<f64>,
    pub counters: Option<BTreeMap<String, u64>>,
    /// Wall time of the command.
    pub elapsed_s: f64,
    /// Set when the run failed: the tool's message.
    pub error: Option<String>,
}
