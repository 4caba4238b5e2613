#!/bin/sh
# Build the wisp probe guests: OUTDIR/probe.elf, OUTDIR/hello.elf and OUTDIR/idle.elf.
# Usage: tests/guests/build.sh OUTDIR
set -eu
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
src=$(cd "$(dirname "$0")" && pwd)
out=$1
mkdir -p "$out"
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

CC=${CC:-gcc}
CFLAGS="-ffreestanding -nostdlib -mno-red-zone -mgeneral-regs-only -O2 -static \
 -fno-pic -fno-pie -fno-stack-protector -fno-asynchronous-unwind-tables \
 -fno-builtin -mcmodel=small -Wall -Wextra -Werror -std=gnu11"
LDFLAGS="-nostdlib -static -no-pie -Wl,--build-id=none -Wl,-z,noexecstack -Wl,--no-warn-rwx-segments"

# Compile in parallel; wait on each job so a failure fails the build.
pids=
for f in lib acpi main scenarios virtio net blk_media floods rng vsock balloon; do
	$CC $CFLAGS -c "$src/$f.c" -o "$tmp/$f.o" & pids="$pids $!"
done
$CC $CFLAGS -c "$src/boot.S" -o "$tmp/boot.o" & pids="$pids $!"
$CC -c "$src/hello.S" -o "$tmp/hello.o" & pids="$pids $!"
$CC -DIDLE -c "$src/hello.S" -o "$tmp/idle.o" & pids="$pids $!"
for p in $pids; do wait "$p"; done
$CC $CFLAGS $LDFLAGS -T "$src/probe.ld" -o "$tmp/probe.elf" \
	"$tmp/boot.o" "$tmp/lib.o" "$tmp/acpi.o" "$tmp/main.o" "$tmp/scenarios.o" \
	"$tmp/virtio.o" "$tmp/net.o" "$tmp/blk_media.o" "$tmp/floods.o" "$tmp/rng.o" "$tmp/vsock.o" "$tmp/balloon.o"
$CC $LDFLAGS -Wl,-n -s -T "$src/hello.ld" -o "$tmp/hello.elf" "$tmp/hello.o"
$CC $LDFLAGS -Wl,-n -s -T "$src/hello.ld" -o "$tmp/idle.elf" "$tmp/idle.o"
mv "$tmp/probe.elf" "$tmp/hello.elf" "$tmp/idle.elf" "$out/"
