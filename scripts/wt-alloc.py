#!/usr/bin/env python3
"""Issue 14 acceptance 3: writethrough allocating 4k writes QD32 (the bench's wt-alloc-qd32)
through the fio plugin (cache=writethrough) on a fresh empty image, against fio's io_uring
engine writing a fresh sparse raw file with O_DSYNC, with 1 and 4 jobs, every mode, on
/dev/shm and on the disk. Rounds alternate quring and raw; the ratio is the median of the
round-by-round ratios (min-max). Every quring image is checked with `qemu-img check`.

    scripts/wt-alloc.py [--rounds 3] [--seconds 3] [--devices shm,disk] [--jobs 1,4]
                        [--modes standard,xl2-64k,xl2-2m,rc1,lazy,l2less] [--plugin PATH]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
    "standard": "cluster_size=65536",
    "xl2-64k": "cluster_size=65536,extended_l2=on",
    "xl2-2m": "cluster_size=2097152,extended_l2=on",
    "rc1": "cluster_size=65536,refcount_bits=1",
    "lazy": "cluster_size=65536,lazy_refcounts=on",
    "l2less": "cluster_size=65536,l2_less=on",
}
DIRS = {"shm": "/dev/shm", "disk": "/var/tmp"}


def run(cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def iops(out):
    # fio's JSON is the last JSON document on stdout (the plugin prints nothing there).
    j = json.loads(out[out.index("{"):])
    return sum(job["write"]["iops"] for job in j["jobs"])


def fio(args, name, path, jobs, seconds, size):
    per = size // jobs
    cmd = ["fio", f"--name={name}", f"--filename={path}", "--thread=1", "--rw=randwrite", "--bs=4096",
           "--iodepth=32", f"--numjobs={jobs}", f"--size={per}", f"--offset_increment={per}",
           "--randrepeat=1", "--randseed=7", "--clocksource=cpu", f"--runtime={seconds}",
           "--group_reporting=1", "--output-format=json"] + args
    return iops(run(cmd))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--devices", default="shm,disk")
    ap.add_argument("--jobs", default="1,4")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--plugin", default=os.path.join(ROOT, "target/release/libquring_fio.so"))
    ap.add_argument("--quring", default=os.path.join(ROOT, "target/release/quring"))
    a = ap.parse_args()
    print("| device | mode | jobs | quring IOPS | raw O_DSYNC IOPS | quring / raw (min-max) |")
    print("|---|---|---|---|---|---|")
    for dev in a.devices.split(","):
        d = DIRS[dev]
        for mode in a.modes.split(","):
            for jobs in [int(j) for j in a.jobs.split(",")]:
                q, r, ratios = [], [], []
                img, raw = os.path.join(d, "wt-alloc.qcow2"), os.path.join(d, "wt-alloc.raw")
                for rnd in range(a.rounds + 1):
                    for p in (img, raw):
                        if os.path.exists(p):
                            os.remove(p)
                    if mode == "l2less":
                        run([a.quring, "create", "-q", "-f", "qcow2", "-o", MODES[mode], img, str(a.size)])
                    else:
                        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", MODES[mode], img, str(a.size)])
                    x = fio([f"--ioengine=external:{a.plugin}", "--cache=writethrough"], "q", img, jobs, a.seconds,
                            a.size)
                    checker = [a.quring] if mode == "l2less" else ["qemu-img"]  # QEMU cannot open L2-less
                    chk = subprocess.run(checker + ["check", img], capture_output=True, text=True)
                    if chk.returncode != 0:
                        sys.exit(f"qemu-img check {img}: {chk.returncode}\n{chk.stdout}{chk.stderr}")
                    with open(raw, "wb") as f:
                        f.truncate(a.size)
                    y = fio(["--ioengine=io_uring", "--direct=1", "--sync=dsync"], "r", raw, jobs, a.seconds, a.size)
                    if rnd == 0:
                        continue  # warm-up
                    q.append(x)
                    r.append(y)
                    ratios.append(x / y)
                for p in (img, raw):
                    if os.path.exists(p):
                        os.remove(p)
                print(f"| {dev} | {mode} | {jobs} | {statistics.median(q):.0f} | {statistics.median(r):.0f} | "
                      f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
