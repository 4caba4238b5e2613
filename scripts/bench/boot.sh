#!/usr/bin/env bash
# Boot benchmark: wisp against QEMU (microvm, KVM), and Cloud Hypervisor and Firecracker when
# built, on the same guests, alternating runs.
#
#   scripts/bench/boot.sh [--runs N] [--linux-runs N] [--no-linux] [--breakdown] [--linux-mptable]
#                         [--seccomp]
#
# Prints, for each VMM, median and range of: time from process start to the guest's first
# serial output, time to process exit, peak RSS, and memory overhead (RSS minus the guest
# RAM the guest touched, from /proc/PID/smaps), and the ratio wisp/QEMU.
# --breakdown: only wisp's start-up and exit phases (WISP_TRACE_STARTUP), median of --runs.
# --linux-mptable: only the test kernel under wisp with and without its MP table
# (WISP_NO_MPTABLE=1), --linux-runs each: time to init and the guest's timestamps.
# --seccomp: only wisp with its seccomp filters and with --seccomp-level 0, alternating (also
# a section of the default run): what the filters add to start -> first output and exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

# $QEMU (and $QEMU_DATA for its -L) name a QEMU that is not installed; Cloud Hypervisor and
# Firecracker join as columns when built (see boot.py: $CLOUD_HYPERVISOR, $FIRECRACKER).
if [ -z "${QEMU:-}" ] && ! command -v qemu-system-x86_64 >/dev/null; then
	# Debian 12's qemu-system-x86 (7.2) removes a newer qemu-utils (qemu-img, qemu-io),
	# which tests use as judges: put 7.2's back with it.
	echo "boot.sh: installing qemu-system-x86 and qemu-utils 7.2 (the peer)" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
fi
bash scripts/build-release.sh -q
mkdir -p target/bench
cc -O2 -o target/bench/spawn scripts/bench/spawn.c
mkdir -p target/probe-guests
bash tests/guests/build.sh target/probe-guests >/dev/null
exec python3 scripts/bench/boot.py "$@"
