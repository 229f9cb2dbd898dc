/*
 * selftest_dirty PATH default|huge: IOMMU_TEST_OP_DIRTY on a dirty-tracking mock
 * HWPT, read back with IOMMU_HWPT_GET_DIRTY_BITMAP. One STEP line per call;
 * expectations in tests/iommufd/test_selftest.py.
 */
#define _GNU_SOURCE
#include "selftest_util.h"

#define LEN (4 * MIB)
#define MAXBITS (LEN / MOCK_PAGE_SIZE)

static int fd;

static int same(const __u64 *a, const __u64 *b, unsigned nbits)
{
	for (unsigned i = 0; i < nbits; i++)
		if (((a[i / 64] >> (i % 64)) ^ (b[i / 64] >> (i % 64))) & 1)
			return 0;
	return 1;
}

static unsigned popcount(const __u64 *a, unsigned nbits)
{
	unsigned n = 0;

	for (unsigned i = 0; i < nbits; i++)
		n += (a[i / 64] >> (i % 64)) & 1;
	return n;
}

int main(int argc, char **argv)
{
	static __u64 want[MAXBITS / 64], expect[MAXBITS / 64], got[MAXBITS / 64];
	__u32 ioas, stdev, hwpt, idev, dirty_hwpt, out;
	__u64 iova, psize, nr;
	unsigned nbits;
	int huge, mfd;
	char *buf;

	if (argc != 3)
		return 2;
	huge = !strcmp(argv[2], "huge");
	fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open");
	buf = alloc_buf(0, LEN, MIB, &mfd);
	iova = huge ? 256 * MIB : MOCK_APERTURE_START;
	psize = huge ? MOCK_HUGE_PAGE_SIZE : MOCK_PAGE_SIZE;
	nbits = LEN / psize;

	ioas_alloc(fd, &ioas);
	{
		/* PAGE_SIZE mappings, as the kernel selftest's dirty tests use */
		struct iommu_option o = { .size = sizeof(o), .option_id = IOMMU_OPTION_HUGE_PAGES,
					  .op = IOMMU_OPTION_OP_SET, .object_id = ioas, .val64 = 0 };

		if (!huge && ioctl(fd, IOMMU_OPTION, &o))
			die("IOMMU_OPTION_HUGE_PAGES");
	}
	step0("mock", mock_domain(fd, ioas, &stdev, &hwpt, &idev));
	step0("map", ioas_map(fd, ioas, buf, LEN, iova));
	for (unsigned i = 0; i < nbits; i += 3) {
		want[i / 64] |= 1ULL << (i % 64);
		/* the default mock holds a PAGE_SIZE mapping as one 4 KiB entry: both halves read dirty */
		for (unsigned j = huge ? i : i & ~1u; j <= (huge ? i : i | 1u); j++)
			expect[j / 64] |= 1ULL << (j % 64);
	}

	/* the automatic domain has no dirty tracking */
	step0("dirty_auto", mock_dirty(fd, hwpt, iova, LEN, psize, want, &nr));
	step0("hwpt_dirty", hwpt_alloc_mock(fd, idev, ioas, IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
					    huge ? MOCK_IOMMUPT_HUGE : MOCK_IOMMUPT_DEFAULT, &dirty_hwpt));
	step0("replace", mock_replace(fd, stdev, dirty_hwpt, &out));
	step0("dirty_tracking_off", mock_dirty(fd, dirty_hwpt, iova, LEN, psize, want, &nr));
	step0("tracking_on", set_dirty_tracking(fd, dirty_hwpt, 1));

	/* bad inputs */
	step0("dirty_page_size_0", mock_dirty(fd, dirty_hwpt, iova, LEN, 0, want, &nr));
	step0("dirty_length_0", mock_dirty(fd, dirty_hwpt, iova, 0, psize, want, &nr));
	step0("dirty_iova_unaligned", mock_dirty(fd, dirty_hwpt, iova + psize / 2, LEN, psize, want, &nr));
	step0("dirty_length_unaligned", mock_dirty(fd, dirty_hwpt, iova, LEN - psize / 2, psize, want, &nr));
	step0("dirty_no_bitmap", mock_dirty(fd, dirty_hwpt, iova, LEN, psize, NULL, &nr));
	step0("dirty_bad_bitmap", mock_dirty(fd, dirty_hwpt, iova, LEN, psize, (void *)8, &nr));
	step0("dirty_on_ioas", mock_dirty(fd, ioas, iova, LEN, psize, want, &nr));
	step0("dirty_missing", mock_dirty(fd, 999, iova, LEN, psize, want, &nr));

	/* mark, read back (clearing), read again */
	stepv("dirty", mock_dirty(fd, dirty_hwpt, iova, LEN, psize, want, &nr), "nr=%llu expected=%u",
	     (unsigned long long)nr, popcount(want, nbits));
	memset(got, 0, sizeof(got));
	stepv("bitmap", get_dirty_bitmap(fd, dirty_hwpt, iova, LEN, psize, got, 0), "match=%d set=%u",
	     same(expect, got, nbits), popcount(got, nbits));
	memset(got, 0, sizeof(got));
	stepv("bitmap_cleared", get_dirty_bitmap(fd, dirty_hwpt, iova, LEN, psize, got, 0), "set=%u",
	     popcount(got, nbits));

	/* NO_CLEAR keeps them */
	step0("dirty_again", mock_dirty(fd, dirty_hwpt, iova, LEN, psize, want, &nr));
	memset(got, 0, sizeof(got));
	stepv("bitmap_no_clear", get_dirty_bitmap(fd, dirty_hwpt, iova, LEN, psize, got,
						 IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR),
	     "match=%d", same(expect, got, nbits));
	memset(got, 0, sizeof(got));
	stepv("bitmap_kept", get_dirty_bitmap(fd, dirty_hwpt, iova, LEN, psize, got, 0), "match=%d",
	     same(expect, got, nbits));

	/* bits over IOVA nobody mapped are counted, and mark nothing */
	stepv("dirty_unmapped", mock_dirty(fd, dirty_hwpt, iova + LEN, LEN, psize, want, &nr), "nr=%llu",
	     (unsigned long long)nr);

	/* off again: refused */
	step0("tracking_off", set_dirty_tracking(fd, dirty_hwpt, 0));
	step0("dirty_after_off", mock_dirty(fd, dirty_hwpt, iova, LEN, psize, want, &nr));
	return 0;
}
