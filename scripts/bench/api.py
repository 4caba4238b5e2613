#!/usr/bin/env python3
"""API benchmark: time and CPU from `wisp --api-sock` start to the socket accepting, latency
of GET /, and of a full configure-and-start sequence (hello probe guest), medians of N runs.
Firecracker's published figure for the first: under 8 CPU ms. As root, the same again through
`wisp jail` (uid 10123, a chroot under /tmp, alternating with the plain runs): what the
jailer adds before the socket accepts (target: under 10 ms). And the plain runs again with
`--seccomp-level 0`, alternating: what the seccomp filters add (target: under 1 ms)."""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WISP = os.environ.get("WISP", os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/wisp"))
# Another wisp build (e.g. main before a change), run in turn with WISP: rows and ratios.
WISP_BEFORE = os.environ.get("WISP_BEFORE")
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


def wait_accepting(sock):
    while True:
        try:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(sock)
            c.close()
            return
        except OSError:
            time.sleep(0.0002)


def spawn(argv):
    """posix_spawn, with stdout and stderr to /dev/null: subprocess.Popen's own work (about a
    millisecond here) would count as wisp's start."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        return os.posix_spawn(argv[0], argv, os.environ,
                              file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1),
                                            (os.POSIX_SPAWN_DUP2, devnull, 2)])
    finally:
        os.close(devnull)


def one_run(argv, sock, kernel, r):
    """Start, wait for the socket, GET / five times, configure and start the hello guest."""
    t0 = time.monotonic()
    pid = spawn(argv)
    wait_accepting(sock)
    r["ready"].append((time.monotonic() - t0) * 1000)
    r["cpu"].append(cpu_ms(pid))
    for _ in range(5):
        t = time.monotonic()
        assert request(sock, "GET", "/") == 200
        r["get"].append((time.monotonic() - t) * 1000)
    t = time.monotonic()
    assert request(sock, "PUT", "/boot-source", f'{{"kernel_image_path": "{kernel}"}}') == 204
    assert request(sock, "PUT", "/machine-config", '{"vcpu_count": 1, "mem_size_mib": 64}') == 204
    assert request(sock, "PUT", "/actions", '{"action_type": "InstanceStart"}') == 204
    r["start"].append((time.monotonic() - t) * 1000)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    sock = f"/tmp/wisp-bench-{os.getpid()}.sock"
    jailed = os.geteuid() == 0
    base = f"/tmp/wisp-bench-jail-{os.getpid()}"
    if jailed:
        os.makedirs(base)
        # The agent's copy of the kernel, linked into each jail.
        shutil.copy(HELLO, os.path.join(base, "hello.elf"))
    plain = {"ready": [], "cpu": [], "get": [], "start": []}
    jail = {"ready": [], "cpu": [], "get": [], "start": []}
    # The same with no seccomp filters (alternating): what the filters cost.
    nofilter = {"ready": [], "cpu": [], "get": [], "start": []}
    before = {"ready": [], "cpu": [], "get": [], "start": []}
    for i in range(a.runs):
        # Which goes first alternates: a run right after the jailer's clean-up is slower.
        pair = [([WISP, "--api-sock", sock], plain),
                ([WISP, "--api-sock", sock, "--seccomp-level", "0"], nofilter)]
        if WISP_BEFORE:
            pair.append(([WISP_BEFORE, "--api-sock", sock], before))
        for argv, r in pair if i % 2 == 0 else reversed(pair):
            one_run(argv, sock, HELLO, r)
        if not jailed:
            continue
        vm = f"bench-{i}"
        jail_sock = os.path.join(base, "wisp", vm, "root/api.sock")
        argv = [WISP, "jail", "--id", vm, "--exec-file", WISP, "--uid", "10123",
                "--gid", "10123", "--chroot-base-dir", base,
                "--link-in", os.path.join(base, "hello.elf") + ":/hello.elf",
                "--", "--api-sock", "/api.sock"]
        one_run(argv, jail_sock, "/hello.elf", jail)
        subprocess.run([WISP, "jail", "--cleanup", "--id", vm, "--exec-file", WISP,
                        "--chroot-base-dir", base], check=True, stdout=subprocess.DEVNULL)
    if jailed:
        shutil.rmtree(base)
    rows = [("start -> socket accepting", plain["ready"]),
            ("CPU time until accepting (tick resolution)", plain["cpu"]),
            ("GET / latency", plain["get"]),
            ("configure + InstanceStart (3 requests)", plain["start"])]
    rows += [("--seccomp-level 0: start -> socket accepting", nofilter["ready"]),
             ("--seccomp-level 0: GET / latency", nofilter["get"]),
             ("--seccomp-level 0: configure + InstanceStart", nofilter["start"])]
    if jailed:
        rows += [("jailed: start -> socket accepting", jail["ready"]),
                 ("jailed: CPU time until accepting", jail["cpu"]),
                 ("jailed: GET / latency", jail["get"]),
                 ("jailed: configure + InstanceStart", jail["start"])]
    if WISP_BEFORE:
        rows += [("before: start -> socket accepting", before["ready"]),
                 ("before: GET / latency", before["get"]),
                 ("before: configure + InstanceStart", before["start"])]
    for name, v in rows:
        print(f"{name:<44} median {statistics.median(v):7.2f} ms  [{min(v):.2f}-{max(v):.2f}]")
    if WISP_BEFORE:
        for what, key in (("start -> socket", "ready"), ("GET /", "get"),
                          ("configure + start", "start")):
            ratio = statistics.median(plain[key]) / statistics.median(before[key])
            print(f"{'wisp/before, ' + what + ' (medians)':<44}        {ratio:7.3f}")
    for what, key in (("start -> socket", "ready"), ("GET /", "get"),
                      ("configure + start", "start")):
        extra = statistics.median(plain[key]) - statistics.median(nofilter[key])
        print(f"{'seccomp adds, ' + what + ' (diff. of medians)':<44}        {extra:7.2f} ms")
    if jailed:
        extra = statistics.median(jail["ready"]) - statistics.median(plain["ready"])
        print(f"{'the jailer adds (difference of medians)':<44}        {extra:7.2f} ms")


if __name__ == "__main__":
    main()
