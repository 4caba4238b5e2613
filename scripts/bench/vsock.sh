#!/usr/bin/env bash
# virtio-vsock benchmark: round trips and throughput both ways between host sockets and the
# Linux test guest, over wisp's vsock (Firecracker's Unix-socket host side) against the same
# program over virtio-net TCP in the same boot (vsockio, images/init/vsockio.c, in the test
# rootfs; scenario vsockbench of images/init/init). The tap lives in a network namespace this
# script creates and removes (also on failure); no traffic leaves it.
#
#   scripts/bench/vsock.sh [--rounds N] [--kib K] [--pings P] [--gets G] [--timeout S]   (as root)
#
# Prints per-round figures, then medians, ranges and vsock/TCP ratios, and the MMDS's GET
# latency from the guest against a host HTTP server's (scripts/bench/vsock.py).
# One Linux boot: about a minute on an idle PVM machine, several under load.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "vsock.sh: needs root (network namespace, tap)" >&2; exit 1; }

cargo build --release --bins -q
# The kernel comes from the image cache when it was built before; the rootfs takes seconds.
images/build.sh kernel rootfs >/dev/null

NS=wisp-bench-vsock-$$
TAP=wbvsock0
cleanup() {
	# A wisp left behind by an interrupted run: only processes inside our own namespace.
	local pids
	pids=$(ip netns pids "$NS" 2>/dev/null || true)
	[ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
	ip -n "$NS" link del "$TAP" 2>/dev/null || true
	ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS"
ip netns exec "$NS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
ip -n "$NS" link set lo up
ip -n "$NS" tuntap add dev "$TAP" mode tap
ip -n "$NS" addr add 10.0.0.1/24 dev "$TAP"
ip -n "$NS" link set "$TAP" up
echo "vsock.sh: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
ip netns exec "$NS" python3 scripts/bench/vsock.py --tap "$TAP" "$@"
echo "vsock.sh: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
