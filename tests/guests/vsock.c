/*
 * The virtio-vsock scenario (virtio 1.2 §5.10): a minimal stream driver.
 * The guest connects to the host's port probe.vsock_port (default 1234) and
 * sends probe.vsock_bytes (default 262144) bytes of the pattern
 * (byte i = i * 7 + 3); it accepts a host connection on port 52, reads the
 * same number of bytes from it and answers "rx <n> <fnv1a32 hex>\n"; when the
 * host has closed both connections it is done. Credit is honoured both ways.
 */
#include "probe.h"

#define HDR 44
#define QSIZE 16
#define RXBUFS 8
#define RXLEN (HDR + 4096)
#define BUF_ALLOC 65536u
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define GUEST_PORT 5000
#define LISTEN_PORT 52

struct hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct conn {
	int open;
	u32 host_port, guest_port;
	u32 rx_bytes; /* received from the host: our fwd_cnt */
	u32 fwd_told; /* fwd_cnt last sent */
	u32 tx_bytes; /* sent to the host */
	u32 peer_buf_alloc, peer_fwd_cnt;
	u32 hash;
};

static struct virtio_dev dev;
static struct vq rxq, txq, evq;
static u8 *rxbuf[RXBUFS];
static u8 *txbuf;
static u64 cid;
static struct conn out, in; /* guest-initiated, host-initiated */

static void send_pkt(struct conn *c, u16 op, u32 flags, const u8 *data, u32 len)
{
	struct hdr *h = (struct hdr *)txbuf;
	*h = (struct hdr){ cid, 2, c->guest_port, c->host_port, len, 1, op, flags, BUF_ALLOC, c->rx_bytes };
	c->fwd_told = c->rx_bytes;
	for (u32 i = 0; i < len; i++)
		txbuf[HDR + i] = data[i];
	txq.desc[0] = (struct vring_desc){ (u64)txbuf, HDR, len ? VRING_DESC_F_NEXT : 0, 1 };
	txq.desc[1] = (struct vring_desc){ (u64)txbuf + HDR, len, 0, 0 };
	vq_publish(&txq, 0);
	vq_kick(&txq);
	u32 id, l;
	if (!vq_wait_used(&txq, 5000, &id, &l))
		fail("vsock: tx packet op %u not taken within 5 s", op);
}

static struct conn *find(const struct hdr *h)
{
	if (out.open && h->src_port == out.host_port && h->dst_port == out.guest_port)
		return &out;
	if (in.open && h->src_port == in.host_port && h->dst_port == in.guest_port)
		return &in;
	return 0;
}

static void hash_bytes(struct conn *c, const u8 *p, u32 n)
{
	for (u32 i = 0; i < n; i++) {
		u8 want = (u8)((c->rx_bytes + i) * 7 + 3);
		if (p[i] != want)
			fail("vsock: byte %u from the host is 0x%x, want 0x%x", c->rx_bytes + i, p[i], want);
		c->hash = (c->hash ^ p[i]) * 16777619u;
	}
}

/* Handles one packet from the host; 0 if none came within `ms`. */
static int poll_rx(u64 ms)
{
	u32 id, len;
	if (!vq_wait_used(&rxq, ms, &id, &len))
		return 0;
	if (id >= RXBUFS || len < HDR)
		fail("vsock: rx used id %u len %u", id, len);
	struct hdr h = *(struct hdr *)rxbuf[id];
	const u8 *data = rxbuf[id] + HDR;
	if (h.len != len - HDR || h.src_cid != 2 || h.dst_cid != cid)
		fail("vsock: rx header len %u (used %u) cids %lu -> %lu", h.len, len, h.src_cid, h.dst_cid);
	struct conn *c = find(&h);
	if (h.op == OP_REQUEST && h.dst_port == LISTEN_PORT && !in.open) {
		in = (struct conn){ 1, h.src_port, LISTEN_PORT, 0, 0, 0, h.buf_alloc, h.fwd_cnt, 2166136261u };
		printf("probe: vsock accepted host port %u\n", h.src_port);
		send_pkt(&in, OP_RESPONSE, 0, 0, 0);
	} else if (!c) {
		fail("vsock: op %u for no connection (%u -> %u)", h.op, h.src_port, h.dst_port);
	} else {
		c->peer_buf_alloc = h.buf_alloc;
		c->peer_fwd_cnt = h.fwd_cnt;
		if (h.op == OP_RESPONSE && c == &out) {
			printf("probe: vsock connected to host port %u\n", c->host_port);
		} else if (h.op == OP_RW) {
			hash_bytes(c, data, h.len);
			c->rx_bytes += h.len;
			if (c->rx_bytes - c->fwd_told >= BUF_ALLOC / 4)
				send_pkt(c, OP_CREDIT_UPDATE, 0, 0, 0);
		} else if (h.op == OP_SHUTDOWN) {
			send_pkt(c, OP_RST, 0, 0, 0);
			c->open = 0;
		} else if (h.op == OP_RST) {
			if (c == &out && !c->tx_bytes)
				fail("vsock: the host refused the connection to port %u", c->host_port);
			c->open = 0;
		} else if (h.op == OP_CREDIT_REQUEST) {
			send_pkt(c, OP_CREDIT_UPDATE, 0, 0, 0);
		} else if (h.op != OP_CREDIT_UPDATE) {
			fail("vsock: unexpected op %u", h.op);
		}
	}
	vq_publish(&rxq, (u16)id);
	vq_kick(&rxq);
	return 1;
}

static u32 credit(const struct conn *c)
{
	u32 used = c->tx_bytes - c->peer_fwd_cnt;
	return used >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - used;
}

void scenario_vsock(void)
{
	u32 port = (u32)cmdline_u64("probe.vsock_port", 1234);
	u32 total = (u32)cmdline_u64("probe.vsock_bytes", 262144);
	virtio_find(19, 0, &dev, "vsock");
	virtio_route_irq(&dev);
	virtio_negotiate(&dev, "vsock", 0, 1);
	cid = virtio_config32(&dev, 0) | (u64)virtio_config32(&dev, 4) << 32;
	printf("probe: vsock cid %lu\n", cid);
	virtio_queue_setup(&dev, &rxq, 0, QSIZE);
	virtio_queue_setup(&dev, &txq, 1, QSIZE);
	virtio_queue_setup(&dev, &evq, 2, QSIZE);
	txbuf = dma_alloc(HDR + 4096);
	for (u16 i = 0; i < RXBUFS; i++) {
		rxbuf[i] = dma_alloc(RXLEN);
		rxq.desc[i] = (struct vring_desc){ (u64)rxbuf[i], RXLEN, VRING_DESC_F_WRITE, 0 };
		vq_publish(&rxq, i);
	}
	virtio_driver_ok(&dev, "vsock");
	vq_kick(&rxq);

	out = (struct conn){ 1, port, GUEST_PORT, 0, 0, 0, 0, 0, 0 };
	send_pkt(&out, OP_REQUEST, 0, 0, 0);
	u8 *chunk = dma_alloc(4096);
	int summary_sent = 0;
	u64 end = tsc_deadline(60000);
	while (out.open || in.open || !summary_sent) {
		if (tsc_passed(end))
			fail("vsock: not done after 60 s (sent %u of %u, received %u)", out.tx_bytes, total, in.rx_bytes);
		/* Send while the host's credit allows, once connected. */
		while (out.open && out.peer_buf_alloc && out.tx_bytes < total && credit(&out)) {
			u32 n = total - out.tx_bytes;
			if (n > 4096)
				n = 4096;
			if (n > credit(&out))
				n = credit(&out);
			for (u32 i = 0; i < n; i++)
				chunk[i] = (u8)((out.tx_bytes + i) * 7 + 3);
			send_pkt(&out, OP_RW, 0, chunk, n);
			out.tx_bytes += n;
			if (out.tx_bytes == total)
				printf("probe: vsock sent %u\n", total);
		}
		if (in.open && !summary_sent && in.rx_bytes == total) {
			char line[48];
			u32 n = 0;
			const char *hex = "0123456789abcdef";
			const char *p = "rx ";
			while (*p)
				line[n++] = *p++;
			char dec[12];
			u32 d = 0, v = total;
			do {
				dec[d++] = (char)('0' + v % 10);
				v /= 10;
			} while (v);
			while (d)
				line[n++] = dec[--d];
			line[n++] = ' ';
			for (int s = 28; s >= 0; s -= 4)
				line[n++] = hex[(in.hash >> s) & 0xf];
			line[n++] = '\n';
			send_pkt(&in, OP_RW, 0, (const u8 *)line, n);
			in.tx_bytes += n;
			summary_sent = 1;
			printf("probe: vsock received %u fnv %x\n", total, in.hash);
		}
		poll_rx(100);
	}
	printf("probe: vsock closed\n");
	done();
}
