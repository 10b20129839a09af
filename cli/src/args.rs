//! clap argument groups shared by several commands.

use clap::Args as ClapArgs;
use std::path::PathBuf;

/// `--output=human|json`, as qemu-img spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Text for people.
    Human,
    /// qemu-img's JSON.
    Json,
}

/// Parses `--output` with qemu-img's message for a bad value.
pub fn parse_output(s: &str) -> Result<OutputFormat, String> {
    match s {
        "human" => Ok(OutputFormat::Human),
        "json" => Ok(OutputFormat::Json),
        o => Err(format!("--output expects 'human' or 'json' not '{o}'")),
    }
}

/// The arguments every inspecting command (`info`, `map`, `check`) takes, as qemu-img names
/// them.
#[derive(ClapArgs)]
pub struct InspectArgs {
    /// Output format: human or json.
    #[arg(long = "output", value_parser = parse_output, default_value = "human")]
    pub output: OutputFormat,
    /// Image format (only qcow2).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Force share: open the image even when another process writes it (no write lock is
    /// ever taken for inspection; with -U a reader's lock is not taken either).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub image: PathBuf,
}

impl InspectArgs {
    /// Is JSON output wanted?
    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }
}
