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

/// Options of the commands that open a chain: `-o backing-identity=check|ignore` and
/// `--backing-search DIR` (repeatable), applied to the library's [`Options`].
#[derive(ClapArgs, Clone, Debug, Default)]
pub struct ChainArgs {
    /// Open options: backing-identity=check|ignore (compare backing GUIDs, quring's
    /// identity extension).
    #[arg(short = 'o')]
    pub open_options: Vec<String>,
    /// Directory where a missing or replaced backing file is looked for by GUID
    /// (repeatable).
    #[arg(long = "backing-search")]
    pub backing_search: Vec<std::path::PathBuf>,
}

impl ChainArgs {
    /// Applies them to `o`.
    pub fn apply(&self, o: &mut quring::image::Options) -> Result<(), String> {
        for (k, v) in crate::util::parse_opts(&self.open_options)? {
            match (k.as_str(), v.as_str()) {
                ("backing-identity", "check") => o.backing_identity = quring::image::IdentityPolicy::Check,
                ("backing-identity", "ignore") => o.backing_identity = quring::image::IdentityPolicy::Ignore,
                ("backing-identity", v) => {
                    return Err(format!("Parameter 'backing-identity' expects 'check' or 'ignore', not '{v}'"));
                }
                (k, _) => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        o.backing_search = self.backing_search.clone();
        Ok(())
    }
}
