/* Freestanding helpers: strings, serial output, printf, TSC timing. */
#include "probe.h"

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (u8)*a - (u8)*b;
}

/*
 * COM1, 16550A: THR at +0, FCR at +2, LSR at +5. main.c enables the FIFOs;
 * then LSR.THRE (bit 5) means the 16-byte transmit FIFO is empty, so one
 * bounded LSR poll per 16 bytes is enough (each port access is a VM exit).
 */
#define COM1 0x3f8

static void serial_write(const char *s, u32 n)
{
	for (u32 i = 0; i < n; i++) {
		if (i % 16 == 0)
			for (int t = 0; t < 1000 && !(inb(COM1 + 5) & 0x20); t++)
				cpu_relax();
		outb(COM1, (u8)s[i]);
	}
}

/*
 * One lock around whole lines so CPUs do not interleave. A fatal fault
 * (serial_unlocked set by trap()) skips it: the fault may have interrupted the
 * holder on this very CPU, and spinning at CPL0 is interpreted, hence slow.
 */
static volatile u32 serial_lock;
int serial_unlocked;

static void lock_serial(void)
{
	if (serial_unlocked)
		return;
	/* Bounded only against a holder that died: a holder whose vCPU thread the host
	 * has not run for a while (8 vCPUs on 2 loaded cores) must not be overtaken,
	 * which interleaved two CPUs' lines (2 million spins were once too few). */
	for (u64 i = 0; i < (1ull << 32); i++) {
		if (!__atomic_exchange_n(&serial_lock, 1, __ATOMIC_ACQUIRE))
			return;
		cpu_relax();
	}
}

static void unlock_serial(void) { __atomic_store_n(&serial_lock, 0, __ATOMIC_RELEASE); }

struct buf {
	char s[256];
	u32 n;
};

static void put(struct buf *b, char c)
{
	if (b->n < sizeof(b->s))
		b->s[b->n++] = c;
}

static void put_u64(struct buf *b, u64 v, u32 base)
{
	char tmp[24];
	int i = 0;
	do {
		tmp[i++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (i)
		put(b, tmp[--i]);
}

/* %s %c %d %u %x, with an optional l (64-bit) on d/u/x, and %%. */
static void format(struct buf *b, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(b, *fmt);
			continue;
		}
		int is_long = 0;
		if (*++fmt == 'l')
			is_long = 1, fmt++;
		switch (*fmt) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			while (*s)
				put(b, *s++);
			break;
		}
		case 'c':
			put(b, (char)va_arg(ap, int));
			break;
		case 'd': {
			long long v = is_long ? va_arg(ap, long long) : va_arg(ap, int);
			if (v < 0)
				put(b, '-'), v = -v;
			put_u64(b, (u64)v, 10);
			break;
		}
		case 'u':
			put_u64(b, is_long ? va_arg(ap, u64) : va_arg(ap, u32), 10);
			break;
		case 'x':
			put_u64(b, is_long ? va_arg(ap, u64) : va_arg(ap, u32), 16);
			break;
		case '%':
			put(b, '%');
			break;
		default:
			return;
		}
	}
}

static void emit(struct buf *b)
{
	lock_serial();
	serial_write(b->s, b->n);
	unlock_serial();
}

void printf(const char *fmt, ...)
{
	struct buf b;
	b.n = 0;
	va_list ap;
	va_start(ap, fmt);
	format(&b, fmt, ap);
	va_end(ap);
	emit(&b);
}

/* Print "probe: FAIL <what>" and power off (README: output protocol). */
void fail(const char *fmt, ...)
{
	struct buf b;
	b.n = 0;
	const char *prefix = "probe: FAIL ";
	while (*prefix)
		put(&b, *prefix++);
	va_list ap;
	va_start(ap, fmt);
	format(&b, fmt, ap);
	va_end(ap);
	put(&b, '\n');
	emit(&b);
	acpi_poweroff();
}

/*
 * TSC frequency, measured against the 8254 PIT (1.193182 MHz). Channel 0 in
 * mode 2 counts down from 65536 and wraps; its count is read back with a
 * counter-latch command (8254 datasheet: control word 0x00 latches channel 0).
 * Channel 2 and port 0x61 are avoided on purpose: VMMs that create KVM's PIT
 * with KVM_PIT_SPEAKER_DUMMY (QEMU, Firecracker) have no device behind 0x61.
 * IRQ 0 stays masked in the 8259 and IOAPIC. Falls back to CPUID leaf 0x15
 * and then a guess, so delays stay bounded either way.
 */
#define PIT_HZ 1193182ull
u64 tsc_hz;

static u64 tsc_from_cpuid(void)
{
	u32 a, b, c, d;
	cpuid(0, 0, &a, &b, &c, &d);
	if (a >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c)
			return (u64)c * b / a;
	}
	return 0;
}

static u16 pit0_count(void)
{
	outb(0x43, 0x00);
	u8 lo = inb(0x40);
	return (u16)(lo | inb(0x40) << 8);
}

void tsc_calibrate(void)
{
	const u64 want = PIT_HZ / 50; /* 20 ms of PIT ticks */
	outb(0x43, 0x34); /* channel 0, lobyte/hibyte, mode 2, binary */
	outb(0x40, 0);
	outb(0x40, 0); /* 0 = 65536 */
	u16 prev = pit0_count();
	u64 t0 = rdtsc(), ticks = 0, t = 0;
	while ((t = rdtsc() - t0) < 4000000000ull) {
		u16 cur = pit0_count();
		ticks += (u16)(prev - cur);
		prev = cur;
		if (ticks >= want)
			break;
	}
	if (ticks >= want) {
		tsc_hz = t * PIT_HZ / ticks;
		return;
	}
	tsc_hz = tsc_from_cpuid();
	if (!tsc_hz)
		tsc_hz = 2000000000ull;
}

u64 tsc_deadline(u64 ms)
{
	if (!tsc_hz)
		tsc_calibrate();
	return rdtsc() + tsc_hz / 1000 * ms;
}

int tsc_passed(u64 deadline) { return (int64_t)(rdtsc() - deadline) >= 0; }

void delay_us(u64 us)
{
	if (!tsc_hz)
		tsc_calibrate();
	u64 end = rdtsc() + tsc_hz / 1000000 * us;
	while (!tsc_passed(end))
		cpu_relax();
}

/* Command line parameters: "key=value" words of the PVH command line. */
static const char *cmdline_find(const char *key)
{
	u32 k = strlen(key);
	for (const char *p = cmdline; *p; p++) {
		if ((p != cmdline && p[-1] != ' ') || memcmp(p, key, k) || p[k] != '=')
			continue;
		return p + k + 1;
	}
	return 0;
}

/* Decimal, or hex with 0x; advances *p past the digits. */
u64 parse_u64(const char **p)
{
	const char *s = *p;
	u64 v = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		s += 2;
		for (;; s++) {
			u32 c = (u8)*s;
			if (c >= '0' && c <= '9')
				v = v * 16 + (c - '0');
			else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
				v = v * 16 + ((c | 0x20) - 'a' + 10);
			else
				break;
		}
	} else {
		for (; *s >= '0' && *s <= '9'; s++)
			v = v * 10 + (u64)(*s - '0');
	}
	*p = s;
	return v;
}

u64 cmdline_u64(const char *key, u64 def)
{
	const char *v = cmdline_find(key);
	if (!v || !*v || *v == ' ')
		return def;
	const char *e = v;
	u64 n = parse_u64(&e);
	if (e == v || (*e && *e != ' '))
		fail("command line %s=: not a number", key);
	return n;
}

int cmdline_str(const char *key, char *out, u32 n)
{
	const char *v = cmdline_find(key);
	if (!v)
		return 0;
	u32 i = 0;
	while (v[i] && v[i] != ' ' && i + 1 < n) {
		out[i] = v[i];
		i++;
	}
	out[i] = 0;
	return 1;
}
