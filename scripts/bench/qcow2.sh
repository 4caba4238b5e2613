#!/usr/bin/env bash
# wisp's disk backends driven directly (devices/examples/qcow2_bench.rs) against
# `qemu-img bench` with the same pattern on the same files: queue depth 1, page cache
# (cache=writeback) for both, requests stepping through the image and wrapping at its end.
# "4k random" is a 4 KiB request every 2731 * 4 KiB (odd stride: a permutation of all 4 KiB
# blocks, scattered over the L2 tables); "1m seq" is sequential 1 MiB requests.
# Prints MB/s for each and wisp/qemu ratios (>= 1.00 means wisp is at least as fast).
#
# usage: scripts/bench/qcow2.sh   (SIZE=512M COUNT4K=20000 COUNT1M=1024 REPS=5 to change)
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v qemu-img >/dev/null || { echo "qemu-img missing: apt-get install qemu-utils" >&2; exit 1; }

SIZE=${SIZE:-512M}
COUNT4K=${COUNT4K:-20000}
COUNT1M=${COUNT1M:-1024}
REPS=${REPS:-5}
STEP4K=$((4096 * 2731))

cargo build -q --release -p wisp-devices --example qcow2_bench
BIN=target/release/examples/qcow2_bench
DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/wisp-qcow2-bench.XXXXXX")
trap 'rm -rf "$DIR"' EXIT

# Images: (a) raw, (b) fully allocated qcow2, (c) fresh overlay over (a),
# (d) three-level chain raw <- qcow2 <- qcow2 <- qcow2 with data in every level.
qemu-img create -q -f raw "$DIR/a.raw" "$SIZE"
qemu-io -f raw -c "write -P 0x5a 0 $SIZE" "$DIR/a.raw" >/dev/null
qemu-img convert -O qcow2 "$DIR/a.raw" "$DIR/b.qcow2"
make_c() { rm -f "$DIR/c.qcow2"; qemu-img create -q -f qcow2 -b a.raw -F raw "$DIR/c.qcow2"; }
make_d() {
    rm -f "$DIR/d1.qcow2" "$DIR/d2.qcow2" "$DIR/d.qcow2"
    qemu-img create -q -f qcow2 -b a.raw -F raw "$DIR/d1.qcow2"
    qemu-io -f qcow2 -c "write -P 0x11 0 64M" "$DIR/d1.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b d1.qcow2 -F qcow2 "$DIR/d2.qcow2"
    qemu-io -f qcow2 -c "write -P 0x22 64M 64M" "$DIR/d2.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b d2.qcow2 -F qcow2 "$DIR/d.qcow2"
}
make_c
make_d
# The same page-cache state for (a) and (b): how a file came into the cache (one large
# write, 2 MiB writes, readahead) sets the size of its folios, and that alone moved read
# throughput of two files with the same data by up to 30%. Drop both files' pages (only
# theirs) so that the reads in run() bring them back in the same way.
sync
for f in "$DIR/a.raw" "$DIR/b.qcow2"; do dd if="$f" iflag=nocache count=0 status=none; done

# run <label> <fmt> <file> <read|write> <bs> <step> <count> <reset-cmd>
# Best of $REPS alternating runs for each tool (the machine is shared and noisy).
declare -A WISP
run() {
    local label=$1 fmt=$2 file=$3 mode=$4 bs=$5 step=$6 count=$7 reset=$8
    local w=""
    [ "$mode" = write ] && w="-w"
    local wt=999999 qt=999999 t
    for _ in $(seq "$REPS"); do
        $reset
        cat "$DIR"/* >/dev/null; sync
        t=$($BIN "$fmt" "$mode" "$bs" "$step" "$count" "$file")
        wt=$(awk -v a="$wt" -v b="$t" 'BEGIN { print (b < a) ? b : a }')
        $reset
        cat "$DIR"/* >/dev/null; sync
        t=$(qemu-img bench -f "$fmt" -t writeback -d 1 -c "$count" -s "$bs" -S "$step" $w "$file" |
            sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p')
        qt=$(awk -v a="$qt" -v b="$t" 'BEGIN { print (b < a) ? b : a }')
    done
    WISP["$label $mode"]=$(awk -v bs="$bs" -v c="$count" -v wt="$wt" 'BEGIN { print bs * c / 1e6 / wt }')
    awk -v l="$label" -v m="$mode" -v bs="$bs" -v c="$count" -v wt="$wt" -v qt="$qt" 'BEGIN {
        mb = bs * c / 1e6
        printf "%-30s %-5s wisp %8.1f MB/s  qemu-img %8.1f MB/s  wisp/qemu %5.2f\n", l, m, mb / wt, mb / qt, qt / wt
    }'
}
none() { :; }

echo "size $SIZE, 4k x $COUNT4K (stride $STEP4K), 1m x $COUNT1M, depth 1, cache=writeback, best of $REPS"
for mode in read write; do
    run "(a) raw 4k random"            raw   "$DIR/a.raw"    $mode 4096    $STEP4K $COUNT4K none
    run "(a) raw 1m seq"               raw   "$DIR/a.raw"    $mode 1048576 1048576 $COUNT1M none
    run "(b) qcow2 allocated 4k random" qcow2 "$DIR/b.qcow2" $mode 4096    $STEP4K $COUNT4K none
    run "(b) qcow2 allocated 1m seq"   qcow2 "$DIR/b.qcow2"  $mode 1048576 1048576 $COUNT1M none
    run "(c) fresh overlay 4k random"  qcow2 "$DIR/c.qcow2"  $mode 4096    $STEP4K $COUNT4K make_c
    run "(c) fresh overlay 1m seq"     qcow2 "$DIR/c.qcow2"  $mode 1048576 1048576 $COUNT1M make_c
    run "(d) 3-level chain 4k random"  qcow2 "$DIR/d.qcow2"  $mode 4096    $STEP4K $COUNT4K make_d
    run "(d) 3-level chain 1m seq"     qcow2 "$DIR/d.qcow2"  $mode 1048576 1048576 $COUNT1M make_d
done
echo "wisp qcow2 (allocated) / wisp raw:"
for k in "4k random read" "1m seq read" "4k random write" "1m seq write"; do
    set -- $k
    a=${WISP["(a) raw $1 $2 $3"]}
    b=${WISP["(b) qcow2 allocated $1 $2 $3"]}
    awk -v k="$k" -v a="$a" -v b="$b" 'BEGIN { printf "  %-16s %5.2f\n", k, b / a }'
done
