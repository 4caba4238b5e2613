/*
 * vsockio: byte streams over vsock (or TCP) for wisp's Linux test guest, whose busybox has no
 * vsock tool.
 *
 *   vsockio recv ADDR           accept one connection, copy what it brings to stdout
 *   vsockio echo ADDR [N]       accept N connections (default 1), one at a time, and send
 *                               each one's bytes back to it until it closes
 *   vsockio send PEER BYTES     connect, send BYTES bytes of the test pattern, shut down
 *                               writing and wait for the peer to close
 *   vsockio pattern BYTES       the test pattern on stdout (pipe it to sha256sum)
 *   vsockio cid                 the guest's own CID, as its vsock driver has it
 *
 * ADDR is a vsock port to listen on (any CID) or tcp:PORT; PEER is CID:PORT (the host is CID
 * 2) or tcp:A.B.C.D:PORT. TCP is there so that scripts/bench/vsock.sh can time the same
 * program over virtio-net. Once listening, vsockio says "vsockio: listening on ADDR" on
 * stderr, so a host waiting for that line knows a connection will be taken. Errors go to
 * stderr with exit status 1.
 *
 * The test pattern: byte i is the top byte of the i-th state of the 32-bit LCG
 * x = x * 1664525 + 1013904223 from x = 1 (tests/linux_api.rs generates the same).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static char buf[64 * 1024];

static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("vsockio: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (errno)
		fprintf(stderr, ": %s", strerror(errno));
	fputc('\n', stderr);
	exit(1);
}

static unsigned long number(const char *s, const char *what)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end)
		die("bad %s '%s'", what, s);
	return v;
}

/* A socket address from "PORT", "CID:PORT", "tcp:PORT" or "tcp:A.B.C.D:PORT". */
struct addr {
	int family;
	socklen_t len;
	union {
		struct sockaddr sa;
		struct sockaddr_vm vm;
		struct sockaddr_in in;
	} u;
};

static void parse_addr(const char *text, int peer, struct addr *a)
{
	char copy[64];
	char *port;

	errno = 0;
	if (strlen(text) >= sizeof(copy))
		die("address '%s' too long", text);
	strcpy(copy, text);
	memset(a, 0, sizeof(*a));
	port = strrchr(copy, ':');
	if (strncmp(copy, "tcp:", 4) == 0) {
		a->family = AF_INET;
		a->len = sizeof(a->u.in);
		a->u.in.sin_family = AF_INET;
		a->u.in.sin_port = htons(number(port + 1, "port"));
		if (peer) {
			*port = '\0';
			if (port == copy + 3 || inet_pton(AF_INET, copy + 4, &a->u.in.sin_addr) != 1)
				die("bad TCP peer '%s' (want tcp:A.B.C.D:PORT)", text);
		} else {
			a->u.in.sin_addr.s_addr = htonl(INADDR_ANY);
		}
		return;
	}
	a->family = AF_VSOCK;
	a->len = sizeof(a->u.vm);
	a->u.vm.svm_family = AF_VSOCK;
	a->u.vm.svm_cid = VMADDR_CID_ANY;
	if (peer) {
		if (!port)
			die("bad vsock peer '%s' (want CID:PORT)", text);
		*port++ = '\0';
		a->u.vm.svm_cid = number(copy, "CID");
	} else {
		port = copy;
	}
	a->u.vm.svm_port = number(port, "port");
}

/* Small writes (the echo's round trips) go out at once over TCP too. */
static void no_delay(const struct addr *a, int fd)
{
	int one = 1;

	if (a->family == AF_INET)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static void write_all(int fd, const char *p, size_t n)
{
	ssize_t w;

	while (n > 0) {
		w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			die("write");
		p += w;
		n -= w;
	}
}

static int listen_on(const char *text, struct addr *a)
{
	int fd, one = 1;

	parse_addr(text, 0, a);
	fd = socket(a->family, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, &a->u.sa, a->len) < 0)
		die("bind %s", text);
	if (listen(fd, 4) < 0)
		die("listen %s", text);
	fprintf(stderr, "vsockio: listening on %s\n", text);
	return fd;
}

static int accept_one(int lfd, const struct addr *a)
{
	int fd;

	do
		fd = accept(lfd, NULL, NULL);
	while (fd < 0 && errno == EINTR);
	if (fd < 0)
		die("accept");
	no_delay(a, fd);
	return fd;
}

/* Copies fd's bytes to out until fd's end; returns how many. */
static unsigned long long copy(int fd, int out)
{
	unsigned long long total = 0;
	ssize_t r;

	for (;;) {
		r = read(fd, buf, sizeof(buf));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			die("read");
		if (r == 0)
			return total;
		write_all(out, buf, r);
		total += r;
	}
}

static uint32_t pattern_state = 1;

static void pattern_fill(char *p, size_t n)
{
	while (n--) {
		pattern_state = pattern_state * 1664525u + 1013904223u;
		*p++ = pattern_state >> 24;
	}
}

/* Sends `bytes` bytes of the pattern to fd. */
static void send_pattern(int fd, unsigned long long bytes)
{
	size_t n;

	while (bytes > 0) {
		n = bytes < sizeof(buf) ? bytes : sizeof(buf);
		pattern_fill(buf, n);
		write_all(fd, buf, n);
		bytes -= n;
	}
}

static void usage(void)
{
	fputs("usage: vsockio recv ADDR | echo ADDR [N] | send PEER BYTES | pattern BYTES | cid\n"
	      "  ADDR: PORT or tcp:PORT; PEER: CID:PORT or tcp:A.B.C.D:PORT\n",
	      stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	struct addr a;
	unsigned long long n;
	unsigned long i, count;
	unsigned int cid;
	int lfd, fd;

	if (argc == 2 && strcmp(argv[1], "cid") == 0) {
		fd = open("/dev/vsock", O_RDONLY);
		if (fd < 0 || ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
			die("/dev/vsock");
		printf("%u\n", cid);
		return 0;
	}
	if (argc < 3)
		usage();
	if (strcmp(argv[1], "recv") == 0 && argc == 3) {
		lfd = listen_on(argv[2], &a);
		fd = accept_one(lfd, &a);
		n = copy(fd, STDOUT_FILENO);
		fprintf(stderr, "vsockio: received %llu bytes\n", n);
	} else if (strcmp(argv[1], "echo") == 0 && (argc == 3 || argc == 4)) {
		count = argc == 4 ? number(argv[3], "connection count") : 1;
		lfd = listen_on(argv[2], &a);
		for (i = 0; i < count; i++) {
			fd = accept_one(lfd, &a);
			copy(fd, fd);
			close(fd);
		}
	} else if (strcmp(argv[1], "send") == 0 && argc == 4) {
		n = number(argv[3], "byte count");
		parse_addr(argv[2], 1, &a);
		fd = socket(a.family, SOCK_STREAM, 0);
		if (fd < 0)
			die("socket");
		if (connect(fd, &a.u.sa, a.len) < 0)
			die("connect %s", argv[2]);
		send_pattern(fd, n);
		if (shutdown(fd, SHUT_WR) < 0)
			die("shutdown");
		/* The peer closes once it has everything: the bytes are not left in flight. */
		copy(fd, STDOUT_FILENO);
		fprintf(stderr, "vsockio: sent %llu bytes\n", n);
	} else if (strcmp(argv[1], "pattern") == 0 && argc == 3) {
		send_pattern(STDOUT_FILENO, number(argv[2], "byte count"));
	} else {
		usage();
	}
	return 0;
}
