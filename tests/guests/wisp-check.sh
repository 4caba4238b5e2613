#!/bin/sh
# Boot every probe scenario under wisp and check output lines and exit status.
# Usage: tests/guests/wisp-check.sh WISP_BINARY [OUTDIR]
# A quick manual check; wisp's own integration tests (tests/*.rs) are the real ones.
set -u
[ $# -ge 1 ] || { echo "usage: $0 WISP_BINARY [OUTDIR]" >&2; exit 2; }
wisp=$1
src=$(cd "$(dirname "$0")" && pwd)
out=${2:-$(mktemp -d)}
"$src/build.sh" "$out" || exit 1
failed=0
# check NAME WANT_RC OUTPUT RC PATTERN...: every grep -E pattern matches, no FAIL line.
check() {
	name=$1 want=$2 output=$3 rc=$4
	shift 4
	ok=1
	[ "$rc" = "$want" ] || { echo "  exit status $rc, want $want"; ok=0; }
	for p in "$@"; do
		printf '%s\n' "$output" | grep -Eq "$p" || { echo "  missing: $p"; ok=0; }
	done
	if printf '%s\n' "$output" | grep -q '^probe: FAIL'; then ok=0; fi
	if [ $ok = 1 ]; then echo "ok   $name"; else
		echo "FAIL $name"
		printf '%s\n' "$output" | sed 's/^/  | /' | head -40
		failed=1
	fi
}
# run TIMEOUT KERNEL [wisp flags]: sets o (output) and rc; 128 MiB unless --memory is given.
run() {
	t=$1 k=$2
	shift 2
	case " $* " in *" --memory "*) ;; *) set -- "$@" --memory 128M ;; esac
	o=$(timeout "$t" "$wisp" run --log-level info --kernel "$k" "$@" 2>&1)
	rc=$?
}

run 30 "$out/hello.elf"; check hello.elf 0 "$o" $rc '^probe: hello$'
for s in hello int3 fwait; do
	run 30 "$out/probe.elf" --cmdline "probe.scenario=$s"
	check "$s" 0 "$o" $rc "^probe: done $s\$"
done
run 30 "$out/probe.elf" --cmdline probe.scenario=info --cpus 2 --memory 5G
check info 0 "$o" $rc '^probe: madt-cpus 2$' '^probe: memtest 0x100000000 ok$' '^probe: done info$'
for n in 1 2 4; do
	run 30 "$out/probe.elf" --cmdline probe.scenario=smp --cpus $n
	check "smp $n" 0 "$o" $rc "^probe: cpus $n\$" '^probe: done smp$'
done
run 30 "$out/probe.elf" --cmdline probe.scenario=irq --cpus 2
check irq 0 "$o" $rc '^probe: lapic-timer ok' '^probe: serial-irq ok$' '^probe: done irq$'
run 30 "$out/probe.elf" --cmdline probe.scenario=exits
check exits 0 "$o" $rc '^probe: exit-ns pio-out [0-9]+ pio-in [0-9]+ mmio-write [0-9]+ mmio-read [0-9]+ ' '^probe: done exits$'
run 3 "$out/probe.elf" --cmdline probe.scenario=spin --cpus 2
check spin 124 "$o" $rc '^probe: cpus 2$' '^probe: progress 3$'
for s in reset-acpi reset-i8042; do
	run 30 "$out/probe.elf" --cmdline "probe.scenario=$s"
	check "$s" 0 "$o" $rc "^probe: start $s\$" 'guest reset'
done
run 30 "$out/probe.elf" --cmdline probe.scenario=triplefault
check triplefault 2 "$o" $rc '^probe: start triplefault$' 'triple fault'
run 30 "$out/probe.elf" --cmdline probe.scenario=panic
check panic 2 "$o" $rc '^probe: start panic$' 'panicked'
for s in emufail emufail-xrstors; do
	run 30 "$out/probe.elf" --cmdline "probe.scenario=$s"
	check "$s" 2 "$o" $rc "^probe: start $s\$" 'could not emulate'
done

# virtio-blk: the pattern must land in the file (README: "virtio-blk scenarios").
# pattern_ok FILE BYTE_OFFSET LENGTH SEED: the file holds the probe's pattern there.
pattern_ok() {
	python3 - "$@" <<'PY'
import struct, sys
path, off, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open(path, 'rb') as f:
    f.seek(off)
    d = f.read(n)
want = b''.join(struct.pack('<I', ((off + i) // 4 * 0x9e3779b1 + seed) & 0xffffffff) for i in range(0, n, 4))
sys.exit(0 if d == want else 1)
PY
}
disk=$(mktemp "$out/disk.XXXXXX")
truncate -s 64M "$disk"
run 30 "$out/probe.elf" --cmdline "probe.scenario=blk probe.seed=7" --disk "path=$disk,serial=check-1"
check blk 0 "$o" $rc '^probe: blk capacity 131072$' '^probe: blk serial check-1$' '^probe: blk write ok$' \
	'^probe: blk flush ok$' '^probe: blk readback ok$' '^probe: done blk$'
if pattern_ok "$disk" 4096 65536 7 && [ "$(head -c 4096 "$disk" | tr -d '\0' | wc -c)" = 0 ]; then
	echo "ok   blk pattern in the file at 4 KiB"
else
	echo "FAIL blk pattern in the file at 4 KiB"; failed=1
fi
sum=$(md5sum <"$disk")
run 30 "$out/probe.elf" --cmdline "probe.scenario=blk probe.seed=7" --disk "path=$disk,readonly=on"
check "blk readonly" 0 "$o" $rc '^probe: blk capacity 131072 readonly$' '^probe: blk readonly-write refused$' \
	'^probe: blk readback ok$' '^probe: done blk$'
[ "$(md5sum <"$disk")" = "$sum" ] || { echo "FAIL blk readonly: the file changed"; failed=1; }
run 60 "$out/probe.elf" --cmdline probe.scenario=blk-hostile --disk "path=$disk"
check blk-hostile 0 "$o" $rc '^probe: blk hostile data-outside-memory status 1 ' \
	'^probe: blk hostile looping-chain status 255 len 0$' '^probe: blk hostile registers ok$' \
	'^probe: blk hostile survived$' '^probe: done blk-hostile$'
run 60 "$out/probe.elf" --cmdline probe.scenario=blk-hostile --disk "path=$disk,readonly=on"
check "blk-hostile readonly" 0 "$o" $rc '^probe: blk hostile readonly-write status 1 len 1$' \
	'^probe: blk hostile survived$'
run 30 "$out/probe.elf" --cmdline "probe.scenario=blk-bench probe.op=randwrite probe.qd=8 probe.ms=300" --disk "path=$disk"
check blk-bench 0 "$o" $rc '^probe: blk bench randwrite bs 4096 qd 8 ios [1-9][0-9]* us [0-9]+ iops [0-9]+ ' '^probe: done blk-bench$'
# Flushed data survives kill -9 of wisp.
truncate -s 0 "$disk" && truncate -s 16M "$disk"
log=$(mktemp "$out/log.XXXXXX")
"$wisp" run --kernel "$out/probe.elf" --memory 128M --disk "path=$disk" \
	--cmdline "probe.scenario=blk-flush-then-hang probe.seed=42" >"$log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q '^probe: blk flushed$' "$log" && break; sleep 0.1; done
kill -9 $pid; wait $pid 2>/dev/null
if grep -q '^probe: blk flushed$' "$log" && pattern_ok "$disk" 0 1048576 42; then
	echo "ok   blk-flush-then-hang (kill -9, pattern in the file)"
else
	echo "FAIL blk-flush-then-hang"; sed 's/^/  | /' "$log"; failed=1
fi
rm -f "$disk" "$log"

# virtio-net, when this wisp has --net and we may make network namespaces: a tap in a
# namespace of our own (host end 10.0.0.1/24), ping the probe, count its UDP burst.
if "$wisp" run --help | grep -q -- '--net' && [ "$(id -u)" = 0 ]; then
	ns=wisp-check-$$
	ip netns add $ns
	ip netns exec $ns sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
	ip -n $ns link set lo up
	ip -n $ns tuntap add dev wchk0 mode tap
	ip -n $ns addr add 10.0.0.1/24 dev wchk0
	ip -n $ns link set wchk0 up
	ip netns exec $ns python3 -c '
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("10.0.0.1", 9000))
s.settimeout(5)
seen, bad = set(), 0
try:
    while True:
        d = s.recv(2048)
        seq = struct.unpack(">I", d[:4])[0]
        bad += d[4:] != bytes((seq + i) & 0xff for i in range(4, len(d)))
        seen.add(seq)
except socket.timeout:
    pass
print("udp received", len(seen), "bad", bad)
' >"$out/udp.$$" 2>&1 &
	lpid=$!
	log=$(mktemp "$out/log.XXXXXX")
	ip netns exec $ns timeout 60 "$wisp" run --kernel "$out/probe.elf" --memory 128M \
		--net tap=wchk0,mac=52:54:00:12:34:56 \
		--cmdline "probe.scenario=net probe.pings=3 probe.serve_ms=20000 probe.burst=1000" >"$log" 2>&1 &
	wpid=$!
	for _ in $(seq 100); do grep -q '^probe: net ready$' "$log" && break; sleep 0.1; done
	pingout=$(ip netns exec $ns ping -c 3 -i 0.2 -W 5 10.0.0.2 2>&1)
	wait $wpid; rc=$?
	wait $lpid
	o=$(cat "$log")
	check net 0 "$o" $rc '^probe: net mac 52:54:00:12:34:56$' '^probe: net answered 3$' \
		'^probe: net burst sent 1000$' '^probe: done net$'
	printf '%s\n' "$pingout" | grep -q ' 0% packet loss' && echo "ok   net ping" ||
		{ echo "FAIL net ping"; printf '%s\n' "$pingout"; failed=1; }
	grep -q '^udp received 1000 bad 0$' "$out/udp.$$" && echo "ok   net udp burst (1000 datagrams intact)" ||
		{ echo "FAIL net udp burst: $(cat "$out/udp.$$")"; failed=1; }
	ip netns del $ns
	rm -f "$log" "$out/udp.$$"
else
	echo "skip net (no --net in this wisp, or not root)"
fi
exit $failed
