/*
 * access_rw PATH [N] [BATCH]: IOMMU_TEST_OP_ACCESS_RW of 8 bytes against IOMMU_OPTION,
 * both on one iommufd of a daemon in test mode, with the companion library preloaded
 * (CREATE_ACCESS answers with a descriptor through it).
 *
 * Maps one page into a new IOAS, creates an access to it, then times N calls of each
 * (interleaved in batches of BATCH, so both see the same machine) and prints the
 * median of the batch means in nanoseconds:
 *
 *   option_ns=14210 access_rw_ns=20012 calls=20000 batch=500
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "timing.h"


static void check(int rc, const char *what)
{
	if (rc) {
		fprintf(stderr, "%s: %s\n", what, strerror(errno));
		exit(1);
	}
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s PATH [N] [BATCH]\n", argv[0]);
		return 2;
	}
	long n = argc > 2 ? atol(argv[2]) : 20000, batch = argc > 3 ? atol(argv[3]) : 500;
	long nbatches = n / batch;
	int fd = open(argv[1], O_RDWR | O_CLOEXEC);
	check(fd < 0, argv[1]);
	char *buf = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	check(buf == MAP_FAILED, "mmap");
	memset(buf, 0x5a, 4096);

	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	check(ioctl(fd, IOMMU_IOAS_ALLOC, &alloc), "IOMMU_IOAS_ALLOC");
	struct iommu_ioas_map map = {
		.size = sizeof(map), .ioas_id = alloc.out_ioas_id, .user_va = (uintptr_t)buf, .length = 4096,
		.iova = 1 << 20, .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
	};
	check(ioctl(fd, IOMMU_IOAS_MAP, &map), "IOMMU_IOAS_MAP");
	struct iommu_test_cmd create = {
		.size = sizeof(create), .op = IOMMU_TEST_OP_CREATE_ACCESS, .id = alloc.out_ioas_id,
	};
	check(ioctl(fd, IOMMU_TEST_CMD, &create), "CREATE_ACCESS (is the companion preloaded?)");

	char out[8];
	struct iommu_test_cmd rw = {
		.size = sizeof(rw), .op = IOMMU_TEST_OP_ACCESS_RW, .id = create.create_access.out_access_fd,
		.access_rw = { .iova = (1 << 20) + 100, .length = sizeof(out), .uptr = (uintptr_t)out },
	};
	struct iommu_option opt = {
		.size = sizeof(opt), .option_id = IOMMU_OPTION_RLIMIT_MODE, .op = IOMMU_OPTION_OP_GET,
	};
	for (long i = 0; i < batch; i++) {
		check(ioctl(fd, IOMMU_OPTION, &opt), "IOMMU_OPTION");
		check(ioctl(fd, IOMMU_TEST_CMD, &rw), "ACCESS_RW");
	}
	check(memcmp(out, buf + 100, sizeof(out)) != 0, "ACCESS_RW read other bytes");

	double *o = calloc(nbatches, sizeof(*o)), *a = calloc(nbatches, sizeof(*a));
	for (long b = 0; b < nbatches; b++) {
		double t0 = now_ns();
		for (long i = 0; i < batch; i++)
			check(ioctl(fd, IOMMU_OPTION, &opt), "IOMMU_OPTION");
		double t1 = now_ns();
		for (long i = 0; i < batch; i++)
			check(ioctl(fd, IOMMU_TEST_CMD, &rw), "ACCESS_RW");
		o[b] = (t1 - t0) / batch;
		a[b] = (now_ns() - t1) / batch;
	}
	qsort(o, nbatches, sizeof(*o), cmp);
	qsort(a, nbatches, sizeof(*a), cmp);
	printf("option_ns=%.0f access_rw_ns=%.0f calls=%ld batch=%ld\n", o[nbatches / 2], a[nbatches / 2],
	       nbatches * batch, batch);
	return 0;
}
