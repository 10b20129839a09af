//! quring's integration tests live in this package's `[[test]]` targets; the library part is
//! empty (the shared helpers are in `common/`, included by each test with `mod common;`).
