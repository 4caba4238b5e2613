#!/usr/bin/env bash
# Builds wisp and the guest images if needed, then boots the default guest: the test kernel
# with the busybox initramfs, a shell on the console. `poweroff -f` in the guest ends it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
bash images/build.sh kernel initramfs
bash scripts/build-release.sh
exec ./target/x86_64-unknown-linux-gnu/release/wisp run \
	--kernel images/out/vmlinux \
	--initrd images/out/initramfs.cpio \
	--cpus 2 --memory 256M \
	--cmdline "console=ttyS0 quiet panic=-1" "$@"
