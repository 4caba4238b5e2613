#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds the guest images (the test kernel
# is cached outside the tree after its first build), then runs every test. KVM tests skip
# without /dev/kvm unless WISP_REQUIRE_KVM=1 (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
bash images/build.sh all
# Two test threads: the Linux boots are interpreted on a software KVM and share 2 cores.
cargo test --workspace -- --test-threads=2
