#!/usr/bin/env bash
# The main job (README: "Run the main job"): a quick mode comparison through fio and the
# engine on temporary images on /dev/shm (quring-bench's quick preset): every mode
# (standard, subclusters, 1-bit refcounts, lazy refcounts, L2-less) against raw io_uring
# (fio) and QEMU's qcow2 driver (qemu-img bench), runs alternated, ratios pair by pair.
# Writes results.json, report.md and SVG charts into OUT (default: bench-out/quick-<time>).
#
#   scripts/main-job.sh [OUT] [extra quring-bench options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
OUT=${1:-bench-out/quick-$(date +%Y%m%d-%H%M%S)}
shift || true
cargo build --release --workspace >&2
target/release/quring-bench run --preset quick --out "$OUT" "$@"
echo "report: $OUT/report.md"
