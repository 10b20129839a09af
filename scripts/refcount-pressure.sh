#!/usr/bin/env bash
# Refcount pressure benchmark (issue 14, acceptance 2): first-touch 4k random writes QD32
# through the fio plugin into an empty 64 GiB image (64 KiB clusters) with
# refcount_cache_size=16k, 1 job against 8 jobs (each job its own queue, --thread). Every
# run gets a fresh image (first touch), rounds alternate 1 and 8 jobs; medians, the ratio
# of the medians and the median of the round-by-round ratios are printed (and appended to
# $OUT) with the load average before and after, since the machine may be shared.
#
#   scripts/refcount-pressure.sh                         # /dev/shm, 5 rounds of 4 s
#   DIR=/var/tmp/quring-rc ROUNDS=3 scripts/refcount-pressure.sh
#   PLUGIN=/path/to/libquring_fio.so LABEL=before scripts/refcount-pressure.sh
#   CACHE=1M JOBS="1 4 8" scripts/refcount-pressure.sh
#
# A refcount block of a 64 KiB-cluster image covers 32768 clusters (2 GiB of the file with
# 16-bit refcounts); a 16k cache is below one block, so the queues' cluster reservations
# contend for the refcount cache: the regime measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh >&2
SIZE=${SIZE:-64G}
ROUNDS=${ROUNDS:-5}
RUNTIME=${RUNTIME:-4}
DIR=${DIR:-/dev/shm/quring-refcount-pressure}
JOBS=${JOBS:-"1 8"}
CACHE=${CACHE:-16k}
CLUSTER=${CLUSTER:-65536}
LABEL=${LABEL:-$(git rev-parse --short HEAD)}
OUT=${OUT:-target/refcount-pressure.txt}
if [[ -z ${PLUGIN:-} ]]; then
    cargo build --release -p quring-fio >&2
    PLUGIN=$PWD/target/release/libquring_fio.so
fi
mkdir -p "$DIR" "$(dirname "$OUT")"
trap 'rm -rf "$DIR"' EXIT
img=$DIR/rc.qcow2

# fio with N jobs on a fresh image; prints the summed write IOPS (group_reporting).
run_fio() {
    local jobs=$1
    rm -f "$img"
    qemu-img create -q -f qcow2 -o "cluster_size=$CLUSTER" "$img" "$SIZE"
    fio --name=w --filename="$img" --rw=randwrite --bs=4k --iodepth=32 --direct=1 \
        --numjobs="$jobs" --thread --group_reporting --time_based --runtime="$RUNTIME" \
        --size="$SIZE" --norandommap --randrepeat=0 --output-format=json \
        --output="$DIR/fio.json" --ioengine="external:$PLUGIN" \
        --refcount_cache_size="$CACHE" >/dev/null 2>&1
    # The plugin's counters (fio's log) come before the JSON in the output file.
    python3 -c 'import json,sys; t=open(sys.argv[1]).read(); d=json.loads(t[t.index("\n{") + 1 if not t.startswith("{") else 0:]); print(int(sum(j["write"]["iops"] for j in d["jobs"])))' "$DIR/fio.json"
    rm -f "$img"
}

median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A res=()
ratios=""
for ((r = 1; r <= ROUNDS; r++)); do
    declare -A this=()
    for j in $JOBS; do
        v=$(run_fio "$j")
        res[$j]+="$v "
        this[$j]=$v
        echo "round $r: $j jobs $v IOPS (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    done
    first=${JOBS%% *}
    last=${JOBS##* }
    ratios+="$(python3 -c "import sys; print(f'{int(sys.argv[2]) / max(1, int(sys.argv[1])):.3f}')" "${this[$first]}" "${this[$last]}") "
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
{
    echo "== $LABEL first-touch 4k randwrite QD32, size=$SIZE cluster=$CLUSTER refcount_cache_size=$CACHE dir=$DIR rounds=$ROUNDS runtime=${RUNTIME}s ($(date -u +%FT%TZ))"
    echo "load average before: $load_before, after: $load_after ($(nproc) CPUs)"
    declare -A med=()
    for j in $JOBS; do
        med[$j]=$(tr ' ' '\n' <<<"${res[$j]}" | grep . | median)
        echo "quring $j jobs: ${med[$j]} IOPS (rounds: ${res[$j]})"
    done
    first=${JOBS%% *}
    last=${JOBS##* }
    rmed=$(tr ' ' '\n' <<<"$ratios" | grep . | median)
    python3 - "${med[$first]}" "${med[$last]}" "$first" "$last" "$rmed" "$ratios" <<'EOF'
import sys
a, b = float(sys.argv[1]), float(sys.argv[2])
print(f"{sys.argv[4]} jobs / {sys.argv[3]} job: {b / a if a else 0:.2f}x of the medians, "
      f"{float(sys.argv[5]):.2f}x median of the round ratios ({sys.argv[6].strip()}) (goal >= 1.0)")
EOF
} | tee -a "$OUT"
