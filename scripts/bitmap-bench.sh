#!/usr/bin/env bash
# Issue 17, acceptance 4: the cost of an enabled persistent dirty bitmap on the write path.
# 4k random writes QD32 through the fio plugin on two copies of one preallocated image on
# /dev/shm (writes land on allocated clusters, so the bitmap's bit setting is the only
# difference), one with an enabled bitmap (qemu-img bitmap --add, 64 KiB granularity) and
# one without, with 1 and 4 jobs (4 queues on one shared Image), alternated ROUNDS times in
# one run. Prints one line per round and the median ratio with/without per job count.
#
#   scripts/bitmap-bench.sh [ROUNDS] [RUNTIME_S] [SIZE]
#   (needs target/release/libquring_fio.so: cargo build --release -p quring-fio)
set -euo pipefail
ROUNDS=${1:-5}; RUNTIME=${2:-5}; SIZE=${3:-1G}
PLUGIN=${PLUGIN:-$PWD/target/release/libquring_fio.so}
[ -f "$PLUGIN" ] || { echo "no $PLUGIN (cargo build --release -p quring-fio)" >&2; exit 2; }
D=$(mktemp -d /dev/shm/quring-bmbench.XXXXXX)
trap 'rm -rf "$D"' EXIT
qemu-img create -q -f qcow2 -o preallocation=metadata "$D/plain.qcow2" "$SIZE"
qemu-io -c "write -P 0x5a 0 $SIZE" "$D/plain.qcow2" >/dev/null
cp "$D/plain.qcow2" "$D/bitmap.qcow2"
qemu-img bitmap --add "$D/bitmap.qcow2" b

# Summed write IOPS of one fio run on image $1 with $2 jobs.
run_fio() {
    fio --name=w --ioengine=external:"$PLUGIN" --filename="$1" --thread --group_reporting \
        --rw=randwrite --bs=4k --iodepth=32 --direct=1 --numjobs="$2" --time_based \
        --runtime="$RUNTIME" --ramp_time=1 --norandommap --randrepeat=0 --size=100% \
        --output-format=json --output="$D/fio.json" >/dev/null 2>&1
    python3 -c 'import json,sys; t=open(sys.argv[1]).read(); d=json.loads(t[t.index("{"):]) if not t.startswith("{") else json.loads(t); print(int(sum(j["write"]["iops"] for j in d["jobs"])))' "$D/fio.json"
}

declare -A ratios
for r in $(seq 1 "$ROUNDS"); do
    for jobs in 1 4; do
        # Alternate which side runs first.
        if (( r % 2 )); then
            with=$(run_fio "$D/bitmap.qcow2" "$jobs"); without=$(run_fio "$D/plain.qcow2" "$jobs")
        else
            without=$(run_fio "$D/plain.qcow2" "$jobs"); with=$(run_fio "$D/bitmap.qcow2" "$jobs")
        fi
        ratio=$(python3 -c "print(f'{$with/$without:.3f}')")
        ratios[$jobs]="${ratios[$jobs]:-} $ratio"
        echo "round $r jobs $jobs with-bitmap $with without $without ratio $ratio"
    done
done
for jobs in 1 4; do
    echo "jobs $jobs median ratio $(echo ${ratios[$jobs]} | tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')"
done
# The bitmap image is left consistent with the writes recorded.
qemu-img check -q "$D/bitmap.qcow2"
qemu-img info "$D/bitmap.qcow2" | grep -A3 'bitmaps:' | grep -q 'name: b'
