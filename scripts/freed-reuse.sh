#!/usr/bin/env bash
# Freed clusters are reused without waiting for the guest (issue 14, acceptance 5):
#  1. four fio jobs through the plugin on a 96 MiB image (random writes, random trim+write,
#     random trims of 64-256 KiB, random reads; no fsync) for RUNTIME seconds (default 60),
#     the file's apparent size sampled every second (goal: under 2x the virtual size plus
#     metadata), then qemu-img check;
#  2. `write 0 96M; discard 0 96M` three times and a last write in one session, by quring io
#     and by qemu-io (goal: quring's file under 1.1x qemu-io's).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh >&2
RUNTIME=${RUNTIME:-60}
DIR=${DIR:-/dev/shm/quring-freed-reuse}
cargo build --release -p quring-fio -p quring-cli >&2
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
img=$DIR/s.qcow2
qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" 96M
fio --thread --ioengine="external:$PWD/target/release/libquring_fio.so" --filename="$img" \
    --bs=4k --bsrange=4k-192k --iodepth=16 --runtime="$RUNTIME" --time_based --size=96M \
    --name=w --rw=randwrite --name=tw --rw=randtrimwrite \
    --name=t --rw=randtrim --bs=64k --bsrange=64k-256k --name=r --rw=randread \
    --output="$DIR/fio.txt" >/dev/null 2>&1 &
fio_pid=$!
max=0
while kill -0 $fio_pid 2>/dev/null; do
    s=$(stat -c %s "$img")
    (( s > max )) && max=$s
    sleep 1
done
wait $fio_pid
echo "fio, 4 jobs, ${RUNTIME}s: largest apparent size $max bytes ($(( max / 1048576 )) MiB; goal < 192 MiB plus metadata), at the end $(stat -c %s "$img")"
qemu-img check "$img" | tail -3
a=$DIR/a.qcow2 b=$DIR/b.qcow2
qemu-img create -q -f qcow2 "$a" 96M
cp "$a" "$b"
cmds=(-c 'write 0 96M' -c 'discard 0 96M' -c 'write 0 96M' -c 'discard 0 96M' -c 'write 0 96M' -c 'discard 0 96M' -c 'write 0 96M')
target/release/quring io "${cmds[@]}" "$a" >/dev/null
qemu-io "${cmds[@]}" "$b" >/dev/null
sa=$(stat -c %s "$a") sb=$(stat -c %s "$b")
echo "write/discard x3 + write: quring $sa bytes, qemu-io $sb bytes: $(python3 -c "print(f'{$sa / $sb:.3f}x')") (goal < 1.1x)"
qemu-img compare "$a" "$b"
