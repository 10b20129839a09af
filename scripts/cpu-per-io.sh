#!/usr/bin/env bash
# CPU time per request of one fio run (issue 14): fio under `perf stat -e task-clock`,
# which counts every thread of fio (the jobs, with --thread, and the io_uring io-wq workers
# that serve reads and writes of tmpfs files), divided by the requests fio completed.
# On a shared machine wall-clock IOPS swing; CPU per request is what to compare, old binary
# against new, alternated over several rounds. Prints "IOPS us/request".
#
#   scripts/cpu-per-io.sh read FILE JOBS ENGINE-ARGS...   # 4k randread QD32, 4 s
#   scripts/cpu-per-io.sh wt-alloc PLUGIN|raw JOBS [CREATE-OPTS]
#       # scripts/wt-alloc.py's workload on /dev/shm: 4k randwrite QD32 over a fresh 1 GiB
#       # image with cache=writethrough (or a fresh sparse raw file with O_DSYNC)
#
#   scripts/cpu-per-io.sh read /dev/shm/x.qcow2 8 --ioengine=external:$PWD/target/release/libquring_fio.so --l2_cache_size=256k
#   scripts/cpu-per-io.sh read /dev/shm/x.raw 8 --ioengine=io_uring
#   scripts/cpu-per-io.sh wt-alloc target/release/libquring_fio.so 4 cluster_size=65536,extended_l2=on
set -euo pipefail
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 2; }
mode=$1; shift
tmp=$(mktemp -d /dev/shm/cpu-per-io.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
case $mode in
    read)
        file=$1 jobs=$2; shift 2
        size=$(stat -c %s "$file")
        args=(--filename="$file" --rw=randread --direct=1 --numjobs="$jobs" --time_based --runtime="${RUNTIME:-4}"
              --size="$size" --norandommap --randrepeat=0 "$@") ;;
    wt-alloc)
        so=$1 jobs=$2 opts=${3:-cluster_size=65536}
        size=$((1 << 30)) per=$(( (1 << 30) / jobs ))
        if [[ $so == raw ]]; then
            f=$tmp/w.raw; truncate -s $size "$f"; eng=(--ioengine=io_uring --direct=1 --sync=dsync)
        else
            f=$tmp/w.qcow2; qemu-img create -q -f qcow2 -o "$opts" "$f" $size
            eng=(--ioengine=external:$(realpath "$so") --cache=writethrough)
        fi
        args=(--filename="$f" --rw=randwrite --numjobs="$jobs" --size=$per --offset_increment=$per --randrepeat=1
              --randseed=7 --clocksource=cpu --runtime=3 "${eng[@]}") ;;
    *) echo "mode: read or wt-alloc" >&2; exit 2 ;;
esac
perf stat -x, -e task-clock -o "$tmp/perf" fio --name=j --thread --bs=4k --iodepth=32 --group_reporting \
    --output-format=json --output="$tmp/fio.json" "${args[@]}" >/dev/null 2>&1
if [[ $mode == wt-alloc && $so != raw ]]; then qemu-img check -q "$f"; fi
python3 - "$tmp/fio.json" "$tmp/perf" <<'P'
import json, sys
t = open(sys.argv[1]).read()
# The plugin's counters come before the JSON in the output file.
d = json.loads(t[t.index("\n{") + 1 if not t.startswith("{") else 0:])
ios = sum(j[k]["total_ios"] for j in d["jobs"] for k in ("read", "write"))
iops = sum(j[k]["iops"] for j in d["jobs"] for k in ("read", "write"))
ms = [float(l.split(",")[0]) for l in open(sys.argv[2]) if ",task-clock," in l][0]
print(f"{iops:.0f} IOPS {ms * 1000 / ios:.3f} us/request")
P
