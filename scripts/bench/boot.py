#!/usr/bin/env python3
"""Boot benchmark driver; see boot.sh. Runs wisp and its peers alternately on the same guest."""

import argparse
import json
import os
import random
import re
import select
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WISP = os.environ.get("WISP", os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/wisp"))
# Another wisp build (e.g. main before a change) as a column of its own, in the same run.
WISP_BEFORE = os.environ.get("WISP_BEFORE")
SPAWN = os.path.join(ROOT, "target/bench/spawn")
HELLO = os.path.join(ROOT, "target/probe-guests/hello.elf")
PROBE = os.path.join(ROOT, "target/probe-guests/probe.elf")
VMLINUX = os.path.join(ROOT, "images/out/vmlinux")
INITRD = os.path.join(ROOT, "images/out/initramfs.cpio")
QEMU_BIN = os.environ.get("QEMU", "qemu-system-x86_64")
QEMU = [QEMU_BIN] + (["-L", os.environ["QEMU_DATA"]] if os.environ.get("QEMU_DATA") else []) + [
    "-enable-kvm", "-cpu", "host,-arch-capabilities",
    "-M", "microvm", "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio"]
PEERS = "/work/peers"
FIRECRACKER = os.environ.get(
    "FIRECRACKER", f"{PEERS}/firecracker/build/cargo_target/release/firecracker")
CLOUD_HYPERVISOR = os.environ.get(
    "CLOUD_HYPERVISOR", f"{PEERS}/cloud-hypervisor/target/release/cloud-hypervisor")


def wisp_cmd(kernel, mem, cmdline=None, initrd=None, cpus=1):
    cmd = [WISP, "run", "--kernel", kernel, "--memory", mem, "--cpus", str(cpus)]
    if cmdline is not None:
        cmd += ["--cmdline", cmdline]
    if initrd:
        cmd += ["--initrd", initrd]
    return cmd


def qemu_cmd(kernel, mem, cmdline=None, initrd=None, cpus=1):
    cmd = QEMU + ["-m", mem, "-smp", str(cpus), "-kernel", kernel]
    if cmdline is not None:
        cmd += ["-append", cmdline]
    if initrd:
        cmd += ["-initrd", initrd]
    return cmd


def wisp_before_cmd(kernel, mem, cmdline=None, initrd=None, cpus=1):
    return [WISP_BEFORE] + wisp_cmd(kernel, mem, cmdline, initrd, cpus)[1:]


def ch_cmd(kernel, mem, cmdline=None, initrd=None, cpus=1):
    cmd = [CLOUD_HYPERVISOR, "--kernel", kernel, "--memory", f"size={mem}",
           "--cpus", f"boot={cpus}", "--serial", "tty", "--console", "off"]
    if cmdline is not None:
        cmd += ["--cmdline", cmdline]
    if initrd:
        cmd += ["--initramfs", initrd]
    return cmd


def fc_cmd(kernel, mem, cmdline=None, initrd=None, cpus=1):
    boot = {"kernel_image_path": kernel}
    if cmdline is not None:
        boot["boot_args"] = cmdline
    if initrd:
        boot["initrd_path"] = initrd
    config = {"boot-source": boot, "drives": [],
              "machine-config": {"vcpu_count": cpus, "mem_size_mib": int(mem.rstrip("M"))}}
    path = f"/tmp/wisp-bench-fc-{os.getpid()}.json"
    with open(path, "w") as f:
        json.dump(config, f)
    return [FIRECRACKER, "--no-api", "--config-file", path]


def guest_ram_kb(pid, mem_bytes):
    """Sum Rss of the anonymous mappings as large as guest RAM (the guest's memory)."""
    total_rss = guest = 0
    size = rss = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and len(parts) >= 5:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
            elif parts[0] == "Rss:":
                rss = int(parts[1])
                total_rss += rss
                if size >= mem_bytes:
                    guest += rss
    return total_rss, guest


def run_once(cmd, marker=None, timeout=60.0, mem_bytes=None, sample_on_marker=False,
             first_marker=None):
    """Returns dict: first (s), marker (s), exit (s), maxrss (KiB), overhead (KiB). `first` is
    the first output, or the first containing `first_marker` (Firecracker logs to stdout too).
    The launcher is posix_spawn'd: subprocess.Popen's own work would count as start-up."""
    rss_r, rss_w = os.pipe()
    out_r, out_w = os.pipe()
    os.set_inheritable(rss_w, True)
    start = time.monotonic()
    pid = os.posix_spawn(SPAWN, [SPAWN] + cmd, dict(os.environ, SPAWN_RSS_FD=str(rss_w)),
                         file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                       (os.POSIX_SPAWN_DUP2, out_w, 1),
                                       (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    os.close(rss_w)
    os.close(out_w)
    vmm_pid = None
    out = b""
    first = marker_t = None
    overhead = None
    fd = out_r
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            break
        r, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        now = time.monotonic()
        out += chunk
        if first is None and (first_marker is None or first_marker.encode() in out):
            first = now - start
        if marker and marker_t is None and marker.encode() in out:
            marker_t = now - start
            if sample_on_marker:
                vmm_pid = vmm_child(pid)
                total, guest = guest_ram_kb(vmm_pid, mem_bytes)
                overhead = total - guest
                os.kill(vmm_pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    end = time.monotonic() - start
    os.close(out_r)
    with os.fdopen(rss_r) as f:
        line = f.read().split()
    maxrss = int(line[0]) if line else None
    return {"first": first, "marker": marker_t, "exit": end, "maxrss": maxrss,
            "overhead": overhead, "ok": first is not None}


TRACE_RE = re.compile(r"^wisp: startup:\s+(\d+) us \(\+\s*(\d+) us\) (.*)$")


def run_traced(cmd, timeout=30.0):
    """One run with WISP_TRACE_STARTUP: [(phase, us since execve, us in phase)], and the
    time (us since the spawn's execve, as this process saw it) of the first serial output."""
    start = time.monotonic()
    p = subprocess.Popen([SPAWN] + cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=dict(os.environ, WISP_TRACE_STARTUP="1"))
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    phases = []
    for line in err.decode(errors="replace").splitlines():
        m = TRACE_RE.match(line)
        if m:
            phases.append((m.group(3), int(m.group(1)), int(m.group(2))))
    return phases, out, time.monotonic() - start


def breakdown(runs, kernel, mem):
    """Median time of each start-up and exit phase over `runs` runs."""
    per_phase = {}
    order = []
    totals = []
    for _ in range(runs):
        phases, out, wall = run_traced(wisp_cmd(kernel, mem))
        if not phases:
            print("warning: a traced run printed no trace", file=sys.stderr)
            continue
        totals.append(wall * 1e6)
        for name, at, took in phases:
            key = re.sub(r" \(.*\)$", "", name)
            if key not in per_phase:
                per_phase[key] = ([], [])
                order.append(key)
            per_phase[key][0].append(at)
            per_phase[key][1].append(took)
    print(f"\n== start-up and exit breakdown (WISP_TRACE_STARTUP), {runs} runs, medians in us")
    print(f"{'phase':<58} {'phase us':>9} {'since exec':>11}")
    for key in order:
        at, took = per_phase[key]
        print(f"{key:<58} {statistics.median(took):>9.0f} {statistics.median(at):>11.0f}")
    if totals:
        print(f"{'spawn -> process exit (wall, this driver)':<58} {'':>9} "
              f"{statistics.median(totals):>11.0f}")


STAMP_RE = re.compile(rb"^\[\s*(\d+\.\d+)\] (.*)$", re.M)


def linux_mptable(runs):
    """The test kernel under wisp with and without its MP table (WISP_NO_MPTABLE), alternating:
    time to init, and the guest's own timestamps around the scan Linux does without a table."""
    cmdline = "console=ttyS0 panic=-1 random.trust_cpu=on printk.time=1"
    marks = [("x86/PAT", b"x86/PAT"), ("MP table found", b"found SMP MP-table"),
             ("RAMDISK", b"RAMDISK:"), ("Run /init", b"Run /init")]
    res = {"with": [], "without": []}
    for _ in range(runs):
        for name in ("with", "without"):
            env = dict(os.environ)
            if name == "without":
                env["WISP_NO_MPTABLE"] = "1"
            start = time.monotonic()
            p = subprocess.Popen([SPAWN] + wisp_cmd(VMLINUX, "128M", cmdline, INITRD),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, env=env)
            out = b""
            ready = None
            deadline = start + 900
            fd = p.stdout.fileno()
            while time.monotonic() < deadline:
                r, _, _ = select.select([fd], [], [], 1.0)
                if not r:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
                if b"WISP-INIT: ready" in out:
                    ready = time.monotonic() - start
                    break
            # The launcher forks the VMM: end the VMM itself, or it outlives the run.
            try:
                os.kill(vmm_child(p.pid), signal.SIGKILL)
            except (OSError, IndexError, ValueError):
                pass  # already gone
            p.kill()
            p.wait()
            stamps = {}
            for m in STAMP_RE.finditer(out):
                for label, needle in marks:
                    if label not in stamps and needle in m.group(2):
                        stamps[label] = float(m.group(1))
            res[name].append((ready, stamps))
            print(f"{name} MP table: init ready {ready if ready is None else round(ready, 1)} s, "
                  f"guest stamps {stamps}", flush=True)
    print(f"\n== test kernel with and without wisp's MP table (128M, 1 vCPU), {runs} runs each, medians")
    for name in ("with", "without"):
        readys = [r for r, _ in res[name] if r is not None]
        scan = [s["RAMDISK"] - s["x86/PAT"] for _, s in res[name]
                if "RAMDISK" in s and "x86/PAT" in s]
        print(f"{name:>7} MP table: start -> WISP-INIT: ready "
              f"{statistics.median(readys) if readys else float('nan'):.1f} s; guest x86/PAT -> RAMDISK "
              f"{statistics.median(scan) if scan else float('nan'):.2f} s; "
              f"'found SMP MP-table' in {sum('MP table found' in s for _, s in res[name])}/{runs}")


def vmm_child(launcher_pid):
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        return int(f.read().split()[0])


def fmt(values, unit, scale=1.0):
    v = [x * scale for x in values if x is not None]
    if not v:
        return "n/a", None
    med = statistics.median(v)
    return f"{med:8.2f} {unit} [{min(v):.2f}-{max(v):.2f}]", med


def report(title, results, metrics):
    """One column per VMM (wisp first), then wisp's ratio to each peer."""
    names = list(results)
    peers = names[1:]
    print(f"\n== {title}")
    print(f"{'metric':<34} " + " ".join(f"{n:<30}" for n in names) + " "
          + " ".join(f"wisp/{p}" for p in peers))
    for key, label, unit, scale in metrics:
        cells, meds = [], []
        for n in names:
            text, med = fmt([r.get(key) for r in results[n]], unit, scale)
            cells.append(f"{text:<30}")
            meds.append(med)
        ratios = [f"{meds[0] / m:.3f}" if meds[0] is not None and m else "n/a" for m in meds[1:]]
        print(f"{label:<34} " + " ".join(cells) + " " + " ".join(f"{r:<{5 + len(p)}}" for r, p in zip(ratios, peers)))


def seccomp_cost(runs, mem="128M"):
    """wisp on the hello guest with its seccomp filters (the default, level 2) and without
    (--seccomp-level 0), alternating: what the filters add to start -> first output and exit."""
    res = {"2": [], "0": []}
    for _ in range(runs):
        for level in res:
            r = run_once(wisp_cmd(HELLO, mem) + ["--seccomp-level", level], timeout=30)
            if not r["ok"]:
                print(f"warning: a --seccomp-level {level} run printed nothing", file=sys.stderr)
            res[level].append(r)
    print(f"\n== seccomp filters on (level 2) and off (level 0), hello guest, {runs} runs each, "
          "alternating")
    for key, label in (("first", "start -> first serial output"), ("exit", "start -> process exit")):
        on, on_med = fmt([r[key] for r in res["2"]], "ms", 1000)
        off, off_med = fmt([r[key] for r in res["0"]], "ms", 1000)
        print(f"{label:<34} on {on:<28} off {off:<28} adds {on_med - off_med:6.2f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--linux-runs", type=int, default=3)
    ap.add_argument("--no-linux", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="only the per-phase start-up and exit times of wisp (WISP_TRACE_STARTUP)")
    ap.add_argument("--linux-mptable", action="store_true",
                    help="only the test kernel with and without wisp's MP table "
                         "(WISP_NO_MPTABLE), --linux-runs each (minutes per boot here)")
    ap.add_argument("--seccomp", action="store_true",
                    help="only wisp with and without its seccomp filters (hello guest)")
    a = ap.parse_args()
    if a.seccomp:
        seccomp_cost(a.runs)
        return
    if a.breakdown:
        breakdown(a.runs, HELLO, "128M")
        return
    if a.linux_mptable:
        linux_mptable(a.linux_runs)
        return

    with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    print(f"machine: {model}, {os.cpu_count()} cpus, kvm_pvm={'yes' if os.path.exists('/sys/module/kvm_pvm') else 'no'}")
    print(f"qemu: {subprocess.run([QEMU_BIN, '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}")
    vmms = [("wisp", wisp_cmd)]
    if WISP_BEFORE:
        vmms.append(("wisp-before", wisp_before_cmd))
    vmms.append(("qemu", qemu_cmd))
    for name, binary, mk in (("cloud-hypervisor", CLOUD_HYPERVISOR, ch_cmd),
                             ("firecracker", FIRECRACKER, fc_cmd)):
        if os.path.exists(binary):
            version = subprocess.run([binary, "--version"], capture_output=True, text=True)
            print(f"{name}: {version.stdout.splitlines()[0] if version.stdout else binary}")
            vmms.append((name, mk))

    mem = "128M"
    mem_bytes = 128 << 20
    res = {name: [] for name, _ in vmms}
    shuffle = random.Random(19)
    for _ in range(a.runs):
        # A new order each round: a VMM's start pays for the teardown the one before it left
        # to the kernel (kworkers, SRCU), so no VMM may always follow the same one.
        order = list(vmms)
        shuffle.shuffle(order)
        for name, mk in order:
            r = run_once(mk(HELLO, mem), timeout=30, first_marker="probe: hello")
            if not r["ok"]:
                print(f"warning: {name} run printed nothing", file=sys.stderr)
            elif r["exit"] is not None:
                r["tail"] = r["exit"] - r["first"]
            res[name].append(r)
    with open("/proc/loadavg") as f:
        print(f"load average at the end of the hello runs: {' '.join(f.read().split()[:3])}")
    ov = {"wisp": [], "qemu": []}
    for _ in range(max(3, a.runs // 4)):
        for name, mk in (("wisp", wisp_cmd), ("qemu", qemu_cmd)):
            r = run_once(mk(PROBE, mem, "probe.scenario=spin"), marker="probe: progress",
                         timeout=30, mem_bytes=mem_bytes, sample_on_marker=True)
            ov[name].append(r)
    for name in res:
        for r, o in zip(res[name], ov.get(name, []) + [{"overhead": None}] * len(res[name])):
            r["overhead"] = o["overhead"]
    report(f"hello probe guest (PVH ELF, 1 vCPU, {mem}), {a.runs} runs each, alternating", res, [
        ("first", "start -> first serial output", "ms", 1000),
        ("tail", "guest's line -> process exit", "ms", 1000),
        ("exit", "start -> process exit", "ms", 1000),
        ("maxrss", "peak RSS", "MiB", 1 / 1024),
        ("overhead", "RSS - touched guest RAM", "MiB", 1 / 1024),
    ])
    seccomp_cost(a.runs, mem)

    if a.no_linux:
        return
    if not os.path.exists(VMLINUX):
        print("\n(no images/out/vmlinux: run images/build.sh for the Linux part)")
        return
    res = {"wisp": [], "qemu": []}
    cmdline = "console=ttyS0 quiet panic=-1"
    for _ in range(a.linux_runs):
        for name, mk in (("wisp", wisp_cmd), ("qemu", qemu_cmd)):
            r = run_once(mk(VMLINUX, "128M", cmdline, INITRD, cpus=1), marker="WISP-INIT: ready",
                         timeout=900, mem_bytes=mem_bytes, sample_on_marker=True)
            res[name].append(r)
    report(f"test kernel to its init marker (128M, 1 vCPU), {a.linux_runs} runs each", res, [
        ("first", "start -> first serial output", "s", 1),
        ("marker", "start -> WISP-INIT: ready", "s", 1),
        ("maxrss", "peak RSS", "MiB", 1 / 1024),
        ("overhead", "RSS - touched guest RAM", "MiB", 1 / 1024),
    ])


if __name__ == "__main__":
    main()
