#!/usr/bin/env bash
# Compares two builds of the fio plugin on the same image, alternated with fio's own
# io_uring engine on the raw file: 4k random reads QD32 on /dev/shm, ROUNDS rounds, one line
# per round with each side's IOPS and its ratio to raw. For checking that a change did not
# slow the read path: the ratio of the two builds within one run means something on this
# noisy tmpfs; a ratio against an old README table does not.
#
#   scripts/plugin-compare.sh OLD.so NEW.so [ROUNDS]
#   (an old build: git worktree add /tmp/old REV && cargo build --release -p quring-fio there)
set -euo pipefail
OLD=${1:?old libquring_fio.so}; NEW=${2:?new libquring_fio.so}; ROUNDS=${3:-5}
D=$(mktemp -d /dev/shm/quring-pcmp.XXXXXX)
trap 'rm -rf "$D"' EXIT
qemu-img create -q -f qcow2 -o preallocation=full "$D/full.qcow2" 1G
qemu-io -c 'write -P 0x5a 0 1G' "$D/full.qcow2" >/dev/null
qemu-img convert -O raw "$D/full.qcow2" "$D/full.raw"
common=(--name=a --thread --clocksource=cpu --rw=randread --bs=4k --iodepth=32 --runtime=5 --time_based --output-format=json --direct=1)
# Older plugins printed their counters on stdout ahead of fio's JSON: parse from the JSON's start.
iops() { python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{\n"):]); print(int(j["jobs"][0]["read"]["iops"]))'; }
for r in $(seq 1 "$ROUNDS"); do
    raw=$(fio "${common[@]}" --ioengine=io_uring --filename="$D/full.raw" 2>/dev/null | iops)
    old=$(fio "${common[@]}" --ioengine=external:"$OLD" --filename="$D/full.qcow2" 2>/dev/null | iops)
    new=$(fio "${common[@]}" --ioengine=external:"$NEW" --filename="$D/full.qcow2" 2>/dev/null | iops)
    python3 -c "import sys; r,o,n=map(int,sys.argv[1:]); print(f'round $r raw {r} old {o} new {n} old/raw {o/r:.3f} new/raw {n/r:.3f}')" "$raw" "$old" "$new"
done
