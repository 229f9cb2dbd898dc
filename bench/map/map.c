/*
 * map: IOMMU_IOAS_MAP + IOMMU_IOAS_UNMAP of SIZE bytes of populated anonymous
 * memory in 4 KiB pages, against mlock + munlock of the same range, in the
 * same process and run (bench/map/run.py drives it).
 *
 *   cc -O2 -Iinclude -o map bench/map/map.c
 *   ./map IOMMU DEVICE|none [SIZE [RUNS]]
 *
 * With a DEVICE (/dev/vfio/devices/vfioN) it is bound to the iommufd and
 * attached to the IOAS before anything is mapped, so every IOAS_MAP really
 * pins the pages and loads them into the device's I/O page table, as with
 * a VMM's guest memory. With "none" the IOAS has no domain: the map only
 * records the range (the kernel pins nothing then either).
 *
 * The memory: MAP_POPULATE (every page present before timing), 4 KiB pages
 * only (PR_SET_THP_DISABLE before the mmap, MADV_NOHUGEPAGE after; the
 * AnonHugePages of the process is checked to be 0).
 *
 * Prints one line per run, then
 *   result size=... runs=... map_ms=... unmap_ms=... mlock_ms=... munlock_ms=...
 * with medians.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#define IOVA (1ull << 32)
#define MAX_RUNS 64

static void die(const char *what)
{
	fprintf(stderr, "map: %s: %s\n", what, strerror(errno));
	exit(1);
}

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

static double median(double *v, int n)
{
	qsort(v, n, sizeof(*v), cmp);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static long anon_huge_kb(void)
{
	char line[256];
	long kb = -1;
	FILE *f = fopen("/proc/self/smaps_rollup", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s IOMMU DEVICE|none [SIZE [RUNS]]\n", argv[0]);
		return 2;
	}
	uint64_t size = argc > 3 ? strtoull(argv[3], NULL, 0) : 1ull << 30;
	int runs = argc > 4 ? atoi(argv[4]) : 5;
	if (runs < 1 || runs > MAX_RUNS || !size || size % 4096)
		return 2;

	/* 4 KiB pages, all present. */
	if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0))
		die("PR_SET_THP_DISABLE");
	uint8_t *buf = mmap(NULL, size, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED)
		die("mmap");
	if (madvise(buf, size, MADV_NOHUGEPAGE))
		die("madvise");
	for (uint64_t off = 0; off < size; off += 4096)
		buf[off] = (uint8_t)(off >> 12); /* written too: private pages of our own */
	long huge = anon_huge_kb();
	if (huge != 0) {
		fprintf(stderr, "map: AnonHugePages %ld kB: not 4 KiB pages\n", huge);
		return 1;
	}

	int iommufd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (iommufd < 0)
		die(argv[1]);
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc))
		die("IOMMU_IOAS_ALLOC");
	int dev = -1;
	if (strcmp(argv[2], "none")) {
		dev = open(argv[2], O_RDWR | O_CLOEXEC);
		if (dev < 0)
			die(argv[2]);
		struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = iommufd };
		if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind))
			die("VFIO_DEVICE_BIND_IOMMUFD");
		struct vfio_device_attach_iommufd_pt attach = { .argsz = sizeof(attach),
								 .pt_id = alloc.out_ioas_id };
		if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
			die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
	}
	printf("%llu MiB of 4 KiB pages, %s\n", (unsigned long long)(size >> 20),
	       dev >= 0 ? "device attached to the IOAS" : "no device attached");

	double t_map[MAX_RUNS], t_unmap[MAX_RUNS], t_lock[MAX_RUNS], t_unlock[MAX_RUNS];
	for (int i = 0; i < runs; i++) {
		struct iommu_ioas_map map = {
			.size = sizeof(map),
			.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
				 IOMMU_IOAS_MAP_WRITEABLE,
			.ioas_id = alloc.out_ioas_id,
			.user_va = (uintptr_t)buf,
			.length = size,
			.iova = IOVA,
		};
		struct iommu_ioas_unmap unmap = { .size = sizeof(unmap), .ioas_id = alloc.out_ioas_id,
						  .iova = IOVA, .length = size };
		double t0 = now();
		if (ioctl(iommufd, IOMMU_IOAS_MAP, &map))
			die("IOMMU_IOAS_MAP");
		double t1 = now();
		if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &unmap))
			die("IOMMU_IOAS_UNMAP");
		double t2 = now();
		if (unmap.length != size)
			die("IOMMU_IOAS_UNMAP length");
		if (mlock(buf, size))
			die("mlock");
		double t3 = now();
		if (munlock(buf, size))
			die("munlock");
		double t4 = now();
		t_map[i] = t1 - t0, t_unmap[i] = t2 - t1, t_lock[i] = t3 - t2, t_unlock[i] = t4 - t3;
		printf("run %d: map %.2f ms unmap %.2f ms mlock %.2f ms munlock %.2f ms\n", i + 1,
		       t_map[i] * 1e3, t_unmap[i] * 1e3, t_lock[i] * 1e3, t_unlock[i] * 1e3);
	}
	printf("result size=%llu runs=%d map_ms=%.3f unmap_ms=%.3f mlock_ms=%.3f munlock_ms=%.3f\n",
	       (unsigned long long)size, runs, median(t_map, runs) * 1e3, median(t_unmap, runs) * 1e3,
	       median(t_lock, runs) * 1e3, median(t_unlock, runs) * 1e3);

	if (dev >= 0)
		close(dev);
	close(iommufd);
	munmap(buf, size);
	return 0;
}
