/*
 * The net scenario: a minimal virtio-net driver (virtio 1.2 §5.1) at CPL3 on
 * top of virtio.c. Receive queue 0, transmit queue 1, the 12-byte
 * virtio_net_hdr_v1 (VERSION_1) in front of every frame, no offloads (all
 * checksums computed here). It answers ARP requests and ICMP echo requests for
 * its IPv4 address, then finds a peer by ARP and sends it a burst of UDP
 * datagrams. See README.md for the parameters and output lines.
 */
#include "probe.h"

#define VIRTIO_NET_F_MAC (1ull << 5)
#define VIRTIO_NET_F_STATUS (1ull << 16)
#define NET_HDR_LEN 12
#define RX_QUEUE_SIZE 16
#define TX_QUEUE_SIZE 64
#define BUF_SIZE 2048
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define MIN_FRAME 60 /* Ethernet minimum without the FCS */

static struct virtio_dev dev;
static struct vq rxq, txq;
static u8 *rxbufs, *txbufs;
static u8 tx_busy[TX_QUEUE_SIZE];
static u32 tx_free = TX_QUEUE_SIZE, tx_next;
static u8 mac[6], peer_mac[6];
static u32 my_ip, peer_ip; /* host byte order */
static int have_peer_mac;
static u32 irqs_seen;
static struct {
	u64 rx, echo, arp_replies, ignored, bad, irqs, udp_rx;
} st;

/* ---- byte order and checksums ---- */

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}
static void put32(u8 *p, u32 v)
{
	put16(p, (u16)(v >> 16));
	put16(p + 2, (u16)v);
}

/* RFC 1071: ones' complement sum of 16-bit big-endian words. */
static u32 csum_add(u32 sum, const u8 *p, u32 len)
{
	for (u32 i = 0; i + 1 < len; i += 2)
		sum += get16(p + i);
	if (len & 1)
		sum += (u32)p[len - 1] << 8;
	return sum;
}

static u16 csum_fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

static u32 parse_ip(const char *s)
{
	u32 ip = 0;
	for (int i = 0; i < 4; i++) {
		const char *e = s;
		u64 b = parse_u64(&e);
		if (e == s || b > 255 || (i < 3 && *e != '.'))
			return 0;
		ip = ip << 8 | (u32)b;
		s = e + 1;
	}
	return ip;
}

static u32 cmdline_ip(const char *key, const char *def)
{
	char buf[32];
	if (!cmdline_str(key, buf, sizeof(buf)))
		memcpy(buf, def, strlen(def) + 1);
	u32 ip = parse_ip(buf);
	if (!ip)
		fail("%s=%s: not an IPv4 address", key, buf);
	return ip;
}

static void print_mac(const char *prefix, const u8 *m)
{
	printf("%s%x%x:%x%x:%x%x:%x%x:%x%x:%x%x\n", prefix, m[0] >> 4, m[0] & 15, m[1] >> 4, m[1] & 15, m[2] >> 4,
	       m[2] & 15, m[3] >> 4, m[3] & 15, m[4] >> 4, m[4] & 15, m[5] >> 4, m[5] & 15);
}

/* ---- queues ---- */

static void rx_post(u16 id)
{
	rxq.desc[id] = (struct vring_desc){ (u64)(rxbufs + (u64)id * BUF_SIZE), BUF_SIZE, VRING_DESC_F_WRITE, 0 };
	vq_publish(&rxq, id);
}

/* Completed transmissions free their buffers. */
static void tx_reclaim(void)
{
	while (vq_has_used(&txq)) {
		u32 id, len;
		vq_pop_used(&txq, &id, &len);
		if (id >= TX_QUEUE_SIZE || !tx_busy[id])
			fail("net tx used id %u not in flight", id);
		tx_busy[id] = 0;
		tx_free++;
	}
}

/* A free transmit buffer (its frame starts NET_HDR_LEN bytes in), or 0. */
static u8 *tx_get(u16 *id)
{
	tx_reclaim();
	if (!tx_free)
		return 0;
	while (tx_busy[tx_next % TX_QUEUE_SIZE])
		tx_next++;
	*id = (u16)(tx_next++ % TX_QUEUE_SIZE);
	u8 *b = txbufs + (u64)*id * BUF_SIZE;
	memset(b, 0, NET_HDR_LEN); /* virtio_net_hdr_v1: no offloads, gso none */
	return b + NET_HDR_LEN;
}

/* Queue frame `id` of `len` bytes (padded to 60); the caller kicks. */
static void tx_put(u16 id, u32 len)
{
	u8 *frame = txbufs + (u64)id * BUF_SIZE + NET_HDR_LEN;
	if (len < MIN_FRAME) {
		memset(frame + len, 0, MIN_FRAME - len);
		len = MIN_FRAME;
	}
	txq.desc[id] = (struct vring_desc){ (u64)(frame - NET_HDR_LEN), NET_HDR_LEN + len, 0, 0 };
	tx_busy[id] = 1;
	tx_free--;
	vq_publish(&txq, id);
}

/* ---- protocols ---- */

static void eth_header(u8 *f, const u8 *dst, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, mac, 6);
	put16(f + 12, type);
}

/* RFC 826 request or reply; tha is zero in a request. */
static int send_arp(u16 oper, const u8 *eth_dst, const u8 *tha, u32 tpa)
{
	u16 id;
	u8 *f = tx_get(&id);
	if (!f)
		return 0;
	eth_header(f, eth_dst, ETH_P_ARP);
	u8 *a = f + ETH_HLEN;
	put16(a, 1); /* Ethernet */
	put16(a + 2, ETH_P_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, oper);
	memcpy(a + 8, mac, 6);
	put32(a + 14, my_ip);
	memcpy(a + 18, tha, 6);
	put32(a + 24, tpa);
	tx_put(id, ETH_HLEN + 28);
	return 1;
}

static void handle_arp(const u8 *f, u32 len)
{
	const u8 *a = f + ETH_HLEN;
	if (len < ETH_HLEN + 28 || get16(a) != 1 || get16(a + 2) != ETH_P_IP || a[4] != 6 || a[5] != 4) {
		st.ignored++;
		return;
	}
	u16 oper = get16(a + 6);
	u32 spa = get32(a + 14), tpa = get32(a + 24);
	if (oper == 1 && tpa == my_ip) {
		if (send_arp(2, a + 8, a + 8, spa))
			st.arp_replies++;
		else
			st.ignored++; /* no transmit buffer: the peer asks again */
		return;
	}
	if (oper == 2 && spa == peer_ip && tpa == my_ip) {
		memcpy(peer_mac, a + 8, 6);
		have_peer_mac = 1;
		return;
	}
	st.ignored++;
}

/* ICMP echo request to my_ip -> echo reply (RFC 792), checksums checked and recomputed. */
static void handle_ip(const u8 *f, u32 len)
{
	const u8 *ip = f + ETH_HLEN;
	if (len < ETH_HLEN + 20 || ip[0] >> 4 != 4) {
		st.ignored++;
		return;
	}
	u32 ihl = (ip[0] & 15) * 4u, total = get16(ip + 2);
	if (ihl < 20 || total < ihl + 8 || ETH_HLEN + total > len) {
		st.bad++;
		return;
	}
	if (get32(ip + 16) == my_ip && ip[9] == 17 && !(get16(ip + 6) & 0x3fff)) {
		st.udp_rx++; /* counted for host-to-guest rates, not answered */
		return;
	}
	if (get32(ip + 16) != my_ip || ip[9] != 1 || (get16(ip + 6) & 0x3fff)) {
		st.ignored++; /* not ICMP to us, or a fragment */
		return;
	}
	const u8 *icmp = ip + ihl;
	u32 icmp_len = total - ihl;
	if (csum_fold(csum_add(0, ip, ihl)) != 0 || csum_fold(csum_add(0, icmp, icmp_len)) != 0) {
		st.bad++;
		return;
	}
	if (icmp[0] != 8 || icmp[1] != 0) {
		st.ignored++;
		return;
	}
	u16 id;
	u8 *r = tx_get(&id);
	if (!r || ETH_HLEN + total > BUF_SIZE - NET_HDR_LEN) {
		st.ignored++;
		return;
	}
	eth_header(r, f + 6, ETH_P_IP);
	u8 *rip = r + ETH_HLEN;
	memcpy(rip, ip, total);
	memcpy(rip + 12, ip + 16, 4); /* source: us */
	memcpy(rip + 16, ip + 12, 4); /* destination: the sender */
	rip[8] = 64; /* TTL */
	put16(rip + 10, 0);
	put16(rip + 10, csum_fold(csum_add(0, rip, ihl)));
	u8 *ricmp = rip + ihl;
	ricmp[0] = 0; /* echo reply */
	put16(ricmp + 2, 0);
	put16(ricmp + 2, csum_fold(csum_add(0, ricmp, icmp_len)));
	tx_put(id, ETH_HLEN + total);
	st.echo++;
}

static void handle_frame(const u8 *f, u32 len)
{
	static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	if (len < ETH_HLEN || (memcmp(f, mac, 6) && memcmp(f, bcast, 6))) {
		st.ignored++;
		return;
	}
	u16 type = get16(f + 12);
	if (type == ETH_P_ARP)
		handle_arp(f, len);
	else if (type == ETH_P_IP)
		handle_ip(f, len);
	else
		st.ignored++;
}

/*
 * One round of work: count interrupts (main.c acknowledged them), handle every received frame
 * (re-posting its buffer), kick the queues that got new entries.
 */
static void poll_once(void)
{
	if (virtio_irqs[dev.slot] != irqs_seen) {
		irqs_seen = virtio_irqs[dev.slot];
		st.irqs++;
	}
	u16 tx_before = txq.avail_idx;
	int reposted = 0;
	while (vq_has_used(&rxq)) {
		u32 id, len;
		vq_pop_used(&rxq, &id, &len);
		if (id >= RX_QUEUE_SIZE || len > BUF_SIZE)
			fail("net rx used id %u len %u", id, len);
		st.rx++;
		if (len > NET_HDR_LEN)
			handle_frame(rxbufs + (u64)id * BUF_SIZE + NET_HDR_LEN, len - NET_HDR_LEN);
		else
			st.bad++;
		rx_post((u16)id);
		reposted = 1;
	}
	if (reposted)
		vq_kick(&rxq);
	if (txq.avail_idx != tx_before)
		vq_kick(&txq);
}

/* ---- the scenario ---- */

static void net_setup(void)
{
	virtio_find(VIRTIO_ID_NET, (u32)cmdline_u64("probe.nic", 0), &dev, "net");
	virtio_route_irq(&dev);
	virtio_negotiate(&dev, "net", VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS, 1);
	virtio_queue_setup(&dev, &rxq, 0, RX_QUEUE_SIZE);
	virtio_queue_setup(&dev, &txq, 1, TX_QUEUE_SIZE);
	rxbufs = dma_alloc((u64)RX_QUEUE_SIZE * BUF_SIZE);
	txbufs = dma_alloc((u64)TX_QUEUE_SIZE * BUF_SIZE);
	/* virtio 1.2 §3.1.1: buffers may be posted before DRIVER_OK; the device
	 * looks at them once it is live and notified. */
	for (u16 i = 0; i < RX_QUEUE_SIZE; i++)
		rx_post(i);
	virtio_driver_ok(&dev, "net");
	vq_kick(&rxq);
	if (!(dev.acked & VIRTIO_NET_F_MAC))
		fail("net device does not offer VIRTIO_NET_F_MAC");
	/* struct virtio_net_config: mac[6], status (§5.1.4); naturally aligned 32-bit reads. */
	u32 w0 = virtio_config32(&dev, 0), w1 = virtio_config32(&dev, 4);
	memcpy(mac, &w0, 4);
	memcpy(mac + 4, &w1, 2);
	print_mac("probe: net mac ", mac);
	if (dev.acked & VIRTIO_NET_F_STATUS)
		printf("probe: net link %s\n", (w1 >> 16) & 1 ? "up" : "down");
}

/* ARP for the peer: a request every 500 ms, up to 10 s, serving meanwhile. */
static void resolve_peer(void)
{
	static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff }, zero[6] = { 0 };
	u64 end = tsc_deadline(10000);
	while (!have_peer_mac && !tsc_passed(end)) {
		if (!send_arp(1, bcast, zero, peer_ip))
			fail("net no transmit buffer for the ARP request");
		vq_kick(&txq);
		u64 retry = tsc_deadline(500);
		while (!have_peer_mac && !tsc_passed(retry)) {
			poll_once();
			wait_change16(&rxq.used->idx, rxq.last_used);
		}
	}
	if (!have_peer_mac)
		fail("net no ARP reply from %u.%u.%u.%u in 10 s", peer_ip >> 24, (peer_ip >> 16) & 255, (peer_ip >> 8) & 255,
		     peer_ip & 255);
	printf("probe: net peer %u.%u.%u.%u ", peer_ip >> 24, (peer_ip >> 16) & 255, (peer_ip >> 8) & 255, peer_ip & 255);
	print_mac("is-at ", peer_mac);
}

/*
 * UDP datagram number `seq` to the peer: source port 9001, destination
 * probe.port; payload = seq (4 bytes, big endian), then byte i (i >= 4) =
 * (seq + i) & 0xff, `plen` bytes in all.
 */
static void build_udp(u8 *f, u32 seq, u32 plen, u16 dport)
{
	eth_header(f, peer_mac, ETH_P_IP);
	u8 *ip = f + ETH_HLEN, *udp = ip + 20, *pl = udp + 8;
	u16 total = (u16)(20 + 8 + plen);
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, total);
	put16(ip + 4, (u16)seq); /* identification */
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = 17;
	put16(ip + 10, 0);
	put32(ip + 12, my_ip);
	put32(ip + 16, peer_ip);
	put16(ip + 10, csum_fold(csum_add(0, ip, 20)));
	put16(udp, 9001);
	put16(udp + 2, dport);
	put16(udp + 4, (u16)(8 + plen));
	put16(udp + 6, 0);
	put32(pl, seq);
	for (u32 i = 4; i < plen; i++)
		pl[i] = (u8)(seq + i);
	/* UDP checksum over the pseudo-header (RFC 768); 0 is sent as 0xffff. */
	u32 sum = csum_add(0, ip + 12, 8) + 17 + (8 + plen);
	u16 c = csum_fold(csum_add(sum, udp, 8 + plen));
	put16(udp + 6, c ? c : 0xffff);
}

static void burst(u32 n, u32 plen, u16 dport)
{
	u32 sent = 0;
	u64 t0 = rdtsc();
	while (sent < n) {
		u32 queued = 0;
		u64 end = tsc_deadline(5000);
		for (;;) {
			u16 id;
			u8 *f = queued < 32 && sent < n ? tx_get(&id) : 0;
			if (f) {
				build_udp(f, sent, plen, dport);
				tx_put(id, ETH_HLEN + 28 + plen);
				sent++;
				queued++;
				continue;
			}
			if (queued)
				break;
			/* No free buffer: the device has not sent the earlier ones yet. */
			poll_once();
			if (tsc_passed(end))
				fail("net burst: no transmit buffer came back in 5 s (%u sent)", sent);
			if (!vq_has_used(&txq))
				wait_change16(&txq.used->idx, txq.last_used);
		}
		vq_kick(&txq);
		poll_once();
	}
	u64 end = tsc_deadline(5000);
	while (tx_free != TX_QUEUE_SIZE && !tsc_passed(end)) {
		tx_reclaim();
		poll_once();
		if (tx_free != TX_QUEUE_SIZE && !vq_has_used(&txq))
			wait_change16(&txq.used->idx, txq.last_used);
	}
	if (tx_free != TX_QUEUE_SIZE)
		fail("net burst: %u frames not returned by the device in 5 s", TX_QUEUE_SIZE - tx_free);
	u64 us = (rdtsc() - t0) * 1000000 / tsc_hz;
	printf("probe: net burst sent %u\n", sent);
	printf("probe: net burst us %lu pps %lu\n", us, us ? (u64)sent * 1000000 / us : 0);
}

void scenario_net(void)
{
	my_ip = cmdline_ip("probe.ip", "10.0.0.2");
	peer_ip = cmdline_ip("probe.peer", "10.0.0.1");
	u64 serve_ms = cmdline_u64("probe.serve_ms", 10000);
	u64 pings = cmdline_u64("probe.pings", 0);
	u32 nburst = (u32)cmdline_u64("probe.burst", 1000);
	u32 plen = (u32)cmdline_u64("probe.udp_len", 64);
	u16 dport = (u16)cmdline_u64("probe.port", 9000);
	if (plen < 4 || plen > 1472)
		fail("probe.udp_len=%u: want 4 to 1472", plen);
	tsc_calibrate();
	net_setup();
	printf("probe: net ready\n");
	u64 end = tsc_deadline(serve_ms);
	while (!tsc_passed(end) && (!pings || st.echo < pings)) {
		poll_once();
		wait_change16(&rxq.used->idx, rxq.last_used);
	}
	printf("probe: net answered %lu\n", st.echo);
	if (nburst) {
		resolve_peer();
		burst(nburst, plen, dport);
	}
	printf("probe: net stats rx %lu arp-replies %lu echo-replies %lu udp-rx %lu ignored %lu bad %lu irqs %lu\n",
	       st.rx, st.arp_replies, st.echo, st.udp_rx, st.ignored, st.bad, st.irqs);
	done();
}
