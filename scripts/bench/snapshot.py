#!/usr/bin/env python3
"""Snapshot benchmark, on the `snap` probe guest (it counts, writes its count to a virtio-blk
disk and prints `probe: count N ...` about every 50 ms):

- create: time of `PUT /snapshot/create` on a paused 128 MiB and 1 GiB guest (the memory
  file is written whole; the disks are written back first);
- restore: from the new wisp's start to the answer of `PUT /snapshot/load` (resume_vm), and
  to the restored guest's next serial line; medians of N runs;
- clones: 10 wisps restored from one 128 MiB snapshot side by side, each on its own copy of
  the disk: the RSS of each (shared pages of the memory file are counted in every RSS) and
  their PSS (each shared page divided among its sharers), against one VM booted fresh.

Targets (issue 14): restore to running under 10 ms for 128 MiB; 10 clones' total well under
10 times one VM's."""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WISP = os.environ.get("WISP", os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/wisp"))
PROBE = os.path.join(ROOT, "target/probe-guests/probe.elf")


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
    status = int(data.split()[1])
    if status >= 300:
        raise RuntimeError(f"{method} {url}: {data.decode(errors='replace')}")
    return status


def wait_accepting(sock):
    while True:
        try:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(sock)
            c.close()
            return
        except OSError:
            time.sleep(0.0002)


class Vm:
    def __init__(self, work, name):
        self.sock = os.path.join(work, f"{name}.sock")
        self.out = os.path.join(work, f"{name}.out")
        self.outf = open(self.out, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([WISP, "--api-sock", self.sock], stdout=self.outf,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_accepting(self.sock)

    def put(self, url, body):
        request(self.sock, "PUT", url, body)

    def patch(self, url, body):
        request(self.sock, "PATCH", url, body)

    def text(self):
        with open(self.out, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_for(self, needle, timeout=60):
        end = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > end:
                raise RuntimeError(f"no {needle!r} within {timeout} s:\n{self.text()[-2000:]}")
            time.sleep(0.0005)
        return time.monotonic()

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.outf.close()

    def rss_pss_kib(self):
        with open(f"/proc/{self.proc.pid}/smaps_rollup") as f:
            v = {l.split(":")[0]: int(l.split()[1]) for l in f if l.split()[-1:] == ["kB"]}
        return v["Rss"], v["Pss"]


def counting_vm(work, name, mem_mib, disk):
    vm = Vm(work, name)
    vm.put("/boot-source",
           f'{{"kernel_image_path": "{PROBE}", "boot_args": "probe.scenario=snap"}}')
    vm.put("/machine-config", f'{{"vcpu_count": 1, "mem_size_mib": {mem_mib}}}')
    vm.put("/drives/data",
           f'{{"drive_id": "data", "path_on_host": "{disk}", "is_root_device": false}}')
    vm.put("/actions", '{"action_type": "InstanceStart"}')
    vm.wait_for("probe: count 3 ")
    return vm


def snapshot(work, mem_mib, disk):
    """A snapshot of a counting guest; returns (create seconds, state path, memory path)."""
    vm = counting_vm(work, f"origin-{mem_mib}", mem_mib, disk)
    vm.patch("/vm", '{"state": "Paused"}')
    state = os.path.join(work, f"state-{mem_mib}.snap")
    mem = os.path.join(work, f"mem-{mem_mib}.raw")
    t = time.monotonic()
    vm.put("/snapshot/create",
           f'{{"snapshot_path": "{state}", "mem_file_path": "{mem}"}}')
    took = time.monotonic() - t
    vm.stop()
    return took, state, mem


def load_body(state, mem, resume):
    return (f'{{"snapshot_path": "{state}", "mem_backend": {{"backend_type": "File", '
            f'"backend_path": "{mem}"}}, "resume_vm": {"true" if resume else "false"}}}')


def restore_once(work, i, state, mem):
    vm = Vm(work, f"restore-{i}")
    vm.put("/snapshot/load", load_body(state, mem, True))
    loaded = time.monotonic()
    # The next complete line the restored guest prints.
    line = vm.wait_for("\nprobe: count ")
    vm.stop()
    return (loaded - vm.t0) * 1000, (line - vm.t0) * 1000


def fmt(xs):
    return f"median {statistics.median(xs):.1f} ms (range {min(xs):.1f}-{max(xs):.1f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--clones", type=int, default=10)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="wisp-bench-snap-")
    try:
        disk = os.path.join(work, "disk.raw")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        for mib in (128, 1024):
            took, _, _ = snapshot(work, mib, disk)
            print(f"create, {mib} MiB guest: {took * 1000:.0f} ms")
            for suffix in ("snap", "raw"):
                os.unlink(os.path.join(work, f"{'state' if suffix == 'snap' else 'mem'}-{mib}.{suffix}"))
        _, state, mem = snapshot(work, 128, disk)
        loads, lines = [], []
        for i in range(args.runs):
            # Each restore goes on writing the same disk (one at a time).
            a, b = restore_once(work, i, state, mem)
            loads.append(a)
            lines.append(b)
        print(f"restore, 128 MiB: wisp start -> load answered (VM running): {fmt(loads)}")
        print(f"restore, 128 MiB: wisp start -> the guest's next serial line: {fmt(lines)}")

        fresh = counting_vm(work, "fresh", 128, disk)
        fresh.wait_for("probe: count 10 ")
        fresh_rss, _ = fresh.rss_pss_kib()
        fresh.stop()
        clones = []
        for i in range(args.clones):
            own = os.path.join(work, f"disk-{i}.raw")
            shutil.copyfile(disk, own)
            vm = Vm(work, f"clone-{i}")
            vm.put("/snapshot/load", load_body(state, mem, False))
            vm.patch("/drives/data", f'{{"drive_id": "data", "path_on_host": "{own}"}}')
            clones.append(vm)
        for vm in clones:
            vm.patch("/vm", '{"state": "Resumed"}')
        for vm in clones:
            vm.wait_for("probe: count 10 ")
        sizes = [vm.rss_pss_kib() for vm in clones]
        for vm in clones:
            vm.stop()
        rss = sum(r for r, _ in sizes)
        pss = sum(p for _, p in sizes)
        print(f"one VM booted fresh (128 MiB, same guest): RSS {fresh_rss / 1024:.1f} MiB")
        print(f"{args.clones} clones of one 128 MiB snapshot: RSS {rss / 1024:.1f} MiB in all "
              f"(each counts the shared file pages), PSS {pss / 1024:.1f} MiB in all "
              f"({pss / 1024 / args.clones:.1f} MiB each)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
