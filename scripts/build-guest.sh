#!/bin/sh
# build-guest.sh OUTDIR: assembles a minimal Linux guest for the vhost-user-blk test from
# Debian packages: Debian's kernel (linux-image-amd64), an initramfs with busybox-static, the
# virtio modules the kernel needs for /dev/vda, a 1 MiB random pattern file and an /init
# that writes the pattern through /dev/vda at fixed offsets (buffered, O_DIRECT, 512-byte
# requests, two writers in parallel pinned to two CPUs, a discard), flushes, reads the whole
# disk back with O_DIRECT and prints `QURING-CHECKSUM <md5>` and `QURING-DONE` on the serial
# console before powering off.
#
# With `quring.case=discard` on the kernel command line, /init runs the discard and resize
# case instead, on every virtio disk (/dev/vda, /dev/vdb): it writes the pattern over the
# first 4 MiB, discards (blkdiscard), punches holes and zeroes ranges (util-linux's
# `fallocate --punch-hole` / `--zero-range`: VIRTIO_BLK_T_WRITE_ZEROES with and without
# the UNMAP flag), writes a block of zeros (--detect-zeroes), prints each disk's discard
# granularity and the md5 of its first 4 MiB, then prints `QURING-RESIZE-READY` and waits
# for the host to resize the disks live: it prints each new size from /sys/block/vdX/size,
# writes the pattern at 65 MiB (past the old end) and prints its md5 read back.
#
# Produces OUTDIR/vmlinuz, OUTDIR/initrd.gz and OUTDIR/pattern.bin (the test builds its
# reference from that very file). Installs qemu-system-x86, linux-image-amd64 and
# busybox-static when they are missing. util-linux's fallocate (busybox's cannot punch holes
# or zero ranges) is copied in with the libraries it links. Does nothing when the outputs exist and are newer
# than this script.
set -eu

OUT=${1:?usage: build-guest.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")

if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.gz" ] && [ -f "$OUT/pattern.bin" ] &&
    [ "$OUT/initrd.gz" -nt "$SELF" ]; then
    exit 0
fi

need=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || need="$need qemu-system-x86"
command -v qemu-img >/dev/null 2>&1 || need="$need qemu-utils"
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx taskset || need="$need busybox-static"
ls /boot/vmlinuz-* >/dev/null 2>&1 || need="$need linux-image-amd64"
command -v cpio >/dev/null 2>&1 || need="$need cpio"
[ -x /usr/bin/fallocate ] || need="$need util-linux"
if [ -n "$need" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "build-guest: installing:$need" >&2
    # qemu-img, the test oracle, may come from bookworm-backports (QEMU 10 on this machine
    # kind). QEMU's system emulator must then come from the same suite: installing
    # bookworm's older one would make apt remove qemu-utils.
    target=""
    if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
        if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
            printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' |
                $SUDO tee /etc/apt/sources.list.d/quring-backports.sources >/dev/null
        fi
        target="-t bookworm-backports"
    fi
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $target $need >/dev/null
    qemu-img --version >/dev/null || { echo "build-guest: qemu-img is gone after installing:$need" >&2; exit 1; }
fi

# The newest installed Debian kernel.
KIMG=$(ls /boot/vmlinuz-* | sort -V | tail -1)
KVER=${KIMG#/boot/vmlinuz-}
MODDIR=/lib/modules/$KVER
[ -f "$MODDIR/modules.dep" ] || { echo "build-guest: $MODDIR/modules.dep missing" >&2; exit 1; }

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT/bin" "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" "$ROOT/mods"
cp /bin/busybox "$ROOT/bin/busybox"
# util-linux's fallocate and what it links (the dynamic loader and libc), at their paths.
for f in /usr/bin/fallocate $(ldd /usr/bin/fallocate | grep -o '/[^ ]*'); do
    mkdir -p "$ROOT$(dirname "$f")"
    cp -L "$f" "$ROOT$f"
done

# The virtio modules for a PCI virtio-blk disk, dependencies first (nothing to do for the
# ones built into the kernel).
ORDER=""
add_module() {
    local path dep name
    path=$(grep -E "(^|/)$1\.ko(\.(xz|zst|gz))?:" "$MODDIR/modules.dep" | head -1 | cut -d: -f1)
    [ -n "$path" ] || return 0
    case " $ORDER " in *" $path "*) return 0 ;; esac
    for dep in $(grep "^$path:" "$MODDIR/modules.dep" | cut -d: -f2); do
        name=$(basename "$dep" | sed 's/\.ko.*$//')
        add_module "$name"
    done
    case " $ORDER " in *" $path "*) return 0 ;; esac
    ORDER="$ORDER $path"
}
for m in virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    if grep -q "/$m\.ko" "$MODDIR/modules.builtin" 2>/dev/null; then continue; fi
    add_module "$m"
done
: >"$ROOT/mods/order"
for p in $ORDER; do
    f=$(basename "$p")
    case "$f" in
    *.ko.xz) xz -dc "$MODDIR/$p" >"$ROOT/mods/${f%.xz}"; f=${f%.xz} ;;
    *.ko.zst) zstd -qdc "$MODDIR/$p" >"$ROOT/mods/${f%.zst}"; f=${f%.zst} ;;
    *.ko.gz) gzip -dc "$MODDIR/$p" >"$ROOT/mods/${f%.gz}"; f=${f%.gz} ;;
    *) cp "$MODDIR/$p" "$ROOT/mods/$f" ;;
    esac
    echo "$f" >>"$ROOT/mods/order"
done

# The pattern the guest writes (kept across rebuilds so that it stays the test's reference).
[ -f "$OUT/pattern.bin" ] || head -c 1048576 /dev/urandom >"$OUT/pattern.bin"
cp "$OUT/pattern.bin" "$ROOT/pattern.bin"

cat >"$ROOT/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "$@" >/dev/console; }
fail() { say "QURING-FAIL $*"; poweroff -f; }
for m in $(cat /mods/order); do insmod "/mods/$m" || fail "insmod $m"; done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 100 ] && fail "no /dev/vda"; sleep 0.1
done
K=1024; M=1048576
# The discard and resize case (tests/vhost_guest.rs guest_discard_and_resize).
one_disk() { # name
    d=/dev/$1; q=/sys/block/$1/queue
    say "QURING-DISK $1 gran $(cat $q/discard_granularity) wzmax $(cat $q/write_zeroes_max_bytes) size $(cat /sys/block/$1/size)"
    for i in 0 1 2 3; do
        dd if=/pattern.bin of=$d bs=1M seek=$i oflag=direct 2>/dev/null || fail "$1 write $i"
    done
    blkdiscard -o $((256 * K)) -l $((256 * K)) $d || fail "$1 blkdiscard"
    blkdiscard -o $((M + 4 * K)) -l $((128 * K)) $d || fail "$1 blkdiscard unaligned"
    /usr/bin/fallocate --punch-hole -o $((2 * M + 64 * K)) -l $((128 * K)) $d || fail "$1 punch-hole"
    /usr/bin/fallocate --zero-range -o $((3 * M + 64 * K)) -l $((128 * K)) $d || fail "$1 zero-range"
    /usr/bin/fallocate --zero-range -o $((3 * M + 513 * K)) -l $((3 * K)) $d || fail "$1 zero-range small"
    dd if=/dev/zero of=$d bs=64k seek=$(((3 * M + 256 * K) / (64 * K))) count=1 oflag=direct 2>/dev/null || fail "$1 zeros"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    say "QURING-SUM $1 $(cat $q/discard_granularity) $(dd if=$d bs=1M count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
}
resized() { # name old_sectors
    i=0
    while [ "$(cat /sys/block/$1/size)" = "$2" ]; do
        i=$((i + 1)); [ $i -gt 1200 ] && fail "$1 kept $2 sectors"; sleep 0.1
    done
    say "QURING-NEWSIZE $1 $(cat /sys/block/$1/size)"
    dd if=/pattern.bin of=/dev/$1 bs=1M seek=65 oflag=direct 2>/dev/null || fail "$1 write past the old end"
    say "QURING-TAILSUM $1 $(dd if=/dev/$1 bs=1M skip=65 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
}
case " $(cat /proc/cmdline) " in
*" quring.case=discard "*)
    i=0
    while [ ! -b /dev/vdb ]; do
        i=$((i + 1)); [ $i -gt 100 ] && fail "no /dev/vdb"; sleep 0.1
    done
    for n in vda vdb; do one_disk $n; done
    a=$(cat /sys/block/vda/size); b=$(cat /sys/block/vdb/size)
    say "QURING-RESIZE-READY"
    resized vda "$a"
    resized vdb "$b"
    say "QURING-DONE"
    poweroff -f
    ;;
esac
say "QURING-SIZE $(blockdev --getsize64 /dev/vda)"
say "QURING-SERIAL $(cat /sys/block/vda/serial 2>/dev/null)"
say "QURING-QUEUES $(ls /sys/block/vda/mq | wc -l) CPUS $(nproc)"
# A: buffered, 64 KiB blocks, at 0.
dd if=/pattern.bin of=/dev/vda bs=64k seek=0 conv=fsync 2>/dev/null || fail "A"
# B: O_DIRECT 4 KiB blocks at 3 MiB + 4 KiB (straddles clusters).
dd if=/pattern.bin of=/dev/vda bs=4k seek=$(((3 * M + 4 * K) / 4096)) oflag=direct 2>/dev/null || fail "B"
# C: O_DIRECT 512-byte requests at 10 MiB + 1.5 KiB.
dd if=/pattern.bin of=/dev/vda bs=512 seek=$(((10 * M + 1536) / 512)) oflag=direct 2>/dev/null || fail "C"
# D: at 20 MiB, then discard 256 KiB at 20 MiB + 256 KiB.
dd if=/pattern.bin of=/dev/vda bs=1M seek=20 oflag=direct 2>/dev/null || fail "D"
blkdiscard -o $((20 * M + 256 * K)) -l $((256 * K)) /dev/vda || fail "discard"
# E, F: two writers at once, pinned to two CPUs when there are two (blk-mq maps a queue
# per CPU), 8 MiB each at 32 MiB and 48 MiB.
writer() { # cpu base_mib bs
    n=0
    while [ $n -lt 8 ]; do
        if [ "$(nproc)" -ge 2 ]; then
            taskset -c "$1" dd if=/pattern.bin of=/dev/vda bs="$3" seek=$((($2 + n) * M / $3)) oflag=direct 2>/dev/null || return 1
        else
            dd if=/pattern.bin of=/dev/vda bs="$3" seek=$((($2 + n) * M / $3)) oflag=direct 2>/dev/null || return 1
        fi
        n=$((n + 1))
    done
}
writer 0 32 4096 & p1=$!
writer 1 48 16384 & p2=$!
wait $p1 || fail "E"
wait $p2 || fail "F"
sync
blockdev --flushbufs /dev/vda || fail "flushbufs"
echo 3 >/proc/sys/vm/drop_caches
sum=$(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
say "QURING-CHECKSUM $sum"
say "QURING-DONE"
poweroff -f
EOF
chmod +x "$ROOT/init"

cp "$KIMG" "$OUT/vmlinuz.tmp"
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -9) >"$OUT/initrd.gz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initrd.gz.tmp" "$OUT/initrd.gz"
echo "build-guest: kernel $KVER, modules:$(tr '\n' ' ' <"$ROOT/mods/order" | sed 's/^/ /'), in $OUT" >&2
