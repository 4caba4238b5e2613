#!/usr/bin/env python3
"""virtio-net benchmark driver; see net.sh, which runs this inside a network namespace of its
own that holds the tap (host end 10.0.0.1/24). Everything here (the VMMs, ping, the UDP sender
and receiver) runs in that namespace; nothing else is touched.

One guest boot per VMM and payload size, the probe's `net` scenario:
  1. `probe: net ready` -> one ping (ARP warm-up),
  2. host -> guest: an unpaced UDP flood to 10.0.0.2:9000 for --flood-s seconds; the guest
     counts what arrives (`udp-rx` in its stats line),
  3. ping -c 20 -i 0.05: the guest stops serving after the 21st echo reply (probe.pings=21),
  4. guest -> host: the probe's burst of --burst datagrams to 10.0.0.1:9000, counted and
     timed by a receiver here.
"""

import argparse
import json
import os
import re
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WISP = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/wisp")
PROBE = os.path.join(ROOT, "target/probe-guests/probe.elf")
MAC = "52:54:00:12:34:56"
GUEST, HOST, PORT = "10.0.0.2", "10.0.0.1", 9000
TICK = os.sysconf("SC_CLK_TCK")
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def wisp_cmd(tap, cmdline):
    return [WISP, "run", "--kernel", PROBE, "--memory", "128M", "--console", "stdio",
            "--net", f"tap={tap},mac={MAC}", "--cmdline", cmdline]


def wisp_unreached_cmd(tap, cmdline):
    """wisp with rate limiters on both directions far above what the device does: every frame
    goes through the buckets, none waits (the cost of the check)."""
    lim = "1024G"
    return [WISP, "run", "--kernel", PROBE, "--memory", "128M", "--console", "stdio",
            "--net", f"tap={tap},mac={MAC},rx_bps={lim},rx_pps={lim},tx_bps={lim},tx_pps={lim}",
            "--cmdline", cmdline]


# The transmit limit of the at-the-limit rows, frames per second, with a bucket of a hundredth
# of a second (so the full bucket a boot starts with adds almost nothing).
TX_PPS_LIMIT = 2000


def wisp_limit_cmd(tap, cmdline):
    """wisp with the guest's transmit limited to TX_PPS_LIMIT frames/s (wisp's JSON config)."""
    path = f"/tmp/wisp-bench-net-limit-{os.getpid()}.json"
    with open(path, "w") as f:
        json.dump({"kernel": PROBE, "memory": "128M", "console": "stdio", "cmdline": cmdline,
                   "nets": [{"tap": tap, "mac": MAC, "tx_rate_limiter": {
                       "ops": {"size": TX_PPS_LIMIT // 100, "refill_time": 10}}}]}, f)
    return [WISP, "run", "--config", path]


def qemu_cmd(tap, cmdline):
    return ["qemu-system-x86_64", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "microvm",
            "-m", "128M", "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
            "-global", "virtio-mmio.force-legacy=false", "-kernel", PROBE, "-append", cmdline,
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-device,netdev=n0,mac={MAC}"]


def cpu_ticks(pid):
    """utime + stime of the whole process (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Receiver:
    """Counts the guest's burst on HOST:PORT (datagrams from GUEST:9001 of the expected
    length whose first 4 bytes are a sequence number below the burst size)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        # Kernel arrival times: the rate is the namespace's, not this Python loop's.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind((HOST, PORT))
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.reset(0, 0)
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def reset(self, length, n):
        self.length, self.n = length, n
        self.count = self.bad = 0
        self.first = self.last = None
        self.seen = time.monotonic()

    def drain(self, quiet=0.5, bound=15.0):
        """Waits until nothing has arrived for `quiet` seconds: the socket's backlog is read
        and the next boot's counts start from zero."""
        end = time.monotonic() + bound
        while time.monotonic() < end and time.monotonic() - self.seen < quiet:
            time.sleep(0.1)

    def loop(self):
        while not self.stop.is_set():
            try:
                d, anc, _, src = self.sock.recvmsg(2048, socket.CMSG_SPACE(16))
            except socket.timeout:
                continue
            self.seen = time.monotonic()
            now = None
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                    sec, nsec = struct.unpack("qq", data[:16])
                    now = sec + nsec / 1e9
            if now is None:
                now = time.time()
            if src != (GUEST, 9001) or len(d) != self.length or int.from_bytes(d[:4], "big") >= self.n:
                self.bad += 1
                continue
            if self.first is None:
                self.first = now
            self.last = now
            self.count += 1

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def flood(length, seconds):
    """Unpaced UDP to the guest for `seconds`; returns datagrams handed to the stack."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
    payload = bytes(length)
    dst = (GUEST, PORT)
    sent = 0
    end = time.monotonic() + seconds
    while True:
        for _ in range(64):
            try:
                s.sendto(payload, dst)
                sent += 1
            except OSError:  # ENOBUFS when the queue is full: the flood is meant to overrun it
                pass
        if time.monotonic() >= end:
            break
    s.close()
    return sent


def ping(count, interval):
    out = subprocess.run(["ping", "-n", "-c", str(count), "-i",
                          str(interval), "-W", "2", GUEST], capture_output=True, text=True)
    return [float(x) for x in re.findall(r"time=([0-9.]+) ms", out.stdout)], out.stdout


def tap_stat(tap, name):
    with open(f"/sys/class/net/{tap}/statistics/{name}") as f:
        return int(f.read())


class Guest:
    """A VMM process running the probe; lines of its console, read as they come."""

    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.buf = b""
        self.lines = []
        self.marks = {}

    def wait_for(self, prefix, timeout, mark_cpu=None):
        """Reads lines until one starts with `prefix`; records the VMM's CPU ticks at lines
        starting with a key of `mark_cpu` (dict: prefix -> name)."""
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while True:
            for i, line in enumerate(self.lines):
                if line.startswith(prefix):
                    del self.lines[:i + 1]
                    return line
            self.lines.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no {prefix!r} within {timeout} s")
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"VMM exited before {prefix!r}")
            self.buf += chunk
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                for key, name in (mark_cpu or {}).items():
                    if line.startswith(key):
                        self.marks[name] = cpu_ticks(self.p.pid)
                if line.startswith("probe: FAIL"):
                    raise RuntimeError(line)
                self.lines.append(line)

    def cpu(self):
        return cpu_ticks(self.p.pid)

    def finish(self):
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        err = self.p.stderr.read().decode(errors="replace")
        self.p.stdout.close()
        self.p.stderr.close()
        return err


def run_once(mk, tap, recv, length, a, burst=None):
    """One boot; returns a dict of measurements or None."""
    burst = burst or a.burst
    cmdline = (f"probe.scenario=net probe.serve_ms=60000 probe.pings=21 probe.burst={burst} "
               f"probe.udp_len={length}")
    recv.reset(length, burst)
    g = Guest(mk(tap, cmdline))
    r = {}
    try:
        g.wait_for("probe: net ready", 30)
        rtts, out = ping(1, 0.2)
        if not rtts:
            raise RuntimeError(f"warm-up ping failed: {out}")
        dropped0 = tap_stat(tap, "tx_dropped")
        c0 = g.cpu()
        t0 = time.monotonic()
        r["h2g_sent"] = flood(length, a.flood_s)
        t1 = time.monotonic()
        time.sleep(0.3)  # let the tap queue drain into the guest
        c1 = g.cpu()
        r["h2g_dropped"] = tap_stat(tap, "tx_dropped") - dropped0
        rtts, out = ping(20, 0.05)
        r["rtt_ms"] = statistics.median(rtts) if rtts else None
        if len(rtts) < 20:
            print(f"warning: {20 - len(rtts)} of 20 pings lost", file=sys.stderr)
            # The guest serves until its 21st echo reply: make up for the lost ones.
            missing = 20 - len(rtts)
            for _ in range(3):
                missing -= len(ping(missing, 0.2)[0])
                if missing <= 0:
                    break
        marks = {"probe: net peer": "b0", "probe: net burst us": "b1"}
        g.wait_for("probe: net answered", 30, marks)
        line = g.wait_for("probe: net burst us", 60, marks)
        r["g2h_guest_pps"] = int(line.split()[-1])
        g2h_guest_us = int(line.split()[4])
        stats = g.wait_for("probe: net stats", 30)
        g.wait_for("probe: done net", 10)
        kv = dict(zip(stats.split()[3::2], stats.split()[4::2]))
        r["h2g_rx"] = int(kv["udp-rx"])
        r["h2g_pps"] = r["h2g_rx"] / (t1 - t0)
        r["h2g_cpu_us"] = (c1 - c0) / TICK * 1e6 / max(r["h2g_rx"], 1)
        r["g2h_cpu_us"] = (g.marks["b1"] - g.marks["b0"]) / TICK * 1e6 / burst
    except RuntimeError as e:
        print(f"warning: {e}", file=sys.stderr)
        r = None
    except BaseException:  # interrupted: no VMM left behind
        g.p.kill()
        g.finish()
        raise
    err = g.finish()
    if r is None:
        print(f"  stderr: {err.strip()[-2000:]}", file=sys.stderr)
        return None
    recv.drain()  # the last datagrams through the namespace's stack and this receiver
    r["g2h_recv"] = recv.count
    r["g2h_bad"] = recv.bad
    r["g2h_host_pps"] = (recv.count / (recv.last - recv.first)
                         if recv.count > 1 and recv.last > recv.first else None)
    r["g2h_guest_us"] = g2h_guest_us
    return r


def fmt(values):
    if not values:
        return "n/a", None
    med = statistics.median(values)
    if med >= 100:
        return f"{med:9.0f} [{min(values):.0f}-{max(values):.0f}]", med
    return f"{med:9.3f} [{min(values):.3f}-{max(values):.3f}]", med


def limit_rows(res, sizes, a):
    """wisp with limiters against wisp without: the cost of limits not reached, and the
    guest's transmit rate at a limit (on the host receiver's kernel timestamps)."""
    print(f"\n== rate limiters (wisp only), median [min-max]; wisp-unreached: rx/tx limits of "
          f"1024G bytes and frames per second on the command line; wisp-limit: tx at "
          f"{TX_PPS_LIMIT} frames/s (bucket of 10 ms), {a.limit_burst}-datagram bursts")
    print(f"{'metric':<28} {'payload':<8} {'wisp':<30} {'wisp-unreached':<30} unreached/wisp")
    for size in sizes:
        for key, label, unit in [("h2g_pps", "host->guest pps", "pps"),
                                 ("g2h_host_pps", "guest->host pps (host rx)", "pps"),
                                 ("g2h_cpu_us", "guest->host CPU/pkt", "us")]:
            w, wm = fmt([r[key] for r in res["wisp"][size] if r and r[key] is not None])
            u, um = fmt([r[key] for r in res["wisp-unreached"][size]
                         if r and r[key] is not None])
            rt = f"{um / wm:.2f}" if um is not None and wm else "n/a"
            print(f"{label:<28} {size:<8} {w + ' ' + unit:<30} {u + ' ' + unit:<30} {rt}")
    print(f"{'metric':<28} {'payload':<8} {'wisp-limit':<30} {'% of the limit':<30}")
    for size in sizes:
        v, vm = fmt([r["g2h_host_pps"] for r in res["wisp-limit"][size]
                     if r and r["g2h_host_pps"] is not None])
        pct = f"{vm / TX_PPS_LIMIT * 100:.1f}%" if vm else "n/a"
        lost = sum(a.limit_burst - r["g2h_recv"] for r in res["wisp-limit"][size] if r)
        print(f"{'guest->host pps (host rx)':<28} {size:<8} {v + ' pps':<30} {pct:<30} "
              f"({lost} datagrams not received)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tap", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--flood-s", type=float, default=1.5, help="host->guest flood length")
    ap.add_argument("--burst", type=int, default=50000, help="guest->host datagrams per boot")
    ap.add_argument("--no-limits", action="store_true", help="skip the rate limiter rows")
    ap.add_argument("--limits-only", action="store_true",
                    help="only the rate limiter rows (wisp with and without limiters, no QEMU)")
    ap.add_argument("--limit-burst", type=int, default=10000,
                    help=f"guest->host datagrams per boot at the {TX_PPS_LIMIT} frames/s limit")
    a = ap.parse_args()

    with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    print(f"machine: {model}, {os.cpu_count()} cpus, load average {load}, "
          f"kvm_pvm={'yes' if os.path.exists('/sys/module/kvm_pvm') else 'no'}")
    print(f"qemu: {qv.stdout.splitlines()[0]}")
    print(f"network: namespace of its own, tap {a.tap} (host 10.0.0.1/24, guest 10.0.0.2), "
          "probe net scenario (no offloads, 16 rx buffers of 2 KiB)")
    print("  wisp: --net tap=...   qemu: microvm, virtio-net-device, -netdev tap,vhost=off")
    print(f"  {a.runs} boots per VMM and payload size, alternating; per boot: a {a.flood_s} s "
          f"unpaced host->guest UDP flood, ping -c 20 -i 0.05, a {a.burst}-datagram guest burst")
    print("  h2g pps = guest's udp-rx / flood time (the tap queue's backlog, at most ~1000, is "
          "counted too); g2h pps: the guest's own figure (first frame queued to last returned) "
          "and the host receiver's (first to last datagram's kernel arrival time, SO_TIMESTAMPNS)")
    print("  CPU/pkt: utime+stime of the VMM process (all threads, vCPU included) from "
          "/proc/PID/stat over the flood (h2g) or the burst (g2h), / packets")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    vmms = {"wisp": wisp_cmd} if a.limits_only else {"wisp": wisp_cmd, "qemu": qemu_cmd}
    limited = {} if a.no_limits else {"wisp-unreached": wisp_unreached_cmd,
                                      "wisp-limit": wisp_limit_cmd}
    sizes = [64, 1472]
    res = {n: {s: [] for s in sizes} for n in list(vmms) + list(limited)}
    recv = Receiver()
    try:
        for i in range(a.runs):
            for size in sizes:
                for name, mk in list(vmms.items()) + list(limited.items()):
                    burst = a.limit_burst if name == "wisp-limit" else None
                    res[name][size].append(run_once(mk, a.tap, recv, size, a, burst))
            print(f"  round {i + 1}/{a.runs} done", file=sys.stderr)
    finally:
        recv.close()
    failed = sum(1 for n in res for s in sizes for r in res[n][s] if r is None)
    if limited:
        limit_rows(res, sizes, a)
    if a.limits_only:
        sys.exit(1 if failed else 0)

    rows = [
        ("h2g_pps", "host->guest pps", "pps", True),
        ("h2g_cpu_us", "host->guest CPU/pkt", "us", False),
        ("g2h_guest_pps", "guest->host pps (guest)", "pps", True),
        ("g2h_host_pps", "guest->host pps (host rx)", "pps", True),
        ("g2h_cpu_us", "guest->host CPU/pkt", "us", False),
    ]
    print(f"\n== median [min-max]; ratio = wisp/qemu (> 1 is better for pps, < 1 for CPU and RTT)")
    print(f"{'metric':<28} {'payload':<8} {'wisp':<30} {'qemu':<30} wisp/qemu")
    for size in sizes:
        for key, label, unit, _ in rows:
            w, wm = fmt([r[key] for r in res["wisp"][size] if r and r[key] is not None])
            q, qm = fmt([r[key] for r in res["qemu"][size] if r and r[key] is not None])
            rt = f"{wm / qm:.2f}" if wm is not None and qm else "n/a"
            print(f"{label:<28} {size:<8} {w + ' ' + unit:<30} {q + ' ' + unit:<30} {rt}")
    rtt = {n: [r["rtt_ms"] for s in sizes for r in res[n][s] if r and r["rtt_ms"] is not None]
           for n in vmms}
    w, wm = fmt(rtt["wisp"])
    q, qm = fmt(rtt["qemu"])
    rt = f"{wm / qm:.2f}" if wm is not None and qm else "n/a"
    print(f"{'ping RTT (median per boot)':<28} {'icmp':<8} {w + ' ms':<30} {q + ' ms':<30} {rt}")

    print("\n== delivery (sums over all boots)")
    for name in vmms:
        for size in sizes:
            ok = [r for r in res[name][size] if r]
            print(f"  {name} {size:>4} B: h2g sent {sum(r['h2g_sent'] for r in ok)}, "
                  f"guest got {sum(r['h2g_rx'] for r in ok)}, "
                  f"tap dropped {sum(r['h2g_dropped'] for r in ok)}; "
                  f"g2h {sum(r['g2h_recv'] for r in ok)} of {a.burst * len(ok)} received, "
                  f"{sum(r['g2h_bad'] for r in ok)} unexpected")
    if failed:
        print(f"\n{failed} boots failed (see warnings)")
        sys.exit(1)


if __name__ == "__main__":
    main()
