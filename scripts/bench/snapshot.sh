#!/usr/bin/env bash
# Snapshot benchmark (scripts/bench/snapshot.py): create time for a 128 MiB and a 1 GiB guest,
# wisp start -> restored guest running and -> its next serial line, and the RSS/PSS of 10
# clones of one snapshot. Needs about 1.3 GiB free in the temp directory.
#
#   scripts/bench/snapshot.sh [--runs N] [--clones N]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
[ -n "${WISP:-}" ] || bash scripts/build-release.sh -q
mkdir -p target/probe-guests
bash tests/guests/build.sh target/probe-guests >/dev/null
exec python3 scripts/bench/snapshot.py "$@"
