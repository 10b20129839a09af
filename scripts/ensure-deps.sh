#!/bin/sh
# Installs the tools the fio benchmarks and the NBD tests need (fio, strace, libnbd's
# nbdinfo/nbdcopy) when they are missing.
# Idempotent and silent when everything is already present.
set -eu

missing=""
command -v fio >/dev/null 2>&1 || missing="$missing fio"
command -v strace >/dev/null 2>&1 || missing="$missing strace"
command -v nbdcopy >/dev/null 2>&1 || missing="$missing libnbd-bin"
[ -z "$missing" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-deps: missing:$missing (no apt-get; install them manually)" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "ensure-deps: installing:$missing" >&2
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
# shellcheck disable=SC2086 # word splitting of the package list is intended
DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq $missing >/dev/null
