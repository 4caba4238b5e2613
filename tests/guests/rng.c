/*
 * The virtio-rng scenario (virtio 1.2 §5.4): one request queue, whose
 * device-writable buffers the device fills with random bytes.
 */
#include "probe.h"

#define RNG_QUEUE_SIZE 16
#define UNTOUCHED 0xa5

static struct virtio_dev rng;
static struct vq rq;

/*
 * Publishes chain `head` (descriptors already written), kicks, waits for it
 * and for the interrupt. Returns the used length.
 */
static u32 rng_request(u16 head, const char *what)
{
	u32 irqs = virtio_irqs[rng.slot];
	vq_publish(&rq, head);
	vq_kick(&rq);
	u32 id, len;
	if (!vq_wait_used(&rq, 5000, &id, &len))
		fail("rng %s: no completion within 5 s (used idx %u)", what, rq.used->idx);
	if (id != head)
		fail("rng %s: used id %u, want %u", what, id, head);
	u64 end = tsc_deadline(2000);
	while (virtio_irqs[rng.slot] == irqs && !tsc_passed(end))
		cpu_relax();
	if (virtio_irqs[rng.slot] == irqs)
		fail("rng %s: no interrupt within 2 s of the completion", what);
	if (!(__atomic_exchange_n(&virtio_isr[rng.slot], 0, __ATOMIC_SEQ_CST) & 1))
		fail("rng %s: interrupt without the used-buffer bit", what);
	return len;
}

/* How many of the 256 byte values occur in buf. */
static u32 distinct(const u8 *buf, u32 len)
{
	u8 seen[256];
	memset(seen, 0, sizeof(seen));
	u32 n = 0;
	for (u32 i = 0; i < len; i++)
		if (!seen[buf[i]]++)
			n++;
	return n;
}

static u32 untouched_from(const u8 *buf, u32 len)
{
	u32 i = len;
	while (i > 0 && buf[i - 1] == UNTOUCHED)
		i--;
	return i;
}

void scenario_rng(void)
{
	virtio_find(VIRTIO_ID_RNG, 0, &rng, "rng");
	virtio_route_irq(&rng);
	virtio_negotiate(&rng, "rng", 0, 1);
	virtio_queue_setup(&rng, &rq, 0, RNG_QUEUE_SIZE);
	virtio_driver_ok(&rng, "rng");

	/* Two 4 KiB requests: random-looking, and not the same bytes twice. */
	u8 *a = dma_alloc(4096), *b = dma_alloc(4096);
	memset(a, UNTOUCHED, 4096);
	memset(b, UNTOUCHED, 4096);
	rq.desc[0] = (struct vring_desc){ (u64)a, 4096, VRING_DESC_F_WRITE, 0 };
	u32 len = rng_request(0, "read");
	if (len != 4096)
		fail("rng read: used len %u, want 4096", len);
	rq.desc[1] = (struct vring_desc){ (u64)b, 4096, VRING_DESC_F_WRITE, 0 };
	if (rng_request(1, "second read") != 4096)
		fail("rng second read: used len, want 4096");
	u32 da = distinct(a, 4096);
	/* 4096 random bytes miss a given value with probability 1e-7. */
	if (da < 250)
		fail("rng read: only %u distinct byte values in 4096 bytes", da);
	if (!memcmp(a, b, 4096))
		fail("rng: two requests got the same bytes");
	printf("probe: rng read 4096 distinct %s\n", da >= 250 ? "ok" : "low");

	/* Two buffers in one chain: both filled, in order. */
	memset(a, UNTOUCHED, 4096);
	rq.desc[2] = (struct vring_desc){ (u64)a, 1000, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3 };
	rq.desc[3] = (struct vring_desc){ (u64)a + 2048, 1000, VRING_DESC_F_WRITE, 0 };
	len = rng_request(2, "chain");
	if (len != 2000 || distinct(a, 1000) < 200 || distinct(a + 2048, 1000) < 200 ||
	    untouched_from(a + 1000, 1048) != 0)
		fail("rng chain: used len %u", len);
	printf("probe: rng chain 2000\n");

	/* 128 KiB asked for at once: the device gives at most 64 KiB. */
	u8 *big = dma_alloc(128 * 1024);
	memset(big, UNTOUCHED, 128 * 1024);
	rq.desc[4] = (struct vring_desc){ (u64)big, 128 * 1024, VRING_DESC_F_WRITE, 0 };
	len = rng_request(4, "big");
	u32 written = untouched_from(big, 128 * 1024);
	if (len > 65536 || written > len || written < len - 64)
		fail("rng big: used len %u, last written byte at %u", len, written);
	printf("probe: rng big 131072 got %u\n", len);

	/* A driver-readable buffer: refused with nothing written. */
	memset(b, UNTOUCHED, 4096);
	rq.desc[5] = (struct vring_desc){ (u64)b, 4096, 0, 0 };
	len = rng_request(5, "read-only");
	if (len != 0 || untouched_from(b, 4096) != 0)
		fail("rng read-only buffer: used len %u, bytes written", len);
	printf("probe: rng read-only refused\n");

	/* And the device still serves after it. */
	rq.desc[6] = (struct vring_desc){ (u64)a, 512, VRING_DESC_F_WRITE, 0 };
	if (rng_request(6, "after") != 512)
		fail("rng: no bytes after the refused request");
	printf("probe: rng ok\n");
	done();
}
