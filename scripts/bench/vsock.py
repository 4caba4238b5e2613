#!/usr/bin/env python3
"""virtio-vsock benchmark driver; see vsock.sh, which runs this inside a network namespace of
its own that holds the tap (host end 10.0.0.1/24). One boot of the test kernel (images/out)
with its root filesystem on a disk, a NIC on the tap and a vsock; the guest's init runs
scenarios net (eth0 = 10.0.0.2/24) and vsockbench (images/init/init), which serves the same
program, vsockio, over vsock and over TCP in turn, --rounds times:
  1. round trips: the host connects to the guest's echo server on port 5100 and sends --pings
     64-byte messages one at a time, each timed until its echo is back;
  2. host -> guest: the host connects to port 5101, streams --kib KiB, closes its writing side
     and waits for the guest's close (timed from the first byte to that close);
  3. guest -> host: the guest connects to the host's port 5102 and streams --kib KiB (timed
     from the host's accept, already waiting, to the end of the stream).
vsock goes through wisp's Unix sockets as a node agent's would (`CONNECT 5100` on uds_path;
the guest's connection to port 5102 arrives at uds_path_5102); TCP through virtio-net and the
tap. Prints medians and ranges per transport and vsock/TCP ratios. Then scenario mmdsbench:
the guest GETs its instance-id --gets times from the MMDS (V2, token first; the VM is
configured by a config file, as `wisp run` has no MMDS flag) and --gets times from an HTTP
server of this script on the host, through the same NIC, and the MMDS/host ratio is printed.
"""

import argparse
import http.server
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WISP = os.path.join(ROOT, "target/release/wisp")
IMAGES = os.path.join(ROOT, "images/out")
MAC = "52:54:00:12:34:57"
GUEST, HOST = "10.0.0.2", "10.0.0.1"
ECHO, TO_GUEST, TO_HOST = 5100, 5101, 5102
MSG = 64
HTTP_PORT = 8080
MMDS_PATH = "/latest/meta-data/instance-id"
MMDS_VALUE = "i-bench"


class Console:
    """The guest console (wisp's stdout), collected by a thread; waits for lines in it."""

    def __init__(self, proc):
        self.proc = proc
        self.text = ""
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in iter(lambda: self.proc.stdout.read1(4096), b""):
            with self.cv:
                self.text += raw.decode(errors="replace")
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait_count(self, needle, count, timeout):
        """Waits until `needle` appears `count` times."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while self.text.count(needle) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    sys.exit(f"vsock.py: no {needle!r} #{count} (wisp {self.proc.poll()})\n"
                             f"console tail:\n{self.text[-3000:]}")
                self.cv.wait(min(left, 1.0))


class Receiver:
    """A listener whose thread is already in accept() when the guest connects; records the
    byte count and seconds from accept to the end of each stream."""

    def __init__(self, sock):
        self.sock = sock
        self.results = []
        self.cv = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            c, _ = self.sock.accept()
            t0 = time.monotonic()
            n = 0
            while True:
                d = c.recv(1 << 16)
                if not d:
                    break
                n += len(d)
            t1 = time.monotonic()
            c.close()
            with self.cv:
                self.results.append((n, t1 - t0))
                self.cv.notify_all()

    def wait_result(self, count, timeout):
        deadline = time.monotonic() + timeout
        with self.cv:
            while len(self.results) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    sys.exit("vsock.py: the guest's stream to the host never ended")
                self.cv.wait(left)
            return self.results[count - 1]


def connect(transport, uds, port, timeout):
    """A connected stream to the guest's `port`: TCP, or vsock through wisp's uds_path."""
    if transport == "tcp":
        s = socket.create_connection((GUEST, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            sys.exit(f"vsock.py: wisp closed the connection to guest port {port} before OK")
        line += b
    if not line.startswith(b"OK "):
        sys.exit(f"vsock.py: {line!r} instead of OK")
    return s


def recv_exact(s, n):
    got = b""
    while len(got) < n:
        d = s.recv(n - len(got))
        if not d:
            sys.exit("vsock.py: the guest's echo ended early")
        got += d
    return got


def round_trips(s, pings):
    rtts = []
    msg = bytes(range(MSG))
    for _ in range(pings):
        t0 = time.monotonic()
        s.sendall(msg)
        if recv_exact(s, MSG) != msg:
            sys.exit("vsock.py: the echo differs")
        rtts.append(time.monotonic() - t0)
    return rtts


def stream_to_guest(s, nbytes):
    chunk = bytes(1 << 16)
    t0 = time.monotonic()
    left = nbytes
    while left > 0:
        n = min(left, len(chunk))
        s.sendall(chunk[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    if s.recv(1):
        sys.exit("vsock.py: the guest sent bytes back")
    return time.monotonic() - t0


def med_range(xs, fmt):
    return f"{fmt(statistics.median(xs))} [{fmt(min(xs))} .. {fmt(max(xs))}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tap", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kib", type=int, default=1024, help="KiB per stream")
    ap.add_argument("--pings", type=int, default=50, help="round trips per round")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for the boot")
    ap.add_argument("--gets", type=int, default=50, help="MMDS GETs (and host HTTP GETs)")
    a = ap.parse_args()
    # vsock.sh's cleanup or ^C: still remove the scratch directory and the VM.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = tempfile.mkdtemp(prefix="wisp-bench-vsock-")
    proc = None
    try:
        root = os.path.join(work, "root.ext4")
        shutil.copyfile(os.path.join(IMAGES, "rootfs.ext4"), root)
        uds = os.path.join(work, "v.sock")
        receivers = {}
        lu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lu.bind(f"{uds}_{TO_HOST}")
        lu.listen(1)
        receivers["vsock"] = Receiver(lu)
        lt = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lt.bind((HOST, TO_HOST))
        lt.listen(1)
        receivers["tcp"] = Receiver(lt)

        # The same path from an HTTP server on the host, through the same NIC and tap: the
        # MMDS's answers against the host's.
        class Http(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = MMDS_VALUE.encode()
                self.send_response(200 if self.path == MMDS_PATH else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer((HOST, HTTP_PORT), Http)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()

        cmdline = (f"console=ttyS0 panic=-1 random.trust_cpu=on root=/dev/vda rw "
                   f"wisp.scenario=net,vsockbench,mmdsbench,poweroff wisp.ip={GUEST}/24 "
                   f"wisp.bench_rounds={a.rounds} wisp.bench_kib={a.kib} "
                   f"wisp.bench_gets={a.gets} wisp.http_peer={HOST}:{HTTP_PORT}")
        # A config file, since the MMDS has no command-line flag of `wisp run`.
        config = os.path.join(work, "vm.json")
        with open(config, "w") as f:
            json.dump({
                "kernel": os.path.join(IMAGES, "vmlinux"), "cmdline": cmdline, "cpus": 2,
                "memory": "256M", "disks": [{"path": root}],
                "nets": [{"id": "eth0", "tap": a.tap, "mac": MAC}],
                "vsock": {"guest_cid": 3, "uds_path": uds},
                "mmds": {"version": "V2", "network_interfaces": ["eth0"]},
                "mmds_data": {"latest": {"meta-data": {"instance-id": MMDS_VALUE}}},
            }, f)
        proc = subprocess.Popen(
            [WISP, "run", "--config", config],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        console = Console(proc)
        t_boot = time.monotonic()
        rtt = {"vsock": [], "tcp": []}
        h2g = {"vsock": [], "tcp": []}
        g2h = {"vsock": [], "tcp": []}
        nbytes = a.kib * 1024
        for r in range(1, a.rounds + 1):
            for t in ("vsock", "tcp"):
                prefix = "" if t == "vsock" else "tcp:"
                timeout = a.timeout if r == 1 and t == "vsock" else 600
                # The console ends lines with \r\n; "5100" is no prefix of another port here.
                console.wait_count(f"vsockio: listening on {prefix}{ECHO}\r", r, timeout)
                with connect(t, uds, ECHO, 600) as s:
                    rtt[t] += round_trips(s, a.pings)
                console.wait_count(f"vsockio: listening on {prefix}{TO_GUEST}\r", r, 600)
                with connect(t, uds, TO_GUEST, 600) as s:
                    h2g[t].append(nbytes / stream_to_guest(s, nbytes))
                n, secs = receivers[t].wait_result(r, 600)
                if n != nbytes:
                    sys.exit(f"vsock.py: {n} bytes from the guest over {t}, not {nbytes}")
                g2h[t].append(nbytes / secs)
                print(f"round {r} {t}: rtt median {statistics.median(rtt[t][-a.pings:]) * 1e3:.2f} ms, "
                      f"host->guest {h2g[t][-1] / 1e6:.2f} MB/s, guest->host {g2h[t][-1] / 1e6:.2f} MB/s",
                      flush=True)
        proc.wait(timeout=600)
        if "WISP-INIT: scenario vsockbench ok" not in console.text:
            sys.exit(f"vsock.py: the guest's vsockbench failed\n{console.text[-3000:]}")
        print(f"\n{a.rounds} rounds, {a.pings} round trips of {MSG} bytes and {a.kib} KiB each way "
              f"per round and transport; boot to end {time.monotonic() - t_boot:.0f} s")
        ms = lambda x: f"{x * 1e3:.2f} ms"
        mbs = lambda x: f"{x / 1e6:.2f} MB/s"
        print(f"{'':22} {'vsock':>32} {'TCP (virtio-net)':>32} {'vsock/TCP':>10}")
        for name, d, f, better in (("round trip", rtt, ms, "lower"),
                                   ("host -> guest", h2g, mbs, "higher"),
                                   ("guest -> host", g2h, mbs, "higher")):
            ratio = statistics.median(d["vsock"]) / statistics.median(d["tcp"])
            print(f"{name:22} {med_range(d['vsock'], f):>32} {med_range(d['tcp'], f):>32} "
                  f"{ratio:>9.2f}x  ({better} is better)")
        # MMDS GETs against the host's HTTP server, as the guest timed them (10 ms ticks).
        gets = {}
        for line in console.text.splitlines():
            for target in ("mmds", "host"):
                pre = f"WISP-INIT: mmdsbench_{target} gets="
                if line.startswith(pre):
                    n, secs = line[len(pre):].strip().split(" seconds=")
                    gets[target] = float(secs) / int(n)
        if "WISP-INIT: scenario mmdsbench ok" not in console.text or len(gets) != 2:
            sys.exit(f"vsock.py: the guest's mmdsbench failed\n{console.text[-3000:]}")
        print(f"{'GET ' + MMDS_PATH:22} {'MMDS ' + ms(gets['mmds']):>32} "
              f"{'host HTTP ' + ms(gets['host']):>32} {gets['mmds'] / gets['host']:>9.2f}x  "
              f"(lower is better; per GET, a busybox wget started each time, {a.gets} each)")
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
