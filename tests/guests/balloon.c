/*
 * The virtio-balloon scenario (virtio 1.2 §5.5): probe.balloon_mib MiB of RAM
 * from probe.balloon_at_mib are written, then given to the device once its
 * target asks for them (inflate), then taken back when the target drops to 0
 * (deflate): they must read as zeros (the host dropped them), and are written
 * again. A target of 1 MiB after that ends the scenario.
 */
#include "probe.h"

#define BALLOON_QUEUE_SIZE 64
#define PFNS_PER_BUF 256
#define F_STATS_VQ (1ull << 1)

static struct virtio_dev dev;
static struct vq inflq, deflq, statq;

/* num_pages, read under a stable ConfigGeneration. */
static u32 target(void)
{
	return virtio_config32(&dev, 0);
}

/* Halts (10 ms LAPIC tick) until the target satisfies `ok`, at most `ms`. */
static u32 wait_target(int (*ok)(u32), u64 ms, const char *what)
{
	u64 end = tsc_deadline(ms);
	static volatile u16 never_changes;
	for (;;) {
		u32 t = target();
		if (ok(t))
			return t;
		if (tsc_passed(end))
			fail("balloon: target %u after %lu ms waiting for %s", t, ms, what);
		wait_change16(&never_changes, 0);
	}
}

static u32 want_pages;
static int at_least_want(u32 t) { return t >= want_pages; }
static int zero(u32 t) { return t == 0; }
static int one_mib(u32 t) { return t == 256; }

/* Sends `n` page frame numbers from `first` on `q`, PFNS_PER_BUF per buffer, and
 * waits for every buffer to come back. */
static void send_pfns(struct vq *q, u32 *list, u32 first, u32 n, const char *what)
{
	u32 done = 0;
	while (done < n) {
		u32 k = n - done < PFNS_PER_BUF ? n - done : PFNS_PER_BUF;
		for (u32 i = 0; i < k; i++)
			list[i] = first + done + i;
		q->desc[0] = (struct vring_desc){ (u64)list, k * 4, 0, 0 };
		vq_publish(q, 0);
		vq_kick(q);
		u32 id, len;
		if (!vq_wait_used(q, 5000, &id, &len))
			fail("balloon %s: buffer not returned within 5 s (%u of %u pages sent)", what, done, n);
		done += k;
	}
}

void scenario_balloon(void)
{
	u64 mib = cmdline_u64("probe.balloon_mib", 32), at = cmdline_u64("probe.balloon_at_mib", 64);
	u64 ms = cmdline_u64("probe.wait_ms", 60000);
	virtio_find(VIRTIO_ID_BALLOON, 0, &dev, "balloon");
	virtio_route_irq(&dev);
	virtio_negotiate(&dev, "balloon", F_STATS_VQ, 1);
	int stats = (dev.acked & F_STATS_VQ) != 0;
	virtio_queue_setup(&dev, &inflq, 0, BALLOON_QUEUE_SIZE);
	virtio_queue_setup(&dev, &deflq, 1, BALLOON_QUEUE_SIZE);
	if (stats)
		virtio_queue_setup(&dev, &statq, 2, 4);
	virtio_driver_ok(&dev, "balloon");
	u32 *list = dma_alloc(4096);
	if (stats) {
		/* One statistics buffer: total_memory (5) and free_memory (4), packed
		 * struct virtio_balloon_stat { le16 tag; le64 val; }. */
		u8 *s = dma_alloc(4096);
		u64 vals[2][2] = { { 5, 128ull << 20 }, { 4, 77ull << 20 } };
		for (int i = 0; i < 2; i++) {
			memcpy(s + 10 * i, &vals[i][0], 2);
			memcpy(s + 10 * i + 2, &vals[i][1], 8);
		}
		statq.desc[0] = (struct vring_desc){ (u64)s, 20, 0, 0 };
		vq_publish(&statq, 0);
		vq_kick(&statq);
	}
	printf("probe: balloon ready target %u stats %d\n", target(), stats);

	u64 first = at << 8, pages = mib << 8; /* 4 KiB page frames */
	for (u64 p = 0; p < pages; p++)
		*(volatile u64 *)((first + p) << 12) = 0x5a5a5a5a00000000ull | p;
	printf("probe: balloon touched %lu MiB at %lu MiB\n", mib, at);

	want_pages = (u32)pages;
	wait_target(at_least_want, ms, "inflate");
	send_pfns(&inflq, list, (u32)first, (u32)pages, "inflate");
	vio_write(&dev, VMMIO_CONFIG + 4, (u32)pages);
	printf("probe: balloon inflated %lu pages\n", pages);

	wait_target(zero, ms, "deflate");
	send_pfns(&deflq, list, (u32)first, (u32)pages, "deflate");
	vio_write(&dev, VMMIO_CONFIG + 4, 0);
	u64 zeroed = 0;
	for (u64 p = 0; p < pages; p++)
		zeroed += *(volatile u64 *)((first + p) << 12) == 0;
	printf("probe: balloon deflated %lu pages zeroed %lu\n", pages, zeroed);
	for (u64 p = 0; p < pages; p++)
		*(volatile u64 *)((first + p) << 12) = 0xa5a5a5a500000000ull | p;
	printf("probe: balloon retouched\n");

	wait_target(one_mib, ms, "the end (1 MiB)");
	done();
}
