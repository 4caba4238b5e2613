/*
 * blk-media: a virtio-blk media change seen by the driver. The VMM swaps the
 * disk's file while the guest runs (wisp: PATCH /drives/{id}); the device
 * says so by a new capacity (virtio 1.2 §5.2.4), a new ConfigGeneration
 * (§2.5) and the configuration change bit of InterruptStatus (§4.2.2), and
 * reads return the new file's bytes. All at CPL3, with the public driver of
 * virtio.c (see README.md for the lines).
 */
#include "probe.h"

#define MEDIA_QUEUE_SIZE 16
#define VIRTIO_BLK_T_IN 0
#define INT_CONFIG_CHANGE 2

struct media_req {
	u32 type;
	u32 reserved;
	u64 sector;
};

static struct virtio_dev dev;
static struct vq q;
static struct media_req *hdr;
static volatile u8 *status;
static u8 *sector0;

/* Capacity (le64 at config offset 0) and the generation it was read under. */
static u64 media_capacity(u32 *gen)
{
	for (int i = 0; i < 100; i++) {
		u32 g = vio_read(&dev, VMMIO_CONFIG_GENERATION);
		u64 lo = vio_read(&dev, VMMIO_CONFIG);
		u64 hi = vio_read(&dev, VMMIO_CONFIG + 4);
		if (vio_read(&dev, VMMIO_CONFIG_GENERATION) == g) {
			*gen = g;
			return lo | hi << 32;
		}
	}
	fail("blk-media ConfigGeneration never stable");
}

/* Sector 0 into sector0: header, 512 bytes, status; bounded wait. */
static void media_read_sector0(const char *what)
{
	volatile struct vring_desc *d = q.desc;
	*hdr = (struct media_req){ VIRTIO_BLK_T_IN, 0, 0 };
	*status = 0xff;
	memset(sector0, 0xa5, 512);
	d[0] = (struct vring_desc){ (u64)hdr, 16, VRING_DESC_F_NEXT, 1 };
	d[1] = (struct vring_desc){ (u64)sector0, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2 };
	d[2] = (struct vring_desc){ (u64)status, 1, VRING_DESC_F_WRITE, 0 };
	vq_publish(&q, 0);
	vq_kick(&q);
	u32 id, len;
	if (!vq_wait_used(&q, 5000, &id, &len))
		fail("blk-media %s read: no completion within 5 s", what);
	if (id != 0 || *status != 0 || len != 513)
		fail("blk-media %s read: id %u status %u used len %u", what, id, *status, len);
}

/* "probe: media <what> capacity <sectors> sector0 <first 16 bytes, ? for non-printable>" */
static void media_report(const char *what, u64 capacity)
{
	char s[17];
	for (int i = 0; i < 16; i++)
		s[i] = (sector0[i] < 0x21 || sector0[i] > 0x7e) ? '?' : (char)sector0[i];
	s[16] = 0;
	printf("probe: media %s capacity %lu sector0 %s\n", what, capacity, s);
}

void scenario_blk_media(void)
{
	virtio_find(VIRTIO_ID_BLOCK, (u32)cmdline_u64("probe.disk", 0), &dev, "blk");
	virtio_route_irq(&dev);
	virtio_negotiate(&dev, "blk", 0, 0);
	virtio_queue_setup(&dev, &q, 0, MEDIA_QUEUE_SIZE);
	virtio_driver_ok(&dev, "blk");
	hdr = dma_alloc(4096);
	status = (volatile u8 *)hdr + 64;
	sector0 = dma_alloc(4096);

	u32 gen0;
	u64 cap0 = media_capacity(&gen0);
	media_read_sector0("initial");
	media_report("initial", cap0);

	/* probe.media_changes=N: wait for N changes in turn (a test can look at the VMM while the
	 * guest waits for the next one). Each wait: forget the used-buffer interrupts so far,
	 * then wait, halted between interrupts (the 10 ms LAPIC tick bounds each halt), for
	 * both signs of the change. */
	u64 changes = cmdline_u64("probe.media_changes", 1);
	u64 ms = cmdline_u64("probe.wait_ms", 60000);
	for (u64 n = 0; n < changes; n++) {
		__atomic_exchange_n(&virtio_isr[dev.slot], 0, __ATOMIC_SEQ_CST);
		printf("probe: media waiting %lu ms\n", ms);
		u64 end = tsc_deadline(ms);
		static volatile u16 never_changes;
		int irq = 0, gen_changed = 0;
		while (!tsc_passed(end)) {
			irq = (virtio_isr[dev.slot] & INT_CONFIG_CHANGE) != 0;
			gen_changed = vio_read(&dev, VMMIO_CONFIG_GENERATION) != gen0;
			if (irq && gen_changed)
				break;
			wait_change16(&never_changes, 0);
		}
		if (irq != gen_changed)
			fail("blk-media config interrupt %s but ConfigGeneration %s within %lu ms",
			     irq ? "seen" : "not seen", gen_changed ? "changed" : "unchanged", ms);

		u64 cap1 = media_capacity(&gen0);
		media_read_sector0(irq ? "changed" : "unchanged");
		media_report(irq ? "changed" : "unchanged", cap1);
		if (!irq)
			break;
	}
	done();
}
