#!/usr/bin/env python3
"""Acceptance benchmarks of the issues, each a ratio measured in one run: the two sides
alternate (A B A B ...) for ROUNDS rounds and the report gives the median of the pair-wise
ratios with min-max. Usage:

    cargo build --release --workspace
    scripts/acceptance.py [--rounds 3] [--only NAME,...] [--out results.md]

Sides: `quring bench` / `qemu-img bench` (same -c -d -s -S pattern), fio with the quring
plugin / fio's io_uring engine on a raw file (same job options)."""
import argparse, os, re, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = os.path.join(ROOT, "target/release/quring")
SO = os.path.join(ROOT, "target/release/libquring_fio.so")
DISK_DIR = os.environ.get("DISK_DIR", "/var/tmp")
STEP = str(4096 * 257)


def sh(cmd, **kw):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r.stdout + r.stderr


def bench_iops(out, count):
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    return count / float(m.group(1))


def fio_iops(out):
    tot = 0.0
    for m in re.finditer(r"(read|write): IOPS=([0-9.]+)([kM]?)", out):
        v = float(m.group(2)) * {"": 1, "k": 1e3, "M": 1e6}[m.group(3)]
        tot += v
    if tot == 0:
        raise RuntimeError("no IOPS in fio output:\n" + out)
    return tot


def fio(args, plugin=None, raw=False):
    # Both sides: threads, and one clock (fio otherwise picks TSC or clock_gettime per run).
    eng = [f"--ioengine=external:{SO}", "--thread"] if plugin else ["--ioengine=io_uring", "--direct=1", "--thread"]
    eng.append("--clocksource=cpu")
    if plugin and isinstance(plugin, list):
        eng += plugin
    return fio_iops(sh(["fio", "--name=a", "--group_reporting"] + eng + args))


def pair(name, a, b, rounds, note):
    """Runs a() and b() alternately; returns the summary row."""
    a(); b()  # warm-up
    ra, rb, ratios = [], [], []
    for _ in range(rounds):
        x = a(); y = b()
        ra.append(x); rb.append(y); ratios.append(x / y)
    row = (name, statistics.median(ra), statistics.median(rb), statistics.median(ratios), min(ratios), max(ratios), note)
    print(f"{name}: A {row[1]:.0f} IOPS, B {row[2]:.0f} IOPS, ratio {row[3]:.2f} ({row[4]:.2f}-{row[5]:.2f})", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    want = lambda n: not only or n in only
    shm = tempfile.mkdtemp(prefix="quring-acc.", dir="/dev/shm")
    disk = tempfile.mkdtemp(prefix="quring-acc.", dir=DISK_DIR)
    rows = []
    R = a.rounds
    try:
        full = os.path.join(shm, "full.qcow2")
        raw = os.path.join(shm, "full.raw")
        if any(want(n) for n in ["read-vs-qemu", "overwrite-vs-qemu", "plugin-read-shm", "scaling"]):
            sh([Q, "create", "-q", "-o", "preallocation=full", full, "1G"])
            sh(["qemu-io", "-c", "write -P 0x5a 0 1G", full])
            sh(["qemu-img", "convert", "-O", "raw", full, raw])
        if want("read-vs-qemu"):
            n = 400000
            rows.append(pair("4k random read QD32, 1 GiB full image, /dev/shm: quring bench / qemu-img bench",
                lambda: bench_iops(sh([Q, "bench", "-c", str(n), "-d", "32", "-s", "4k", "-S", STEP, full]), n),
                lambda: bench_iops(sh(["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-c", str(n), "-d", "32", "-s", "4k", "-S", STEP, full]), n),
                R, "issue 2 #3 (goal >= 1.25)"))
        if want("overwrite-vs-qemu"):
            n = 300000
            rows.append(pair("4k overwrite QD32, allocated clusters, /dev/shm: quring bench -w / qemu-img bench -w",
                lambda: bench_iops(sh([Q, "bench", "-w", "-c", str(n), "-d", "32", "-s", "4k", "-S", STEP, full]), n),
                lambda: bench_iops(sh(["qemu-img", "bench", "-w", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-c", str(n), "-d", "32", "-s", "4k", "-S", STEP, full]), n),
                R, "issue 3 #5a (goal >= 1.25)"))
        if want("overlay"):
            # 4 GiB of backing data and a step of 68 KiB: the 60000 writes of a run all land
            # in distinct 64 KiB clusters of the fresh overlay (the step exceeds a cluster and
            # wraps only after 4 GiB / 68 KiB = 61680 writes), so every write is a first touch
            # and each run measures the copy-on-write case only; the 4 KiB offset inside the
            # cluster moves by 4 KiB per write.
            base = os.path.join(shm, "base.raw")
            sh(["qemu-img", "create", "-q", "-f", "raw", base, "4G"])
            sh(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1G", "-c", "write -P 0x33 1G 1G", "-c", "write -P 0x33 2G 1G", "-c", "write -P 0x33 3G 1G", base])
            n = 60000
            ostep = str(68 * 1024)
            def ov(opts, tool):
                p = os.path.join(shm, "ov.qcow2")
                if os.path.exists(p):
                    os.unlink(p)
                sh([Q, "create", "-q", "-o", opts, "-b", base, "-F", "raw", p])
                if tool == "quring":
                    return bench_iops(sh([Q, "bench", "-w", "-c", str(n), "-d", "32", "-s", "4k", "-S", ostep, p]), n)
                return bench_iops(sh(["qemu-img", "bench", "-w", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-c", str(n), "-d", "32", "-s", "4k", "-S", ostep, p]), n)
            rows.append(pair("4k writes into a 64 KiB-cluster overlay over a full backing file (every write a first touch), /dev/shm: quring extended_l2=on / off",
                lambda: ov("cluster_size=64k,extended_l2=on", "quring"), lambda: ov("cluster_size=64k,extended_l2=off", "quring"),
                R, "issue 3 #5b (goal >= 4; QEMU measures ~6)"))
            rows.append(pair("same overlay, extended_l2=on: quring bench -w / qemu-img bench -w",
                lambda: ov("cluster_size=64k,extended_l2=on", "quring"), lambda: ov("cluster_size=64k,extended_l2=on", "qemu"),
                R, "issue 3 #5b (goal >= 1.25)"))
            os.unlink(base)
        if want("firsttouch-disk"):
            def ft(kind):
                if kind == "quring":
                    p = os.path.join(disk, "ft.qcow2")
                    if os.path.exists(p): os.unlink(p)
                    sh([Q, "create", "-q", p, "1G"])
                    return fio(["--filename=" + p, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=1G", "--runtime=8", "--time_based=0", "--io_size=256M"], plugin=True)
                p = os.path.join(disk, "ft.raw")
                if os.path.exists(p): os.unlink(p)
                sh(["truncate", "-s", "1G", p])
                return fio(["--filename=" + p, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=1G", "--runtime=8", "--time_based=0", "--io_size=256M"])
            rows.append(pair("first-touch 4k random writes QD32 on the disk (ext4, O_DIRECT): quring (fio plugin, empty 64 KiB-cluster image) / sparse raw file (fio io_uring)",
                lambda: ft("quring"), lambda: ft("raw"), R, "issue 3 #5c (goal >= 0.6; QEMU ~0.32)"))
        if want("scaling"):
            def rd(plugin, jobs):
                base = ["--rw=randread", "--bs=4k", "--iodepth=32", "--runtime=3", "--time_based", "--randrepeat=0"]
                if jobs > 1:
                    base += [f"--numjobs={jobs}", "--thread"]
                if plugin:
                    return fio(["--filename=" + full] + base, plugin=True)
                return fio(["--filename=" + raw] + base)
            q1 = []; q2 = []; r1 = []; r2 = []
            rd(True, 1); rd(False, 1)
            for _ in range(R):
                q1.append(rd(True, 1)); q2.append(rd(True, 2)); r1.append(rd(False, 1)); r2.append(rd(False, 2))
            qs = [b / a for a, b in zip(q1, q2)]; rs = [b / a for a, b in zip(r1, r2)]
            rel = [x / y for x, y in zip(qs, rs)]
            row = ("scaling 1 -> 2 queues on 2 threads (4k random read QD32, cached image, /dev/shm): quring ratio / fio raw ratio",
                   statistics.median(qs), statistics.median(rs), statistics.median(rel), min(rel), max(rel),
                   "issue 3 #5d (goal >= 0.9); A/B columns are the two scaling ratios")
            print(row, flush=True)
            rows.append(row)
        if want("plugin-read-shm"):
            rows.append(pair("4k random read QD32, 1 GiB full image, /dev/shm: fio+quring plugin / fio io_uring raw",
                lambda: fio(["--filename=" + full, "--rw=randread", "--bs=4k", "--iodepth=32", "--runtime=4", "--time_based"], plugin=True),
                lambda: fio(["--filename=" + raw, "--rw=randread", "--bs=4k", "--iodepth=32", "--runtime=4", "--time_based"]),
                R, "issue 4 #3 (goal >= 0.85)"))
        if want("plugin-read-disk"):
            dq = os.path.join(disk, "full.qcow2"); dr = os.path.join(disk, "full.raw")
            sh([Q, "create", "-q", "-o", "preallocation=full", dq, "1G"])
            sh(["qemu-io", "-c", "write -P 0x5a 0 1G", dq])
            sh(["qemu-img", "convert", "-O", "raw", dq, dr])
            rows.append(pair("4k random read QD32, 1 GiB full image, disk: fio+quring plugin / fio io_uring raw",
                lambda: fio(["--filename=" + dq, "--rw=randread", "--bs=4k", "--iodepth=32", "--runtime=4", "--time_based"], plugin=True),
                lambda: fio(["--filename=" + dr, "--rw=randread", "--bs=4k", "--iodepth=32", "--runtime=4", "--time_based"]),
                R, "issue 4 #3 (goal >= 0.95)"))
        if want("l2less"):
            l4 = os.path.join(shm, "l4.qcow2"); s4 = os.path.join(shm, "s4.qcow2"); r4 = os.path.join(shm, "r4.raw")
            sh([Q, "create", "-q", "-o", "l2_less=on,refcount_bits=1", l4, "4G"])
            sh([Q, "create", "-q", s4, "4G"])
            for p in (l4, s4):
                sh(["fio", "--name=fill", f"--ioengine=external:{SO}", "--thread", "--filename=" + p, "--rw=write", "--bs=1m", "--iodepth=8", "--size=4g"])
            sh(["fio", "--name=fill", "--ioengine=io_uring", "--direct=1", "--filename=" + r4, "--rw=write", "--bs=1m", "--iodepth=8", "--size=4g"])
            args = ["--rw=randread", "--bs=4k", "--iodepth=32", "--runtime=4", "--time_based"]
            for cache in ["1m", "256k"]:
                rows.append(pair(f"4k random read QD32, 4 GiB full image, /dev/shm, l2_cache_size={cache}: L2-less / raw (fio)",
                    lambda: fio(["--filename=" + l4] + args, plugin=[f"--l2_cache_size={cache}"]), lambda: fio(["--filename=" + r4] + args),
                    R, "issue 5 #4 (goal >= 0.9)"))
                rows.append(pair(f"same, l2_cache_size={cache}: standard 64 KiB / raw (fio)",
                    lambda: fio(["--filename=" + s4] + args, plugin=[f"--l2_cache_size={cache}"]), lambda: fio(["--filename=" + r4] + args),
                    R, "issue 5 #4 (expected well below L2-less)"))
            for p in (l4, s4, r4):
                os.unlink(p)
            def ftl(kind):
                if kind == "q":
                    p = os.path.join(shm, "ftl.qcow2")
                    if os.path.exists(p): os.unlink(p)
                    sh([Q, "create", "-q", "-o", "l2_less=on,refcount_bits=1", p, "4G"])
                    return fio(["--filename=" + p, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=4G", "--io_size=512M"], plugin=True)
                p = os.path.join(shm, "ftl.raw")
                if os.path.exists(p): os.unlink(p)
                sh(["truncate", "-s", "4G", p])
                return fio(["--filename=" + p, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=4G", "--io_size=512M"])
            rows.append(pair("first-touch 4k random writes QD32 to an empty image, /dev/shm: L2-less (fio plugin) / sparse raw (fio)",
                lambda: ftl("q"), lambda: ftl("r"), R, "issue 5 #4 (goal >= 0.8)"))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    lines = ["| measurement | A (median IOPS) | B (median IOPS) | A/B pair-wise median (min-max) | goal |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | **{r[3]:.2f}** ({r[4]:.2f}-{r[5]:.2f}) | {r[6]} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.uname().nodename}, {a.rounds} rounds, `scripts/acceptance.py`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
