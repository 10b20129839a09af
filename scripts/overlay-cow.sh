#!/bin/bash
# overlay-4k as quring-bench runs it, alternated per round: fio io_uring O_DIRECT on a full raw file (raw),
# quring bench with the OLD and the NEW binary, and qemu-img bench -i io_uring (fresh 256 MiB overlay over a full
# raw backing file on /dev/shm, 65536 4k writes QD32, step 1060864). Prints IOPS and CPU us per request
# (/usr/bin/time user + system / requests) per side, and the load average (issue 15, copy-on-write).
#
#   scripts/overlay-cow.sh OLD_QURING NEW_QURING [ROUNDS] [QCOW2_OPTIONS]
#   scripts/overlay-cow.sh /tmp/old/quring target/release/quring 5 cluster_size=64k,extended_l2=on
OLD=$1; NEW=$2; R=${3:-3}; OPTS=${4:-cluster_size=64k}
B=/dev/shm/cowov-back.raw
[ -f $B ] || { qemu-img create -q -f raw $B 256M; qemu-io -f raw -c 'write -P 0x5a 0 256M' $B >/dev/null; }
RAW=/dev/shm/cowraw.raw
[ -f $RAW ] || { qemu-img create -q -f raw $RAW 256M; qemu-io -f raw -c 'write -P 0x5a 0 256M' $RAW >/dev/null; }
N=65536
one() { # side -> "iops cpu_us"
  local side=$1 D=/dev/shm/cowm.$$; mkdir -p $D
  local t0 out cpu
  case $side in
    raw) out=$( { /usr/bin/time -f "CPU %U %S" fio --name=a --filename=$RAW --ioengine=io_uring --direct=1 --thread --clocksource=cpu --rw=randwrite --bs=4k --iodepth=32 --size=256M --randseed=1 --runtime=2 ; } 2>&1 )
         iops=$(echo "$out" | sed -n 's/.*IOPS=\([0-9.]*\)\([kM]\?\),.*/\1 \2/p' | awk '{m=($2=="k")?1e3:(($2=="M")?1e6:1); print $1*m}')
         ios=$(echo "$out" | sed -n 's/.*issued rwts: total=[0-9]*,\([0-9]*\),.*/\1/p');;
    qemu) qemu-img create -q -f qcow2 -o $OPTS -b $B -F raw $D/i.qcow2 256M
         out=$( { /usr/bin/time -f "CPU %U %S" qemu-img bench -f qcow2 -i io_uring -c $N -d 32 -s 4096 -S 1060864 -o 0 -t none -w $D/i.qcow2 ; } 2>&1 )
         iops=$(echo "$out" | awk -v n=$N '/Run completed/{print n/$4}'); ios=$N;;
    *) qemu-img create -q -f qcow2 -o $OPTS -b $B -F raw $D/i.qcow2 256M
         out=$( { /usr/bin/time -f "CPU %U %S" $side bench -c $N -d 32 -s 4096 -S 1060864 -o 0 -t none -w $D/i.qcow2 ; } 2>&1 )
         iops=$(echo "$out" | awk -v n=$N '/Run completed/{print n/$4}'); ios=$N;;
  esac
  cpu=$(echo "$out" | awk -v n=$ios '/^CPU/{printf "%.2f", ($2+$3)*1e6/n}')
  rm -rf $D
  echo "$iops $cpu"
}
echo "# $OPTS, $R rounds, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 $R); do
  a=$(one raw); b=$(one $OLD); c=$(one $NEW); d=$(one qemu)
  echo "round $r: raw $a | old $b | new $c | qemu $d"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
