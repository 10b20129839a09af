#!/usr/bin/env bash
# What sequential 1 MiB writes cost on the device, from the engine counters (issue 15, items
# 1 and 2): for fresh 256 MiB images of several layouts, one request, 16 one at a time and
# 16 with 8 in flight (`quring bench -w --counters`); one line per run with the data writes,
# the device data bytes per guest byte, the copy-on-write and zero fill bytes and the
# metadata bytes. Counters, not timings: meaningful on a loaded machine.
#
#   scripts/write-counters.sh [QURING_BINARY]   (default: target/release/quring)
set -euo pipefail
Q=${1:-target/release/quring}
D=$(mktemp -d /dev/shm/quring-wc.XXXXXX)
trap 'rm -rf "$D"' EXIT
run() { # name create-options count depth
    local name=$1 opts=$2 c=$3 d=$4 out
    rm -f "$D/i.qcow2"
    if [[ $opts == *l2_less* ]]; then
        "$Q" create -q -o "$opts" "$D/i.qcow2" 256M
    else
        qemu-img create -q -f qcow2 -o "$opts" "$D/i.qcow2" 256M
    fi
    out=$("$Q" bench -w -q -c "$c" -s 1M -d "$d" --counters "$D/i.qcow2")
    g() { awk -v k="$1" '$1==k":"{print $2}' <<<"$out"; }
    printf '%-8s requests=%-3s depth=%-2s data_writes=%-4s data/guest=%s cow=%s zero_fill=%s metadata=%s\n' \
        "$name" "$c" "$d" "$(g data_writes)" "$(awk "BEGIN{printf \"%.3f\", $(g data_write_bytes)/$(g write_bytes)}")" \
        "$(g cow_bytes)" "$(g zero_fill_bytes)" \
        $(($(g l2_write_bytes) + $(g refcount_write_bytes) + $(g l1_header_write_bytes)))
}
for cfg in c512:cluster_size=512 c4k:cluster_size=4k c64k:cluster_size=64k c2m:cluster_size=2M \
    x32k:cluster_size=32k,extended_l2=on x64k:cluster_size=64k,extended_l2=on x2m:cluster_size=2M,extended_l2=on \
    rc1:refcount_bits=1 lazy:lazy_refcounts=on l2l512:cluster_size=512,l2_less=on l2less:l2_less=on; do
    for cd in "1 1" "16 1" "16 8"; do
        run "${cfg%%:*}" "${cfg#*:}" $cd
    done
done
