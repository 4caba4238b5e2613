#!/usr/bin/env bash
# Installs what building and testing wisp needs on a fresh Debian 12 machine (run as root,
# or with the packages already there). Idempotent; quiet when nothing is missing.
set -euo pipefail

PACKAGES=(
	build-essential pkg-config    # probe guests (gcc, as, ld), crates that build C
	qemu-utils                    # qemu-img: the judge of wisp's qcow2 images
	iproute2 iputils-ping dnsmasq-base busybox-static  # network tests in namespaces
	util-linux curl jq e2fsprogs cpio python3  # setpriv, API tests, images, benchmarks
)

missing=()
for p in "${PACKAGES[@]}"; do
	[[ "$p" == \#* ]] && continue
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "setup.sh: missing Debian packages (install them as root): ${missing[*]}" >&2
		exit 1
	fi
	echo "setup.sh: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
fi

if ! command -v cargo >/dev/null 2>&1; then
	[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
	echo "setup.sh: no cargo found; install a Rust toolchain (rustup, 1.85 or newer)" >&2
	exit 1
fi
