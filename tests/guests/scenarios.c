/*
 * The scenarios that run at CPL3 (native speed on PVM). The identity map is
 * user-accessible, so RAM, the LAPIC, the IOAPIC and the ACPI tables are
 * plain memory accesses here. Port I/O is allowed by RFLAGS.IOPL = 3 on
 * hardware KVM and by the TSS I/O bitmap on PVM (see main.c).
 */
#include "probe.h"

#define TRAMPOLINE_PA 0x8000ull /* SIPI vector 0x08 */

char cmdline[1024];
static struct hvm_start_info *start_info;

void done(void)
{
	printf("probe: done %s\n", scenario);
	acpi_poweroff();
}

/* A CPU that has nothing left to do halts: HLT at CPL3 traps to main.c. */
static void park(void)
{
	for (;;)
		__asm__ volatile("hlt");
}

/* ---- Local APIC (xAPIC MMIO, Intel SDM Vol. 3A, 11.4) ---- */
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

/* Software-enable the LAPIC with the spurious vector (SDM Vol. 3A, 11.9). */
void lapic_enable(void) { lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS); }

/* Send an IPI and wait (bounded) for Delivery Status to go idle (bit 12). */
static void lapic_ipi(u32 apic_id, u32 icr_lo)
{
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, icr_lo);
	for (u64 end = tsc_deadline(100); !tsc_passed(end) && (lapic_read(LAPIC_ICR_LO) & (1 << 12));)
		cpu_relax();
}

/* ---- hello ---- */
static void scenario_hello(void)
{
	printf("probe: hello\n");
	done();
}

/* ---- ctrl-alt-del ---- */

/*
 * Wait for Ctrl-Alt-Del from the i8042 (scan code set 2, as a PC keyboard sends it: Ctrl
 * 0x14, Alt 0x11, Delete 0xe0 0x71), then power off, as a guest OS would shut down.
 * Polls the status port (bit 0: output buffer full) at CPL3.
 */
/* Returns once the keyboard sent Ctrl+Alt+Del's scan codes (set 2, as wisp's i8042 does). */
void wait_ctrl_alt_del(void)
{
	static const u8 want[] = {0x14, 0x11, 0xe0, 0x71};
	unsigned int matched = 0;
	while (matched < sizeof(want)) {
		if (!(inb(0x64) & 1)) {
			__asm__ volatile("pause");
			continue;
		}
		u8 b = inb(0x60);
		matched = (b == want[matched]) ? matched + 1 : (b == want[0]);
	}
}

static void scenario_ctrl_alt_del(void)
{
	printf("probe: waiting for ctrl-alt-del\n");
	wait_ctrl_alt_del();
	printf("probe: ctrl-alt-del\n");
	done();
}

/* ---- info ---- */

/*
 * Write and read back patterns over one 4 KiB page, restoring what was there
 * (the page may hold ACPI tables or this image's data).
 */
static int page_is_ram(u64 addr)
{
	volatile u64 *p = (volatile u64 *)addr;
	for (int i = 0; i < 512; i++) {
		u64 old = p[i], pat = 0x5a5a5a5a00000000ull ^ (addr + 8 * i);
		p[i] = pat;
		int ok = p[i] == pat;
		p[i] = ~pat;
		ok = ok && p[i] == ~pat;
		p[i] = old;
		if (!ok)
			return 0;
	}
	return 1;
}

static void memtest(u64 addr)
{
	if (!page_is_ram(addr))
		fail("memtest 0x%lx", addr);
	printf("probe: memtest 0x%lx ok\n", addr);
}

static void scenario_info(void)
{
	printf("probe: cmdline %s\n", cmdline);
	if (start_info->version < 1 || !start_info->memmap_entries)
		fail("no memmap in start_info (version %u)", start_info->version);
	const struct hvm_memmap_table_entry *m = (const void *)start_info->memmap_paddr;
	u32 n = start_info->memmap_entries;
	u64 ram = 0;
	for (u32 i = 0; i < n; i++) {
		printf("probe: e820 0x%lx 0x%lx %u\n", m[i].addr, m[i].size, m[i].type);
		if (m[i].type == 1)
			ram += m[i].size;
	}
	printf("probe: ram %lu\n", ram);

	/* First and last page of every RAM range above 1 MiB, skipping the pages
	 * this image occupies; boot.S / main.c mapped up to 64 GiB. */
	const u64 limit = 64ull << 30, mib = 1ull << 20;
	const u64 img_lo = (u64)_image_start & ~0xfffull, img_hi = ((u64)_image_end + 0xfff) & ~0xfffull;
	for (u32 i = 0; i < n; i++) {
		if (m[i].type != 1 || m[i].addr + m[i].size <= mib)
			continue;
		u64 lo = (m[i].addr < mib ? mib : m[i].addr + 0xfff) & ~0xfffull;
		u64 hi = ((m[i].addr + m[i].size) & ~0xfffull) - 0x1000;
		if (lo < img_hi && lo + 0x1000 > img_lo)
			lo = img_hi;
		if (lo > hi)
			continue;
		if (hi + 0x1000 > limit) {
			printf("probe: memtest-skipped 0x%lx (above 64 GiB)\n", hi);
			if (lo + 0x1000 > limit)
				continue;
			memtest(lo);
			continue;
		}
		memtest(lo);
		if (hi != lo)
			memtest(hi);
	}

	if (!acpi_init(start_info->rsdp_paddr, 1))
		fail("no ACPI tables (rsdp_paddr 0x%lx)", start_info->rsdp_paddr);
	if (!acpi.fadt)
		fail("no FACP in XSDT");
	if (!acpi.madt)
		fail("no APIC (MADT) in XSDT");
	printf("probe: madt-cpus %u\n", acpi.ncpus);
	for (char *c = cpuid_hv_signature; *c; c++)
		if (*c < 0x21 || *c > 0x7e)
			*c = '?';
	printf("probe: cpuid hypervisor %s x2apic %u page1gb %u\n", cpuid_hv_signature[0] ? cpuid_hv_signature : "none",
	       (cpuid_1_ecx >> 21) & 1, cpu_1g_pages);
	tsc_calibrate();
	printf("probe: tsc-khz %lu\n", tsc_hz / 1000);
	done();
}

/* ---- smp and spin ---- */

/*
 * Each CPU reports its LAPIC id; the initial APIC id from CPUID leaf 1
 * (EBX bits 31-24, SDM Vol. 2A, CPUID), read at CPL0 by main.c, must agree.
 */
static void check_in(u32 cpu)
{
	u32 id = lapic_id();
	if (cpuid_apic_id[cpu] != (id & 0xff))
		fail("cpu apic id: LAPIC %u, CPUID.1 %u", id, cpuid_apic_id[cpu]);
	printf("probe: cpu %u\n", id);
	__atomic_fetch_add(&cpus_checked_in, 1, __ATOMIC_SEQ_CST);
}

/*
 * INIT-SIPI-SIPI to every AP the MADT lists (SDM Vol. 3A, 9.4.4.1): INIT
 * (level assert), 10 ms, STARTUP with vector 0x08 (start at 0x8000), 200 us,
 * a second STARTUP. The BSP then waits (bounded) for all of them to check in.
 */
static void start_aps(void)
{
	if (acpi.ncpus > MAX_CPUS)
		fail("smp MADT lists %u CPUs, probe supports %u", acpi.ncpus, MAX_CPUS);
	memcpy((void *)TRAMPOLINE_PA, ap_trampoline_start, ap_trampoline_end - ap_trampoline_start);
	lapic_enable();
	u32 self = lapic_id();
	for (u32 i = 0; i < acpi.ncpus; i++)
		if (acpi.apic_ids[i] != self)
			lapic_ipi(acpi.apic_ids[i], 0x4500);
	delay_us(10000);
	for (int round = 0; round < 2; round++) {
		for (u32 i = 0; i < acpi.ncpus; i++)
			if (acpi.apic_ids[i] != self)
				lapic_ipi(acpi.apic_ids[i], 0x4600 | (TRAMPOLINE_PA >> 12));
		delay_us(200);
	}
	check_in(0);
	u64 end = tsc_deadline(10000);
	while (cpus_checked_in < acpi.ncpus && !tsc_passed(end))
		cpu_relax();
	if (cpus_checked_in != acpi.ncpus)
		fail("smp %u of %u cpus checked in", cpus_checked_in, acpi.ncpus);
	printf("probe: cpus %u\n", cpus_checked_in);
}

static void scenario_smp(void)
{
	start_aps();
	done();
}

static void __attribute__((noinline)) work(u64 iterations)
{
	for (u64 i = 0; i < iterations; i++)
		__asm__ volatile("" ::: "memory");
}

/*
 * Progress is counted in work, not time: "about 100 ms" is calibrated once
 * against the TSC, so a vCPU that gets less CPU (pause, cgroup cap) prints
 * progress lines more slowly.
 */
static void scenario_spin(void)
{
	/* Calibrate before the APs start spinning and compete for host CPUs. */
	tsc_calibrate();
	const u64 probe_iters = 10000000;
	u64 best = ~0ull;
	for (int i = 0; i < 5; i++) {
		u64 t0 = rdtsc();
		work(probe_iters);
		u64 t = rdtsc() - t0;
		if (t < best)
			best = t;
	}
	u64 per_100ms = probe_iters * (tsc_hz / 10) / (best ? best : 1);
	start_aps();
	printf("probe: spin-calibrated %lu iterations per 100 ms (tsc %lu kHz, %lu cycles per %lu)\n", per_100ms, tsc_hz / 1000, best, probe_iters);
	for (u64 n = 1;; n++) {
		work(per_100ms);
		printf("probe: progress %lu\n", n);
	}
}

/* snap: each AP's own count, which the BSP reports (the smallest). */
static volatile u64 ap_count[MAX_CPUS];

/*
 * A counter for snapshot tests: every round writes its count to the disk and
 * reads it back (virtio requests and interrupts), the LAPIC timer ticks, and
 * every AP counts on its own; the BSP prints `probe: count N ticks T ap A`
 * (A: the smallest AP count, 0 without APs) about every 50 ms.
 */
static void scenario_snap(void)
{
	snap_blk_init();
	start_aps();
	lapic_write(LAPIC_TIMER_DIV, 0x3);
	lapic_write(LAPIC_LVT_TIMER, VEC_LAPIC_TIMER | 1 << 17);
	lapic_write(LAPIC_TIMER_INIT, 1000000);
	for (u64 n = 1;; n++) {
		snap_blk_step(n);
		u64 ap = ~0ull;
		for (u32 i = 1; i < cpus_checked_in; i++)
			if (ap_count[i] < ap)
				ap = ap_count[i];
		printf("probe: count %lu ticks %u ap %lu\n", n, lapic_ticks, ap == ~0ull ? 0 : ap);
		delay_us(50000);
	}
}

void ap_user_main(u64 cpu)
{
	check_in((u32)cpu);
	if (!strcmp(scenario, "spin"))
		for (;;)
			work(~0ull);
	if (!strcmp(scenario, "snap"))
		for (;;) {
			work(1000000);
			ap_count[cpu < MAX_CPUS ? cpu : 0]++;
		}
	park();
}

/* ---- irq ---- */

void ioapic_write(u32 reg, u32 v)
{
	/* IOAPIC: IOREGSEL at +0x00, IOWIN at +0x10 (82093AA datasheet 3.1). */
	mmio_write32(acpi.ioapic_addr, reg);
	mmio_write32(acpi.ioapic_addr + 0x10, v);
}

static void scenario_irq(void)
{
	/* (a) LAPIC timer, periodic, divide by 16 (SDM Vol. 3A, 11.5.4). */
	lapic_enable();
	lapic_write(LAPIC_TIMER_DIV, 0x3);
	lapic_write(LAPIC_LVT_TIMER, VEC_LAPIC_TIMER | 1 << 17);
	lapic_write(LAPIC_TIMER_INIT, 100000);
	u64 end = tsc_deadline(5000);
	while (lapic_ticks < 5 && !tsc_passed(end))
		cpu_relax();
	lapic_write(LAPIC_LVT_TIMER, 1 << 16); /* masked */
	lapic_write(LAPIC_TIMER_INIT, 0);
	u32 ticks = lapic_ticks;
	if (ticks < 5)
		fail("lapic-timer %u ticks in 5 s", ticks);
	printf("probe: lapic-timer ok %u\n", ticks);

	/* (b) COM1 THR-empty interrupt through IOAPIC pin 4 (ISA IRQ 4 unless
	 * the MADT overrides it; ACPI 6.5, 5.2.12.5 for the MPS INTI flags). */
	if (!acpi.ioapic_addr)
		fail("serial-irq no IOAPIC in MADT");
	u32 pin = acpi.irq4_gsi - acpi.ioapic_gsi_base;
	u32 polarity_low = (acpi.irq4_flags & 3) == 3;
	u32 level = ((acpi.irq4_flags >> 2) & 3) == 3;
	/* IOAPIC redirection entry (82093AA 3.2.4): vector, fixed, physical
	 * destination = this CPU, bit 13 polarity, bit 15 trigger, bit 16 mask. */
	ioapic_write(0x10 + 2 * pin + 1, lapic_id() << 24);
	ioapic_write(0x10 + 2 * pin, VEC_SERIAL | polarity_low << 13 | level << 15);
	outb(0x3fc, 0x0b); /* MCR: DTR, RTS, OUT2 (gates the IRQ line on PCs) */
	outb(0x3f9, 0x02); /* IER: THR empty interrupt; THR is empty now */
	end = tsc_deadline(5000);
	while (!serial_irqs && !tsc_passed(end))
		cpu_relax();
	ioapic_write(0x10 + 2 * pin, 1 << 16);
	outb(0x3f9, 0);
	if (!serial_irqs)
		fail("serial-irq no interrupt on vector 0x%x (IOAPIC pin %u) in 5 s", VEC_SERIAL, pin);
	printf("probe: serial-irq ok\n");
	done();
}

/* ---- sse: XMM state kept across exits and interrupts ---- */

void sse_pattern(u8 *p, u32 seed);
u32 sse_diff(const u8 *a, const u8 *b);

/*
 * At CPL3 (native on PVM): the 16 XMM registers hold a known pattern while the
 * vCPU exits to the VMM (port 0x80) and takes LAPIC timer interrupts (whose
 * handler runs at CPL0 and touches no XMM register); each round reads them
 * back. A register that changed is state lost by the hypervisor or the VMM.
 */
static void scenario_sse(void)
{
	static u8 want[256], got[256];
	lapic_enable();
	lapic_write(LAPIC_TIMER_DIV, 0x3);
	lapic_write(LAPIC_LVT_TIMER, VEC_LAPIC_TIMER | 1 << 17);
	lapic_write(LAPIC_TIMER_INIT, 20000);
	u32 rounds = 0, lost = 0, lost_regs = 0;
	u64 end = tsc_deadline(3000);
	while (!tsc_passed(end)) {
		sse_pattern(want, rounds + 3);
		__asm__ volatile(XMM_LOAD_ASM ::"r"(want) : "memory");
		for (u32 i = 0; i < 200; i++) {
			outb(0x80, (u8)i);
			for (volatile u32 j = 0; j < 500; j++)
				;
		}
		__asm__ volatile(XMM_STORE_ASM ::"r"(got) : "memory");
		u32 bad = sse_diff(got, want);
		if (bad) {
			lost++;
			lost_regs |= bad;
		}
		rounds++;
	}
	lapic_write(LAPIC_LVT_TIMER, 1 << 16);
	lapic_write(LAPIC_TIMER_INIT, 0);
	printf("probe: sse rounds %u exits %u ticks %u lost-rounds %u lost-regs 0x%x\n", rounds, rounds * 200,
	       lapic_ticks, lost, lost_regs);
	printf("probe: sse %s\n", lost ? "wrong" : "ok");
	done();
}

/* ---- exits: the cost of a VM exit, for the VMM benchmarks ---- */

/* Time `n` iterations of one exiting access; returns nanoseconds per exit. */
#define TIME_EXITS(n, access)                                          \
	({                                                             \
		u64 t0_ = rdtsc();                                     \
		for (u32 i_ = 0; i_ < (n); i_++)                       \
			access;                                        \
		(rdtsc() - t0_) * 1000000000ull / tsc_hz / (n);        \
	})

/*
 * Port 0x80 (the POST diagnostic port, no device behind it in wisp) and the
 * first MMIO-hole page 0xc0000000 (no device in wisp's layout) exit to the
 * VMM, which ignores writes and reads 0xff.
 */
static void scenario_exits(void)
{
	const u32 n = 5000;
	const u64 mmio = 0xc0000000ull;
	tsc_calibrate();
	u64 pio_out = TIME_EXITS(n, outb(0x80, 0));
	u64 pio_in = TIME_EXITS(n, (void)inb(0x80));
	u64 mmio_write = TIME_EXITS(n, mmio_write32(mmio, 0));
	u64 mmio_read = TIME_EXITS(n, (void)mmio_read32(mmio));
	printf("probe: exit-ns pio-out %lu pio-in %lu mmio-write %lu mmio-read %lu (%u each)\n", pio_out, pio_in,
	       mmio_write, mmio_read, n);
	done();
}

/* ---- entry ---- */
void user_main(u64 cpl0_done)
{
	start_info = (struct hvm_start_info *)(u64)start_info_paddr;
	if (start_info->magic != HVM_START_MAGIC) {
		printf("probe: FAIL start_info magic 0x%x\n", start_info->magic);
		i8042_reset();
		park();
	}
	if (start_info->cmdline_paddr) {
		const char *c = (const char *)start_info->cmdline_paddr;
		u32 n = 0;
		while (c[n] && n < sizeof(cmdline) - 1)
			n++;
		memcpy(cmdline, c, n);
	}
	if (!cpl0_done)
		printf("probe: start %s\n", scenario);
	if (!acpi_init(start_info->rsdp_paddr, 0)) {
		printf("probe: FAIL no ACPI (rsdp_paddr 0x%lx)\n", start_info->rsdp_paddr);
		i8042_reset();
		park();
	}
	if (cpl0_done)
		done();

	if (!strcmp(scenario, "hello"))
		scenario_hello();
	else if (!strcmp(scenario, "info"))
		scenario_info();
	else if (!strcmp(scenario, "smp"))
		scenario_smp();
	else if (!strcmp(scenario, "spin"))
		scenario_spin();
	else if (!strcmp(scenario, "snap"))
		scenario_snap();
	else if (!strcmp(scenario, "irq"))
		scenario_irq();
	else if (!strcmp(scenario, "sse"))
		scenario_sse();
	else if (!strcmp(scenario, "exits"))
		scenario_exits();
	else if (!strcmp(scenario, "blk"))
		scenario_blk();
	else if (!strcmp(scenario, "blk-hostile"))
		scenario_blk_hostile();
	else if (!strcmp(scenario, "blk-flush-then-hang"))
		scenario_blk_flush_then_hang();
	else if (!strcmp(scenario, "blk-write-then-end"))
		scenario_blk_write_then_end();
	else if (!strcmp(scenario, "blk-media"))
		scenario_blk_media();
	else if (!strcmp(scenario, "blk-bench"))
		scenario_blk_bench();
	else if (!strcmp(scenario, "net"))
		scenario_net();
	else if (!strcmp(scenario, "blk-net"))
		scenario_blk_net();
	else if (!strcmp(scenario, "rng"))
		scenario_rng();
	else if (!strcmp(scenario, "vsock"))
		scenario_vsock();
	else if (!strcmp(scenario, "balloon"))
		scenario_balloon();
	else if (!strcmp(scenario, "ctrl-alt-del"))
		scenario_ctrl_alt_del();
	else if (!strcmp(scenario, "i8042-flood"))
		scenario_i8042_flood();
	else if (!strcmp(scenario, "console-flood"))
		scenario_console_flood();
	else if (!strcmp(scenario, "log-flood"))
		scenario_log_flood();
	else if (!strcmp(scenario, "reset-acpi"))
		acpi_reset();
	else if (!strcmp(scenario, "reset-i8042")) {
		i8042_reset();
		fail("reset-i8042 did not reset");
	} else
		fail("unknown scenario %s", scenario);
}
