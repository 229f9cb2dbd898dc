/*
 * selftest_map PATH MEMORY DOMAIN: MD_CHECK_MAP and MD_CHECK_REFS after map,
 * copy, unmap, replace and close, for MEMORY "anon" or "memfd" and DOMAIN
 * "default" (2 KiB mock pages) or "huge" (MOCK_IOMMUPT_HUGE, 1 MiB pages).
 * One STEP line per call; expectations in tests/iommufd/test_selftest.py.
 */
#define _GNU_SOURCE
#include "selftest_util.h"

#define LEN (2 * MIB)

static int fd, cfd; /* the context under test, and one that only checks */

int main(int argc, char **argv)
{
	int memfd, huge, mfd;
	__u32 ioas, ioas2, stdev, hwpt, idev, stdev2, hwpt2, idev2, out, manual = 0;
	__u64 iova, iova2, iova3, gran;
	char *buf, *other;

	if (argc != 4) {
		fprintf(stderr, "usage: %s PATH anon|memfd default|huge\n", argv[0]);
		return 2;
	}
	memfd = !strcmp(argv[2], "memfd");
	huge = !strcmp(argv[3], "huge");
	fd = open(argv[1], O_RDWR | O_CLOEXEC);
	cfd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0 || cfd < 0)
		die("open");

	buf = alloc_buf(memfd, LEN, MIB, &mfd);
	{
		int dummy;
		other = alloc_buf(0, LEN, MIB, &dummy);
		memcpy(other, buf, LEN);
	}
	iova = huge ? 256 * MIB : MOCK_APERTURE_START;
	iova2 = iova + 64 * MIB;
	iova3 = iova + 128 * MIB;
	gran = huge ? PAGE : MOCK_PAGE_SIZE;

	step0("refs_before", check_refs(cfd, buf, LEN, 0));

	ioas_alloc(fd, &ioas);
	ioas_alloc(fd, &ioas2);
	step0("mock", mock_domain(fd, ioas, &stdev, &hwpt, &idev));
	step0("mock2", mock_domain(fd, ioas2, &stdev2, &hwpt2, &idev2));
	if (huge) {
		__u32 h1, h2;
		step0("hwpt_huge", hwpt_alloc_mock(fd, idev, ioas, 0, MOCK_IOMMUPT_HUGE, &h1));
		step0("hwpt_huge2", hwpt_alloc_mock(fd, idev2, ioas2, 0, MOCK_IOMMUPT_HUGE, &h2));
		step0("replace_huge", mock_replace(fd, stdev, h1, &out));
		step0("replace_huge2", mock_replace(fd, stdev2, h2, &out));
		hwpt = manual = h1;
		hwpt2 = h2;
	}
	{
		struct iommu_ioas_iova_ranges q = { .size = sizeof(q), .ioas_id = ioas, .num_iovas = 0 };
		struct res r = xioctl(fd, IOMMU_IOAS_IOVA_RANGES, &q);
		stepv("ranges", r, "n=%u align=%llu", q.num_iovas, (unsigned long long)q.out_iova_alignment);
	}

	/* map: the domain translates to the caller's pages, one pin each */
	step0("map", ioas_map(fd, ioas, buf, LEN, iova));
	step0("check_map", check_map(fd, hwpt, iova, LEN, buf));
	step0("check_map_tail", check_map(fd, hwpt, iova + LEN - gran, gran, buf + LEN - gran));
	step0("check_map_shifted", check_map(fd, hwpt, iova, LEN - PAGE, buf + PAGE));
	step0("check_map_copy_of_data", check_map(fd, hwpt, iova, PAGE, other));
	step0("check_map_unmapped_iova", check_map(fd, hwpt, iova + LEN, gran, buf));
	step0("check_map_unaligned_iova", check_map(fd, hwpt, iova + gran / 2, gran, buf + gran / 2));
	step0("check_map_unaligned_length", check_map(fd, hwpt, iova, gran + 8, buf));
	step0("check_map_unaligned_uptr", check_map(fd, hwpt, iova, gran, buf + 8));
	step0("check_map_2k", check_map(fd, hwpt, iova + 2048, 2048, buf + 2048));
	step0("check_map_overflow", check_map(fd, hwpt, iova, 2 * gran, (void *)(uintptr_t)(~0ULL - gran + 1)));
	step0("check_map_unmapped_uptr", check_map(fd, hwpt, iova, gran, (void *)(uintptr_t)gran));
	step0("check_map_wrong_hwpt", check_map(fd, hwpt2, iova, gran, buf));
	step0("refs_mapped", check_refs(cfd, buf, LEN, 1));
	step0("refs_mapped_wrong", check_refs(cfd, buf, LEN, 2));
	step0("refs_other", check_refs(cfd, other, LEN, 0));
	step0("refs_unaligned", check_refs(cfd, buf + 8, PAGE, 1));
	step0("refs_unaligned_length", check_refs(cfd, buf, PAGE + 8, 1));
	step0("refs_unmapped", check_refs(cfd, (void *)PAGE, PAGE, 0));
	step0("refs_empty", check_refs(cfd, buf, 0, 7));
	if (memfd) {
		/* the same memfd pages seen at another address are the same pages */
		char *alias = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
		step0("check_map_alias", check_map(fd, hwpt, iova, LEN, alias));
		step0("refs_alias", check_refs(cfd, alias, LEN, 1));
		munmap(alias, LEN);
	}

	/* copy into the second IOAS: the same pages, no new pin */
	step0("copy", ioas_copy(fd, ioas2, iova2, ioas, iova, LEN));
	step0("check_map_copy", check_map(fd, hwpt2, iova2, LEN, buf));
	step0("refs_copy", check_refs(cfd, buf, LEN, 1));

	/* a second map of the same memory: a second pin */
	step0("map_again", ioas_map(fd, ioas2, buf, LEN, iova3));
	step0("check_map_again", check_map(fd, hwpt2, iova3, LEN, buf));
	step0("refs_twice", check_refs(cfd, buf, LEN, 2));
	if (memfd) {
		step0("map_file", ioas_map_file(fd, ioas2, mfd, 0, LEN, iova3 + 8 * MIB));
		step0("check_map_file", check_map(fd, hwpt2, iova3 + 8 * MIB, LEN, buf));
		step0("refs_file", check_refs(cfd, buf, LEN, 3));
		step0("unmap_file", ioas_unmap(fd, ioas2, iova3 + 8 * MIB, LEN));
	}

	/* unmap: the pin goes, the translation goes */
	step0("unmap_again", ioas_unmap(fd, ioas2, iova3, LEN));
	step0("refs_after_unmap", check_refs(cfd, buf, LEN, 1));
	step0("check_map_unmapped", check_map(fd, hwpt2, iova3, LEN, buf));

	/* replace: the first device moves to the second IOAS; the first IOAS loses
	 * its only domain and unpins, the copy in the second stays pinned */
	step0("replace", mock_replace(fd, stdev, ioas2, &out));
	stepv("check_map_replaced", check_map(fd, out, iova2, LEN, buf), "shared=%d", out == hwpt2);
	if (manual) /* a HWPT of our own stays loaded until destroyed */
		step0("destroy_manual", destroy(fd, manual));
	step0("refs_replaced", check_refs(cfd, buf, LEN, 1));
	step0("unmap_copy", ioas_unmap(fd, ioas2, iova2, LEN));
	step0("refs_unmapped_all", check_refs(cfd, buf, LEN, 0));
	step0("replace_back", mock_replace(fd, stdev, ioas, &out));
	step0("check_map_back", check_map(fd, out, iova, LEN, buf));
	step0("refs_back", check_refs(cfd, buf, LEN, 1));

	/* destroying the device: the IOAS keeps its mapping, no domain holds it */
	step0("destroy_stdev", destroy(fd, stdev));
	step0("refs_no_domain", check_refs(cfd, buf, LEN, 0));
	step0("mock_again", mock_domain(fd, ioas, &stdev, &hwpt, &idev));
	step0("check_map_new_domain", check_map(fd, hwpt, iova, LEN, buf));
	step0("refs_new_domain", check_refs(cfd, buf, LEN, 1));

	/* close: everything of the context goes */
	close(fd);
	step0("refs_closed", check_refs(cfd, buf, LEN, 0));
	return 0;
}
