//! The `quring` tool's option values and `quring io` command language, run on a small image.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz_cli(data, harness::scratch("cli")));
