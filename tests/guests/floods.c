/*
 * Flood scenarios: a guest that hammers a device, to check the VMM's bounds on
 * its own memory and log and on the time its event loop gives one guest.
 */
#include "probe.h"

/*
 * i8042-flood: probe.writes=N (default 20000) self-test commands (0xaa, each
 * answered with 0x55) written to the controller without reading the answers;
 * then every byte the data port gives is read and counted. A real i8042 holds
 * one byte; a VMM that queues them all holds N.
 */
void scenario_i8042_flood(void)
{
	u64 n = cmdline_u64("probe.writes", 20000);
	for (u64 i = 0; i < n; i++)
		outb(0x64, 0xaa);
	u64 queued = 0;
	while ((inb(0x64) & 1) && queued <= n) {
		(void)inb(0x60);
		queued++;
	}
	printf("probe: i8042 flood writes %lu queued %lu\n", n, queued);
	/* The controller still answers once its buffer was read. */
	outb(0x64, 0xaa);
	if (!(inb(0x64) & 1) || inb(0x60) != 0x55)
		fail("i8042 no self-test answer after the flood");
	done();
}

/*
 * console-flood: probe.lines=N (default 2000) numbered lines of 64 bytes on
 * COM1, then power off. For a console whose reader is slow, stuck or gone.
 */
void scenario_console_flood(void)
{
	u64 n = cmdline_u64("probe.lines", 2000);
	for (u64 i = 0; i < n; i++)
		printf("probe: flood %lu 0123456789abcdefghijklmnopqrstuvwxyzABCDEF\n", i % 1000000);
	done();
}

/*
 * log-flood: probe.writes=N (default 20000) writes each of two kinds a VMM
 * may warn about: an S3 sleep request (SLP_TYP 3 | SLP_EN) to the FADT's
 * sleep control register, which wisp does not support, and "crash kernel
 * loaded" (bit 1) to pvpanic (port 0x505). The guest goes on; a VMM that logs
 * each one writes 2N lines.
 */
void scenario_log_flood(void)
{
	u64 n = cmdline_u64("probe.writes", 20000);
	u64 f = acpi.fadt;
	/* FADT SLEEP_CONTROL_REG: a Generic Address Structure at offset 244,
	 * its 64-bit address at +4 (ACPI 6.5, 5.2.9). */
	u64 addr = f ? *(const u64 *)(f + 244 + 4) : 0;
	if (!addr || addr > 0xffff)
		fail("log-flood: no sleep control register in the FADT");
	for (u64 i = 0; i < n; i++) {
		outb((u16)addr, 3 << 2 | 1 << 5);
		outb(0x505, 2);
	}
	printf("probe: log flood writes %lu\n", n);
	done();
}
