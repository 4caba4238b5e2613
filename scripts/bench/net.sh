#!/usr/bin/env bash
# virtio-net benchmark: wisp against QEMU (microvm, KVM, virtio-net-device, tap, vhost off) on
# the same probe guest (tests/guests, scenario net: a virtio-net driver at CPL3), alternating
# boots, all inside a network namespace this script creates and removes (also on failure).
#
#   scripts/bench/net.sh [--runs N] [--flood-s S] [--burst N] [--no-limits] [--limits-only]
#                        [--limit-burst N]      (as root)
#
# Prints guest->host and host->guest UDP packets per second for 64- and 1472-byte payloads
# (1472: a 1500-byte IP packet), host CPU time of the VMM per packet, and ping round-trip
# time; medians, ranges and wisp/QEMU ratios; and wisp with rate limiters against wisp without:
# limits not reached (their cost) and a transmit limit (accuracy in %). No traffic leaves the
# namespace.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "net.sh: needs root (network namespace, tap)" >&2; exit 1; }

if ! command -v qemu-system-x86_64 >/dev/null; then
	# Debian 12's qemu-system-x86 (7.2) removes a newer qemu-utils (qemu-img, qemu-io),
	# which tests use as judges: put 7.2's back with it.
	echo "net.sh: installing qemu-system-x86 and qemu-utils 7.2 (the peer)" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
fi
bash scripts/build-release.sh -q
mkdir -p target/probe-guests
bash tests/guests/build.sh target/probe-guests >/dev/null

NS=wisp-bench-net-$$
TAP=wbnet0
cleanup() {
	# VMMs left behind by an interrupted run: only processes inside our own namespace.
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
# The driver runs in the namespace too: its sockets, ping and the VMMs see only the tap.
ip netns exec "$NS" python3 scripts/bench/net.py --tap "$TAP" "$@"
