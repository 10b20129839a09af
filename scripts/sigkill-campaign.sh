#!/usr/bin/env bash
# Long real-process crash campaign: fio through the quring plugin, killed with SIGKILL at
# seeded points of its write stream, then qemu-img check and fio's verify of every write
# the engine promised (tests/sigkill.rs, `sigkill_states`). Prints the totals; stops at the
# first violation with the seed to reproduce it:
#   QURING_SIGKILL_SEED=<seed> QURING_SIGKILL_KILLS=1 cargo test -p quring-tests --test sigkill -- --nocapture sigkill_states
#
#   scripts/sigkill-campaign.sh [KILLS]             # default 500 kill states, release build
#   SEED_BASE=5000 scripts/sigkill-campaign.sh 2000
#   PROFILE=debug scripts/sigkill-campaign.sh 200   # the suite's debug build (no release build)
#   KEEP_GOING=1 VERBOSE=1 scripts/sigkill-campaign.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
KILLS=${1:-${QURING_SIGKILL_KILLS:-500}}
SEED_BASE=${SEED_BASE:-$(( $(date +%s) % 1000000 * 1000 ))}
PROFILE=${PROFILE:-release}
case "$PROFILE" in
    release) flag=(--release) ;;
    debug) flag=() ;;
    *) echo "PROFILE must be release or debug" >&2; exit 2 ;;
esac
cargo build "${flag[@]}" -p quring-fio -p quring-cli
echo "sigkill campaign: $KILLS kill states, seeds from $SEED_BASE, $PROFILE build" >&2
env QURING_FIO="$PWD/target/$PROFILE/libquring_fio.so" QURING_SIGKILL_KILLS="$KILLS" \
    QURING_SIGKILL_SEED="$SEED_BASE" ${KEEP_GOING:+QURING_SIGKILL_KEEP_GOING=1} \
    ${VERBOSE:+QURING_SIGKILL_VERBOSE=1} \
    cargo test "${flag[@]}" -p quring-tests --test sigkill -- --nocapture --exact sigkill_states
