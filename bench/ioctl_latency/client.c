/*
 * client PATH [N] [WARMUP] [BATCH]: ioctl round-trip latency of an iommufd node.
 *
 * Times N calls of IOMMU_OPTION(op GET, option RLIMIT_MODE) -- the cheapest
 * ioctl that reads and writes the caller's struct -- after WARMUP untimed
 * ones, in batches of BATCH calls timed with clock_gettime(CLOCK_MONOTONIC).
 * Prints the median of the batch means (and min/p10/p90) in nanoseconds:
 *
 *   median_ns=7321 min_ns=7012 p10_ns=7150 p90_ns=7702 calls=200000 batch=1000
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "timing.h"


static void call(int fd, struct iommu_option *o)
{
	o->val64 = 99;
	if (ioctl(fd, IOMMU_OPTION, o) || o->val64 != 0) {
		fprintf(stderr, "IOMMU_OPTION failed: %s (val64=%llu)\n", strerror(errno),
			(unsigned long long)o->val64);
		exit(1);
	}
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s PATH [N] [WARMUP] [BATCH]\n", argv[0]);
		return 2;
	}
	long n = argc > 2 ? atol(argv[2]) : 200000;
	long warmup = argc > 3 ? atol(argv[3]) : 20000;
	long batch = argc > 4 ? atol(argv[4]) : 1000;
	long nbatches = n / batch;
	if (nbatches < 1) {
		fprintf(stderr, "N must be at least BATCH\n");
		return 2;
	}
	int fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	struct iommu_option o = {
		.size = sizeof(o), .option_id = IOMMU_OPTION_RLIMIT_MODE, .op = IOMMU_OPTION_OP_GET,
	};
	for (long i = 0; i < warmup; i++)
		call(fd, &o);

	double *means = calloc(nbatches, sizeof(*means));
	for (long b = 0; b < nbatches; b++) {
		double t0 = now_ns();
		for (long i = 0; i < batch; i++)
			call(fd, &o);
		means[b] = (now_ns() - t0) / batch;
	}
	qsort(means, nbatches, sizeof(*means), cmp);
	printf("median_ns=%.0f min_ns=%.0f p10_ns=%.0f p90_ns=%.0f calls=%ld batch=%ld\n",
	       means[nbatches / 2], means[0], means[nbatches / 10], means[nbatches * 9 / 10],
	       nbatches * batch, batch);
	close(fd);
	return 0;
}
