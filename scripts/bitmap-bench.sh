#!/usr/bin/env bash
# Issue 17, acceptance 4: the cost of an enabled persistent dirty bitmap on the write path.
# 4k random writes QD32 through the fio plugin on two copies of one preallocated image on
# /dev/shm (writes land on allocated clusters, so the bitmap's bit setting is the only
# difference), one with an enabled bitmap (qemu-img bitmap --add, 64 KiB granularity) and
# one without, with 1 and 4 jobs (4 queues on one shared Image), alternated ROUNDS times in
# one run. Prints one line per round (IOPS, and fio's CPU time per write, which a busy shared
# machine disturbs less) and the median ratios with/without per job count.
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

# One fio run on image $1 with $2 jobs: "IOPS CPU_US_PER_WRITE" (summed write IOPS; the
# CPU time fio used, user and system, per write: steadier than IOPS on a shared machine).
run_fio() {
    python3 - "$PLUGIN" "$1" "$2" "$RUNTIME" "$D/fio.json" <<'PY'
import json, resource, subprocess, sys
plugin, img, jobs, runtime, out = sys.argv[1:]
subprocess.run(["fio", "--name=w", f"--ioengine=external:{plugin}", f"--filename={img}", "--thread",
    "--group_reporting", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--direct=1", f"--numjobs={jobs}",
    "--time_based", f"--runtime={runtime}", "--norandommap", "--randrepeat=0", "--size=100%",
    "--output-format=json", f"--output={out}"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
t = open(out).read()
d = json.loads(t[t.index("\n{") + 1:] if not t.startswith("{") else t)
ios = sum(j["write"]["total_ios"] for j in d["jobs"])
iops = sum(j["write"]["iops"] for j in d["jobs"])
print(int(iops), f"{(ru.ru_utime + ru.ru_stime) * 1e6 / ios:.2f}")
PY
}

declare -A ratios cpus
for r in $(seq 1 "$ROUNDS"); do
    for jobs in 1 4; do
        # Alternate which side runs first.
        if (( r % 2 )); then
            with=$(run_fio "$D/bitmap.qcow2" "$jobs"); without=$(run_fio "$D/plain.qcow2" "$jobs")
        else
            without=$(run_fio "$D/plain.qcow2" "$jobs"); with=$(run_fio "$D/bitmap.qcow2" "$jobs")
        fi
        read -r wi wc <<<"$with"; read -r oi oc <<<"$without"
        ratio=$(python3 -c "print(f'{$wi/$oi:.3f}')"); cpu=$(python3 -c "print(f'{$wc/$oc:.3f}')")
        ratios[$jobs]="${ratios[$jobs]:-} $ratio"; cpus[$jobs]="${cpus[$jobs]:-} $cpu"
        echo "round $r jobs $jobs with-bitmap ${wi} IOPS ${wc} us-cpu/write, without ${oi} IOPS ${oc} us-cpu/write: IOPS ratio $ratio, CPU ratio $cpu"
    done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
for jobs in 1 4; do
    echo "jobs $jobs: median IOPS ratio (with/without) $(echo "${ratios[$jobs]}" | median), median CPU-per-write ratio $(echo "${cpus[$jobs]}" | median)"
done
# The bitmap image is left consistent with the writes recorded.
qemu-img check -q "$D/bitmap.qcow2"
qemu-img info "$D/bitmap.qcow2" | grep -A3 'bitmaps:' | grep -q 'name: b'
