//! L2 entries and subcluster bitmaps, refcount blocks at every order, the snapshot table,
//! and deflate/zstd cluster decompression.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::fuzz_decode(data));
