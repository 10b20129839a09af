#!/usr/bin/env python3
"""NBD acceptance benchmark (issue 18 #2), side by side in one run: 4k random read and
write at QD32 through fio's nbd engine with 1 and 2 connections (one per fio job), against

  A  quring serve --nbd  (Unix socket, --cache=none)
  B  qemu-nbd            (Unix socket, --cache=none, --aio=io_uring)
  C  fio with the quring plugin on the image itself (no socket; same jobs)

all on the same image (a full 1 GiB qcow2, 64 KiB clusters, so writes are overwrites).
Besides IOPS, each run reports the CPU time fio and the server (all threads, io_uring
workers included) spent per request: on a busy shared machine IOPS swing with the
neighbours' load, CPU per request much less, and the plugin's CPU per request over
quring's is the IOPS ratio a CPU-bound idle machine would show.
Each round runs A, B, C once per cell (a server is started for its run and stopped after);
a warm-up round is discarded; the report gives the medians and the median of the
round-by-round ratios A/B (goal >= 1.5) and A/C (goal >= 0.5) with min-max.

    cargo build --release -p quring-cli -p quring-fio
    scripts/nbd-bench.py [--rounds 5] [--runtime 4] [--dir /dev/shm] [--out results.md]
"""
import argparse, os, re, shutil, signal, statistics, subprocess, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = os.path.join(ROOT, "target/release/quring")
SO = os.path.join(ROOT, "target/release/libquring_fio.so")


def sh(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r.stdout + r.stderr


def fio_result(out):
    """(IOPS, requests) from fio's group report."""
    iops = 0.0
    n = 0
    for m in re.finditer(r"(read|write): IOPS=([0-9.]+)([kM]?), BW=[^(]*\([^)]*\)\(([0-9.]+)([KMG]i)B/", out):
        iops += float(m.group(2)) * {"": 1, "k": 1e3, "M": 1e6}[m.group(3)]
        n += float(m.group(4)) * {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[m.group(5)] / 4096
    if iops == 0:
        raise RuntimeError("no IOPS in fio output:\n" + out)
    return iops, n


def cpu_of(pid):
    """User + system seconds of a live process (all its threads, io_uring workers included)."""
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


def fio(engine, rw, jobs, runtime, server_pid=None):
    """(IOPS, CPU microseconds per request of fio and the server together)."""
    args = ["fio", "--name=a", "--group_reporting", "--thread", "--clocksource=cpu", f"--rw={rw}", "--bs=4k",
            "--iodepth=32", f"--numjobs={jobs}", f"--runtime={runtime}", "--time_based", "--randrepeat=0"]
    s0 = cpu_of(server_pid) if server_pid else 0.0
    p = subprocess.Popen(args + engine, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"fio: exit {status}\n{out}")
    s1 = cpu_of(server_pid) if server_pid else 0.0
    iops, n = fio_result(out)
    return iops, (ru.ru_utime + ru.ru_stime + s1 - s0) * 1e6 / n


def wait_for(path, proc, what):
    t = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read() if proc.stderr else ''}")
        if time.time() - t > 20:
            raise RuntimeError(f"{what}: no {path}")
        time.sleep(0.01)


class Served:
    """A server on `img` for the duration of a `with` block."""

    def __init__(self, kind, img, d):
        self.kind, self.img, self.d = kind, img, d

    def __enter__(self):
        self.sock = os.path.join(self.d, f"{self.kind}.sock")
        pid = os.path.join(self.d, f"{self.kind}.pid")
        for p in (self.sock, pid):
            if os.path.exists(p):
                os.unlink(p)
        if self.kind == "quring":
            cmd = [Q, "serve", "--nbd", "-k", self.sock, "-e", "4", "-t", "--cache=none", "--pid-file", pid, self.img]
        else:
            cmd = ["qemu-nbd", "-k", self.sock, "-e", "4", "-t", "-f", "qcow2", "--cache=none", "--aio=io_uring",
                   "--pid-file", pid, self.img]
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(pid, self.p, self.kind)
        wait_for(self.sock, self.p, self.kind)
        return ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={self.sock}"], self.p.pid

    def __exit__(self, *exc):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise
        if self.p.returncode != 0 and exc[0] is None:
            raise RuntimeError(f"{self.kind} exited {self.p.returncode}: {self.p.stderr.read()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="quring-nbd-bench.", dir=a.dir)
    rows = []
    try:
        img = os.path.join(d, "full.qcow2")
        sh([Q, "create", "-q", img, "1G"])
        sh(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1G", img])
        cells = [(rw, jobs) for rw in ("randread", "randwrite") for jobs in (1, 2)]

        def one(side, rw, jobs):
            if side == "plugin":
                return fio([f"--ioengine=external:{SO}", f"--filename={img}"], rw, jobs, a.runtime)
            with Served(side, img, d) as (eng, pid):
                return fio(eng, rw, jobs, a.runtime, pid)

        res = {(c, s): [] for c in cells for s in ("quring", "qemu", "plugin")}
        for r in range(a.rounds + 1):
            for c in cells:
                for side in ("quring", "qemu", "plugin"):
                    v = one(side, *c)
                    if r > 0:
                        res[(c, side)].append(v)
                print(f"round {r}{' (warm-up)' if r == 0 else ''} {c[0]} x{c[1]}: " +
                      ", ".join(f"{s} {res[(c, s)][-1][0]:.0f} IOPS {res[(c, s)][-1][1]:.2f} us/req" if r > 0 else s
                                for s in ("quring", "qemu", "plugin")), flush=True)
        for c in cells:
            A, B, C = ([x[0] for x in res[(c, s)]] for s in ("quring", "qemu", "plugin"))
            cA, cB, cC = ([x[1] for x in res[(c, s)]] for s in ("quring", "qemu", "plugin"))
            ab = [x / y for x, y in zip(A, B)]
            ac = [x / y for x, y in zip(A, C)]
            cpu = [z / x for x, z in zip(cA, cC)]
            rows.append((c, statistics.median(A), statistics.median(B), statistics.median(C), ab, ac,
                         (statistics.median(cA), statistics.median(cB), statistics.median(cC)), cpu))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    lines = [
        "| 4k QD32, fio nbd engine | conns | IOPS: quring serve --nbd | qemu-nbd | fio + plugin (no socket) "
        "| quring / qemu-nbd (min-max) | quring / plugin (min-max) | CPU us/request: quring+fio, qemu-nbd+fio, plugin "
        "| plugin CPU / quring CPU (min-max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (rw, jobs), A, B, C, ab, ac, cpus, cpu in rows:
        lines.append(f"| {rw} | {jobs} | {A:.0f} | {B:.0f} | {C:.0f} | **{statistics.median(ab):.2f}** ({min(ab):.2f}-{max(ab):.2f}) "
                     f"| **{statistics.median(ac):.2f}** ({min(ac):.2f}-{max(ac):.2f}) "
                     f"| {cpus[0]:.2f}, {cpus[1]:.2f}, {cpus[2]:.2f} | {statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.uname().nodename} in {a.dir}, "
                    f"{a.rounds} rounds of {a.runtime} s (+1 warm-up), `scripts/nbd-bench.py`; goals: quring/qemu-nbd >= 1.5, "
                    f"quring/plugin >= 0.5\n\n" + text + "\n")


if __name__ == "__main__":
    main()
