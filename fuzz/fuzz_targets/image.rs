//! Whole-image open + read + block_status + check on mutated image files.
#![no_main]

#[path = "../harness.rs"]
mod harness;

use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        dir.join(format!("quring-fuzz-{}.qcow2", std::process::id()))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz_image(data, scratch()));
