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
 * COM1, 8250/16550: THR at +0, LSR at +5 (bit 5 = THR empty). The poll is
 * bounded: a UART that never reports empty must not hang the probe.
 */
#define COM1 0x3f8

static void serial_putc(char c)
{
	for (int i = 0; i < 1000 && !(inb(COM1 + 5) & 0x20); i++)
		cpu_relax();
	outb(COM1, (u8)c);
}

/*
 * One lock around whole lines so CPUs do not interleave. Acquisition is
 * bounded so that a fault handler interrupting the holder on the same CPU
 * still gets its FAIL line out.
 */
static volatile u32 serial_lock;

static void lock_serial(void)
{
	for (u32 i = 0; i < 2000000; i++) {
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
	for (u32 i = 0; i < b->n; i++)
		serial_putc(b->s[i]);
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
 * TSC frequency, measured against PIT channel 2 (8254 at 1.193182 MHz, gate
 * and output through port 0x61) the way Linux's pit_calibrate_tsc does: mode
 * 0 counts down once and raises OUT2 at zero. Falls back to CPUID leaf 0x15
 * and then a guess, so delays stay bounded either way.
 */
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

void tsc_calibrate(void)
{
	const u32 latch = 11932; /* 10 ms */
	u64 best = ~0ull;
	for (int round = 0; round < 3; round++) {
		outb(0x61, (inb(0x61) & ~0x02) | 0x01);
		outb(0x43, 0xb0); /* channel 2, lobyte/hibyte, mode 0, binary */
		outb(0x42, latch & 0xff);
		outb(0x42, latch >> 8);
		u64 t0 = rdtsc();
		int done = 0;
		while (rdtsc() - t0 < 2000000000ull) {
			if (inb(0x61) & 0x20) {
				done = 1;
				break;
			}
		}
		u64 t = rdtsc() - t0;
		if (done && t < best)
			best = t;
	}
	if (best != ~0ull && best > 1000) {
		tsc_hz = best * 100;
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
