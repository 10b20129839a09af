#!/usr/bin/env bash
# The main job (README: "Run the main job"): a quick read-path comparison of quring against
# QEMU's own qcow2 driver on a temporary fully allocated image on /dev/shm, measured
# alternately (A B A B ...) in one run. Prints each pair and the median ratio.
#
#   ROUNDS=5 COUNT=300000 SIZE=1G scripts/main-job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
ROUNDS=${ROUNDS:-5}
COUNT=${COUNT:-300000}
SIZE=${SIZE:-1G}
DEPTH=${DEPTH:-32}
STEP=${STEP:-1052672}   # 4 KiB * 257: an odd multiple of 4 KiB scatters the requests
cargo build --release -p quring >&2
Q=$PWD/target/release/quring
DIR=$(mktemp -d /dev/shm/quring-main.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
IMG=$DIR/bench.qcow2
qemu-img create -q -f qcow2 -o preallocation=full "$IMG" "$SIZE"
qemu-io -c "write -P 0x5a 0 $SIZE" "$IMG" >/dev/null
echo "image: $IMG ($SIZE, 64 KiB clusters, fully allocated); $COUNT reads of 4 KiB, QD$DEPTH, step $STEP"
ratios=()
for r in $(seq 1 "$ROUNDS"); do
    tq=$("$Q" bench -c "$COUNT" -d "$DEPTH" -s 4k -S "$STEP" "$IMG" | sed -n 's/Run completed in \([0-9.]*\) seconds./\1/p')
    te=$(qemu-img bench -f qcow2 -t none -i io_uring -c "$COUNT" -d "$DEPTH" -s 4k -S "$STEP" "$IMG" | sed -n 's/Run completed in \([0-9.]*\) seconds./\1/p')
    ratio=$(awk -v a="$tq" -v b="$te" 'BEGIN { printf "%.3f", b / a }')
    ratios+=("$ratio")
    printf 'round %d: quring %.0f IOPS, qemu-img bench %.0f IOPS, ratio %s\n' "$r" \
        "$(awk -v t="$tq" -v c="$COUNT" 'BEGIN { print c / t }')" \
        "$(awk -v t="$te" -v c="$COUNT" 'BEGIN { print c / t }')" "$ratio"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
echo "median quring/QEMU IOPS ratio: $median (min $(printf '%s\n' "${ratios[@]}" | sort -n | head -1), max $(printf '%s\n' "${ratios[@]}" | sort -n | tail -1))"
