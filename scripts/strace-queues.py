#!/usr/bin/env python3
"""Issue 14, acceptance 4: which system calls the threads make while the queues run.

Runs fio through the plugin under `strace -f -T -ttt` (4 jobs of 4k random writes QD32 on a
fresh image, each job its own queue): cache=writeback with fsync=64, and cache=writethrough.
Then counts the system calls per thread kind inside the window in which every queue runs
(from the last queue thread's first io_uring_enter to the first queue thread's last one):

* queue: the fio job threads (each drives its queue: thousands of io_uring_enter calls;
  the thread that opened the image entered its synchronous ring only a few times);
* main: fio's main thread (the strace root);
* other: every other thread (fio helpers, anything the engine starts).

Reported per kind: every system call with its count, the calls the issue forbids once the
image is open (pread/pwrite/preadv/pwritev/fsync/fdatasync/fallocate/ftruncate) and futex
waits longer than 1 ms, and the eventfd write(2)s (cross-queue wake-ups from threads that
have no ring of their own; MSG_RING wakes ride on io_uring_enter).

  scripts/strace-queues.py                            # /var/tmp, 5 s per mode
  scripts/strace-queues.py --dir /dev/shm/x --seconds 3 --plugin path/to/libquring_fio.so
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys

FORBIDDEN = {"pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "fsync", "fdatasync",
             "fallocate", "ftruncate"}
LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(?:<\.\.\. )?(\w+)(?:\(| resumed>)(.*?)(?:<(\d+\.\d+)>)?$")


def run(args, mode, trace):
    img = os.path.join(args.dir, "strace.qcow2")
    if os.path.exists(img):
        os.unlink(img)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, args.size],
                   check=True)
    extra = ["--cache=writeback", "--fsync=64"] if mode == "writeback" else ["--cache=writethrough"]
    out = os.path.join(args.dir, "fio.json")
    cmd = ["strace", "-f", "-T", "-ttt", "-qq", "-o", trace,
           "fio", "--name=w", f"--filename={img}", f"--ioengine=external:{args.plugin}", "--rw=randwrite",
           "--bs=4k", "--iodepth=32", "--direct=1", f"--numjobs={args.jobs}", "--thread", "--group_reporting",
           "--time_based", f"--runtime={args.seconds}", f"--size={args.size}", "--norandommap", "--randrepeat=0",
           "--output-format=json", f"--output={out}"] + extra
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = open(out).read()
    d = json.loads(t[t.index("\n{") + 1:] if not t.startswith("{") else t)
    os.unlink(img)
    return int(sum(j["write"]["iops"] for j in d["jobs"]))


def analyse(trace):
    events = []  # (tid, time, name, args, duration)
    first = None
    # A call another thread's output interrupted: its arguments, until its "resumed" line
    # (which carries the duration; the call is counted there).
    unfinished = {}
    with open(trace, errors="replace") as f:
        for line in f:
            m = LINE.match(line.rstrip("\n"))
            if not m:
                continue
            tid, ts, name, rest, dur = int(m[1]), float(m[2]), m[3], m[4], m[5]
            if first is None:
                first = tid
            if "<unfinished ...>" in line:
                unfinished[tid] = rest
                continue
            if " resumed>" in line:
                rest = unfinished.pop(tid, "") + rest
            events.append((tid, ts, name, rest, float(dur) if dur else 0.0))
    enters = collections.defaultdict(list)
    for tid, ts, name, _, _ in events:
        if name == "io_uring_enter":
            enters[tid].append(ts)
    # Queue threads enter thousands of times; the thread that opened the image (its
    # synchronous ring) only a few.
    most = max(len(v) for v in enters.values())
    queues = {t for t, v in enters.items() if len(v) * 10 >= most}
    enters = {t: enters[t] for t in queues}
    start = max(v[0] for v in enters.values())
    end = min(v[-1] for v in enters.values())
    kinds = {}
    for tid, *_ in events:
        kinds[tid] = "queue" if tid in queues else ("main" if tid == first else "other")
    counts = {k: collections.Counter() for k in ("queue", "main", "other")}
    eventfd_writes = collections.Counter()
    long_futex = collections.Counter()
    for tid, ts, name, rest, dur in events:
        if not (start <= ts <= end):
            continue
        k = kinds[tid]
        counts[k][name] += 1
        if name == "write" and '"\\1\\0\\0\\0\\0\\0\\0\\0", 8' in rest:
            eventfd_writes[k] += 1
        if name == "futex" and "WAIT" in rest and dur > 0.001:
            long_futex[k] += 1
    return {
        "window_s": round(end - start, 3),
        "threads": {k: sum(1 for t in kinds if kinds[t] == k) for k in counts},
        "calls": {k: dict(c.most_common()) for k, c in counts.items()},
        "forbidden": {k: {n: c[n] for n in sorted(FORBIDDEN) if c[n]} for k, c in counts.items()},
        "eventfd_writes": dict(eventfd_writes),
        "futex_waits_over_1ms": dict(long_futex),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/var/tmp/quring-strace")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--size", default="4G")
    p.add_argument("--plugin", default=None)
    p.add_argument("--modes", default="writeback,writethrough")
    p.add_argument("--label", default="")
    p.add_argument("--keep", action="store_true", help="keep the strace output files in --dir")
    a = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if a.plugin is None:
        subprocess.run(["cargo", "build", "--release", "-p", "quring-fio"], check=True, cwd=root)
        a.plugin = os.path.join(root, "target", "release", "libquring_fio.so")
    os.makedirs(a.dir, exist_ok=True)
    for mode in a.modes.split(","):
        trace = os.path.join(a.dir, f"trace.{mode}")
        iops = run(a, mode, trace)
        r = analyse(trace)
        r.update({"label": a.label, "mode": mode, "iops_under_strace": iops,
                  "loadavg": open("/proc/loadavg").read().split()[:3]})
        print(json.dumps(r, indent=4))
        if not a.keep:
            os.unlink(trace)


if __name__ == "__main__":
    sys.exit(main())
