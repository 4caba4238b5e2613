#!/usr/bin/env bash
# Writes a few small, valid qcow2 images into DIR as a seed corpus for the qcow2_image target,
# each under 64 KiB (within -max_len): empty, allocated data with 512-byte and 4 KiB clusters,
# compressed clusters, an overlay naming a backing file, discarded and zeroed clusters.
#   fuzz/seeds.sh DIR      (needs qemu-img and qemu-io)
set -euo pipefail
dir=${1:?usage: fuzz/seeds.sh DIR}
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
qemu-img create -q -f qcow2 -o cluster_size=4096 "$dir/empty.qcow2" 1M
qemu-img create -q -f qcow2 -o cluster_size=512 "$dir/small-clusters.qcow2" 1M
qemu-io -f qcow2 -c 'write -P 0x5a 0 8k' -c 'write -P 0xa5 900k 4k' "$dir/small-clusters.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4096 "$dir/allocated.qcow2" 4M
qemu-io -f qcow2 -c "write -P 0x11 0 16k" -c "write -P 0x22 3M 8k" "$dir/allocated.qcow2" >/dev/null
qemu-img create -q -f raw "$tmp/data.raw" 64k
qemu-io -f raw -c 'write -P 0x33 0 32k' "$tmp/data.raw" >/dev/null
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 "$tmp/data.raw" "$dir/compressed.qcow2"
# The backing file does not exist where the fuzzer runs: opening fails after the header parse.
qemu-img create -q -f qcow2 -o cluster_size=4096 -u -b /nonexistent/base.raw -F raw "$dir/overlay.qcow2" 1M
qemu-img create -q -f qcow2 -o cluster_size=4096 "$dir/zeroed.qcow2" 1M
qemu-io -f qcow2 -c 'write -P 0x44 0 16k' -c 'discard 4k 4k' -c 'write -z 8k 4k' "$dir/zeroed.qcow2" >/dev/null
ls -l "$dir"
