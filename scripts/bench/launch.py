#!/usr/bin/env python3
"""Launch benchmark driver; see launch.sh. Starts N VMs at once as a node agent would, waits for
every guest's first line, measures memory, checks that every VM is alive (and answers its API),
then stops them all and cleans up."""

import argparse
import asyncio
import concurrent.futures
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WISP = os.environ.get("WISP", os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/wisp"))
IDLE = os.path.join(ROOT, "target/probe-guests/idle.elf")
PEERS = "/work/peers"
QEMU = os.environ.get("QEMU", shutil.which("qemu-system-x86_64") or
                      f"{PEERS}/qemu-debs/root/usr/bin/qemu-system-x86_64")
QEMU_DATA = os.environ.get("QEMU_DATA", f"{PEERS}/qemu-debs/root/usr/share/qemu")
FIRECRACKER = os.environ.get(
    "FIRECRACKER", f"{PEERS}/firecracker/build/cargo_target/release/firecracker")
CLOUD_HYPERVISOR = os.environ.get(
    "CLOUD_HYPERVISOR", f"{PEERS}/cloud-hypervisor/target/release/cloud-hypervisor")

SPAWN_THREADS = 4
MEMINFO_KEYS = ["AnonPages", "PageTables", "SecPageTables", "KernelStack", "SUnreclaim",
                "Percpu"]


def meminfo():
    d = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            d[k] = int(v.split()[0])
    # What `free` calls used: neither free nor reclaimable cache.
    d["Used"] = (d["MemTotal"] - d["MemFree"] - d["Buffers"] - d["Cached"]
                 - d["SReclaimable"])
    return d


def rollup(pid):
    """(Rss, Pss, private) KiB of a process, from smaps_rollup."""
    vals = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":"):
                    vals[parts[0][:-1]] = int(parts[1])
    except OSError:
        return None
    return (vals.get("Rss", 0), vals.get("Pss", 0),
            vals.get("Private_Clean", 0) + vals.get("Private_Dirty", 0))


def threads(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


class Vm:
    def __init__(self, i, workdir):
        self.i = i
        self.sock = os.path.join(workdir, f"{i}.sock")
        self.pid = None
        self.fd = None
        self.spawned = None
        self.first = None
        self.out = b""
        self.error = None
        self.stderr = os.path.join(workdir, f"{i}.err")
        self.status = None


def reap(vm, flags=os.WNOHANG):
    """Whether the VM's process has ended (reaped here, once; its status kept)."""
    if vm.status is None:
        pid, status = os.waitpid(vm.pid, flags)
        if pid == 0:
            return False
        vm.status = status
    return True


def ended_why(vm):
    """The exit status and the last line the VMM wrote on stderr."""
    st = vm.status
    how = (f"signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st) else f"status {os.WEXITSTATUS(st)}")
    try:
        with open(vm.stderr, errors="replace") as f:
            lines = f.read().strip().splitlines()
    except OSError:
        lines = []
    return f"{how}: {lines[-1][:200] if lines else '(nothing on stderr)'}"


def spawn(cmd, vm):
    r, w = os.pipe2(os.O_CLOEXEC)
    actions = [(os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, vm.stderr, os.O_WRONLY | os.O_CREAT, 0o600)]
    vm.spawned = time.monotonic()
    vm.pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=actions)
    os.close(w)
    os.set_blocking(r, False)
    vm.fd = r


async def http(path, method, url, body=""):
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(f"{method} {url} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
                 f"Content-Type: application/json\r\n\r\n{body}".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split()[1])
    length = 0
    for line in head.decode(errors="replace").split("\r\n"):
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    if length:
        await reader.readexactly(length)
    writer.close()
    return status


async def wait_socket(path, deadline):
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.close()
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} never accepted")
            await asyncio.sleep(0.001)


async def configure(vm, mem_mib, deadline):
    await wait_socket(vm.sock, deadline)
    for method, url, body in (
            ("PUT", "/boot-source", f'{{"kernel_image_path": "{IDLE}"}}'),
            ("PUT", "/machine-config", f'{{"vcpu_count": 1, "mem_size_mib": {mem_mib}}}'),
            ("PUT", "/actions", '{"action_type": "InstanceStart"}')):
        status = await http(vm.sock, method, url, body)
        if status != 204:
            raise RuntimeError(f"{method} {url}: HTTP {status}")


def watch_output(loop, vm, done):
    """Reads the VM's output for as long as it runs (a full pipe would stall the VMM); `done`
    once, at the guest's first line or at EOF."""
    counted = [False]

    def on_readable():
        try:
            data = os.read(vm.fd, 4096)
        except BlockingIOError:
            return
        if vm.first is None:
            vm.out += data
            # The guest's line, not a VMM's own log lines (Firecracker logs to stdout).
            if b"probe: hello" in vm.out:
                vm.first = time.monotonic()
                vm.out = b""
        if not data:
            loop.remove_reader(vm.fd)
            if vm.first is None:
                vm.error = vm.error or "exited before its guest's line"
        if not counted[0] and (vm.first is not None or not data):
            counted[0] = True
            done()
    loop.add_reader(vm.fd, on_readable)


def command(vmm, mode, vm, mem_mib):
    if vmm == "wisp":
        if mode == "api":
            return [WISP, "--api-sock", vm.sock]
        return [WISP, "run", "--kernel", IDLE, "--memory", f"{mem_mib}M", "--cpus", "1"]
    if vmm == "firecracker":
        return [FIRECRACKER, "--api-sock", vm.sock]
    if vmm == "qemu":
        return [QEMU, "-L", QEMU_DATA, "-enable-kvm", "-cpu", "host,-arch-capabilities",
                "-M", "microvm", "-nodefaults", "-no-reboot", "-display", "none",
                "-serial", "stdio", "-m", f"{mem_mib}M", "-smp", "1", "-kernel", IDLE]
    if vmm == "cloud-hypervisor":
        return [CLOUD_HYPERVISOR, "--kernel", IDLE, "--memory", f"size={mem_mib}M",
                "--cpus", "boot=1", "--serial", "tty", "--console", "off"]
    raise ValueError(vmm)


async def launch(vmm, mode, n, mem_mib, timeout):
    loop = asyncio.get_running_loop()
    workdir = tempfile.mkdtemp(prefix="wisp-launch-")
    vms = [Vm(i, workdir) for i in range(n)]
    remaining = [n]
    all_out = loop.create_future()

    def done():
        remaining[0] -= 1
        if remaining[0] == 0 and not all_out.done():
            all_out.set_result(None)

    before = meminfo()
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru_self = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    deadline = t0 + timeout
    failures = []
    try:
        # Spawned from a few threads (posix_spawn waits for each child's exec, which is most
        # of a spawn): one thread alone caps the rate near 200/s here.
        def spawn_one(vm):
            try:
                spawn(command(vmm, mode, vm, mem_mib), vm)
            except OSError as e:
                vm.error = f"spawn: {e}"

        started = []
        with concurrent.futures.ThreadPoolExecutor(SPAWN_THREADS) as pool:
            for vm, _ in zip(vms, pool.map(spawn_one, vms)):
                if vm.pid is None:
                    failures.append(vm)
                    done()
                else:
                    started.append(vm)
                    watch_output(loop, vm, done)
        spawned_all = time.monotonic() - t0
        # For a manual clean-up should this driver die before its own.
        with open(os.path.join(workdir, "pids"), "w") as f:
            f.write("".join(f"{vm.pid}\n" for vm in started))
        if mode == "api":
            async def one(vm):
                try:
                    await configure(vm, mem_mib, deadline)
                except Exception as e:  # noqa: BLE001 - reported per VM
                    vm.error = f"API: {e}"
            await asyncio.gather(*(one(vm) for vm in vms if vm.pid))
        try:
            await asyncio.wait_for(all_out, max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        launched = [vm for vm in vms if vm.first is not None]
        last = max((vm.first for vm in launched), default=t0)
        await asyncio.sleep(1.0)  # let every VM settle into idle
        after = meminfo()
        sample = [vm for vm in launched][:: max(1, len(launched) // 200)]
        mems = [m for m in (rollup(vm.pid) for vm in sample) if m]
        nthreads = [threads(vm.pid) for vm in sample]
        nfds = [len(os.listdir(f"/proc/{vm.pid}/fd")) for vm in sample
                if os.path.exists(f"/proc/{vm.pid}/fd")]
        alive = [vm for vm in vms if vm.pid and not reap(vm)]
        for vm in vms:
            if vm.pid and vm.status is not None:
                vm.error = vm.error or f"ended early: {ended_why(vm)}"
        answering = None
        if mode == "api":
            async def get(vm):
                try:
                    return await asyncio.wait_for(http(vm.sock, "GET", "/"), 10) == 200
                except Exception:  # noqa: BLE001 - counted as not answering
                    return False
            answering = sum(await asyncio.gather(*(get(vm) for vm in alive)))
    finally:
        stop_start = time.monotonic()
        for vm in vms:
            if vm.pid and vm.status is None:
                try:
                    os.kill(vm.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        unreaped = [vm for vm in vms if vm.pid and vm.status is None]
        stop_deadline = time.monotonic() + 30
        while unreaped and time.monotonic() < stop_deadline:
            still = []
            for vm in unreaped:
                if not reap(vm):
                    still.append(vm)
            unreaped = still
            if unreaped:
                await asyncio.sleep(0.01)
        stopped_in = time.monotonic() - stop_start
        for vm in unreaped:
            os.kill(vm.pid, signal.SIGKILL)
            reap(vm, 0)
        for vm in vms:
            if vm.fd is not None:
                try:
                    loop.remove_reader(vm.fd)
                except Exception:  # noqa: BLE001 - already removed
                    pass
                os.close(vm.fd)
        shutil.rmtree(workdir, ignore_errors=True)
    await asyncio.sleep(0.5)
    final = meminfo()
    ru_c = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru_s = resource.getrusage(resource.RUSAGE_SELF)
    vmm_cpu = (ru_c.ru_utime - ru_children.ru_utime, ru_c.ru_stime - ru_children.ru_stime)
    driver_cpu = (ru_s.ru_utime - ru_self.ru_utime) + (ru_s.ru_stime - ru_self.ru_stime)

    lat = sorted((vm.first - vm.spawned) * 1000 for vm in launched)
    errors = [vm.error for vm in vms if vm.error]
    span = last - t0

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

    print(f"\n== {vmm} ({'API: PUT boot-source, machine-config, InstanceStart' if mode == 'api' else 'command line'}), "
          f"{n} VMs of {mem_mib} MiB, idle guest")
    print(f"spawned all in {spawned_all * 1000:.0f} ms; {len(launched)}/{n} printed within "
          f"{span * 1000:.0f} ms of the first spawn: {len(launched) / span if span > 0 else 0:.0f} launches/s")
    print(f"CPU per VM, whole life (start, idle, stop): the VMM's {sum(vmm_cpu) / n * 1000:.2f} ms "
          f"(user {vmm_cpu[0] / n * 1000:.2f}, system {vmm_cpu[1] / n * 1000:.2f}), this driver's "
          f"{driver_cpu / n * 1000:.2f} ms")
    print(f"spawn -> first output: p50 {pct(50):.1f} ms, p99 {pct(99):.1f} ms, max {pct(100):.1f} ms")
    if mems:
        print(f"per VMM process (sample of {len(mems)}): RSS {statistics.mean(m[0] for m in mems) / 1024:.2f} MiB, "
              f"PSS {statistics.mean(m[1] for m in mems) / 1024:.2f} MiB, "
              f"private {statistics.mean(m[2] for m in mems) / 1024:.2f} MiB, "
              f"{statistics.median(nthreads):.0f} threads, {statistics.median(nfds):.0f} fds")
    if launched:
        k = len(launched)
        per = {key: (after[key] - before[key]) / k for key in ["Used"] + MEMINFO_KEYS if key in after}
        kernel = sum(per.get(key, 0) for key in ("PageTables", "SecPageTables", "KernelStack",
                                                  "SUnreclaim", "Percpu"))
        pss = statistics.mean(m[1] for m in mems) if mems else 0
        print(f"host memory per VM: {(pss + kernel) / 1024:.2f} MiB = the VMM's PSS "
              f"{pss / 1024:.2f} + the kernel's {kernel / 1024:.2f} (page tables "
              f"{per['PageTables'] / 1024:.2f}, secondary page tables "
              f"{per.get('SecPageTables', 0) / 1024:.2f}, kernel stacks {per['KernelStack'] / 1024:.2f}, "
              f"unreclaimable slab {per['SUnreclaim'] / 1024:.2f}, percpu {per['Percpu'] / 1024:.2f}: "
              f"/proc/meminfo after - before, / VMs); all used memory after - before, / VMs: "
              f"{per['Used'] / 1024:.2f} MiB (anon {per['AnonPages'] / 1024:.2f}; noisy on a shared host)")
    alive_txt = f"{len(alive)}/{n} alive"
    if answering is not None:
        alive_txt += f", {answering}/{n} answered GET /"
    print(f"after the launch: {alive_txt}; SIGTERM to all exited in {stopped_in * 1000:.0f} ms"
          f"{f', {len(unreaped)} needed SIGKILL' if unreaped else ''}; "
          f"memory back: used {(final['Used'] - before['Used']) / 1024:+.0f} MiB against before")
    if errors:
        print(f"failures ({len(errors)}): " + "; ".join(sorted(set(errors))[:5]))
    return len(launched) == n and len(alive) == n and (answering in (None, n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("--mode", choices=["api", "run", "both"], default="both")
    ap.add_argument("--mem", type=int, default=64, help="guest memory, MiB")
    ap.add_argument("--peers", default="", help="comma-separated: qemu,firecracker,cloud-hypervisor")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if 2 * a.n + 64 > hard:
        sys.exit(f"launch: {a.n} VMs need about {2 * a.n + 64} fds here; the hard limit is {hard}")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{os.cpu_count()} cpus, load average {' '.join(load)}, "
          f"pid_max {open('/proc/sys/kernel/pid_max').read().strip()}, "
          f"MemAvailable {meminfo()['MemAvailable'] // 1024} MiB")
    runs = []
    modes = ["api", "run"] if a.mode == "both" else [a.mode]
    for mode in modes:
        runs.append(("wisp", mode))
    for peer in filter(None, a.peers.split(",")):
        binary = {"qemu": QEMU, "firecracker": FIRECRACKER,
                  "cloud-hypervisor": CLOUD_HYPERVISOR}.get(peer)
        if not binary or not os.path.exists(binary):
            print(f"\n(no {peer} binary at {binary}: skipped)")
            continue
        runs.append((peer, "api" if peer == "firecracker" else "run"))
    ok = True
    for vmm, mode in runs:
        ok &= asyncio.run(launch(vmm, mode, a.n, a.mem, a.timeout))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
