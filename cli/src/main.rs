//! `quring`: qcow2 image tools on the quring engine, following qemu-img's conventions for
//! options, output and exit codes.

mod amend;
mod args;
mod backend_channel;
mod bench;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod convert_bitmaps;
mod convert_io;
mod create;
mod export_opts;
mod guest;
mod info;
mod io_cmd;
mod io_extra;
mod io_lang;
mod map;
mod measure;
mod nbd;
mod output;
mod probe;
mod progress;
mod qjson;
mod rebase;
mod resize;
mod serve;
mod serve_control;
mod snapshot;
mod util;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "quring", version, about = "qcow2 image tools on the quring io_uring engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new image (like `qemu-img create`).
    Create(create::Args),
    /// Check an image for consistency (like `qemu-img check`).
    Check(check::Args),
    /// Compare the guest contents of two images (like `qemu-img compare`).
    Compare(compare::Args),
    /// Show information about an image (like `qemu-img info`).
    Info(info::Args),
    /// Show the mapping of guest ranges to files (like `qemu-img map`).
    Map(map::Args),
    /// Measure the size a new image needs (like `qemu-img measure`).
    Measure(measure::Args),
    /// Convert an image to raw or qcow2 (like `qemu-img convert`).
    Convert(convert::Args),
    /// Run qemu-io style commands (read, write, discard, flush) on an image.
    Io(io_cmd::Args),
    /// Benchmark reads or writes (like `qemu-img bench`).
    Bench(bench::Args),
    /// Change the virtual size of an image (like `qemu-img resize`).
    Resize(resize::Args),
    /// Create, apply, delete or list internal snapshots (like `qemu-img snapshot`).
    Snapshot(snapshot::Args),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps (like
    /// `qemu-img bitmap`).
    Bitmap(bitmap::Args),
    /// Change format options of an image (like `qemu-img amend`).
    Amend(amend::Args),
    /// Change the backing file of an image (like `qemu-img rebase`).
    Rebase(rebase::Args),
    /// Write an image's data into its backing file (like `qemu-img commit`).
    Commit(commit::Args),
    /// Serve an image to a VMM (vhost-user-blk) or over NBD (like qemu-nbd).
    Serve(serve::Args),
}

fn main() -> ExitCode {
    // Like C tools: die quietly on a closed pipe (`quring map | head`) instead of panicking.
    // SAFETY: setting a signal disposition to SIG_DFL before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Usage errors exit 1, as qemu-img's do (clap's own default is 2); help and version 0.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return ExitCode::from(if usage { 1 } else { 0 });
        }
    };
    let r = match cli.cmd {
        Cmd::Check(a) => check::run(a),
        Cmd::Create(a) => create::run(a),
        Cmd::Compare(a) => compare::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Map(a) => map::run(a),
        Cmd::Measure(a) => measure::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Io(a) => io_cmd::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Resize(a) => resize::run(a),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Bitmap(a) => bitmap::run(a),
        Cmd::Amend(a) => amend::run(a),
        Cmd::Rebase(a) => rebase::run(a),
        Cmd::Commit(a) => commit::run(a),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("quring: {e}");
            ExitCode::from(1)
        }
    }
}
