//! The `quring` tool's option values and `quring io` command language, run on a small image.
#![no_main]

#[path = "../harness.rs"]
mod harness;

use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        dir.join(format!("quring-fuzz-cli-{}.qcow2", std::process::id()))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz_cli(data, scratch()));
