/*
 * ioas_alloc: the smallest useful iommufd client.
 *
 * Opens the iommufd node, allocates an I/O address space (IOAS), asks which
 * IOVA ranges it can map, and destroys it again. Works the same against
 * iommufd-cuse and against a kernel with CONFIG_IOMMUFD.
 *
 *   cc -Iinclude -o ioas_alloc examples/ioas_alloc.c
 *   ./ioas_alloc [/dev/iommu]
 */
#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

static int fail(const char *what)
{
	fprintf(stderr, "ioas_alloc: %s: %s\n", what, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : "/dev/iommu";
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return fail(path);

	/* Every iommufd struct starts with its own size. */
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	if (ioctl(fd, IOMMU_IOAS_ALLOC, &alloc))
		return fail("IOMMU_IOAS_ALLOC");
	printf("ioas id %u\n", alloc.out_ioas_id);

	/* Ask how many ranges there are: with no room for any, the answer is
	 * EMSGSIZE and num_iovas says how many to make room for. */
	struct iommu_ioas_iova_ranges ranges = {
		.size = sizeof(ranges),
		.ioas_id = alloc.out_ioas_id,
		.num_iovas = 0,
	};
	if (ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &ranges) == 0) {
		/* zero ranges: nothing to fetch */
	} else if (errno != EMSGSIZE) {
		return fail("IOMMU_IOAS_IOVA_RANGES");
	} else {
		struct iommu_iova_range *r = calloc(ranges.num_iovas, sizeof(*r));
		if (!r)
			return fail("calloc");
		ranges.allowed_iovas = (__u64)(uintptr_t)r;
		if (ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &ranges))
			return fail("IOMMU_IOAS_IOVA_RANGES");
		for (__u32 i = 0; i < ranges.num_iovas; i++)
			printf("iova range %u: [0x%llx, 0x%llx]\n", i,
			       (unsigned long long)r[i].start, (unsigned long long)r[i].last);
		free(r);
	}
	printf("iova alignment 0x%llx\n", (unsigned long long)ranges.out_iova_alignment);

	struct iommu_destroy destroy = { .size = sizeof(destroy), .id = alloc.out_ioas_id };
	if (ioctl(fd, IOMMU_DESTROY, &destroy))
		return fail("IOMMU_DESTROY");
	printf("destroyed ioas %u\n", alloc.out_ioas_id);

	close(fd);
	return 0;
}
