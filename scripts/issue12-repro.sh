#!/usr/bin/env bash
# Replays issue 12's reproductions N times (default 20) with the release build:
#   1. a zero write inside one subcluster (128 KiB and 2 MiB extended-L2 clusters) vs qemu-io;
#   2. the four-job fio storm (writes+fsync, trim+write, trims, reads; tiny caches) on
#      512 B, 4 KiB (16- and 1-bit refcounts) and 16 KiB clusters, then qemu-img check.
# Prints one line per round and exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
scripts/ensure-deps.sh >/dev/null
cargo build --release -q -p quring-cli -p quring-fio
q=$PWD/target/release/quring
plugin=$PWD/target/release/libquring_fio.so
d=$(mktemp -d /tmp/issue12.XXXXXX)
trap 'rm -rf "$d"' EXIT
for round in $(seq 1 "$n"); do
    for spec in "128k 5120 1024" "2M 6656 36864"; do
        set -- $spec
        qemu-img create -q -f qcow2 -o cluster_size=$1,extended_l2=on "$d/a.qcow2" 8M
        cp "$d/a.qcow2" "$d/b.qcow2"
        qemu-io -c 'write -P 44 0 4M' -c "write -z $2 $3" "$d/a.qcow2" >/dev/null
        "$q" io -c 'write -P 44 0 4M' -c "write -z $2 $3" "$d/b.qcow2" >/dev/null
        qemu-img compare -q "$d/a.qcow2" "$d/b.qcow2" || { echo "round $round: zero write $spec: content differs"; exit 1; }
        qemu-img check -q "$d/b.qcow2" || { echo "round $round: zero write $spec: check failed"; exit 1; }
    done
    for spec in "512 " "4096 " "4096 ,refcount_bits=1" "16384 "; do
        cs=${spec% *}; extra=${spec#* }
        img=$d/s.qcow2
        qemu-img create -q -f qcow2 -o "cluster_size=$cs$extra" "$img" 96M
        if ! fio --thread --ioengine=external:"$plugin" --l2_cache_size=64k --refcount_cache_size=16k \
            --filename="$img" --bs=4k --bsrange=4k-192k --iodepth=16 --runtime=8 --time_based --size=96M \
            --name=w --rw=randwrite --fsync=37 --name=tw --rw=randtrimwrite \
            --name=t --rw=randtrim --bs=64k --bsrange=64k-256k --name=r --rw=randread \
            --output="$d/fio.out" 2>"$d/fio.err"; then
            echo "round $round: storm cluster_size=$cs$extra: fio failed"; cat "$d/fio.err"; exit 1
        fi
        if grep -qi corrupt "$d/fio.err" "$d/fio.out"; then
            echo "round $round: storm cluster_size=$cs$extra: $(grep -i -m1 corrupt "$d/fio.err" "$d/fio.out")"; exit 1
        fi
        if ! qemu-img check "$img" >"$d/check.out" 2>&1; then
            echo "round $round: storm cluster_size=$cs$extra: qemu-img check: $(tail -3 "$d/check.out")"; exit 1
        fi
    done
    echo "round $round/$n: zero writes equal to qemu-io, 4 storms clean (qemu-img check 0, no leaks)"
done
