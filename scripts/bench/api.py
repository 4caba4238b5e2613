#!/usr/bin/env python3
"""API benchmark: time and CPU from `wisp --api-sock` start to the socket accepting, latency
of GET /, and of a full configure-and-start sequence (hello probe guest), medians of N runs.
Firecracker's published figure for the first: under 8 CPU ms."""

import argparse
import os
import socket
import statistics
import subprocess
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WISP = os.path.join(ROOT, "target/release/wisp")
HELLO = os.path.join(ROOT, "target/probe-guests/hello.elf")
TICK = os.sysconf("SC_CLK_TCK")


def request(path, method, url, body=""):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(f"{method} {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
              f"Connection: close\r\n\r\n{body}".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split()[1])


def cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    sock = f"/tmp/wisp-bench-{os.getpid()}.sock"
    ready, cpu, get_lat, start_lat = [], [], [], []
    for _ in range(a.runs):
        t0 = time.monotonic()
        p = subprocess.Popen([WISP, "--api-sock", sock], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        while True:
            try:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(sock)
                c.close()
                break
            except OSError:
                time.sleep(0.0002)
        ready.append((time.monotonic() - t0) * 1000)
        cpu.append(cpu_ms(p.pid))
        for _ in range(5):
            t = time.monotonic()
            assert request(sock, "GET", "/") == 200
            get_lat.append((time.monotonic() - t) * 1000)
        t = time.monotonic()
        assert request(sock, "PUT", "/boot-source", f'{{"kernel_image_path": "{HELLO}"}}') == 204
        assert request(sock, "PUT", "/machine-config", '{"vcpu_count": 1, "mem_size_mib": 64}') == 204
        assert request(sock, "PUT", "/actions", '{"action_type": "InstanceStart"}') == 204
        start_lat.append((time.monotonic() - t) * 1000)
        p.wait(timeout=30)
    for name, v, unit in [("start -> socket accepting", ready, "ms"),
                          ("CPU time until accepting (tick resolution)", cpu, "ms"),
                          ("GET / latency", get_lat, "ms"),
                          ("configure + InstanceStart (3 requests)", start_lat, "ms")]:
        print(f"{name:<44} median {statistics.median(v):7.2f} {unit}  [{min(v):.2f}-{max(v):.2f}]")


if __name__ == "__main__":
    main()
