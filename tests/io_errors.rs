//! I/O error matrix (issue 7).
mod common;
mod crash_harness;
