#!/usr/bin/env bash
# Long crash-consistency campaign (issue 7): the `crash` test in release mode over many seeded
# workloads. Prints the number of crash states checked; exits non-zero on a violation (the
# message names the seed, the crash point, the applied subset and the violation; reproduce
# with QURING_CRASH_SEED=<seed> cargo test --test crash -- --nocapture).
#
#   scripts/crash-campaign.sh [STATES]          # default 20000 states
#   SEED_BASE=1000 PER_WORKLOAD=20 scripts/crash-campaign.sh 50000
#   KEEP_GOING=1 scripts/crash-campaign.sh      # list every violating seed instead of stopping
set -euo pipefail
cd "$(dirname "$0")/.."
STATES=${1:-${QURING_CRASH_STATES:-20000}}
SEED_BASE=${SEED_BASE:-$(( $(date +%s) % 1000000 * 1000 ))}
PER_WORKLOAD=${PER_WORKLOAD:-20}
echo "crash campaign: $STATES states, seeds from $SEED_BASE, $PER_WORKLOAD states per workload" >&2
cargo build --release -p quring-cli -p quring-fio
env QURING_CRASH_STATES="$STATES" QURING_CRASH_SEED_BASE="$SEED_BASE" QURING_CRASH_PER_WORKLOAD="$PER_WORKLOAD" \
    ${KEEP_GOING:+QURING_CRASH_KEEP_GOING=1} \
    cargo test --release -p quring-tests --test crash -- --nocapture --test-threads 1 crash_states
