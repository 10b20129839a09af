#!/usr/bin/env bash
# Long differential campaign (issue 12): generated qemu-io command streams applied by
# `quring io` (release build) and by `qemu-io` to copies of one starting image, compared
# with `qemu-img compare` and checked with `qemu-img check` at every reopen and at the
# end, for consecutive seeds across the whole matrix (every cluster size 512 B .. 2 MiB,
# with and without extended L2, refcount widths, v2/v3, lazy refcounts, backing files,
# snapshots, compressed and zero clusters; see tests/differential/generator.rs).
#
#   scripts/diff-campaign.sh [MINUTES]     # default 15; resumes where the last run stopped
#   RESET=1 scripts/diff-campaign.sh 30    # forget the totals and start at SEED_BASE (0)
#   scripts/diff-campaign.sh --seed N      # replay one seed (report and minimized commands)
#
# State (next seed, total minutes, plans, operations, failures) is kept in
# $QURING_DIFF_DIR/state (default target/diff-campaign), updated after every plan, so
# several shorter runs add up and an interrupted run loses at most one plan. Failures go
# to $QURING_DIFF_DIR/failures.log with their seed, configuration and a minimized,
# self-contained shell script that reproduces them.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${QURING_DIFF_DIR:-target/diff-campaign}
mkdir -p "$DIR"
# Absolute: cargo runs the campaign binary in engine/.
DIR=$(cd "$DIR" && pwd)
# The campaign runs the release `quring` binary (found next to the test executable).
cargo build --release -p quring-cli -p quring-tests --bins --test diff_campaign >&2
if [[ "${1:-}" == "--seed" ]]; then
    exec cargo test --release -p quring-tests --test diff_campaign -- --seed "$2" --minimize-secs "${MINIMIZE_SECS:-600}"
fi
MINUTES=${1:-15}
if [[ -n "${RESET:-}" ]]; then
    rm -f "$DIR/state"
fi
echo "differential campaign: $MINUTES minutes, state in $DIR/state, failures in $DIR/failures.log" >&2
status=0
cargo test --release -p quring-tests --test diff_campaign -- --minutes "$MINUTES" --state "$DIR/state" \
    --log "$DIR/failures.log" --seed-base "${SEED_BASE:-0}" --minimize-secs "${MINIMIZE_SECS:-600}" || status=$?
if [[ $status -ne 0 ]]; then
    echo "failures in this run: see $DIR/failures.log" >&2
fi
exit $status
