//! Whole-image open + read + block_status + check on mutated image files.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz_image(data, harness::scratch("image")));
