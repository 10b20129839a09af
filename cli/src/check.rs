//! `quring check`: qemu-img check's verdict, output and exit codes (0 clean, 1 could not
//! check, 2 corruptions, 3 leaks only). Metadata is read through io_uring with O_DIRECT.

use clap::Parser;
use quring::check::{MetaRead, check};
use quring::io::{ImageFile, SyncRing};
use std::path::PathBuf;

/// Arguments of `quring check`.
#[derive(Parser)]
pub struct Args {
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Image format (only qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Force share.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet: no output, only the exit code.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    image: PathBuf,
}

struct Reader {
    file: ImageFile,
    ring: SyncRing,
    len: u64,
}

impl MetaRead for Reader {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> quring::Result<usize> {
        if off >= self.len {
            return Ok(0);
        }
        let (data, valid) = self.ring.read(self.file.fd(), off, buf.len())?;
        buf.copy_from_slice(&data);
        Ok(valid)
    }

    fn len(&self) -> u64 {
        self.len
    }
}

pub fn run(a: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let json = match a.output.as_str() {
        "json" => true,
        "human" => false,
        o => return Err(format!("--output must be 'human' or 'json', not '{o}'").into()),
    };
    let file = ImageFile::open(&a.image, false)?;
    let _lock = quring::io::lock::ImageLock::acquire(
        file.file(),
        &a.image,
        quring::io::lock::LockMode::ReadOnly,
        a.force_share,
    )?;
    let len = file.len()?;
    let r = Reader { file, ring: SyncRing::new()?, len };
    // Progress on a terminal: checking a large image reads all of its metadata.
    let spinner = (!a.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(format!("checking {} ({} metadata)", a.image.display(), crate::util::human_size(len)));
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    });
    let result = check(&r);
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    let report = match result {
        Ok(rep) => rep,
        Err(e) => {
            eprintln!("quring: Could not open '{}': {e}", a.image.display());
            return Ok(1);
        }
    };
    if !a.quiet {
        for m in &report.messages {
            eprintln!("{m}");
        }
        if let Some(l) = report.omitted_line() {
            eprintln!("{l}");
        }
        if json {
            print!("{}", report.to_json(&a.image.display().to_string()));
        } else {
            print!("{}", report.summary_human());
        }
        if report.exit_code() != 0 {
            // Say also why the engine itself would refuse the image, when it would.
            let ro = quring::image::Options { read_only: true, ..Default::default() };
            if let Err(e) = quring::image::Image::open(&a.image, &ro) {
                eprintln!("quring: the image cannot be opened for I/O: {e}");
            }
        }
        if report.check_errors > 0 {
            eprintln!("Check failed");
        }
    }
    Ok(report.exit_code() as u8)
}
