#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds the guest images (the test kernel
# is cached outside the tree after its first build), then runs every test binary, also after
# one of them failed, and ends with a summary of each binary's result. KVM tests skip without
# /dev/kvm unless WISP_REQUIRE_KVM=1 (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
bash images/build.sh all

log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
# Two test threads: the Linux boots are interpreted on a software KVM and share 2 cores.
# --no-fail-fast: one failing binary must not hide the results of the others.
set +e
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

echo
echo "== summary: each test binary ($(($(date +%s) - start)) s) =="
# cargo prints "Running <source> (<binary>)" (or "Doc-tests <crate>") before each binary's
# tests and "test result: ..." after them.
awk '
	/^ *Running / {
		name = ($2 == "unittests") ? $3 : $2
		if ($2 == "unittests" && match($0, /deps\/[A-Za-z0-9_]+-/))
			name = substr($0, RSTART + 5, RLENGTH - 6) " " name
		next
	}
	/^ *Doc-tests / { name = "doc-tests " $2; next }
	/^test result: / {
		verdict = ($3 == "ok.") ? "ok" : "FAILED"
		sub(/^test result: [A-Za-z]+\. /, "")
		sub(/; [0-9]+ measured.*/, "")
		printf "  %-7s %-32s %s\n", verdict, name, $0
	}
' "$log"
if [ "$status" -ne 0 ]; then
	echo "== failed binaries =="
	grep -E '^ +`.*`$' "$log" || echo "  (cargo test exited $status before running the tests; see above)"
fi
exit "$status"
