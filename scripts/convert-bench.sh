#!/bin/sh
# Issue 16's convert ratios, quring against qemu-img in one run, alternated (A B A B ...):
#   1. convert -c of a 1 GiB raw file, -m 2 on both (time, output size)
#   2. convert -f raw -O qcow2 of a 4 GiB raw file with holes (time; holes kept)
# Usage: scripts/convert-bench.sh ONE.raw HOLES.raw [ROUNDS] (quring from target/release;
# HOLES.raw "-" skips the second; QURING_DEFLATE=qemu|fast picks quring's deflate profile).
set -eu
one=$1; holes=$2; rounds=${3:-3}
q=$(dirname "$0")/../target/release/quring
out=$(dirname "$one")
t() { s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
for r in $(seq "$rounds"); do
  rm -f "$out"/cq.qcow2 "$out"/cr.qcow2 "$out"/hq.qcow2 "$out"/hr.qcow2
  a=$(t "$q" convert -c -m 2 -f raw -O qcow2 "$one" "$out"/cq.qcow2)
  b=$(t qemu-img convert -c -m 2 -f raw -O qcow2 "$one" "$out"/cr.qcow2)
  cs=$(stat -c %s "$out"/cq.qcow2); rs=$(stat -c %s "$out"/cr.qcow2)
  echo "round $r: -c quring ${a}s qemu-img ${b}s ratio $(echo "scale=3; $a / $b" | bc)" \
       "sizes $cs $rs (x$(echo "scale=4; $cs / $rs" | bc))"
  [ "$holes" = - ] && continue
  c=$(t "$q" convert -f raw -O qcow2 "$holes" "$out"/hq.qcow2)
  d=$(t qemu-img convert -f raw -O qcow2 "$holes" "$out"/hr.qcow2)
  echo "round $r: holes quring ${c}s qemu-img ${d}s ratio $(echo "scale=3; $c / $d" | bc)" \
       "du $(du -k "$out"/hq.qcow2 | cut -f1)k $(du -k "$out"/hr.qcow2 | cut -f1)k"
done
qemu-img check "$out"/cq.qcow2 | tail -2
qemu-img compare -f raw -F qcow2 "$one" "$out"/cq.qcow2
[ "$holes" = - ] || qemu-img compare -f raw -F qcow2 "$holes" "$out"/hq.qcow2
