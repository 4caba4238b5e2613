/*
 * CPL0 part of the probe: per-CPU GDT/TSS/IDT setup, the trap handler, the
 * scenarios that must run at CPL0, and the drop to CPL3. PVM interprets
 * CPL0 code, so this file does as little as it can.
 */
#include "probe.h"

char scenario[32];
volatile u32 cpus_checked_in;
volatile u32 lapic_ticks, serial_irqs, bp_hits;
volatile u32 virtio_irqs[VIRTIO_SLOTS];
volatile u32 virtio_isr[VIRTIO_SLOTS];
u64 virtio_base[VIRTIO_SLOTS];
int cpu_1g_pages;
u32 cpuid_apic_id[MAX_CPUS];
u32 cpuid_1_ecx;
char cpuid_hv_signature[13];

/* Intel SDM Vol. 3A, 7.14.1: 64-bit IDT gate descriptor. */
struct idt_gate {
	u16 offset_lo;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 offset_mid;
	u32 offset_hi;
	u32 reserved;
} __attribute__((packed));

/* In .nozero, cleared when used (idt_init, cpu_init) rather than with .bss
 * at boot: clearing all 64 TSSs would cost interpreted CPL0 time. */
static struct idt_gate idt[VEC_SPURIOUS + 1] __attribute__((section(".nozero"), aligned(16)));
static struct tss64 tss[MAX_CPUS] __attribute__((section(".nozero"), aligned(16)));

struct __attribute__((packed)) desc_ptr {
	u16 limit;
	u64 base;
};

static void lidt(const void *base, u16 limit)
{
	struct desc_ptr p = { limit, (u64)base };
	__asm__ volatile("lidt %0" ::"m"(p));
}

/*
 * 0x8E: present, DPL 0, 64-bit interrupt gate (IF cleared on entry). Only the
 * exceptions and the probe's own vectors get a gate, and the IDT ends at
 * VEC_SPURIOUS (fewer interpreted instructions). Any other vector finds a
 * not-present gate (#NP) or lies beyond the limit (#GP), with error code
 * vector * 8 + 2 (SDM Vol. 3A, 7.13); either is reported as a FAIL.
 */
static void set_gate_dpl(int v, u8 type_attr)
{
	u64 h = (u64)isr_stubs + 16 * v;
	idt[v] = (struct idt_gate){
		.offset_lo = (u16)h,
		.selector = SEL_KCODE64,
		.type_attr = type_attr,
		.offset_mid = (u16)(h >> 16),
		.offset_hi = (u32)(h >> 32),
	};
}

static void set_gate(int v) { set_gate_dpl(v, 0x8e); }

/* On PVM each rep stosq iteration costs about one interpreted instruction,
 * a third of a C loop's. */
static void zero_qwords(void *p, u64 n) { __asm__ volatile("rep stosq" : "+D"(p), "+c"(n) : "a"(0ull) : "memory"); }

static void idt_init(void)
{
	zero_qwords(idt, sizeof(idt) / 8);
	for (int v = 0; v < 32; v++)
		set_gate(v);
	set_gate(VEC_LAPIC_TIMER);
	set_gate(VEC_SERIAL);
	for (int v = 0; v < VIRTIO_SLOTS; v++)
		set_gate(VEC_VIRTIO + v);
	/* 0xee: DPL 3, so CPL3 code may use int $VEC_WAIT. */
	set_gate_dpl(VEC_WAIT, 0xee);
	set_gate(VEC_SPURIOUS);
}

static u64 kstack_top(u32 cpu) { return (u64)kstacks + (u64)(cpu + 1) * KSTACK_SIZE; }
u64 ustack_top(u32 cpu) { return (u64)ustacks + (u64)(cpu + 1) * USTACK_SIZE; }

/*
 * Load this CPU's TSS (RSP0 = the stack interrupts from CPL3 switch to,
 * Intel SDM Vol. 3A, 7.12.1 / 8.7) and the shared IDT.
 */
static void cpu_init(u32 cpu)
{
	struct tss64 *t = &tss[cpu];
	zero_qwords(t, sizeof(*t) / 8);
	t->rsp0 = kstack_top(cpu);
	/* PVM drops RFLAGS.IOPL on IRETQ to CPL3, so port access at CPL3 relies
	 * on the I/O bitmap: all zero = all ports allowed. */
	t->iopb_offset = __builtin_offsetof(struct tss64, iopb);
	t->iopb[sizeof(t->iopb) - 1] = 0xff;
	u64 base = (u64)t;
	/* SDM Vol. 3A, 8.2.3: 16-byte TSS descriptor, type 9 (available), present. */
	gdt[6 + 2 * cpu] = (sizeof(*t) - 1) | (base & 0xffffff) << 16 | 0x89ull << 40 |
			   ((base >> 24) & 0xff) << 56;
	gdt[7 + 2 * cpu] = base >> 32;
	lidt(idt, sizeof(idt) - 1);
	__asm__ volatile("ltr %w0" ::"r"(SEL_TSS0 + 16 * cpu));
	/* CPUID is read here at CPL0: on PVM, CPUID at CPL3 is not intercepted
	 * and returns the host CPU's values. */
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	cpuid_apic_id[cpu] = b >> 24;
	if (cpu == 0) {
		cpuid_1_ecx = c;
		cpuid(0x40000000, 0, &a, &b, &c, &d);
		memcpy(cpuid_hv_signature, &b, 4);
		memcpy(cpuid_hv_signature + 4, &c, 4);
		memcpy(cpuid_hv_signature + 8, &d, 4);
		cpuid(0x80000001, 0, &a, &b, &c, &d);
		cpu_1g_pages = (d >> 26) & 1;
	}
}

static void lapic_eoi(void) { mmio_write32(LAPIC_BASE + 0xb0, 0); }

/*
 * wait_change16(p = rdi, v = rsi): IF is clear here (interrupt gate), so an
 * interrupt after the check stays pending until STI, and the STI shadow lets
 * it end the HLT rather than precede it. The interrupt nests on this stack
 * (CPL0 to CPL0).
 */
static void wait_for_change(struct trap_frame *f)
{
	if (*(const volatile u16 *)f->rdi == (u16)f->rsi)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
}

void trap(struct trap_frame *f)
{
	switch (f->vector) {
	case 3: /* #BP from the int3 scenario */
		bp_hits++;
		return;
	case 13:
		/* HLT is privileged (SDM Vol. 2A, HLT): at CPL3 it raises #GP.
		 * The probe uses exactly that to park a CPU for good. */
		if ((f->cs & 3) == 3 && *(const u8 *)f->rip == 0xf4)
			halt_forever();
		break;
	case VEC_LAPIC_TIMER:
		lapic_ticks++;
		lapic_eoi();
		return;
	case VEC_SERIAL:
		/* Reading IIR acknowledges THR-empty; IER = 0 stops it re-arming. */
		(void)inb(0x3fa);
		outb(0x3f9, 0);
		serial_irqs++;
		lapic_eoi();
		return;
	case VEC_VIRTIO ... VEC_VIRTIO + VIRTIO_SLOTS - 1: {
		/* virtio-mmio interrupt: read InterruptStatus, acknowledge it
		 * (virtio 1.2 §4.2.2) and remember it for the CPL3 driver. The
		 * line may be level-triggered (QEMU's microvm), so the device
		 * must drop it before the EOI or the IOAPIC delivers it again. */
		u32 slot = f->vector - VEC_VIRTIO;
		if (virtio_base[slot]) {
			u32 isr = mmio_read32(virtio_base[slot] + 0x60);
			if (isr)
				mmio_write32(virtio_base[slot] + 0x64, isr);
			virtio_isr[slot] |= isr;
		}
		virtio_irqs[slot]++;
		lapic_eoi();
		return;
	}
	case 6:
		/* PVM raises #UD for INT n at CPL3 (ENVIRONMENT.md): do what the
		 * VEC_WAIT gate would have done and step over the instruction. */
		if ((f->cs & 3) == 3 && *(const u8 *)f->rip == 0xcd && ((const u8 *)f->rip)[1] == VEC_WAIT) {
			wait_for_change(f);
			f->rip += 2;
			return;
		}
		break;
	case VEC_WAIT:
		wait_for_change(f);
		return;
	case VEC_SPURIOUS: /* SDM Vol. 3A, 11.9: no EOI for spurious vectors */
		return;
	}
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	serial_unlocked = 1;
	fail("%s %lu error 0x%lx rip 0x%lx cs 0x%lx rflags 0x%lx cr2 0x%lx", f->vector < 32 ? "exception" : "interrupt",
	     f->vector, f->error_code, f->rip, f->cs, f->rflags, cr2);
}

/* Find probe.scenario=NAME on the command line; default "hello". */
static void parse_scenario(const char *cmdline)
{
	static const char key[] = "probe.scenario=";
	memcpy(scenario, "hello", 6);
	if (!cmdline)
		return;
	for (const char *p = cmdline; *p; p++) {
		if ((p != cmdline && p[-1] != ' ') || memcmp(p, key, sizeof(key) - 1))
			continue;
		p += sizeof(key) - 1;
		u32 n = 0;
		while (p[n] && p[n] != ' ' && n < sizeof(scenario) - 1)
			n++;
		memcpy(scenario, p, n);
		scenario[n] = 0;
		return;
	}
}

/*
 * boot.S maps the first 4 GiB. The info scenario needs all RAM (up to
 * 64 GiB): 1 GiB pages if CPUID.80000001H:EDX.Page1GB[26], else 2 MiB pages.
 * The entries were not present before, so no TLB flush is needed (SDM Vol. 3A,
 * 4.10.4.3).
 */
static void map_all_ram(const struct hvm_start_info *si)
{
	if (si->version < 1)
		return;
	const struct hvm_memmap_table_entry *m = (const void *)si->memmap_paddr;
	u64 top = 0;
	for (u32 i = 0; i < si->memmap_entries && i < 128; i++)
		if (m[i].type == 1 && m[i].addr + m[i].size > top)
			top = m[i].addr + m[i].size;
	u64 gib = (top + (1ull << 30) - 1) >> 30;
	if (gib > 64)
		gib = 64;
	for (u64 g = 4; g < gib; g++) {
		if (cpu_1g_pages) {
			pdpt[g] = g << 30 | 0x87;
			continue;
		}
		u64 *t = &pd_high[(g - 4) * 512];
		for (u64 i = 0; i < 512; i++)
			t[i] = (g << 30 | i << 21) | 0x87;
		pdpt[g] = (u64)t | 0x7;
	}
}

void user_main(u64 arg);
void ap_user_main(u64 cpu);
void user_returned(void) { fail("user code returned"); }

static void cpl0_scenario_int3(void)
{
	/* #BP is a trap: the handler returns to the instruction after int3. */
	__asm__ volatile("int3" ::: "memory");
	if (bp_hits != 1)
		fail("int3 handler ran %u times", bp_hits);
	printf("probe: int3 ok\n");
}

static void cpl0_scenario_fwait(void)
{
	/* CR0: MP (1) and NE (5) set, EM (2) and TS (3) clear, so x87
	 * instructions execute and FWAIT checks for pending exceptions
	 * (SDM Vol. 3A, 2.5; Vol. 2A, FWAIT); FNINIT leaves none pending. */
	u64 cr0;
	__asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
	cr0 = (cr0 | 1 << 1 | 1 << 5) & ~(u64)(1 << 2 | 1 << 3);
	__asm__ volatile("mov %0, %%cr0; fninit; fwait" ::"r"(cr0) : "memory");
	printf("probe: fwait ok\n");
}

static void cpl0_scenario_emufail(void)
{
	/* lock cmpxchg16b (SDM Vol. 2A, CMPXCHG8B/CMPXCHG16B), which
	 * ENVIRONMENT.md lists as not completed by PVM's emulator at CPL0. PVM
	 * fails it whether or not CPUID shows CX16 (wisp hides CX16); elsewhere
	 * it completes, or raises #UD without CX16. */
	static u64 target[2] __attribute__((aligned(16))) = { 1, 2 };
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	if (!(c & (1u << 13)))
		printf("probe: emufail CPUID has no CMPXCHG16B, trying anyway\n");
	u64 lo = 1, hi = 2;
	__asm__ volatile("lock cmpxchg16b %0"
			 : "+m"(*(volatile u64(*)[2])target), "+a"(lo), "+d"(hi)
			 : "b"(3ull), "c"(4ull)
			 : "memory", "cc");
	printf("probe: emufail not-failed\n");
	/* Both outcomes (SDM Vol. 2A): equal -> RCX:RBX stored, ZF set; not equal -> the
	 * operand loaded into RDX:RAX, ZF clear, memory unchanged. */
	u8 zf;
	int ok = target[0] == 3 && target[1] == 4;
	lo = 7, hi = 8;
	__asm__ volatile("lock cmpxchg16b %0; setz %3"
			 : "+m"(*(volatile u64(*)[2])target), "+a"(lo), "+d"(hi), "=q"(zf)
			 : "b"(5ull), "c"(6ull)
			 : "memory", "cc");
	ok = ok && !zf && lo == 3 && hi == 4 && target[0] == 3 && target[1] == 4;
	printf("probe: emufail cmpxchg16b %s\n", ok ? "ok" : "wrong");
}

static void cpl0_scenario_emufail_xrstors(void)
{
	/* xrstors (SDM Vol. 1, 13.12): needs CR4.OSXSAVE (bit 18) and XCR0;
	 * restores x87 state from a compacted XSAVE area (XCOMP_BV bit 63). */
	static u8 area[4096] __attribute__((aligned(64)));
	u32 a, b, c, d;
	cpuid(0xd, 1, &a, &b, &c, &d);
	if (!(a & (1u << 3)))
		printf("probe: emufail-xrstors CPUID has no XSAVES, trying anyway\n");
	u64 cr4;
	__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
	__asm__ volatile("mov %0, %%cr4" ::"r"(cr4 | 1ull << 18));
	__asm__ volatile("xsetbv" ::"a"(3), "d"(0), "c"(0)); /* XCR0 = x87 | SSE */
	printf("probe: emufail-xrstors xsetbv ok\n");
	*(u64 *)(area + 520) = 1ull << 63 | 1; /* XCOMP_BV: compacted, x87 */
	__asm__ volatile("xrstors64 %0" ::"m"(area), "a"(1), "d"(0) : "memory");
	printf("probe: emufail-xrstors not-failed\n");
}

static int lsl(u64 sel, u64 *dst)
{
	u8 zf;
	__asm__ volatile("lsl %2, %0; setz %1" : "+r"(*dst), "=q"(zf) : "r"(sel) : "cc", "memory");
	return zf;
}

static void cpl0_scenario_lsl(void)
{
	/* LSL (SDM Vol. 2A) as Linux's paranoid entry runs it with FSGSBASE:
	 * the CPU and node numbers from the limit of a DPL-3 data segment
	 * (GDT_ENTRY_CPUNODE). The entry at 0x40 is CPU 1's TSS slot, unused with
	 * one vCPU: a data segment, DPL 3, G=0, limit (node 2 << 12) | cpu 5. */
	gdt[8] = 0x0000f20000002005ull;
	u64 v = ~0ull, w = ~0ull, x = 0x1111, y = 0x2222;
	int ok = lsl(0x43, &v) && v == 0x2005;
	/* 32-bit form: the limit of the 4 GiB kernel code segment, zero-extended. */
	u32 lo;
	u8 zf;
	__asm__ volatile("lsl %2, %0; setz %1" : "=r"(lo), "=q"(zf) : "r"(0x08u) : "cc");
	ok = ok && zf && lo == 0xffffffffu;
	/* The CPU's TSS (64-bit, available or busy): its byte limit. */
	ok = ok && lsl(0x30, &w) && w == sizeof(struct tss64) - 1;
	/* Null selector and one past the GDT: ZF clear, destination unchanged. */
	ok = ok && !lsl(0, &x) && x == 0x1111;
	ok = ok && !lsl(0xfff8, &y) && y == 0x2222;
	gdt[8] = 0;
	printf("probe: lsl %s %lx %lx\n", ok ? "ok" : "wrong", v, w);

	/* VERW/VERR (SDM Vol. 2A), as Linux's idle path runs VERW on __KERNEL_DS from memory
	 * against MDS / MMIO stale data: kernel data is writable and readable, kernel code is
	 * readable only, the null selector is neither. */
	static const u16 kernel_ds = 0x10;
	u8 w_ds, r_ds, w_cs, r_cs, w_null;
	__asm__ volatile("verw %1; setz %0" : "=q"(w_ds) : "m"(kernel_ds) : "cc", "memory");
	__asm__ volatile("verr %1; setz %0" : "=q"(r_ds) : "r"((u16)0x10) : "cc");
	__asm__ volatile("verw %1; setz %0" : "=q"(w_cs) : "r"((u16)0x08) : "cc");
	__asm__ volatile("verr %1; setz %0" : "=q"(r_cs) : "r"((u16)0x08) : "cc");
	__asm__ volatile("verw %1; setz %0" : "=q"(w_null) : "r"((u16)0) : "cc");
	ok = w_ds && r_ds && !w_cs && r_cs && !w_null;
	printf("probe: verw %s\n", ok ? "ok" : "wrong");
}

void sse_pattern(u8 *p, u32 seed)
{
	for (u32 i = 0; i < 256; i++)
		p[i] = (u8)(seed * 131 + i * 7 + 1);
}

/* Which XMM registers differ between two 256-byte images: a bit per register. */
u32 sse_diff(const u8 *a, const u8 *b)
{
	u32 bad = 0;
	for (u32 i = 0; i < 256; i++)
		if (a[i] != b[i])
			bad |= 1u << (i / 16);
	return bad;
}

static void cpl0_scenario_sse(void)
{
	/* SSE on: CR4.OSFXSR and OSXMMEXCPT, CR0.MP set and EM/TS clear (SDM
	 * Vol. 3A, 13.1.3). What a Linux kernel booted with noxsave does on every
	 * context switch: FXSAVE a task's registers and FXRSTOR them later
	 * (SDM Vol. 1, 10.5), here at CPL0 where PVM interprets them. */
	u64 cr0, cr4;
	__asm__ volatile("mov %%cr0, %0; mov %%cr4, %1" : "=r"(cr0), "=r"(cr4));
	cr0 = (cr0 | 1 << 1) & ~(u64)(1 << 2 | 1 << 3);
	__asm__ volatile("mov %0, %%cr0; mov %1, %%cr4" ::"r"(cr0), "r"(cr4 | 1 << 9 | 1 << 10) : "memory");
	static u8 area[512] __attribute__((aligned(16)));
	static u8 a[256], b[256], got[256];
	sse_pattern(a, 1);
	sse_pattern(b, 2);
	__asm__ volatile(XMM_LOAD_ASM ::"r"(a) : "memory");
	__asm__ volatile("fxsave64 %0" : "=m"(area)::"memory");
	u32 saved = sse_diff(area + 160, a);
	__asm__ volatile(XMM_LOAD_ASM ::"r"(b) : "memory");
	__asm__ volatile("fxrstor64 %0" ::"m"(area) : "memory");
	__asm__ volatile(XMM_STORE_ASM ::"r"(got) : "memory");
	u32 restored = sse_diff(got, a);
	if (saved || restored)
		printf("probe: sse-cpl0 wrong fxsave-regs 0x%x fxrstor-regs 0x%x\n", saved, restored);
	else
		printf("probe: sse-cpl0 ok\n");
}

static int cpl0_done;

void kmain(u32 start_info_pa)
{
	struct hvm_start_info *si = (void *)(u64)start_info_pa;
	/* Mask both 8259As (OCW1): the probe uses the IOAPIC and LAPIC only. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	/* 16550A FCR: enable and clear the FIFOs (lib.c writes 16 bytes per
	 * THRE). */
	outb(0x3fa, 0x07);
	idt_init();
	cpu_init(0);
	if (si->magic == HVM_START_MAGIC)
		parse_scenario((const char *)si->cmdline_paddr);
	else
		memcpy(scenario, "hello", 6);

	if (!strcmp(scenario, "triplefault")) {
		printf("probe: start %s\n", scenario);
		/* An empty IDT: the #UD cannot be delivered, nor the #GP/#DF that
		 * follow, so the CPU shuts down (SDM Vol. 3A, 7.15 #DF). */
		lidt(0, 0);
		__asm__ volatile("ud2");
	} else if (!strcmp(scenario, "panic")) {
		printf("probe: start %s\n", scenario);
		outb(0x505, 1); /* pvpanic: bit 0 = guest panicked */
		halt_forever();
	} else if (!strcmp(scenario, "int3")) {
		printf("probe: start %s\n", scenario);
		cpl0_scenario_int3();
		cpl0_done = 1;
	} else if (!strcmp(scenario, "fwait")) {
		printf("probe: start %s\n", scenario);
		cpl0_scenario_fwait();
		cpl0_done = 1;
	} else if (!strcmp(scenario, "sse")) {
		printf("probe: start %s\n", scenario);
		cpl0_scenario_sse();
	} else if (!strcmp(scenario, "lsl")) {
		printf("probe: start %s\n", scenario);
		cpl0_scenario_lsl();
		cpl0_done = 1;
	} else if (!strcmp(scenario, "emufail")) {
		printf("probe: start %s\n", scenario);
		cpl0_scenario_emufail();
		cpl0_done = 1;
	} else if (!strcmp(scenario, "emufail-xrstors")) {
		printf("probe: start %s\n", scenario);
		cpl0_scenario_emufail_xrstors();
		cpl0_done = 1;
	} else if (!strcmp(scenario, "info") && si->magic == HVM_START_MAGIC) {
		map_all_ram(si);
	}
	enter_user(user_main, cpl0_done, ustack_top(0), RFLAGS_USER);
}

void ap_kmain(u32 cpu)
{
	cpu_init(cpu);
	enter_user(ap_user_main, cpu, ustack_top(cpu), RFLAGS_USER);
}
