#!/bin/sh
# Boot every probe scenario under QEMU + KVM and check its output lines.
# Usage: tests/guests/qemu-check.sh [OUTDIR]   (builds into OUTDIR, default a temp dir)
# QEMU is only the reference peer here; wisp's own tests live in tests/*.rs.
set -u
src=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(mktemp -d)}
"$src/build.sh" "$out" || exit 1
qemu() {
	timeout "${T:-30}" qemu-system-x86_64 -enable-kvm -cpu host,-arch-capabilities -M microvm \
		-m 128M -nodefaults -no-reboot -serial stdio -display none "$@" 2>&1
}
failed=0
# expect NAME OUTPUT PATTERN...: every grep -E pattern must match a line, no FAIL line.
expect() {
	name=$1 output=$2
	shift 2
	ok=1
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

o=$(qemu -kernel "$out/hello.elf"); expect hello.elf "$o" '^probe: hello$'
o=$(qemu -kernel "$out/probe.elf"); expect default "$o" '^probe: start hello$' '^probe: hello$' '^probe: done hello$'
o=$(qemu -smp 2 -m 5G -kernel "$out/probe.elf" -append 'probe.scenario=info'); expect info "$o" \
	'^probe: cmdline probe.scenario=info$' '^probe: e820 0x0 0x9fc00 1$' '^probe: ram [0-9]+$' \
	'^probe: memtest 0x100000000 ok$' '^probe: acpi RSDP 0x' '^probe: acpi FACP 0x' '^probe: acpi APIC 0x' \
	'^probe: acpi DSDT 0x' '^probe: madt-cpus 2$' '^probe: done info$'
for n in 1 2 4; do
	o=$(qemu -smp $n -kernel "$out/probe.elf" -append 'probe.scenario=smp')
	expect "smp $n" "$o" "^probe: cpus $n\$" '^probe: cpu 0$' "^probe: cpu $((n - 1))\$" '^probe: done smp$'
done
o=$(qemu -smp 2 -kernel "$out/probe.elf" -append 'probe.scenario=irq'); expect irq "$o" \
	'^probe: lapic-timer ok [0-9]+$' '^probe: serial-irq ok$' '^probe: done irq$'
o=$(qemu -kernel "$out/probe.elf" -append 'probe.scenario=exits'); expect exits "$o" \
	'^probe: exit-ns pio-out [0-9]+ pio-in [0-9]+ mmio-write [0-9]+ mmio-read [0-9]+ ' '^probe: done exits$'
o=$(T=3 qemu -smp 2 -kernel "$out/probe.elf" -append 'probe.scenario=spin'); expect spin "$o" \
	'^probe: cpus 2$' '^probe: progress 3$'
# Without -no-reboot a reset boots the probe again: two start lines prove the reset.
for s in reset-acpi triplefault; do
	o=$(T=3 qemu -kernel "$out/probe.elf" -append "probe.scenario=$s" -action reboot=reset)
	expect "$s" "$o" "^probe: start $s\$"
	[ "$(printf '%s\n' "$o" | grep -c "^probe: start $s\$")" -ge 2 ] || { echo "  $s: no reset"; failed=1; }
done
o=$(T=5 qemu -device pvpanic -action panic=exit-failure -kernel "$out/probe.elf" -append 'probe.scenario=panic')
rc=$?; expect "panic (qemu exit $rc)" "$o" '^probe: start panic$'; [ $rc = 1 ] || failed=1
o=$(T=40 qemu -M pc -kernel "$out/probe.elf" -append 'probe.scenario=reset-i8042' -action reboot=reset)
expect "reset-i8042 (-M pc)" "$o" '^probe: start reset-i8042$'
[ "$(printf '%s\n' "$o" | grep -c "^probe: start reset-i8042\$")" -ge 2 ] || { echo "  reset-i8042: no reset"; failed=1; }
# PVM cannot complete these at CPL0: QEMU reports the emulation failure (and would pause).
for s in int3 fwait emufail emufail-xrstors; do
	o=$(T=5 qemu -kernel "$out/probe.elf" -append "probe.scenario=$s")
	if printf '%s\n' "$o" | grep -q 'emulation failure'; then
		expect "$s (emulation failure on PVM)" "$o" "^probe: start $s\$"
	else
		expect "$s" "$o" "^probe: done $s\$"
	fi
done
# virtio-blk through the probe's driver: modern virtio-mmio (force-legacy=false), found in
# microvm's DSDT (512-byte windows, GSIs on the second IOAPIC). blk-hostile is wisp's
# contract only: QEMU completes a read into unassigned guest-physical space with status OK.
disk=$(mktemp "$out/qdisk.XXXXXX")
truncate -s 64M "$disk"
o=$(qemu -global virtio-mmio.force-legacy=false -kernel "$out/probe.elf" -append 'probe.scenario=blk probe.seed=7' \
	-drive "file=$disk,format=raw,if=none,id=d0" -device virtio-blk-device,drive=d0,serial=qemu-1)
expect blk "$o" '^probe: blk capacity 131072$' '^probe: blk serial qemu-1$' '^probe: blk write ok$' \
	'^probe: blk flush ok$' '^probe: blk readback ok$' '^probe: done blk$'
rm -f "$disk"
exit $failed
