#!/usr/bin/env bash
# Cache pressure benchmark (issue 14, acceptance 1): 4k random reads QD32 through the fio
# plugin on a fully mapped image whose L2 tables are far larger than the L2 cache
# (l2_cache_size=256k), 1, 8 and 16 jobs (each job its own queue, --thread), against fio's
# io_uring engine on a raw file of the same size with 8 jobs. Rounds alternate the runs;
# medians and the ratios the issue asks for are printed (and appended to $OUT).
#
#   scripts/cache-pressure.sh                      # 8 GiB images on /dev/shm, 3 rounds
#   SIZE=8G ROUNDS=5 RUNTIME=5 scripts/cache-pressure.sh
#   PLUGIN=/path/to/libquring_fio.so LABEL=before scripts/cache-pressure.sh
#   KINDS="std xl2 c4k" scripts/cache-pressure.sh  # standard 64 KiB, extended L2, 4 KiB clusters
#
# The images are created with preallocation=metadata (every cluster mapped, the data a
# sparse hole on tmpfs) and the raw file sparse, so both sides read holes: what is measured
# is the engine's metadata path, not memory bandwidth.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh >&2
SIZE=${SIZE:-8G}
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-4}
DIR=${DIR:-/dev/shm/quring-cache-pressure}
KINDS=${KINDS:-std}
JOBS=${JOBS:-"1 8 16"}
CACHE=${CACHE:-256k}
LABEL=${LABEL:-$(git rev-parse --short HEAD)}
OUT=${OUT:-target/cache-pressure.txt}
if [[ -z ${PLUGIN:-} ]]; then
    cargo build --release -p quring-fio >&2
    PLUGIN=$PWD/target/release/libquring_fio.so
fi
mkdir -p "$DIR" "$(dirname "$OUT")"
trap 'rm -rf "$DIR"' EXIT

raw=$DIR/raw.img
rm -f "$raw"
truncate -s "$SIZE" "$raw"

# fio with N jobs; prints the summed read IOPS (group_reporting).
run_fio() {
    local file=$1 jobs=$2; shift 2
    fio --name=r --filename="$file" --rw=randread --bs=4k --iodepth=32 --direct=1 \
        --numjobs="$jobs" --thread --group_reporting --time_based --runtime="$RUNTIME" \
        --ramp_time=1 --size="$SIZE" --norandommap --randrepeat=0 --output-format=json \
        --output="$DIR/fio.json" "$@" >/dev/null 2>&1
    # The plugin's counters (fio's log) come before the JSON in the output file.
    python3 -c 'import json,sys; t=open(sys.argv[1]).read(); d=json.loads(t[t.index("\n{") + 1 if not t.startswith("{") else 0:]); print(int(sum(j["read"]["iops"] for j in d["jobs"])))' "$DIR/fio.json"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

for kind in $KINDS; do
    img=$DIR/$kind.qcow2
    case $kind in
        std) opts=cluster_size=65536 ;;
        xl2) opts=cluster_size=65536,extended_l2=on ;;
        c4k) opts=cluster_size=4096 ;;
        *) echo "unknown kind $kind" >&2; exit 2 ;;
    esac
    qemu-img create -q -f qcow2 -o "$opts,preallocation=metadata" "$img" "$SIZE"
    declare -A res=()
    for ((r = 1; r <= ROUNDS; r++)); do
        for j in $JOBS; do
            v=$(run_fio "$img" "$j" --ioengine="external:$PLUGIN" --l2_cache_size="$CACHE")
            res[q$j]+="$v "
            echo "round $r $kind quring $j jobs: $v" >&2
        done
        v=$(run_fio "$raw" 8 --ioengine=io_uring)
        res[raw8]+="$v "
        echo "round $r raw io_uring 8 jobs: $v" >&2
    done
    {
        echo "== $LABEL $kind size=$SIZE l2_cache_size=$CACHE rounds=$ROUNDS runtime=${RUNTIME}s ($(date -u +%FT%TZ))"
        declare -A med=()
        for k in "${!res[@]}"; do
            med[$k]=$(tr ' ' '\n' <<<"${res[$k]}" | grep . | median)
        done
        for j in $JOBS; do echo "quring $j jobs: ${med[q$j]} IOPS (rounds: ${res[q$j]})"; done
        echo "raw io_uring 8 jobs: ${med[raw8]} IOPS (rounds: ${res[raw8]})"
        python3 - "${med[q1]:-0}" "${med[q8]:-0}" "${med[q16]:-0}" "${med[raw8]}" <<'EOF'
import sys
q1, q8, q16, raw = (float(x) for x in sys.argv[1:])
def r(a, b): return f"{a / b:.2f}x" if b else "n/a"
print(f"8 jobs / 1 job: {r(q8, q1)} (goal >= 1.0)  16 jobs / 8 jobs: {r(q16, q8)} (goal >= 1.0)  8 jobs / raw 8 jobs: {r(q8, raw)} (goal >= 0.4)")
EOF
    } | tee -a "$OUT"
    rm -f "$img"
done
