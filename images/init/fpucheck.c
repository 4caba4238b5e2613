/*
 * fpucheck SECONDS: does the guest keep user space's vector registers across context
 * switches? Two processes share one CPU: the checker holds known values in XMM (and, when
 * the CPU and OS say AVX is usable, in the upper halves of YMM) while a rival process
 * clobbers them (vpxor, vzeroupper); every round reads them back. Then the same with glibc's
 * own memcpy (which picks SSE or AVX code by CPUID/XCR0 and GLIBC_TUNABLES) copying 64 KiB
 * buffers while the rival runs. Prints one line:
 *   fpucheck: avx=<0|1> xcr0=<hex> rounds=<n> xmm_lost=<n> ymm_upper_lost=<n> copies=<n> copies_bad=<n>
 * Exit status 0 when nothing was lost.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int avx_usable(uint64_t *xcr0)
{
	unsigned a, b, c, d;
	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
	*xcr0 = 0;
	if (!(c & (1u << 27))) /* OSXSAVE */
		return 0;
	unsigned lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	*xcr0 = (uint64_t)hi << 32 | lo;
	return (c & (1u << 28)) && (*xcr0 & 6) == 6; /* AVX, XCR0 SSE|YMM */
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void spin(void)
{
	for (volatile int i = 0; i < 20000; i++)
		;
}

static pid_t rival(int avx)
{
	pid_t p = fork();
	if (p != 0)
		return p;
	for (;;) {
		if (avx)
			__asm__ volatile("vpxor %%ymm0, %%ymm0, %%ymm0\n vpxor %%ymm1, %%ymm1, %%ymm1\n"
					 "vzeroupper" ::: "xmm0", "xmm1");
		else
			__asm__ volatile("pxor %%xmm0, %%xmm0\n pxor %%xmm1, %%xmm1" ::: "xmm0", "xmm1");
	}
}

int main(int argc, char **argv)
{
	double seconds = argc > 1 ? atof(argv[1]) : 3;
	cpu_set_t one;
	CPU_ZERO(&one);
	CPU_SET(0, &one);
	sched_setaffinity(0, sizeof(one), &one); /* the rival inherits it */
	uint64_t xcr0;
	int avx = avx_usable(&xcr0);

	pid_t r = rival(avx);
	unsigned long rounds = 0, xmm_lost = 0, ymm_lost = 0;
	static unsigned char want[64] __attribute__((aligned(32))), got[64] __attribute__((aligned(32)));
	double end = now() + seconds;
	while (now() < end) {
		for (int i = 0; i < 64; i++)
			want[i] = (unsigned char)(rounds * 31 + i * 7 + 1);
		memset(got, 0, sizeof(got));
		if (avx) {
			__asm__ volatile("vmovdqu (%0), %%ymm0\n vmovdqu 32(%0), %%ymm1" ::"r"(want) : "xmm0", "xmm1");
			spin();
			__asm__ volatile("vmovdqu %%ymm0, (%0)\n vmovdqu %%ymm1, 32(%0)\n vzeroupper" ::"r"(got)
					 : "memory");
		} else {
			__asm__ volatile("movdqu (%0), %%xmm0\n movdqu 32(%0), %%xmm1" ::"r"(want) : "xmm0", "xmm1");
			spin();
			__asm__ volatile("movdqu %%xmm0, (%0)\n movdqu %%xmm1, 32(%0)" ::"r"(got) : "memory");
			memcpy(got + 16, want + 16, 16);
			memcpy(got + 48, want + 48, 16);
		}
		if (memcmp(got, want, 16) || memcmp(got + 32, want + 32, 16))
			xmm_lost++;
		else if (memcmp(got + 16, want + 16, 16) || memcmp(got + 48, want + 48, 16))
			ymm_lost++;
		rounds++;
	}

	/* glibc's memcpy, as every program in the guest uses it. */
	static unsigned char src[65536], dst[65536];
	for (size_t i = 0; i < sizeof(src); i++)
		src[i] = (unsigned char)(i * 13 + 5);
	unsigned long copies = 0, bad = 0;
	end = now() + seconds;
	while (now() < end) {
		memset(dst, 0, sizeof(dst));
		memcpy(dst, src, sizeof(src));
		if (memcmp(dst, src, sizeof(src)))
			bad++;
		copies++;
	}
	kill(r, SIGKILL);
	waitpid(r, NULL, 0);
	printf("fpucheck: avx=%d xcr0=%llx rounds=%lu xmm_lost=%lu ymm_upper_lost=%lu copies=%lu copies_bad=%lu\n",
	       avx, (unsigned long long)xcr0, rounds, xmm_lost, ymm_lost, copies, bad);
	return xmm_lost || ymm_lost || bad;
}
