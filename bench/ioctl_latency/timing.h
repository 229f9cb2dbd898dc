/* What the ioctl_latency clients share: a monotonic clock in ns and a qsort order. */
#ifndef IOCTL_LATENCY_TIMING_H
#define IOCTL_LATENCY_TIMING_H

#include <time.h>

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

#endif
