#!/usr/bin/env bash
# Launch benchmark: N VMs started at once, as a node agent would, with a guest that prints a
# line and then idles (tests/guests: idle.elf).
#
#   scripts/bench/launch.sh N [--mode api|run|both] [--mem MiB] [--peers qemu,firecracker,cloud-hypervisor]
#
# Through the API (N `wisp --api-sock`, then PUT /boot-source, PUT /machine-config and
# InstanceStart on each, all concurrently) and through `wisp run`. Reports launches per second,
# p50/p99 time from spawn to the guest's first output, memory per VM (the VMM's RSS, PSS and
# private memory, and the host's: /proc/meminfo before and after, divided by N, with the
# kernel's share), whether every VM is still alive and answering GET /, then SIGTERMs them all
# and removes their sockets. Peers are found under /work/peers (or $QEMU, $FIRECRACKER,
# $CLOUD_HYPERVISOR); Firecracker goes through its API, QEMU and Cloud Hypervisor through their
# command lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/build-release.sh -q
mkdir -p target/probe-guests
bash tests/guests/build.sh target/probe-guests >/dev/null
exec python3 scripts/bench/launch.py "$@"
