#!/usr/bin/env bash
# API benchmark: start-up to a listening socket, GET / latency, configure-and-start latency.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/build-release.sh -q
mkdir -p target/probe-guests
bash tests/guests/build.sh target/probe-guests >/dev/null
exec python3 scripts/bench/api.py "$@"
