#!/usr/bin/env python3
"""virtio-blk benchmark driver; see blk.sh. The probe guest's `blk-bench` scenario on wisp and
on QEMU (microvm, virtio-blk-device), alternating, on the same files."""

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WISP = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/wisp")
PROBE = os.path.join(ROOT, "target/probe-guests/probe.elf")
DIR = os.path.join(ROOT, "target/bench")
RAW = os.path.join(DIR, "blk-bench.raw")
QCOW2 = os.path.join(DIR, "blk-bench.qcow2")
QEMU = ["qemu-system-x86_64", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "microvm",
        "-m", "128M", "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
        # microvm's virtio-mmio is legacy (version 1) unless told otherwise; the probe is modern only.
        "-global", "virtio-mmio.force-legacy=false"]
TICK = os.sysconf("SC_CLK_TCK")

# (label, op, bs, qd, unit): unit is what the table shows, IOPS or MiB/s.
WORKLOADS = [
    ("4k randread qd1", "randread", 4096, 1, "IOPS"),
    ("4k randread qd32", "randread", 4096, 32, "IOPS"),
    ("4k randwrite qd1", "randwrite", 4096, 1, "IOPS"),
    ("4k randwrite qd32", "randwrite", 4096, 32, "IOPS"),
    ("1M read qd1", "read", 1 << 20, 1, "MiB/s"),
    ("1M write qd1", "write", 1 << 20, 1, "MiB/s"),
]


def vmms(args):
    """name -> (header description, function(cmdline) -> argv)."""
    def wisp(path, fmt):
        return lambda cl: [WISP, "run", "--kernel", PROBE, "--memory", "128M", "--console", "stdio",
                           "--disk", f"path={path},format={fmt}", "--cmdline", cl]

    def qemu(cache, aio):
        return lambda cl: QEMU + ["-kernel", PROBE, "-append", cl, "-drive",
                                  f"id=d0,file={RAW},format=raw,if=none,cache={cache},aio={aio}",
                                  "-device", "virtio-blk-device,drive=d0"]

    v = {
        "wisp": ("wisp, raw file, buffered I/O (host page cache; preadv/pwritev on its event-loop thread)",
                 wisp(RAW, "raw")),
    }
    if not args.qcow2_only:
        v["qemu-none"] = ("QEMU 7.2, raw file, cache=none,aio=native (O_DIRECT, Linux AIO; "
                          "bypasses the page cache)", qemu("none", "native"))
    if not (args.no_writeback or args.qcow2_only):
        v["qemu-wb"] = ("QEMU 7.2, raw file, cache=writeback,aio=threads (host page cache, "
                        "like wisp)", qemu("writeback", "threads"))
    if not args.no_qcow2:
        v["wisp-qcow2"] = ("wisp, qcow2 image of the same data (fully allocated, 64 KiB clusters), "
                           "buffered I/O", wisp(QCOW2, "qcow2"))
    return v


# Rate limiter rows: (label, op, bs, qd, limiter, limit, unit). The limiter is Firecracker's
# JSON; buckets hold a hundredth of a second (refill_time 10 ms) so that the full bucket a
# run starts with adds almost nothing. "unreached": limits far above what the device does,
# so every request goes through the buckets and none waits (the cost of the check).
UNREACHED = {"bandwidth": {"size": 1 << 50, "refill_time": 10},
             "ops": {"size": 1 << 40, "refill_time": 10}}
LIMIT_ROWS = [
    ("4k randread qd1", "randread", 4096, 1, UNREACHED, None, "IOPS"),
    ("4k randread qd32", "randread", 4096, 32, UNREACHED, None, "IOPS"),
    ("4k randread qd1", "randread", 4096, 1,
     {"ops": {"size": 10, "refill_time": 10}}, 1000, "IOPS"),
    ("4k randread qd32", "randread", 4096, 32,
     {"ops": {"size": 10, "refill_time": 10}}, 1000, "IOPS"),
    ("1M read qd1", "read", 1 << 20, 1,
     {"bandwidth": {"size": 83886, "refill_time": 10}}, 8, "MiB/s"),
]


def wisp_limited(limiter, tag):
    """wisp on the raw file with `limiter` on the disk (wisp's JSON config)."""
    def argv(cl):
        path = os.path.join(DIR, f"blk-limits-{tag}.json")
        with open(path, "w") as f:
            json.dump({"kernel": PROBE, "memory": "128M", "console": "stdio", "cmdline": cl,
                       "disks": [{"path": RAW, "format": "raw", "rate_limiter": limiter}]}, f)
        return [WISP, "run", "--config", path]
    return argv


def limits(a):
    """The rate limiter rows: the cost of a limiter not reached, and accuracy at the limit."""
    plain = vmms(a)["wisp"][1]
    res = {i: ([], []) for i in range(len(LIMIT_ROWS))}
    for r in range(a.runs):
        for i, (_, op, bs, qd, limiter, _, _) in enumerate(LIMIT_ROWS):
            cl = (f"probe.scenario=blk-bench probe.op={op} probe.bs={bs} probe.qd={qd} "
                  f"probe.ms={a.limit_ms} probe.span_mib={a.size_mib}")
            res[i][0].append(run_once(plain(cl), timeout=a.limit_ms / 1000 + 60))
            res[i][1].append(run_once(wisp_limited(limiter, i)(cl), timeout=a.limit_ms / 1000 + 60))
        print(f"  limits round {r + 1}/{a.runs} done", file=sys.stderr)
    print(f"\n== rate limiters (wisp only, {a.limit_ms} ms per run, {a.runs} runs, alternating "
          "with no limiter), median [min-max]")
    print(f"{'workload':<18} {'limit':<16} {'unit':<6} {'no limiter':<24} {'limiter':<24} "
          f"{'limiter/none':<12} {'% of limit':<10}")
    for i, (label, _, _, _, _, limit, unit) in enumerate(LIMIT_ROWS):
        none_s, none_m = fmt([value(r, unit) for r in res[i][0] if r])
        lim_s, lim_m = fmt([value(r, unit) for r in res[i][1] if r])
        what = "not reached" if limit is None else f"{limit} {unit}"
        acc = f"{lim_m / limit * 100:.1f}%" if limit and lim_m else "-"
        print(f"{label:<18} {what:<16} {unit:<6} {none_s:<24} {lim_s:<24} "
              f"{ratio(lim_m, none_m):<12} {acc:<10}")
    print("  % of limit: the guest's own rate (its TSC) over the run, which starts with a full "
          "bucket (a hundredth of a second's worth)")
    return sum(1 for i in res for side in res[i] for r in side if r is None)


def cpu_ticks(pid):
    """utime + stime of the whole process (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def run_once(argv, timeout):
    """Runs one guest; returns the parsed bench line plus the VMM's CPU seconds between the
    device being set up (`blk capacity`) and the result line, or None on failure."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    fd = p.stdout.fileno()
    buf = b""
    cpu0 = cpu1 = None
    result = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"warning: timeout: {' '.join(argv)}", file=sys.stderr)
                break
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.decode(errors="replace")
                if line.startswith("probe: blk capacity"):
                    cpu0 = cpu_ticks(p.pid)
                elif line.startswith("probe: blk bench"):
                    cpu1 = cpu_ticks(p.pid)
                    w = line.split()
                    kv = dict(zip(w[4::2], w[5::2]))
                    result = {k: int(kv[k]) for k in ("ios", "us", "iops", "kib-per-s")}
                elif line.startswith("probe: FAIL"):
                    print(f"warning: {line}", file=sys.stderr)
    except BaseException:  # interrupted: no VMM left behind
        p.kill()
        raise
    finally:
        if p.poll() is None:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        err = p.stderr.read().decode(errors="replace")
        p.stdout.close()
        p.stderr.close()
    if result is None or cpu0 is None:
        print(f"warning: no result (exit {p.returncode}): {' '.join(argv)}\n{err}", file=sys.stderr)
        return None
    result["cpu_us_per_req"] = (cpu1 - cpu0) / TICK * 1e6 / max(result["ios"], 1)
    return result


def prepare(size_mib):
    os.makedirs(DIR, exist_ok=True)
    if not (os.path.exists(RAW) and os.path.getsize(RAW) == size_mib << 20):
        # Allocated, non-zero data: reads hit real blocks, not holes.
        with open(RAW, "wb") as f:
            chunk = os.urandom(1 << 20)
            for i in range(size_mib):
                f.write(chunk[i % 64:] + chunk[:i % 64])
        os.sync()
    if os.path.exists(QCOW2):
        os.unlink(QCOW2)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", RAW, QCOW2], check=True)
    # The same starting point for everyone: both files in the page cache, brought in the
    # same way (how a file came into the cache sets the size of its folios, which alone
    # moved read throughput by up to 30%), so first drop their pages (only theirs).
    os.sync()
    for path in (RAW, QCOW2):
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    for path in (RAW, QCOW2):
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def fmt(values):
    if not values:
        return "n/a", None
    med = statistics.median(values)
    if med >= 100:
        return f"{med:9.0f} [{min(values):.0f}-{max(values):.0f}]", med
    return f"{med:9.2f} [{min(values):.2f}-{max(values):.2f}]", med


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def value(r, unit):
    return r["iops"] if unit == "IOPS" else r["kib-per-s"] / 1024


def table(title, res, names, peers, metric):
    """One row per workload: each VMM's median [range], then wisp / each peer."""
    print(f"\n== {title}")
    head = f"{'workload':<18} {'unit':<6}" + "".join(f" {n:<24}" for n in names)
    head += "".join(f" {a}/{b:<5}" for a, b in peers)
    print(head)
    for label, _, _, _, unit in WORKLOADS:
        meds = {}
        row = f"{label:<18} {metric(None, unit)[0]:<6}"
        for n in names:
            s, meds[n] = fmt([metric(r, unit)[1] for r in res[n][label] if r])
            row += f" {s:<24}"
        for a, b in peers:
            row += f" {ratio(meds[a], meds[b]):>{len(a) + len(b) + 6}}"
        print(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ms", type=int, default=2000, help="probe.ms: length of each run in the guest")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--no-writeback", action="store_true", help="skip QEMU cache=writeback")
    ap.add_argument("--no-qcow2", action="store_true", help="skip wisp on qcow2")
    ap.add_argument("--qcow2-only", action="store_true",
                    help="only wisp on raw vs wisp on qcow2 (no QEMU runs)")
    ap.add_argument("--no-limits", action="store_true", help="skip the rate limiter rows")
    ap.add_argument("--limits-only", action="store_true",
                    help="only the rate limiter rows (wisp with and without limiters)")
    ap.add_argument("--limit-ms", type=int, default=5000,
                    help="probe.ms for the rate limiter rows")
    a = ap.parse_args()

    with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    print(f"machine: {model}, {os.cpu_count()} cpus, load average {load}, "
          f"kvm_pvm={'yes' if os.path.exists('/sys/module/kvm_pvm') else 'no'}")
    print(f"qemu: {qv.stdout.splitlines()[0]}")
    prepare(a.size_mib)
    v = vmms(a)
    print(f"disk: {a.size_mib} MiB file on {RAW} (random data, in the page cache at start), "
          f"probe blk-bench, {a.ms} ms per run, {a.runs} runs per VMM and workload, alternating")
    for name, (desc, _) in v.items():
        print(f"  {name:<11} {desc}")
    print("  CPU/req:    utime+stime of the VMM process (all threads, vCPU included) from "
          "/proc/PID/stat, from device set-up to the result line, / requests completed")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.limits_only:
        sys.exit(1 if limits(a) else 0)
    res = {n: {w[0]: [] for w in WORKLOADS} for n in v}
    for i in range(a.runs):
        for label, op, bs, qd, _ in WORKLOADS:
            cl = (f"probe.scenario=blk-bench probe.op={op} probe.bs={bs} probe.qd={qd} "
                  f"probe.ms={a.ms} probe.span_mib={a.size_mib}")
            for name, (_, mk) in v.items():
                res[name][label].append(run_once(mk(cl), timeout=a.ms / 1000 + 60))
        print(f"  round {i + 1}/{a.runs} done", file=sys.stderr)

    names = [n for n in ("wisp", "qemu-none", "qemu-wb") if n in v]
    peers = [("wisp", n) for n in names[1:]]
    if peers:
        table("throughput, median [min-max]", res, names, peers,
              lambda r, unit: (unit, value(r, unit) if r else None))
        table("host CPU per request (us), median [min-max]", res, names, peers,
              lambda r, unit: ("us", r["cpu_us_per_req"] if r else None))
    if "wisp-qcow2" in v:
        q = ["wisp-qcow2", "wisp"]
        table("wisp on qcow2 vs raw: throughput", res, q, [("wisp-qcow2", "wisp")],
              lambda r, unit: (unit, value(r, unit) if r else None))
        table("wisp on qcow2 vs raw: host CPU per request (us)", res, q, [("wisp-qcow2", "wisp")],
              lambda r, unit: ("us", r["cpu_us_per_req"] if r else None))
    failed = sum(1 for n in res for l in res[n] for r in res[n][l] if r is None)
    if not a.no_limits:
        failed += limits(a)
    if failed:
        print(f"\n{failed} runs failed (see warnings)")
        sys.exit(1)


if __name__ == "__main__":
    main()
