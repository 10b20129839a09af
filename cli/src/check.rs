//! `quring check [-r leaks|all]`: qemu-img check's verdict, repairs, output and exit codes
//! (0 clean, 1 could not check, 2 corruptions, 3 leaks only). Metadata is read and written
//! through io_uring with O_DIRECT.

use clap::Parser;
use quring::check::{CheckReport, FileMeta, Fix, check, repair};
use quring::io::{ImageFile, SyncRing};

/// Arguments of `quring check`.
#[derive(Parser)]
pub struct Args {
    #[command(flatten)]
    a: crate::args::InspectArgs,
    /// Quiet: no output, only the exit code.
    #[arg(short = 'q')]
    quiet: bool,
    /// Repair: `leaks` (refcounts too high) or `all` (also refcounts too low, COPIED flags,
    /// broken refcount structures).
    #[arg(short = 'r', long = "repair", value_parser = parse_repair)]
    repair: Option<Fix>,
}

/// `-r`'s values, with qemu-img's message for anything else.
fn parse_repair(s: &str) -> Result<Fix, String> {
    match s {
        "leaks" => Ok(Fix::LEAKS),
        "all" => Ok(Fix::ALL),
        o => Err(format!("--repair (-r) expects 'leaks' or 'all' not '{o}'")),
    }
}

/// Prints a report's problem lines on stderr, as qemu-img does while it checks.
fn print_lines(rep: &CheckReport) {
    for m in &rep.messages {
        eprintln!("{m}");
    }
    if let Some(l) = rep.omitted_line() {
        eprintln!("{l}");
    }
}

pub fn run(Args { a, quiet, repair: fix }: Args) -> Result<u8, Box<dyn std::error::Error>> {
    if let Some(fix) = fix {
        return run_repair(a, quiet, fix);
    }
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
    if let Err(e) = data_file_opens(&a.image) {
        eprintln!("quring: Could not open '{}': {e}", a.image.display());
        return Ok(1);
    }
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
    // The problem lines go to stderr even with -q (qemu-img prints them as it checks).
    print_lines(&report);
    if !quiet {
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

/// `check -r`: repair, then (when something was repaired) check again and report that.
fn run_repair(a: crate::args::InspectArgs, quiet: bool, fix: Fix) -> Result<u8, Box<dyn std::error::Error>> {
    let json = a.json();
    if crate::probe::resolve(&a.image, a.format.as_deref(), true)? == crate::probe::ImageFormat::Raw {
        eprintln!("quring: This image format does not support checks");
        return Ok(63);
    }
    if a.force_share {
        eprintln!(
            "quring: Could not open '{}': force-share=on can only be used with read-only images",
            a.image.display()
        );
        return Ok(1);
    }
    let file = ImageFile::open(&a.image, true)?;
    let _lock =
        quring::io::lock::ImageLock::acquire(file.file(), &a.image, quring::io::lock::LockMode::ReadWrite, false)?;
    let ring = SyncRing::new()?;
    let failed = |e: String| {
        eprintln!("quring: Check failed: {e}");
        Ok(1)
    };
    let outcome = match repair(&ring, &file, fix) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("quring: Could not open '{}': {e}", a.image.display());
            return Ok(1);
        }
    };
    print_lines(&outcome.report);
    if let Some(e) = outcome.failed {
        return failed(e);
    }
    let mut report = outcome.report;
    if report.corruptions_fixed > 0 || report.leaks_fixed > 0 {
        if !quiet && !json {
            print!("{}", report.repaired_human());
        }
        let r = FileMeta { ring: &ring, file: &file, len: file.len()? };
        let again = match check(&r) {
            Ok(rep) => rep,
            Err(e) => return failed(e.to_string()),
        };
        print_lines(&again);
        report = CheckReport { corruptions_fixed: report.corruptions_fixed, leaks_fixed: report.leaks_fixed, ..again };
    }
    if !quiet {
        if json {
            print!("{}", report.to_json(&a.image.display().to_string()));
        } else {
            print!("{}", report.summary_human());
        }
    }
    if report.check_errors > 0 {
        eprintln!("quring: Check failed");
    }
    Ok(report.exit_code() as u8)
}

/// Like qemu-img, which opens the image (and so its external data file) before checking it:
/// an image whose data file cannot be opened is not checked. Problems of the header itself
/// are left to the check, which names them.
fn data_file_opens(image: &std::path::Path) -> Result<(), String> {
    use std::io::Read;
    let mut buf = Vec::new();
    let Ok(f) = std::fs::File::open(image) else { return Ok(()) };
    let Ok(len) = f.metadata().map(|m| m.len()) else { return Ok(()) };
    if f.take(2 << 20).read_to_end(&mut buf).is_err() {
        return Ok(());
    }
    let Ok(h) = quring::format::header::Header::parse(&buf, len) else { return Ok(()) };
    if !h.has_data_file() {
        return Ok(());
    }
    match h.data_file() {
        Ok(Some(name)) => {
            std::fs::File::open(&name).map(drop).map_err(|e| format!("Could not open data file '{name}': {e}"))
        }
        // The bit without a name (`amend -o data_file=`): QEMU needs the data file given
        // another way and does not open the image.
        Ok(None) => Err("'data-file' is required for this image".into()),
        Err(_) => Ok(()),
    }
}
