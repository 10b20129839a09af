#!/usr/bin/env bash
# Multi-queue model campaign (issue 12): runs tests/mq_model.rs's generator in release mode
# with fresh seeds over 2, 4 and 8 queues (every image configuration of the matrix, picked
# per seed) for MINUTES minutes in total, in chunks, giving each chunk to the queue count
# with the least time so far. Resumable: the totals and the next seed live in a state file,
# so runs add up across invocations. Every run's line (seed, queues, configuration, batches,
# ops) goes to the log; a violation stops the campaign, keeps the test's whole output and
# exits 1 (the output names the seed and the replay command).
#
#   scripts/mq-campaign.sh [MINUTES]            # default 45
#   CHUNK_MINUTES=5 MQ_DIR=target/mq-campaign scripts/mq-campaign.sh 30
#   scripts/mq-campaign.sh --status             # print the totals
#   MQ_BIN=target/release/deps/mq_model-<hash> scripts/mq-campaign.sh 10   # a prebuilt binary
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${MQ_DIR:-target/mq-campaign}
STATE=$DIR/state
LOG=$DIR/runs.log
CHUNK=${CHUNK_MINUTES:-5}
mkdir -p "$DIR"
if [[ ! -f $STATE ]]; then
    {
        echo "next_seed $(( $(date +%s) % 100000 * 100000 ))"
        for q in 2 4 8; do echo "queues $q secs 0 runs 0 ops 0"; done
        echo "violations 0"
    } >"$STATE"
fi

status() {
    awk '/^queues/ { printf "%d queues: %.1f min, %d runs, %d ops\n", $2, $4 / 60, $6, $8; s += $4; r += $6; o += $8 }
         /^next_seed/ { n = $2 } /^violations/ { v = $2 }
         END { printf "total: %.1f min, %d runs, %d ops, %d violations; next seed %s\n", s / 60, r, o, v, n }' "$STATE"
}
if [[ ${1:-} == --status ]]; then
    status
    exit 0
fi
MINUTES=${1:-45}
budget=$(( MINUTES * 60 ))
# One build for the whole invocation: the chunks run this binary (edits made meanwhile do not
# change the campaign under way).
# MQ_BIN=<path> runs a test binary built before instead.
bin=${MQ_BIN:-}
[[ -n $bin ]] || bin=$(cargo test --release -p quring-tests --test mq_model --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[[ -x $bin ]] || { echo "mq-campaign: building the mq_model test failed" >&2; exit 1; }
echo "mq-campaign: $bin ($(git rev-parse --short HEAD)$(git diff --quiet HEAD -- engine tests || echo '+changes'))" | tee -a "$LOG" >&2
start=$(date +%s)
while :; do
    left=$(( budget - ($(date +%s) - start) ))
    (( left >= 30 )) || break
    secs=$(( CHUNK * 60 < left ? CHUNK * 60 : left ))
    q=$(awk '/^queues/ { print $4, $2 }' "$STATE" | sort -n | head -1 | cut -d' ' -f2)
    seed=$(awk '/^next_seed/ { print $2 }' "$STATE")
    out=$DIR/chunk.out
    echo "$(date -u +%FT%TZ) chunk: $q queues, $secs s, seeds from $seed" | tee -a "$LOG" >&2
    t0=$(date +%s)
    set +e
    QURING_MQ_SEED=$seed QURING_MQ_QUEUES=$q QURING_MQ_SECS=$secs \
        "$bin" --nocapture --test-threads 1 >"$out" 2>&1
    rc=$?
    set -e
    took=$(( $(date +%s) - t0 ))
    # (libtest prints "test model ... " in front of the first line.)
    sed -n 's/.*\(mq-run .*\)/\1/p' "$out" >"$out.runs"
    cat "$out.runs" >>"$LOG"
    runs=$(wc -l <"$out.runs")
    ops=$(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^ops=/) { split($i, a, "="); s += a[2] } } END { print s + 0 }' "$out.runs")
    # The seeds of this chunk are used up (a failing run's seed included).
    next=$(( seed + runs + (rc != 0 ? 1 : 0) ))
    awk -v q="$q" -v t="$took" -v r="$runs" -v o="$ops" -v n="$next" -v bad=$(( rc != 0 )) '
        /^next_seed/ { $2 = n } /^violations/ { $2 += bad }
        /^queues/ && $2 == q { $4 += t; $6 += r; $8 += o } { print }' "$STATE" >"$STATE.tmp"
    mv "$STATE.tmp" "$STATE"
    if (( rc != 0 )); then
        keep=$DIR/violation-q$q-seed$(( seed + runs )).out
        cp "$out" "$keep"
        echo "VIOLATION ($q queues, seed $(( seed + runs ))): see $keep" | tee -a "$LOG" >&2
        grep -E 'panicked|replay|violation|audit|holds|got ' "$out" | head -20 >&2
        status >&2
        exit 1
    fi
done
status
