//! `quring check`: qemu-img check's verdict, output and exit codes (0 clean, 1 could not
//! check, 2 corruptions, 3 leaks only). Metadata is read through io_uring with O_DIRECT.

use clap::Parser;
use quring::check::{FileMeta, check};
use quring::io::{ImageFile, SyncRing};

/// Arguments of `quring check`.
#[derive(Parser)]
pub struct Args {
    #[command(flatten)]
    a: crate::args::InspectArgs,
    /// Quiet: no output, only the exit code.
    #[arg(short = 'q')]
    quiet: bool,
}

pub fn run(Args { a, quiet }: Args) -> Result<u8, Box<dyn std::error::Error>> {
    let json = a.json();
    if crate::probe::resolve(&a.image, a.format.as_deref(), false)? == crate::probe::ImageFormat::Raw {
        eprintln!("quring: This image format does not support checks");
        return Ok(63);
    }
    let file = ImageFile::open(&a.image, false)?;
    let _lock = quring::io::lock::ImageLock::acquire(
        file.file(),
        &a.image,
        quring::io::lock::LockMode::ReadOnly,
        a.force_share,
    )?;
    let len = file.len()?;
    let ring = SyncRing::new()?;
    let r = FileMeta { ring: &ring, file: &file, len };
    // Progress on a terminal: checking a large image reads all of its metadata.
    let spinner = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
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
    if !quiet {
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
