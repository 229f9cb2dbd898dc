/*
 * memcpy baseline of bench/dma/run.py: copy SIZE bytes between two buffers
 * of this process (both written once first, so no page faults are timed),
 * RUNS times; print each time, then the median and best.
 *
 *   cc -O2 -o memcpy bench/dma/memcpy.c && ./memcpy [SIZE [RUNS]]
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	size_t size = argc > 1 ? strtoull(argv[1], NULL, 0) : 64u << 20;
	int runs = argc > 2 ? atoi(argv[2]) : 9;
	uint8_t *src = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint8_t *dst = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	double *t = calloc(runs, sizeof(*t));

	if (src == MAP_FAILED || dst == MAP_FAILED || !t || runs < 1) {
		perror("memcpy bench");
		return 1;
	}
	for (size_t i = 0; i < size; i++)
		src[i] = (uint8_t)(i * 131 + 7);
	memset(dst, 0, size);
	for (int i = 0; i < runs; i++) {
		double t0 = now();
		memcpy(dst, src, size);
		t[i] = now() - t0;
		__asm__ volatile("" : : "r"(dst) : "memory"); /* the copy must happen */
		printf("run %d: %zu MiB in %.2f ms\n", i + 1, size >> 20, t[i] * 1e3);
	}
	if (memcmp(src, dst, size))
		return 1;
	qsort(t, runs, sizeof(*t), cmp);
	double med = runs % 2 ? t[runs / 2] : (t[runs / 2 - 1] + t[runs / 2]) / 2;
	printf("result size=%zu runs=%d median_ms=%.3f best_ms=%.3f median_gbps=%.3f\n", size, runs,
	       med * 1e3, t[0] * 1e3, size / med / 1e9);
	return 0;
}
