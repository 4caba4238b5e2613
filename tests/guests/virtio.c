/*
 * A minimal virtio-mmio driver (virtio 1.2 §4.2.2, modern devices only) with
 * split virtqueues (§2.7), and the virtio-blk scenarios (§5.2). Everything
 * here runs at CPL3: the MMIO windows and RAM are user-mapped, so register
 * accesses are plain 32-bit loads and stores (each one a VM exit, except
 * QueueNotify writes, which the VMM turns into ioeventfd signals).
 *
 * Devices are found in the ACPI DSDT (_HID "LNRO0005", _CRS with a
 * Memory32Fixed and an Extended Interrupt descriptor), or, when the DSDT has
 * none, in virtio_mmio.device=SIZE@BASE:IRQ words of the command line.
 * Interrupts go through the IOAPIC to VEC_VIRTIO + slot; main.c's handler
 * counts them and the CPL3 code reads InterruptStatus and acknowledges.
 */
#include "probe.h"

/* ---- DMA memory: a bump allocator over RAM at 16 MiB ---- */

#define DMA_BASE 0x1000000ull
#define DMA_SIZE 0x1000000ull /* 16 MiB; guests get at least 64 MiB */
static u64 dma_next;

static int is_ram(u64 lo, u64 hi)
{
	const struct hvm_start_info *si = (const void *)(u64)start_info_paddr;
	if (si->version < 1)
		return 0;
	const struct hvm_memmap_table_entry *m = (const void *)si->memmap_paddr;
	for (u32 i = 0; i < si->memmap_entries; i++)
		if (m[i].type == 1 && m[i].addr <= lo && hi <= m[i].addr + m[i].size)
			return 1;
	return 0;
}

/* Page-aligned, zeroed, identity-mapped (guest-physical == virtual). */
void *dma_alloc(u64 size)
{
	if (!dma_next) {
		if (!is_ram(DMA_BASE, DMA_BASE + DMA_SIZE))
			fail("dma region 0x%lx+0x%lx is not RAM in the memmap", DMA_BASE, DMA_SIZE);
		dma_next = DMA_BASE;
	}
	size = (size + 0xfff) & ~0xfffull;
	if (dma_next + size > DMA_BASE + DMA_SIZE)
		fail("dma region exhausted (0x%lx more bytes)", size);
	void *p = (void *)dma_next;
	dma_next += size;
	u64 *q = p;
	for (u64 i = 0; i < size / 8; i++)
		q[i] = 0;
	return p;
}

/* ---- registers ---- */

u32 vio_read(const struct virtio_dev *d, u32 reg) { return mmio_read32(d->base + reg); }
void vio_write(const struct virtio_dev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }

/* A 32-bit config field, read until ConfigGeneration is stable (§4.2.2.2). */
u32 virtio_config32(const struct virtio_dev *d, u32 off)
{
	for (int i = 0; i < 100; i++) {
		u32 g = vio_read(d, VMMIO_CONFIG_GENERATION);
		u32 v = vio_read(d, VMMIO_CONFIG + off);
		if (vio_read(d, VMMIO_CONFIG_GENERATION) == g)
			return v;
	}
	fail("virtio ConfigGeneration never stable");
}

/* ---- discovery ---- */

struct found {
	u64 base;
	u32 gsi;
	int edge, active_low;
};

/*
 * The DSDT's LNRO0005 devices, in DSDT order. Not a full AML interpreter: after
 * each "LNRO0005" string, the resource template of that device holds a
 * Memory32Fixed descriptor (ACPI 6.5, 6.4.3.4: 0x86, length 9, info, base,
 * size) and an Extended Interrupt descriptor (6.4.3.6: 0x89, length, flags
 * [bit 1 edge, bit 2 active low], count, the GSIs). The scan stops at the next
 * LNRO0005 or after 160 bytes.
 */
static u32 dsdt_virtio(struct found *out, u32 max)
{
	if (!acpi.dsdt)
		return 0;
	const u8 *t = (const u8 *)acpi.dsdt;
	u32 len = *(const u32 *)(t + 4), n = 0;
	for (u32 i = 36; i + 8 <= len && n < max; i++) {
		if (memcmp(t + i, "LNRO0005", 8))
			continue;
		struct found f = { 0, 0, 1, 0 };
		int have_mem = 0, have_irq = 0;
		for (u32 j = i + 8; j + 9 <= len && j < i + 160 && !(have_mem && have_irq); j++) {
			if (j + 8 <= len && !memcmp(t + j, "LNRO0005", 8))
				break;
			if (!have_mem && j + 12 <= len && t[j] == 0x86 && t[j + 1] == 9 && t[j + 2] == 0) {
				f.base = *(const u32 *)(t + j + 4);
				have_mem = 1;
				j += 11;
			} else if (have_mem && t[j] == 0x89 && t[j + 4] >= 1) {
				u8 flags = t[j + 3];
				f.edge = (flags >> 1) & 1;
				f.active_low = (flags >> 2) & 1;
				f.gsi = *(const u32 *)(t + j + 5);
				have_irq = 1;
			}
		}
		if (have_mem && have_irq)
			out[n++] = f;
	}
	return n;
}

/* virtio_mmio.device=<size>@<base>:<irq> (Linux's virtio_mmio command line format). */
static u32 cmdline_virtio(struct found *out, u32 max)
{
	static const char key[] = "virtio_mmio.device=";
	u32 n = 0;
	for (const char *p = cmdline; *p && n < max; p++) {
		if ((p != cmdline && p[-1] != ' ') || memcmp(p, key, sizeof(key) - 1))
			continue;
		const char *s = p + sizeof(key) - 1;
		(void)parse_u64(&s);
		if (*s == 'K' || *s == 'k' || *s == 'M' || *s == 'm')
			s++;
		if (*s++ != '@')
			continue;
		u64 base = parse_u64(&s);
		if (*s++ != ':')
			continue;
		u64 irq = parse_u64(&s);
		out[n++] = (struct found){ base, (u32)irq, 1, 0 };
	}
	return n;
}

/*
 * The nth (from 0) device of type device_id. Prints
 * "probe: virtio-mmio <base> gsi <gsi> device <id> (acpi|cmdline)" for it.
 */
void virtio_find(u32 device_id, u32 nth, struct virtio_dev *d, const char *what)
{
	struct found f[16];
	const char *how = "acpi";
	u32 n = dsdt_virtio(f, 16);
	if (!n) {
		n = cmdline_virtio(f, 16);
		how = "cmdline";
	}
	u32 seen = 0;
	for (u32 i = 0; i < n; i++) {
		u64 b = f[i].base;
		/* QEMU's microvm packs 512-byte windows; wisp uses pages. */
		if (b < 0xc0000000ull || b > 0x100000000ull - 0x200 || (b & 0x1ff))
			fail("%s virtio-mmio window 0x%lx: not 512-byte aligned in the 3-4 GiB hole", what, b);
		if (mmio_read32(b + VMMIO_MAGIC) != VIRTIO_MAGIC)
			fail("%s virtio-mmio 0x%lx MagicValue 0x%x", what, b, mmio_read32(b + VMMIO_MAGIC));
		if (mmio_read32(b + VMMIO_DEVICE_ID) != device_id || seen++ != nth)
			continue;
		u32 version = mmio_read32(b + VMMIO_VERSION);
		if (version != 2)
			fail("%s virtio-mmio 0x%lx Version %u, want 2 (modern)", what, b, version);
		*d = (struct virtio_dev){
			.base = b,
			.gsi = f[i].gsi,
			.device_id = device_id,
			.slot = device_id == VIRTIO_ID_NET ? 1 : 0,
			.edge = f[i].edge,
			.active_low = f[i].active_low,
		};
		printf("probe: virtio-mmio 0x%lx gsi %u device %u (%s)\n", b, f[i].gsi, device_id, how);
		return;
	}
	fail("%s no virtio device %u number %u (%u virtio-mmio windows, %s)", what, device_id, nth, n, how);
}

/*
 * A periodic LAPIC timer (vector VEC_LAPIC_TIMER, divide 16, initial count
 * 625000: about 10 ms with KVM's 1 GHz APIC bus) wakes wait_change16 so that
 * waits keep their deadlines even when no device interrupt comes.
 */
static void tick_start(void)
{
	static int started;
	if (started)
		return;
	started = 1;
	lapic_enable();
	mmio_write32(LAPIC_BASE + 0x3e0, 0x3);
	mmio_write32(LAPIC_BASE + 0x320, VEC_LAPIC_TIMER | 1 << 17);
	mmio_write32(LAPIC_BASE + 0x380, 625000);
}

/*
 * IOAPIC redirection entry for the device's GSI -> VEC_VIRTIO + slot, this CPU.
 * The IOAPIC is the MADT's one whose GSI range (base + entries from its
 * version register, 82093AA 3.2.2) holds the GSI.
 */
void virtio_route_irq(struct virtio_dev *d)
{
	for (u32 i = 0; i < acpi.nioapics; i++) {
		u64 a = acpi.ioapics[i].addr;
		u32 base = acpi.ioapics[i].gsi_base;
		mmio_write32(a, 1);
		u32 entries = ((mmio_read32(a + 0x10) >> 16) & 0xff) + 1;
		if (d->gsi < base || d->gsi - base >= entries)
			continue;
		u32 pin = d->gsi - base;
		tick_start();
		virtio_base[d->slot] = d->base;
		mmio_write32(a, 0x10 + 2 * pin + 1);
		mmio_write32(a + 0x10, lapic_id() << 24);
		mmio_write32(a, 0x10 + 2 * pin);
		mmio_write32(a + 0x10, (VEC_VIRTIO + d->slot) | (u32)d->active_low << 13 | (u32)!d->edge << 15);
		return;
	}
	fail("virtio gsi %u is on none of the %u IOAPICs in the MADT", d->gsi, acpi.nioapics);
}

static void set_status(struct virtio_dev *d, u32 s) { vio_write(d, VMMIO_STATUS, s); }

/*
 * Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (virtio 1.2 §3.1.1).
 * Accepts wanted & offered, plus VERSION_1, which is required. Prints
 * "probe: <what> features 0x<offered>" and returns the offered set.
 */
u64 virtio_negotiate(struct virtio_dev *d, const char *what, u64 wanted, int print)
{
	set_status(d, 0);
	if (vio_read(d, VMMIO_STATUS) != 0)
		fail("%s status 0x%x after reset", what, vio_read(d, VMMIO_STATUS));
	set_status(d, VSTAT_ACKNOWLEDGE);
	set_status(d, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER);
	vio_write(d, VMMIO_DEVICE_FEATURES_SEL, 0);
	u64 f = vio_read(d, VMMIO_DEVICE_FEATURES);
	vio_write(d, VMMIO_DEVICE_FEATURES_SEL, 1);
	f |= (u64)vio_read(d, VMMIO_DEVICE_FEATURES) << 32;
	d->features = f;
	if (print)
		printf("probe: %s features 0x%lx\n", what, f);
	if (!(f & VIRTIO_F_VERSION_1))
		fail("%s device does not offer VIRTIO_F_VERSION_1", what);
	d->acked = (f & wanted) | VIRTIO_F_VERSION_1;
	vio_write(d, VMMIO_DRIVER_FEATURES_SEL, 0);
	vio_write(d, VMMIO_DRIVER_FEATURES, (u32)d->acked);
	vio_write(d, VMMIO_DRIVER_FEATURES_SEL, 1);
	vio_write(d, VMMIO_DRIVER_FEATURES, (u32)(d->acked >> 32));
	set_status(d, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER | VSTAT_FEATURES_OK);
	u32 s = vio_read(d, VMMIO_STATUS);
	if (!(s & VSTAT_FEATURES_OK))
		fail("%s FEATURES_OK refused (status 0x%x, features 0x%lx)", what, s, d->acked);
	return f;
}

/* Rings for queue `index` with `size` entries (a power of two), QueueReady = 1. */
void virtio_queue_setup(struct virtio_dev *d, struct vq *q, u16 index, u16 size)
{
	vio_write(d, VMMIO_QUEUE_SEL, index);
	if (vio_read(d, VMMIO_QUEUE_READY))
		fail("virtio queue %u ready before setup", index);
	u32 max = vio_read(d, VMMIO_QUEUE_NUM_MAX);
	if (max < size)
		fail("virtio queue %u QueueNumMax %u < %u", index, max, size);
	/* Descriptor table 16 * size, avail 6 + 2 * size, used 6 + 8 * size: one
	 * or two pages for the sizes used here. */
	u8 *mem = dma_alloc(16u * size + 6 + 2u * size + 8 + 6 + 8u * size + 8);
	*q = (struct vq){
		.dev = d,
		.index = index,
		.size = size,
		.desc = (void *)mem,
		.avail = (void *)(mem + 16u * size),
		.used = (void *)(mem + ((16u * size + 6 + 2u * size + 7) & ~7u)),
	};
	vio_write(d, VMMIO_QUEUE_NUM, size);
	vio_write(d, VMMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
	vio_write(d, VMMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
	vio_write(d, VMMIO_QUEUE_DRIVER_LOW, (u32)(u64)q->avail);
	vio_write(d, VMMIO_QUEUE_DRIVER_HIGH, (u32)((u64)q->avail >> 32));
	vio_write(d, VMMIO_QUEUE_DEVICE_LOW, (u32)(u64)q->used);
	vio_write(d, VMMIO_QUEUE_DEVICE_HIGH, (u32)((u64)q->used >> 32));
	vio_write(d, VMMIO_QUEUE_READY, 1);
	if (vio_read(d, VMMIO_QUEUE_READY) != 1)
		fail("virtio queue %u not ready after QueueReady = 1 (status 0x%x)", index, vio_read(d, VMMIO_STATUS));
}

void virtio_driver_ok(struct virtio_dev *d, const char *what)
{
	set_status(d, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER | VSTAT_FEATURES_OK | VSTAT_DRIVER_OK);
	u32 s = vio_read(d, VMMIO_STATUS);
	if (s != (VSTAT_ACKNOWLEDGE | VSTAT_DRIVER | VSTAT_FEATURES_OK | VSTAT_DRIVER_OK))
		fail("%s status 0x%x after DRIVER_OK", what, s);
}

/* ---- split virtqueue ---- */

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* Make chain `head` available (§2.7.13); the device sees it after vq_kick. */
void vq_publish(struct vq *q, u16 head)
{
	q->avail->ring[q->avail_idx & (q->size - 1)] = head;
	barrier(); /* x86 keeps stores in order; the compiler must too */
	q->avail->idx = ++q->avail_idx;
}

void vq_kick(struct vq *q)
{
	__sync_synchronize();
	vio_write(q->dev, VMMIO_QUEUE_NOTIFY, q->index);
}

int vq_has_used(struct vq *q)
{
	barrier();
	return q->used->idx != q->last_used;
}

void vq_pop_used(struct vq *q, u32 *id, u32 *len)
{
	barrier();
	volatile struct vring_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
	*id = e->id;
	*len = e->len;
	q->last_used++;
}

/* Waits (bounded) for the next used element, halted between interrupts; 0 on timeout. */
int vq_wait_used(struct vq *q, u64 timeout_ms, u32 *id, u32 *len)
{
	u64 end = tsc_deadline(timeout_ms);
	while (!vq_has_used(q)) {
		if (tsc_passed(end))
			return 0;
		wait_change16(&q->used->idx, q->last_used);
	}
	vq_pop_used(q, id, len);
	return 1;
}

/* ---- virtio-blk (virtio 1.2 §5.2) ---- */

#define VIRTIO_BLK_F_RO (1ull << 5)
#define VIRTIO_BLK_F_BLK_SIZE (1ull << 6)
#define VIRTIO_BLK_F_FLUSH (1ull << 9)
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define BLK_QUEUE_SIZE 16
#define NO_STATUS 0xff /* what the status byte holds until the device writes it */

struct blk_req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

struct blk {
	struct virtio_dev dev;
	struct vq q;
	u64 capacity; /* sectors */
	int ro;
	struct blk_req_hdr *hdr;
	volatile u8 *status;
	u8 *id; /* GET_ID buffer, 20 bytes */
	u8 *scratch; /* 4 KiB for the good read after each hostile case */
};

static struct blk blk;
static u16 blk_queue_size = BLK_QUEUE_SIZE;

static void blk_setup(struct blk *b, int print)
{
	virtio_negotiate(&b->dev, "blk", VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH, print);
	virtio_queue_setup(&b->dev, &b->q, 0, blk_queue_size);
	virtio_driver_ok(&b->dev, "blk");
	b->ro = (b->dev.acked & VIRTIO_BLK_F_RO) != 0;
	b->capacity = virtio_config32(&b->dev, 0) | (u64)virtio_config32(&b->dev, 4) << 32;
	if (print)
		printf("probe: blk capacity %lu%s\n", b->capacity, b->ro ? " readonly" : "");
}

static void blk_init(struct blk *b)
{
	virtio_find(VIRTIO_ID_BLOCK, (u32)cmdline_u64("probe.disk", 0), &b->dev, "blk");
	virtio_route_irq(&b->dev);
	b->hdr = dma_alloc(4096);
	b->status = (volatile u8 *)b->hdr + 64;
	b->id = (u8 *)b->hdr + 128;
	b->scratch = dma_alloc(4096);
	blk_setup(b, 1);
}

/*
 * After a completion: the interrupt must come (bounded), the handler must have
 * found the used-buffer bit (0) in InterruptStatus and acknowledged it, and
 * the register must read clear afterwards (§4.2.2).
 */
static void blk_check_irq(struct blk *b, u32 irqs_before, const char *what)
{
	struct virtio_dev *d = &b->dev;
	u64 end = tsc_deadline(2000);
	while (virtio_irqs[d->slot] == irqs_before && !tsc_passed(end))
		cpu_relax();
	if (virtio_irqs[d->slot] == irqs_before)
		fail("blk %s: no interrupt on vector 0x%x (gsi %u) within 2 s of the completion", what,
		     VEC_VIRTIO + d->slot, d->gsi);
	u32 isr = __atomic_exchange_n(&virtio_isr[d->slot], 0, __ATOMIC_SEQ_CST);
	if (!(isr & 1))
		fail("blk %s: InterruptStatus 0x%x without the used-buffer bit", what, isr);
	isr = vio_read(d, VMMIO_INTERRUPT_STATUS);
	if (isr & 1)
		fail("blk %s: InterruptStatus 0x%x after InterruptAck", what, isr);
}

/*
 * One request: header, data split into descriptors of at most `seg` bytes,
 * status. Waits for its completion and the interrupt. Returns the status byte;
 * *used_len gets the used length.
 */
static u32 blk_request(struct blk *b, u32 type, u64 sector, void *buf, u32 len, u32 seg, u32 *used_len, const char *what)
{
	volatile struct vring_desc *d = b->q.desc;
	b->hdr->type = type;
	b->hdr->reserved = 0;
	b->hdr->sector = sector;
	*b->status = NO_STATUS;
	u16 n = 0;
	d[n] = (struct vring_desc){ (u64)b->hdr, 16, VRING_DESC_F_NEXT, (u16)(n + 1) };
	n++;
	u16 wflag = type == VIRTIO_BLK_T_OUT ? 0 : VRING_DESC_F_WRITE;
	for (u32 off = 0; off < len; off += seg) {
		u32 l = len - off < seg ? len - off : seg;
		if (n >= BLK_QUEUE_SIZE - 1)
			fail("blk %s: %u bytes in %u-byte segments do not fit the queue", what, len, seg);
		d[n] = (struct vring_desc){ (u64)buf + off, l, (u16)(wflag | VRING_DESC_F_NEXT), (u16)(n + 1) };
		n++;
	}
	d[n] = (struct vring_desc){ (u64)b->status, 1, VRING_DESC_F_WRITE, 0 };
	u32 irqs = virtio_irqs[b->dev.slot];
	vq_publish(&b->q, 0);
	vq_kick(&b->q);
	u32 id, ulen;
	if (!vq_wait_used(&b->q, 5000, &id, &ulen))
		fail("blk %s: no completion within 5 s (used idx %u, avail idx %u)", what, b->q.used->idx, b->q.avail_idx);
	if (id != 0)
		fail("blk %s: used id %u, want 0", what, id);
	blk_check_irq(b, irqs, what);
	if (used_len)
		*used_len = ulen;
	return *b->status;
}

/* The disk pattern: the 32-bit little-endian word at disk byte offset o
 * (o % 4 == 0) is (o / 4) * 0x9e3779b1 + seed, mod 2^32 (README). */
static void fill_pattern(u32 *buf, u64 disk_off, u32 len, u32 seed)
{
	u32 w = (u32)(disk_off / 4);
	for (u32 i = 0; i < len / 4; i++)
		buf[i] = (w + i) * 0x9e3779b1u + seed;
}

static void blk_check_ok(u32 st, const char *what)
{
	if (st != VIRTIO_BLK_S_OK)
		fail("blk %s: status %u", what, st);
}

static void blk_flush(struct blk *b)
{
	if (!(b->dev.acked & VIRTIO_BLK_F_FLUSH))
		fail("blk device does not offer VIRTIO_BLK_F_FLUSH");
	u32 ulen;
	blk_check_ok(blk_request(b, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0, &ulen, "flush"), "flush");
	if (ulen != 1)
		fail("blk flush: used len %u, want 1", ulen);
}

/* Writes the pattern over [sector, sector + kib KiB) in requests of 64 KiB. */
static void blk_write_pattern(struct blk *b, u64 sector, u64 kib, u32 seed, u8 *buf)
{
	for (u64 done_kib = 0; done_kib < kib; done_kib += 64) {
		u32 len = (u32)((kib - done_kib < 64 ? kib - done_kib : 64) * 1024);
		u64 s = sector + done_kib * 2;
		fill_pattern((u32 *)buf, s * 512, len, seed);
		u32 ulen;
		blk_check_ok(blk_request(b, VIRTIO_BLK_T_OUT, s, buf, len, 32768, &ulen, "write"), "write");
		if (ulen != 1)
			fail("blk write: used len %u, want 1 (the status byte)", ulen);
	}
}

static void blk_get_id(struct blk *b)
{
	u32 ulen;
	memset(b->id, 0, 21);
	blk_check_ok(blk_request(b, VIRTIO_BLK_T_GET_ID, 0, b->id, 20, 20, &ulen, "get-id"), "get-id");
	char s[21];
	u32 n = 0;
	for (; n < 20 && b->id[n]; n++)
		s[n] = (b->id[n] < 0x21 || b->id[n] > 0x7e) ? '?' : (char)b->id[n];
	s[n] = 0;
	printf("probe: blk serial %s\n", n ? s : "(none)");
}

static void blk_params(u64 *sector, u64 *kib, u32 *seed, u64 def_sector, u64 def_kib)
{
	*sector = cmdline_u64("probe.sector", def_sector);
	*kib = cmdline_u64("probe.kib", def_kib);
	*seed = (u32)cmdline_u64("probe.seed", 1);
	if (*kib == 0 || *kib > 1024 || *kib % 64)
		fail("probe.kib=%lu: want a multiple of 64 up to 1024", *kib);
	if (*sector + *kib * 2 > blk.capacity)
		fail("blk pattern at sector %lu + %lu KiB is beyond the capacity (%lu sectors)", *sector, *kib,
		     blk.capacity);
}

/* The blk scenario's round trip: write (or try to), flush, read back, report. */
static void blk_round_trip(void)
{
	blk_init(&blk);
	u64 sector, kib;
	u32 seed;
	blk_params(&sector, &kib, &seed, 8, 64);
	blk_get_id(&blk);
	u8 *wbuf = dma_alloc(64 * 1024), *rbuf = dma_alloc(64 * 1024);
	if (blk.ro) {
		fill_pattern((u32 *)wbuf, sector * 512, 64 * 1024, seed);
		u32 ulen, st = blk_request(&blk, VIRTIO_BLK_T_OUT, sector, wbuf, 64 * 1024, 32768, &ulen, "write");
		if (st != VIRTIO_BLK_S_IOERR)
			fail("blk write on a read-only disk: status %u, want %u (IOERR)", st, VIRTIO_BLK_S_IOERR);
		printf("probe: blk readonly-write refused\n");
	} else {
		blk_write_pattern(&blk, sector, kib, seed, wbuf);
		printf("probe: blk write ok\n");
	}
	blk_flush(&blk);
	printf("probe: blk flush ok\n");
	/* Read back in 8 KiB descriptors and compare, 64 KiB at a time. */
	int same = 1;
	for (u64 done_kib = 0; done_kib < kib && same; done_kib += 64) {
		u64 s = sector + done_kib * 2;
		u32 len = 64 * 1024;
		memset(rbuf, 0xa5, len);
		u32 ulen;
		blk_check_ok(blk_request(&blk, VIRTIO_BLK_T_IN, s, rbuf, len, 8192, &ulen, "read"), "read");
		if (ulen != len + 1)
			fail("blk read: used len %u, want %u (data and status)", ulen, len + 1);
		fill_pattern((u32 *)wbuf, s * 512, len, seed);
		if (memcmp(rbuf, wbuf, len)) {
			if (!blk.ro) {
				u32 i = 0;
				while (rbuf[i] == wbuf[i])
					i++;
				fail("blk readback differs at disk byte 0x%lx: 0x%x, wrote 0x%x", s * 512 + i, rbuf[i], wbuf[i]);
			}
			same = 0;
		}
	}
	/* A read-only disk holds what the host put there: say whether that is the pattern. */
	printf("probe: blk readback %s\n", same ? "ok" : "differs");
}

void scenario_blk(void)
{
	blk_round_trip();
	done();
}

/* The disk's round trip, then the net scenario on the same VM (a jailed VM's devices). */
void scenario_blk_net(void)
{
	blk_round_trip();
	scenario_net();
}

/* ---- blk-hostile ---- */

/* A good 4 KiB read at sector 0 must succeed after every hostile case. */
static void blk_good_read(struct blk *b, const char *after)
{
	u32 ulen, st = blk_request(b, VIRTIO_BLK_T_IN, 0, b->scratch, 4096, 4096, &ulen, "good read");
	if (st != VIRTIO_BLK_S_OK || ulen != 4097)
		fail("blk hostile: good read after %s: status %u used len %u", after, st, ulen);
}

/*
 * Publishes chain `head` (descriptors already written), waits up to 1 s and
 * prints "probe: blk hostile <name> status <n> len <l>", with status 255 when
 * the device did not write the status byte and "status none len none" when
 * the chain never came back. A returned chain must have an error status or
 * used length 0; then a good read must work.
 */
static void hostile_run(struct blk *b, const char *name, u16 head)
{
	*b->status = NO_STATUS;
	u32 irqs = virtio_irqs[b->dev.slot];
	vq_publish(&b->q, head);
	vq_kick(&b->q);
	u32 id, ulen;
	if (!vq_wait_used(&b->q, 1000, &id, &ulen)) {
		printf("probe: blk hostile %s status none len none\n", name);
	} else {
		u32 st = *b->status;
		printf("probe: blk hostile %s status %u len %u\n", name, st, ulen);
		if (id != head)
			fail("blk hostile %s: used id %u, want %u", name, id, head);
		if (st == VIRTIO_BLK_S_OK && ulen != 0)
			fail("blk hostile %s: accepted (status OK, used len %u)", name, ulen);
		blk_check_irq(b, irqs, name);
	}
	blk_good_read(b, name);
}

/* Descriptor helper for the hostile chains. */
static void desc(struct blk *b, u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
	b->q.desc[i] = (struct vring_desc){ addr, len, flags, next };
}

#define F_N VRING_DESC_F_NEXT
#define F_W VRING_DESC_F_WRITE

static void hdr_set(struct blk *b, u32 type, u64 sector)
{
	b->hdr->type = type;
	b->hdr->reserved = 0;
	b->hdr->sector = sector;
}

static u32 reg_status(struct blk *b) { return vio_read(&b->dev, VMMIO_STATUS); }

/* Garbage in the registers; the device must still work after a reset. */
static void hostile_registers(struct blk *b)
{
	struct virtio_dev *d = &b->dev;
	/* DRIVER_OK without FEATURES_OK: an invalid transition, ignored. */
	set_status(d, 0);
	set_status(d, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER);
	set_status(d, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER | VSTAT_DRIVER_OK);
	printf("probe: blk hostile driver-ok-before-features-ok status-reg 0x%x\n", reg_status(b));
	if (reg_status(b) & VSTAT_DRIVER_OK)
		fail("blk hostile: DRIVER_OK accepted without FEATURES_OK");

	/* Features the device did not offer (bit 63): FEATURES_OK must be refused. */
	set_status(d, 0);
	set_status(d, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER);
	vio_write(d, VMMIO_DRIVER_FEATURES_SEL, 1);
	vio_write(d, VMMIO_DRIVER_FEATURES, 0x80000001u);
	set_status(d, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER | VSTAT_FEATURES_OK);
	printf("probe: blk hostile unoffered-features status-reg 0x%x\n", reg_status(b));
	if (reg_status(b) & VSTAT_FEATURES_OK)
		fail("blk hostile: FEATURES_OK accepted with an unoffered feature");

	/* QueueNum 3 (not a power of two), then QueueReady. */
	virtio_negotiate(d, "blk hostile", VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, 0);
	vio_write(d, VMMIO_QUEUE_SEL, 0);
	vio_write(d, VMMIO_QUEUE_NUM, 3);
	vio_write(d, VMMIO_QUEUE_DESC_LOW, (u32)(u64)b->q.desc);
	vio_write(d, VMMIO_QUEUE_DRIVER_LOW, (u32)(u64)b->q.avail);
	vio_write(d, VMMIO_QUEUE_DEVICE_LOW, (u32)(u64)b->q.used);
	vio_write(d, VMMIO_QUEUE_READY, 1);
	u32 ready = vio_read(d, VMMIO_QUEUE_READY);
	printf("probe: blk hostile queue-num-3 ready %u status-reg 0x%x\n", ready, reg_status(b));
	if (ready)
		fail("blk hostile: queue of size 3 accepted");

	/* QueueReady before the ring addresses (all zero: address 0 is RAM, so
	 * the device may accept it); later address writes must not matter. */
	virtio_negotiate(d, "blk hostile", VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, 0);
	vio_write(d, VMMIO_QUEUE_SEL, 0);
	vio_write(d, VMMIO_QUEUE_NUM, BLK_QUEUE_SIZE);
	vio_write(d, VMMIO_QUEUE_READY, 1);
	ready = vio_read(d, VMMIO_QUEUE_READY);
	vio_write(d, VMMIO_QUEUE_DESC_LOW, (u32)(u64)b->q.desc);
	printf("probe: blk hostile ready-before-addresses ready %u status-reg 0x%x\n", ready, reg_status(b));

	/* A ring address outside guest memory, then QueueReady. */
	virtio_negotiate(d, "blk hostile", VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, 0);
	vio_write(d, VMMIO_QUEUE_SEL, 0);
	vio_write(d, VMMIO_QUEUE_NUM, BLK_QUEUE_SIZE);
	vio_write(d, VMMIO_QUEUE_DESC_LOW, 0);
	vio_write(d, VMMIO_QUEUE_DESC_HIGH, 0xfff);
	vio_write(d, VMMIO_QUEUE_DRIVER_LOW, (u32)(u64)b->q.avail);
	vio_write(d, VMMIO_QUEUE_DEVICE_LOW, (u32)(u64)b->q.used);
	vio_write(d, VMMIO_QUEUE_READY, 1);
	ready = vio_read(d, VMMIO_QUEUE_READY);
	printf("probe: blk hostile ring-outside-memory ready %u status-reg 0x%x\n", ready, reg_status(b));
	if (ready)
		fail("blk hostile: descriptor table outside guest memory accepted");

	/* A working device, then: notify queues that do not exist, write
	 * read-only registers, odd-sized accesses, queue registers after
	 * DRIVER_OK, a QueueSel beyond the queues. */
	set_status(d, 0);
	b->q.avail_idx = b->q.last_used = 0;
	blk_setup(b, 0);
	vio_write(d, VMMIO_QUEUE_NOTIFY, 7);
	vio_write(d, VMMIO_QUEUE_NOTIFY, 0xffffffffu);
	vio_write(d, VMMIO_MAGIC, 0);
	vio_write(d, VMMIO_DEVICE_ID, 1);
	vio_write(d, VMMIO_INTERRUPT_STATUS, 0xffffffffu);
	*(volatile u8 *)(d->base + VMMIO_STATUS) = 0;
	*(volatile u16 *)(d->base + VMMIO_QUEUE_SEL) = 5;
	*(volatile u8 *)(d->base + VMMIO_QUEUE_SEL + 1) = 5;
	(void)vio_read(d, VMMIO_QUEUE_NOTIFY);
	vio_write(d, VMMIO_QUEUE_SEL, 0);
	vio_write(d, VMMIO_QUEUE_NUM, 2);
	vio_write(d, VMMIO_QUEUE_DESC_LOW, 0x1000);
	vio_write(d, VMMIO_DRIVER_FEATURES, 0);
	(void)vio_read(d, VMMIO_CONFIG + 0x1000 - 0x100 - 4);
	vio_write(d, VMMIO_CONFIG, 0x12345678);
	vio_write(d, VMMIO_QUEUE_SEL, 99);
	u32 max99 = vio_read(d, VMMIO_QUEUE_NUM_MAX);
	vio_write(d, VMMIO_QUEUE_SEL, 0);
	if (mmio_read32(d->base + VMMIO_MAGIC) != VIRTIO_MAGIC || vio_read(d, VMMIO_DEVICE_ID) != VIRTIO_ID_BLOCK)
		fail("blk hostile: identification registers changed");
	if (reg_status(b) != (VSTAT_ACKNOWLEDGE | VSTAT_DRIVER | VSTAT_FEATURES_OK | VSTAT_DRIVER_OK))
		fail("blk hostile: status 0x%x after register garbage", reg_status(b));
	printf("probe: blk hostile register-garbage queue-99-max %u status-reg 0x%x\n", max99, reg_status(b));
	blk_good_read(b, "register garbage");
	/* And through a full reset once more. */
	set_status(d, 0);
	b->q.avail_idx = b->q.last_used = 0;
	blk_setup(b, 0);
	blk_good_read(b, "reset");
	printf("probe: blk hostile registers ok\n");
}

void scenario_blk_hostile(void)
{
	blk_init(&blk);
	struct blk *b = &blk;
	u8 *data = dma_alloc(8192);
	u64 hdr = (u64)b->hdr, st = (u64)b->status, buf = (u64)data;
	const u64 far = 0xfff00000000ull; /* 16 TiB: outside any guest memory here */
	blk_good_read(b, "setup");

	/* Data descriptor outside guest memory. */
	hdr_set(b, VIRTIO_BLK_T_IN, 0);
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, far, 4096, F_W | F_N, 2);
	desc(b, 2, st, 1, F_W, 0);
	hostile_run(b, "data-outside-memory", 0);

	/* Header outside guest memory. */
	desc(b, 0, far, 16, F_N, 1);
	desc(b, 1, buf, 4096, F_W | F_N, 2);
	desc(b, 2, st, 1, F_W, 0);
	hostile_run(b, "header-outside-memory", 0);

	/* Status descriptor outside guest memory. */
	hdr_set(b, VIRTIO_BLK_T_IN, 0);
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, buf, 4096, F_W | F_N, 2);
	desc(b, 2, far, 1, F_W, 0);
	hostile_run(b, "status-outside-memory", 0);

	/* A descriptor straddling the end of RAM below 3 GiB? Not known here;
	 * a wrapping address instead: addr + len overflows 64 bits. */
	hdr_set(b, VIRTIO_BLK_T_IN, 0);
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, 0xfffffffffffff000ull, 0x2000, F_W | F_N, 2);
	desc(b, 2, st, 1, F_W, 0);
	hostile_run(b, "data-address-wraps", 0);

	/* A looping chain: header -> data -> header -> ... */
	hdr_set(b, VIRTIO_BLK_T_IN, 0);
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, buf, 512, F_W | F_N, 0);
	hostile_run(b, "looping-chain", 0);

	/* A chain whose next index is beyond the queue. */
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, buf, 512, F_W | F_N, 200);
	hostile_run(b, "next-outside-queue", 0);

	/* Status descriptor device-readable. */
	hdr_set(b, VIRTIO_BLK_T_IN, 0);
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, buf, 512, F_W | F_N, 2);
	desc(b, 2, st, 1, 0, 0);
	hostile_run(b, "status-readable", 0);

	/* Zero-length status descriptor. */
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, buf, 512, F_W | F_N, 2);
	desc(b, 2, st, 0, F_W, 0);
	hostile_run(b, "status-zero-length", 0);

	/* Header only, no status at all. */
	desc(b, 0, hdr, 16, 0, 0);
	hostile_run(b, "no-status", 0);

	/* Header shorter than 16 bytes. */
	desc(b, 0, hdr, 8, F_N, 1);
	desc(b, 1, buf, 512, F_W | F_N, 2);
	desc(b, 2, st, 1, F_W, 0);
	hostile_run(b, "short-header", 0);

	/* Data length not a multiple of 512. */
	hdr_set(b, VIRTIO_BLK_T_IN, 0);
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, buf, 1000, F_W | F_N, 2);
	desc(b, 2, st, 1, F_W, 0);
	hostile_run(b, "odd-length", 0);

	/* A read into a device-readable buffer (wrong direction). */
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, buf, 512, F_N, 2);
	desc(b, 2, st, 1, F_W, 0);
	hostile_run(b, "read-into-readable", 0);

	/* Sector at the capacity, and a request straddling it. */
	hdr_set(b, VIRTIO_BLK_T_IN, b->capacity);
	desc(b, 0, hdr, 16, F_N, 1);
	desc(b, 1, buf, 512, F_W | F_N, 2);
	desc(b, 2, st, 1, F_W, 0);
	hostile_run(b, "beyond-capacity", 0);
	hdr_set(b, VIRTIO_BLK_T_IN, b->capacity - 1);
	desc(b, 1, buf, 1024, F_W | F_N, 2);
	hostile_run(b, "straddles-capacity", 0);
	hdr_set(b, VIRTIO_BLK_T_IN, ~0ull >> 1);
	desc(b, 1, buf, 512, F_W | F_N, 2);
	hostile_run(b, "huge-sector", 0);

	/* An unknown request type. */
	hdr_set(b, 0x77, 0);
	desc(b, 1, buf, 512, F_W | F_N, 2);
	hostile_run(b, "unknown-type", 0);

	/* A write on a read-only disk. */
	if (b->ro) {
		hdr_set(b, VIRTIO_BLK_T_OUT, 0);
		desc(b, 0, hdr, 16, F_N, 1);
		desc(b, 1, buf, 512, F_N, 2);
		desc(b, 2, st, 1, F_W, 0);
		hostile_run(b, "readonly-write", 0);
	}

	/* A head index beyond the queue in the avail ring: it can never be
	 * returned, so the device stops and asks for a reset (virtio 1.2
	 * §2.1.2: DEVICE_NEEDS_RESET); hostile_registers() resets it. */
	{
		vq_publish(&b->q, 200);
		vq_kick(&b->q);
		u32 id, ulen;
		int got = vq_wait_used(&b->q, 1000, &id, &ulen);
		printf("probe: blk hostile head-outside-queue %s status-reg 0x%x\n",
		       got ? "returned" : "dropped", reg_status(b));
	}

	hostile_registers(b);
	printf("probe: blk hostile survived\n");
	done();
}

/* ---- blk-bench: throughput through the driver, for scripts/bench ---- */

static u64 xorshift(u64 *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/*
 * probe.op=randread|randwrite|read|write, probe.bs=BYTES, probe.qd=N (1..32),
 * probe.ms=DURATION, probe.span_mib=N (the part of the disk used, from sector
 * 0). Keeps qd requests in flight (descriptors 3k..3k+2 for slot k), for
 * probe.ms, then drains, and prints
 * "probe: blk bench <op> bs <bs> qd <qd> ios <n> us <elapsed> iops <n> kib-per-s <n>".
 */
void scenario_blk_bench(void)
{
	char op[16];
	if (!cmdline_str("probe.op", op, sizeof(op)))
		memcpy(op, "randread", 9);
	int rnd = !memcmp(op, "rand", 4);
	int wr = !strcmp(op + (rnd ? 4 : 0), "write");
	if (!wr && strcmp(op + (rnd ? 4 : 0), "read"))
		fail("probe.op=%s: want randread, randwrite, read or write", op);
	u32 bs = (u32)cmdline_u64("probe.bs", 4096), qd = (u32)cmdline_u64("probe.qd", 1);
	u64 ms = cmdline_u64("probe.ms", 2000);
	if (!bs || bs % 512 || bs > (1u << 20) || !qd || qd > 32 || (u64)bs * qd > (8u << 20))
		fail("blk bench: bs %u (multiple of 512, at most 1 MiB), qd %u (1 to 32), bs * qd at most 8 MiB", bs, qd);
	blk_queue_size = 128;
	blk_init(&blk);
	struct blk *b = &blk;
	if (wr && b->ro)
		fail("blk bench: %s on a read-only disk", op);
	u64 span = cmdline_u64("probe.span_mib", 1024) << 11; /* sectors */
	if (span > b->capacity)
		span = b->capacity;
	u64 blocks = span / (bs / 512);
	if (!blocks)
		fail("blk bench: disk smaller than one %u-byte block", bs);
	struct blk_req_hdr *hdrs = dma_alloc(4096);
	volatile u8 *sts = (volatile u8 *)(hdrs + 32);
	u8 *bufs = dma_alloc((u64)bs * qd);
	for (u64 i = 0; i < (u64)bs * qd; i++)
		bufs[i] = (u8)(i * 7);
	u8 busy[32] = { 0 };
	u64 seed = 0x9e3779b97f4a7c15ull, next_seq = 0, ios = 0, inflight = 0;
	u64 t0 = rdtsc(), end = tsc_deadline(ms);
	int stopping = 0;
	for (;;) {
		/* Fill every free slot (all of them at the start). */
		while (!stopping && inflight < qd) {
			u32 k = 0;
			while (busy[k])
				k++;
			busy[k] = 1;
			u64 blk_no = rnd ? xorshift(&seed) % blocks : next_seq % blocks;
			next_seq++;
			hdrs[k] = (struct blk_req_hdr){ wr ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, 0, blk_no * (bs / 512) };
			sts[k] = NO_STATUS;
			u16 d0 = (u16)(3 * k);
			b->q.desc[d0] = (struct vring_desc){ (u64)&hdrs[k], 16, VRING_DESC_F_NEXT, (u16)(d0 + 1) };
			b->q.desc[d0 + 1] = (struct vring_desc){ (u64)(bufs + (u64)k * bs), bs,
								 (u16)(VRING_DESC_F_NEXT | (wr ? 0 : VRING_DESC_F_WRITE)), (u16)(d0 + 2) };
			b->q.desc[d0 + 2] = (struct vring_desc){ (u64)&sts[k], 1, VRING_DESC_F_WRITE, 0 };
			vq_publish(&b->q, d0);
			inflight++;
		}
		vq_kick(&b->q);
		if (!inflight)
			break;
		u32 id, len;
		if (!vq_wait_used(&b->q, 5000, &id, &len))
			fail("blk bench: no completion within 5 s (%lu in flight)", inflight);
		do {
			if (id % 3 || id / 3 >= qd || !busy[id / 3] || sts[id / 3] != VIRTIO_BLK_S_OK)
				fail("blk bench: used id %u status %u", id, id / 3 < qd ? sts[id / 3] : 0);
			busy[id / 3] = 0;
			inflight--;
			ios++;
		} while (vq_has_used(&b->q) && (vq_pop_used(&b->q, &id, &len), 1));
		if (tsc_passed(end))
			stopping = 1;
	}
	u64 us = (rdtsc() - t0) * 1000000 / tsc_hz;
	if (!us)
		us = 1;
	printf("probe: blk bench %s bs %u qd %u ios %lu us %lu iops %lu kib-per-s %lu\n", op, bs, qd, ios, us,
	       ios * 1000000 / us, ios * (bs / 1024) * 1000000 / us);
	done();
}

/* ---- snap: the disk half of the snapshot scenario (scenarios.c) ---- */

static u32 *snap_buf;

void snap_blk_init(void)
{
	blk_init(&blk);
	if (blk.ro)
		fail("snap needs a writable disk");
	snap_buf = dma_alloc(4096);
}

/*
 * Writes count n into sector n % 64 (the sector's 32-bit words are n, n+1,
 * ...), reads it back and checks it: a request and its interrupt each way.
 */
void snap_blk_step(u64 n)
{
	u64 sector = n % 64;
	for (u32 i = 0; i < 128; i++)
		snap_buf[i] = (u32)n + i;
	blk_check_ok(blk_request(&blk, VIRTIO_BLK_T_OUT, sector, snap_buf, 512, 512, NULL, "snap write"), "snap write");
	u32 *r = (u32 *)blk.scratch;
	memset(r, 0, 512);
	blk_check_ok(blk_request(&blk, VIRTIO_BLK_T_IN, sector, r, 512, 512, NULL, "snap read"), "snap read");
	if (memcmp(r, snap_buf, 512))
		fail("snap sector %lu read back differs from what count %lu wrote", sector, n);
}

/* ---- blk-write-then-end ---- */

void scenario_blk_write_then_end(void)
{
	char end[16] = "poweroff";
	cmdline_str("probe.end", end, sizeof(end));
	blk_init(&blk);
	u64 sector, kib;
	u32 seed;
	blk_params(&sector, &kib, &seed, 0, 1024);
	if (blk.ro)
		fail("blk-write-then-end needs a writable disk");
	u8 *wbuf = dma_alloc(64 * 1024);
	/* No FLUSH: what the guest wrote must survive however the VM ends. */
	blk_write_pattern(&blk, sector, kib, seed, wbuf);
	printf("probe: blk written\n");
	if (!strcmp(end, "poweroff"))
		acpi_poweroff();
	if (!strcmp(end, "reset"))
		acpi_reset();
	if (!strcmp(end, "panic")) {
		outb(0x505, 1); /* pvpanic: bit 0 = guest panicked */
		for (;;)
			cpu_relax();
	}
	if (!strcmp(end, "cad")) {
		wait_ctrl_alt_del();
		acpi_reset();
	}
	if (!strcmp(end, "hang"))
		for (;;)
			cpu_relax();
	fail("probe.end=%s: want poweroff, reset, panic, cad or hang", end);
}

/* ---- blk-flush-then-hang ---- */

void scenario_blk_flush_then_hang(void)
{
	blk_init(&blk);
	u64 sector, kib;
	u32 seed;
	blk_params(&sector, &kib, &seed, 0, 1024);
	if (blk.ro)
		fail("blk-flush-then-hang needs a writable disk");
	u8 *wbuf = dma_alloc(64 * 1024);
	blk_write_pattern(&blk, sector, kib, seed, wbuf);
	blk_flush(&blk);
	printf("probe: blk flushed\n");
	for (;;)
		cpu_relax();
}
