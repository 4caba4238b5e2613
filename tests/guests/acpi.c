/*
 * ACPI, read like a real guest does (ACPI 6.5 chapter 5): RSDP -> XSDT (or
 * RSDT) -> FADT ("FACP"), DSDT, MADT ("APIC"). Also power off and reset
 * through the FADT registers.
 */
#include "probe.h"

struct acpi_info acpi;

/* ACPI 6.5, 5.2.6: every table starts with this 36-byte header. */
struct sdt_header {
	char signature[4];
	u32 length;
	u8 revision;
	u8 checksum;
	char oem_id[6];
	char oem_table_id[8];
	u32 oem_revision;
	u32 creator_id;
	u32 creator_revision;
} __attribute__((packed));

/* ACPI 6.5, 5.2.3.2: Generic Address Structure. */
struct gas {
	u8 space_id; /* 0 = system memory, 1 = system I/O */
	u8 bit_width;
	u8 bit_offset;
	u8 access_size; /* 1 = byte, 2 = word, 3 = dword, 4 = qword */
	u64 address;
} __attribute__((packed));

/* FADT field offsets, ACPI 6.5 table 5.9. */
#define FADT_DSDT 40
#define FADT_SMI_CMD 48
#define FADT_ACPI_ENABLE 52
#define FADT_PM1A_CNT_BLK 64
#define FADT_PM1B_CNT_BLK 68
#define FADT_FLAGS 112
#define FADT_RESET_REG 116
#define FADT_RESET_VALUE 128
#define FADT_X_DSDT 140
#define FADT_X_PM1A_CNT_BLK 172
#define FADT_X_PM1B_CNT_BLK 184
#define FADT_SLEEP_CONTROL_REG 244
#define FADT_FLAG_RESET_REG_SUP (1u << 10)
#define FADT_FLAG_HW_REDUCED_ACPI (1u << 20)

static int checksum_ok(u64 addr, u32 len)
{
	u8 sum = 0;
	for (u32 i = 0; i < len; i++)
		sum += ((const u8 *)addr)[i];
	return sum == 0;
}

static void sig_str(char out[5], const void *p)
{
	memcpy(out, p, 4);
	out[4] = 0;
	for (int i = 0; i < 4; i++)
		if (out[i] < 0x20 || out[i] > 0x7e)
			out[i] = '?';
}

static u32 rd32(u64 addr) { return *(const u32 *)addr; }
static u64 rd64(u64 addr) { return *(const u64 *)addr; }

/* ACPI 6.5, 5.2.5.1: legacy scan of the BIOS area on 16-byte boundaries. */
static u64 rsdp_scan(void)
{
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp((const void *)a, "RSD PTR ", 8) && checksum_ok(a, 20))
			return a;
	return 0;
}

static int table_ok(u64 addr, int verbose)
{
	const struct sdt_header *h = (const void *)addr;
	char sig[5];
	sig_str(sig, h->signature);
	if (verbose)
		printf("probe: acpi %s 0x%lx\n", sig, addr);
	if (h->length < sizeof(*h) || h->length > 0x1000000 || !checksum_ok(addr, h->length)) {
		if (verbose)
			fail("checksum %s", sig);
		return 0;
	}
	return 1;
}

/* ACPI 6.5, 5.2.12: MADT interrupt controller structures. */
static void parse_madt(u64 madt)
{
	const struct sdt_header *h = (const void *)madt;
	u64 p = madt + 44, end = madt + h->length;
	acpi.irq4_gsi = 4;
	while (p + 2 <= end) {
		u8 type = ((const u8 *)p)[0], len = ((const u8 *)p)[1];
		if (len < 2 || p + len > end)
			break;
		const u8 *e = (const u8 *)p;
		if (type == 0 && len >= 8) { /* Processor Local APIC */
			if (rd32(p + 4) & 1) {
				if (acpi.ncpus < MAX_CPUS)
					acpi.apic_ids[acpi.ncpus] = e[3];
				acpi.ncpus++;
			}
		} else if (type == 9 && len >= 16) { /* Processor Local x2APIC */
			if (rd32(p + 8) & 1) {
				if (acpi.ncpus < MAX_CPUS)
					acpi.apic_ids[acpi.ncpus] = rd32(p + 4);
				acpi.ncpus++;
			}
		} else if (type == 1 && len >= 12) { /* I/O APIC: the one with GSI 4 wins */
			if (acpi.nioapics < 8) {
				acpi.ioapics[acpi.nioapics].addr = rd32(p + 4);
				acpi.ioapics[acpi.nioapics].gsi_base = rd32(p + 8);
				acpi.nioapics++;
			}
			if (!acpi.ioapic_addr || rd32(p + 8) == 0) {
				acpi.ioapic_addr = rd32(p + 4);
				acpi.ioapic_gsi_base = rd32(p + 8);
			}
		} else if (type == 2 && len >= 10) { /* Interrupt Source Override */
			if (e[2] == 0 && e[3] == 4) {
				acpi.irq4_gsi = rd32(p + 4);
				acpi.irq4_flags = *(const u16 *)(p + 8);
			}
		}
		p += len;
	}
}

int acpi_init(u64 rsdp, int verbose)
{
	memset(&acpi, 0, sizeof(acpi));
	if (!rsdp)
		rsdp = rsdp_scan();
	if (!rsdp || memcmp((const void *)rsdp, "RSD PTR ", 8))
		return 0;
	if (verbose)
		printf("probe: acpi RSDP 0x%lx\n", rsdp);
	/* ACPI 6.5, 5.2.5.3: checksum over the first 20 bytes; revision 2+ adds
	 * the extended checksum over the whole structure. */
	u8 revision = ((const u8 *)rsdp)[15];
	if (!checksum_ok(rsdp, 20) || (revision >= 2 && !checksum_ok(rsdp, rd32(rsdp + 20)))) {
		if (verbose)
			fail("checksum RSDP");
		return 0;
	}
	acpi.rsdp = rsdp;

	u64 root;
	u32 entry_size;
	if (revision >= 2 && rd64(rsdp + 24)) {
		root = rd64(rsdp + 24);
		entry_size = 8;
	} else {
		root = rd32(rsdp + 16);
		entry_size = 4;
	}
	if (!root || !table_ok(root, verbose))
		return 0;
	acpi.xsdt = root;

	const struct sdt_header *rh = (const void *)root;
	u32 n = (rh->length - sizeof(*rh)) / entry_size;
	for (u32 i = 0; i < n; i++) {
		u64 e = root + sizeof(*rh) + (u64)i * entry_size;
		u64 t = entry_size == 8 ? rd64(e) : rd32(e);
		if (!t || !table_ok(t, verbose))
			continue;
		if (!memcmp((const void *)t, "FACP", 4))
			acpi.fadt = t;
		else if (!memcmp((const void *)t, "APIC", 4))
			acpi.madt = t;
	}

	if (acpi.fadt) {
		u32 len = ((const struct sdt_header *)acpi.fadt)->length;
		u64 dsdt = 0;
		if (len >= FADT_X_DSDT + 8)
			dsdt = rd64(acpi.fadt + FADT_X_DSDT);
		if (!dsdt)
			dsdt = rd32(acpi.fadt + FADT_DSDT);
		if (dsdt && table_ok(dsdt, verbose))
			acpi.dsdt = dsdt;
	}
	if (acpi.madt)
		parse_madt(acpi.madt);
	return 1;
}

static void gas_write(const struct gas *g, u64 value)
{
	u32 width = g->access_size ? 8u << (g->access_size - 1) : g->bit_width;
	value <<= g->bit_offset;
	if (g->space_id == 1) {
		u16 port = (u16)g->address;
		if (width <= 8)
			outb(port, (u8)value);
		else if (width <= 16)
			outw(port, (u16)value);
		else
			outl(port, (u32)value);
	} else if (g->space_id == 0) {
		if (width <= 8)
			*(volatile u8 *)g->address = (u8)value;
		else if (width <= 16)
			*(volatile u16 *)g->address = (u16)value;
		else if (width <= 32)
			*(volatile u32 *)g->address = (u32)value;
		else
			*(volatile u64 *)g->address = value;
	}
}

/*
 * SLP_TYP for S5 from the DSDT's \_S5 package (ACPI 6.5, 7.4.2): find the
 * name "_S5_", then PackageOp (0x12), PkgLength, NumElements, and the first
 * element (BytePrefix 0x0a + byte, or ZeroOp/OneOp). 5 if not found, which
 * is what wisp and QEMU's microvm declare.
 */
static u8 s5_slp_typ(void)
{
	if (!acpi.dsdt)
		return 5;
	const u8 *p = (const u8 *)acpi.dsdt;
	u32 len = ((const struct sdt_header *)p)->length;
	for (u32 i = 36; i + 8 < len; i++) {
		if (memcmp(p + i, "_S5_", 4) || p[i + 4] != 0x12)
			continue;
		const u8 *q = p + i + 5;
		q += 1 + (q[0] >> 6); /* PkgLength: bits 7-6 = extra bytes */
		q++; /* NumElements */
		if (q[0] == 0x0a)
			return q[1];
		if (q[0] == 0x00 || q[0] == 0x01)
			return q[0];
		return 5;
	}
	return 5;
}

void i8042_reset(void)
{
	/* 8042 command 0xFE pulses the CPU reset line. */
	outb(0x64, 0xfe);
	for (u64 end = rdtsc() + 4000000000ull; !tsc_passed(end);)
		cpu_relax();
}

void acpi_poweroff(void)
{
	if (!acpi.fadt)
		acpi_init(((struct hvm_start_info *)(u64)start_info_paddr)->rsdp_paddr, 0);
	if (acpi.fadt) {
		u64 f = acpi.fadt;
		u32 len = ((const struct sdt_header *)f)->length;
		u8 typ = s5_slp_typ();
		const struct gas *sleep = (const void *)(f + FADT_SLEEP_CONTROL_REG);
		if (len >= FADT_SLEEP_CONTROL_REG + 12 && sleep->address) {
			/* ACPI 6.5, 4.8.3.7: SLP_TYP bits 2-4, SLP_EN bit 5. */
			gas_write(sleep, (u64)(typ & 7) << 2 | 1u << 5);
		} else {
			/* Fixed hardware: PM1 control, SLP_TYP bits 10-12, SLP_EN bit 13
			 * (ACPI 6.5, 4.8.4.2). Switch to ACPI mode first if the firmware
			 * left it in legacy mode (SCI_EN, bit 0). */
			u32 pm1a = rd32(f + FADT_PM1A_CNT_BLK), pm1b = rd32(f + FADT_PM1B_CNT_BLK);
			u32 smi = rd32(f + FADT_SMI_CMD);
			if (pm1a && !(inb((u16)pm1a) & 1) && smi) {
				outb((u16)smi, ((const u8 *)f)[FADT_ACPI_ENABLE]);
				for (u64 end = rdtsc() + 1000000000ull; !tsc_passed(end) && !(inb((u16)pm1a) & 1);)
					cpu_relax();
			}
			u16 v = (u16)((typ & 7) << 10 | 1u << 13);
			if (pm1a)
				outw((u16)pm1a, v);
			if (pm1b)
				outw((u16)pm1b, v);
		}
		for (u64 end = rdtsc() + 4000000000ull; !tsc_passed(end);)
			cpu_relax();
		printf("probe: FAIL poweroff did not power off\n");
	} else {
		printf("probe: FAIL no ACPI FADT, trying i8042 reset\n");
	}
	i8042_reset();
	for (;;)
		__asm__ volatile("hlt"); /* at CPL3 this traps and main.c parks the CPU */
}

void acpi_reset(void)
{
	u64 f = acpi.fadt;
	if (!f)
		fail("reset-acpi no FADT");
	u32 len = ((const struct sdt_header *)f)->length;
	if (len < FADT_RESET_VALUE + 1 || !(rd32(f + FADT_FLAGS) & FADT_FLAG_RESET_REG_SUP))
		fail("reset-acpi RESET_REG_SUP not set");
	const struct gas *r = (const void *)(f + FADT_RESET_REG);
	if (!r->address || r->space_id > 1)
		fail("reset-acpi reset register space %u address 0x%lx", r->space_id, r->address);
	gas_write(r, ((const u8 *)f)[FADT_RESET_VALUE]);
	for (u64 end = rdtsc() + 4000000000ull; !tsc_passed(end);)
		cpu_relax();
	fail("reset-acpi did not reset");
}
