/*
 * client DEV N: round trips of the calls that hand back a file, against plain ones.
 *
 * In one process, N calls each (interleaved in batches of 10, the median call kept):
 *   option     IOMMU_OPTION(GET RLIMIT_MODE): a plain call, never notified;
 *   fault      IOMMU_FAULT_QUEUE_ALLOC: a new fault queue and its file in this process
 *              (by the companion or by the seccomp filter, whichever carries it), closed
 *              again at once and destroyed later (the file's release is asynchronous);
 *   continued  IOMMU_FAULT_QUEUE_ALLOC with flags 1 (EOPNOTSUPP): under the filter a
 *              notified call the daemon lets continue to the kernel, else a plain one.
 * Prints option_ns=.. fault_ns=.. continued_ns=..
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

#include "../ioctl_latency/timing.h"

static double median(double *v, long n)
{
	qsort(v, n, sizeof(*v), cmp);
	return v[n / 2];
}

int main(int argc, char **argv)
{
	char path[4096];

	if (argc < 3)
		return 2;
	long n = atol(argv[2]);
	snprintf(path, sizeof(path), "%s/iommu", argv[1]);
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0 || n < 10) {
		perror(path);
		return 1;
	}
	double *t_opt = calloc(n, sizeof(double)), *t_fault = calloc(n, sizeof(double));
	double *t_cont = calloc(n, sizeof(double));
	__u32 *ids = calloc(n, sizeof(__u32));
	long k = 0;

	for (long b = 0; b < n; b += 10) {
		for (long i = b; i < b + 10 && i < n; i++) {
			struct iommu_option o = { .size = sizeof(o), .op = IOMMU_OPTION_OP_GET,
						  .option_id = IOMMU_OPTION_RLIMIT_MODE };
			double t0 = now_ns();
			if (ioctl(fd, IOMMU_OPTION, &o))
				return perror("IOMMU_OPTION"), 1;
			t_opt[i] = now_ns() - t0;
		}
		for (long i = b; i < b + 10 && i < n; i++) {
			struct iommu_fault_alloc a = { .size = sizeof(a) };
			double t0 = now_ns();
			if (ioctl(fd, IOMMU_FAULT_QUEUE_ALLOC, &a))
				return perror("IOMMU_FAULT_QUEUE_ALLOC"), 1;
			t_fault[i] = now_ns() - t0;
			close(a.out_fault_fd);
			ids[k++] = a.out_fault_id;
		}
		for (long i = b; i < b + 10 && i < n; i++) {
			struct iommu_fault_alloc a = { .size = sizeof(a), .flags = 1 };
			double t0 = now_ns();
			if (!ioctl(fd, IOMMU_FAULT_QUEUE_ALLOC, &a) || errno != EOPNOTSUPP)
				return fprintf(stderr, "flags 1: not EOPNOTSUPP\n"), 1;
			t_cont[i] = now_ns() - t0;
		}
	}
	for (long i = 0; i < k; i++) {
		struct iommu_destroy d = { .size = sizeof(d), .id = ids[i] };

		for (int tries = 0; tries < 1000 && ioctl(fd, IOMMU_DESTROY, &d) && errno == EBUSY; tries++)
			usleep(1000);
	}
	printf("option_ns=%.0f fault_ns=%.0f continued_ns=%.0f\n", median(t_opt, n), median(t_fault, n),
	       median(t_cont, n));
	return 0;
}
