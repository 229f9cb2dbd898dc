/*
 * selftest_dmabuf PATH: the selftest's dma-bufs (IOMMU_TEST_OP_DMABUF_GET, handed
 * back through the companion library, and DMABUF_REVOKE) mapped with
 * IOMMU_IOAS_MAP_FILE into an IOAS with a mock domain. Whether the domain
 * translates a dma-buf's IOVAs is read through dirty tracking: IOMMU_TEST_OP_DIRTY
 * marks only leaves that are present, IOMMU_HWPT_GET_DIRTY_BITMAP reads them back.
 * One STEP line per call; expectations in tests/iommufd/test_selftest.py.
 */
#define _GNU_SOURCE
#include "selftest_util.h"

#define DBUF (4 * PAGE)

static int fd;
static __u32 dirty_hwpt;

static struct res dmabuf_get(__u32 len, __u32 open_flags, int *dfd)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_DMABUF_GET, 0);
	struct res r;

	c.dmabuf_get.length = len;
	c.dmabuf_get.open_flags = open_flags;
	r = test_cmd(fd, &c);
	*dfd = r.rc >= 0 ? (int)r.rc : -1;
	return r;
}

static struct res dmabuf_revoke(int dfd, int revoked)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_DMABUF_REVOKE, 0);

	c.dmabuf_revoke.dmabuf_fd = dfd;
	c.dmabuf_revoke.revoked = revoked;
	return test_cmd(fd, &c);
}

static struct res map_dmabuf(__u32 ioas, int dfd, __u64 start, __u64 len, __u64 *iova, int fixed)
{
	struct iommu_ioas_map_file m = {
		.size = sizeof(m), .ioas_id = ioas, .fd = dfd, .start = start, .length = len, .iova = *iova,
		.flags = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE | (fixed ? IOMMU_IOAS_MAP_FIXED_IOVA : 0),
	};
	struct res r = xioctl(fd, IOMMU_IOAS_MAP_FILE, &m);

	if (r.rc == 0)
		*iova = m.iova;
	return r;
}

/* The pages of [iova, iova + DBUF) the dirty-tracking domain translates, as a bit mask. */
static unsigned translated(__u64 iova)
{
	__u64 mark = 0xf, bits = 0, nr;

	if (mock_dirty(fd, dirty_hwpt, iova, DBUF, PAGE, &mark, &nr).rc ||
	    get_dirty_bitmap(fd, dirty_hwpt, iova, DBUF, PAGE, &bits, 0).rc)
		return ~0u;
	return (unsigned)bits;
}

int main(int argc, char **argv)
{
	__u32 ioas, stdev, hwpt, idev, hwpt2;
	__u64 iova = MOCK_APERTURE_START, iova2 = 0, iova3 = 0, len;
	int dfd, dfd2, mfd, afd;
	struct iommu_test_cmd c;

	if (argc < 2)
		die("usage: selftest_dmabuf PATH");
	fd = open(argv[1], O_RDWR);
	if (fd < 0)
		die("open");
	mfd = memfd_create("not-a-dmabuf", MFD_CLOEXEC);
	if (mfd < 0 || ftruncate(mfd, DBUF))
		die("memfd");

	step0("ioas", ioas_alloc(fd, &ioas));
	step0("mock", mock_domain(fd, ioas, &stdev, &hwpt, &idev));
	step0("dirty_hwpt", hwpt_alloc(fd, idev, ioas, IOMMU_HWPT_ALLOC_DIRTY_TRACKING, IOMMU_HWPT_DATA_NONE, NULL, 0,
				       &dirty_hwpt));
	step0("dirty_on", set_dirty_tracking(fd, dirty_hwpt, 1));

	/* DMABUF_GET: the length is rounded up to pages, at most 512 of them */
	step0("get_zero", dmabuf_get(0, O_CLOEXEC, &dfd));
	step0("get_too_long", dmabuf_get(512 * PAGE + 1, O_CLOEXEC, &dfd));
	stepv("get_max", dmabuf_get(512 * PAGE, O_CLOEXEC, &dfd2), "fd_ok=%d", dfd2 > 2);
	close(dfd2);
	stepv("get", dmabuf_get(DBUF - 100, O_CLOEXEC, &dfd), "fd_ok=%d cloexec=%d", dfd > 2,
	      dfd >= 0 && (fcntl(dfd, F_GETFD) & FD_CLOEXEC) != 0);
	stepv("get_no_cloexec", dmabuf_get(PAGE, 0, &dfd2), "fd_ok=%d cloexec=%d", dfd2 > 2,
	      dfd2 >= 0 && (fcntl(dfd2, F_GETFD) & FD_CLOEXEC) != 0);
	if (dfd < 0)
		return 0;

	/* IOMMU_IOAS_MAP_FILE of it: the range must lie inside the dma-buf */
	len = 0;
	step0("map_zero", map_dmabuf(ioas, dfd, 0, 0, &len, 0));
	step0("map_past_end", map_dmabuf(ioas, dfd, DBUF, DBUF, &len, 0));
	step0("map_too_long", map_dmabuf(ioas, dfd, 0, DBUF + 1, &len, 0));
	stepv("map", map_dmabuf(ioas, dfd, 0, DBUF, &iova, 1), "translated=%#x", translated(iova));
	step0("map_again_fixed", map_dmabuf(ioas, dfd, 0, DBUF, &iova, 1));

	/* no struct pages behind it: the access ops refuse it */
	c = tcmd(IOMMU_TEST_OP_CREATE_ACCESS, ioas);
	c.create_access.flags = MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES;
	step0("access", test_cmd(fd, &c));
	afd = (int)c.create_access.out_access_fd;
	c = tcmd(IOMMU_TEST_OP_ACCESS_RW, afd);
	c.access_rw.iova = iova;
	c.access_rw.length = 8;
	c.access_rw.uptr = (uintptr_t)&len;
	step0("access_rw", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_ACCESS_PAGES, afd);
	c.access_pages.iova = iova;
	c.access_pages.length = PAGE;
	step0("access_pages", test_cmd(fd, &c));
	close(afd);

	/* DMABUF_REVOKE: what is not a dma-buf */
	step0("revoke_no_fd", dmabuf_revoke(9999, 1));
	step0("revoke_memfd", dmabuf_revoke(mfd, 1));
	step0("revoke_iommufd", dmabuf_revoke(fd, 1));

	/* revoked: the domains lose the mapping, a new map is ENODEV */
	step0("revoke", dmabuf_revoke(dfd, 1));
	stepv("revoked_domain", xres(0), "translated=%#x", translated(iova));
	step0("map_revoked", map_dmabuf(ioas, dfd, 0, DBUF, &iova2, 0));
	step0("hwpt_after_revoke", hwpt_alloc(fd, idev, ioas, 0, IOMMU_HWPT_DATA_NONE, NULL, 0, &hwpt2));
	step0("revoke_again", dmabuf_revoke(dfd, 1));

	/* restored: new maps work, the old area stays revoked until unmapped */
	step0("unrevoke", dmabuf_revoke(dfd, 0));
	stepv("map_restored", map_dmabuf(ioas, dfd, 0, DBUF, &iova2, 0), "translated=%#x", translated(iova2));
	stepv("old_area", xres(0), "translated=%#x", translated(iova));
	step0("unmap_old", ioas_unmap(fd, ioas, iova, DBUF));
	stepv("map_fixed_again", map_dmabuf(ioas, dfd, 0, DBUF, &iova, 1), "translated=%#x", translated(iova));

	/* the mapping holds the dma-buf: closing its fd changes nothing */
	close(dfd);
	stepv("closed", xres(0), "translated=%#x", translated(iova));
	step0("revoke_closed", dmabuf_revoke(dfd, 1));

	/* a second dma-buf, copied to another IOAS, then revoked: both areas lose it */
	{
		__u32 ioas2, stdev2, hwpt_b, idev2;

		step0("ioas2", ioas_alloc(fd, &ioas2));
		step0("mock2", mock_domain(fd, ioas2, &stdev2, &hwpt_b, &idev2));
		iova3 = MOCK_APERTURE_START + 16 * PAGE;
		step0("map2", map_dmabuf(ioas, dfd2, 0, PAGE, &iova3, 1));
		step0("copy2", ioas_copy(fd, ioas2, MOCK_APERTURE_START, ioas, iova3, PAGE));
		step0("revoke2", dmabuf_revoke(dfd2, 1));
		step0("unmap_copy", ioas_unmap(fd, ioas2, MOCK_APERTURE_START, PAGE));
		step0("destroy_stdev2", destroy(fd, stdev2));
		step0("destroy_ioas2", destroy(fd, ioas2));
	}
	close(dfd2);
	step0("unmap_all", ioas_unmap(fd, ioas, 0, ~0ull));
	step0("destroy_hwpt2", destroy(fd, hwpt2));
	step0("destroy_dirty_hwpt", destroy(fd, dirty_hwpt));
	return 0;
}
