/*
 * Wrappers around IOMMU_TEST_CMD (the kernel's selftest interface) and the
 * iommufd calls the selftest clients share. Each returns a struct res; the
 * client prints it with step(). Written for this project from the uAPI in
 * include/iommufd-cuse/uapi.h.
 */
#ifndef SELFTEST_UTIL_H
#define SELFTEST_UTIL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "stepper.h"

/* step() with fields read after the call (argument evaluation order is unspecified). */
#define stepv(name, call, ...)                    \
	do {                                      \
		struct res _r = (call);           \
		step(name, _r, __VA_ARGS__);      \
	} while (0)

#define PAGE 4096UL
#define MIB (1UL << 20)

static inline struct iommu_test_cmd tcmd(__u32 op, __u32 id)
{
	struct iommu_test_cmd c;

	memset(&c, 0, sizeof(c));
	c.size = sizeof(c);
	c.op = op;
	c.id = id;
	return c;
}

static inline struct res test_cmd(int fd, struct iommu_test_cmd *c)
{
	return xioctl(fd, IOMMU_TEST_CMD, c);
}

/* IOMMU_DESTROY once the daemon has seen a close (FUSE delivers releases
 * asynchronously, after close() has returned): retry EBUSY for up to 2 s. */
static inline struct res destroy_eventually(int fd, __u32 id)
{
	struct timespec ts = { 0, 5 * 1000 * 1000 };
	struct res r;

	for (int i = 0; i < 400; i++) {
		r = destroy(fd, id);
		if (r.rc == 0 || r.err != EBUSY)
			break;
		nanosleep(&ts, NULL);
	}
	return r;
}

static inline struct res ioas_map(int fd, __u32 ioas, void *va, __u64 len, __u64 iova)
{
	struct iommu_ioas_map m = {
		.size = sizeof(m), .ioas_id = ioas, .user_va = (uintptr_t)va, .length = len, .iova = iova,
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
	};

	return xioctl(fd, IOMMU_IOAS_MAP, &m);
}

static inline struct res ioas_map_auto(int fd, __u32 ioas, void *va, __u64 len, __u64 *iova)
{
	struct iommu_ioas_map m = {
		.size = sizeof(m), .ioas_id = ioas, .user_va = (uintptr_t)va, .length = len,
		.flags = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
	};
	struct res r = xioctl(fd, IOMMU_IOAS_MAP, &m);

	*iova = r.rc == 0 ? m.iova : 0;
	return r;
}

static inline struct res ioas_map_file(int fd, __u32 ioas, int mfd, __u64 start, __u64 len, __u64 iova)
{
	struct iommu_ioas_map_file m = {
		.size = sizeof(m), .ioas_id = ioas, .fd = mfd, .start = start, .length = len, .iova = iova,
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
	};

	return xioctl(fd, IOMMU_IOAS_MAP_FILE, &m);
}

static inline struct res ioas_unmap(int fd, __u32 ioas, __u64 iova, __u64 len)
{
	struct iommu_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas, .iova = iova, .length = len };

	return xioctl(fd, IOMMU_IOAS_UNMAP, &u);
}

static inline struct res ioas_copy(int fd, __u32 dst, __u64 dst_iova, __u32 src, __u64 src_iova, __u64 len)
{
	struct iommu_ioas_copy c = {
		.size = sizeof(c), .dst_ioas_id = dst, .src_ioas_id = src, .length = len,
		.dst_iova = dst_iova, .src_iova = src_iova,
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
	};

	return xioctl(fd, IOMMU_IOAS_COPY, &c);
}

static inline struct res mock_domain_flags(int fd, __u32 pt, __u32 flags, __u32 *stdev, __u32 *hwpt, __u32 *idev)
{
	struct iommu_test_cmd c = tcmd(flags == (__u32)-1 ? IOMMU_TEST_OP_MOCK_DOMAIN : IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS, pt);
	struct res r;

	if (flags != (__u32)-1)
		c.mock_domain_flags.dev_flags = flags;
	r = test_cmd(fd, &c);
	if (stdev)
		*stdev = r.rc == 0 ? c.mock_domain.out_stdev_id : 0;
	if (hwpt)
		*hwpt = r.rc == 0 ? c.mock_domain.out_hwpt_id : 0;
	if (idev)
		*idev = r.rc == 0 ? c.mock_domain.out_idev_id : 0;
	return r;
}

static inline struct res mock_domain(int fd, __u32 pt, __u32 *stdev, __u32 *hwpt, __u32 *idev)
{
	return mock_domain_flags(fd, pt, (__u32)-1, stdev, hwpt, idev);
}

static inline struct res mock_replace(int fd, __u32 stdev, __u32 pt, __u32 *out)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, stdev);
	struct res r;

	c.mock_domain_replace.pt_id = pt;
	r = test_cmd(fd, &c);
	if (out)
		*out = r.rc == 0 ? c.mock_domain_replace.pt_id : 0;
	return r;
}

static inline struct res check_map(int fd, __u32 hwpt, __u64 iova, __u64 len, void *uptr)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_MD_CHECK_MAP, hwpt);

	c.check_map.iova = iova;
	c.check_map.length = len;
	c.check_map.uptr = (uintptr_t)uptr;
	return test_cmd(fd, &c);
}

static inline struct res check_refs(int fd, void *uptr, __u64 len, __u32 refs)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_MD_CHECK_REFS, 0);

	c.check_refs.uptr = (uintptr_t)uptr;
	c.check_refs.length = len;
	c.check_refs.refs = refs;
	return test_cmd(fd, &c);
}

static inline struct res hwpt_alloc(int fd, __u32 dev, __u32 pt, __u32 flags, __u32 data_type, void *data,
				    __u32 data_len, __u32 *out)
{
	struct iommu_hwpt_alloc a = {
		.size = sizeof(a), .flags = flags, .dev_id = dev, .pt_id = pt, .data_type = data_type,
		.data_len = data_len, .data_uptr = (uintptr_t)data,
	};
	struct res r = xioctl(fd, IOMMU_HWPT_ALLOC, &a);

	if (out)
		*out = r.rc == 0 ? a.out_hwpt_id : 0;
	return r;
}

/* A HWPT of the mock IOMMU with the given page-table type (MOCK_IOMMUPT_*). */
static inline struct res hwpt_alloc_mock(int fd, __u32 dev, __u32 pt, __u32 flags, __u32 type, __u32 *out)
{
	struct iommu_hwpt_selftest cfg = { .pagetable_type = type };

	return hwpt_alloc(fd, dev, pt, flags, IOMMU_HWPT_DATA_SELFTEST, &cfg, sizeof(cfg), out);
}

static inline struct res set_dirty_tracking(int fd, __u32 hwpt, int on)
{
	struct iommu_hwpt_set_dirty_tracking s = {
		.size = sizeof(s), .hwpt_id = hwpt, .flags = on ? IOMMU_HWPT_DIRTY_TRACKING_ENABLE : 0,
	};

	return xioctl(fd, IOMMU_HWPT_SET_DIRTY_TRACKING, &s);
}

static inline struct res get_dirty_bitmap(int fd, __u32 hwpt, __u64 iova, __u64 len, __u64 page_size,
					  __u64 *bitmap, __u32 flags)
{
	struct iommu_hwpt_get_dirty_bitmap g = {
		.size = sizeof(g), .hwpt_id = hwpt, .flags = flags, .iova = iova, .length = len,
		.page_size = page_size, .data = (uintptr_t)bitmap,
	};

	return xioctl(fd, IOMMU_HWPT_GET_DIRTY_BITMAP, &g);
}

static inline struct res mock_dirty(int fd, __u32 hwpt, __u64 iova, __u64 len, __u64 page_size, void *bitmap,
				    __u64 *nr)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_DIRTY, hwpt);
	struct res r;

	c.dirty.iova = iova;
	c.dirty.length = len;
	c.dirty.page_size = page_size;
	c.dirty.uptr = (uintptr_t)bitmap;
	r = test_cmd(fd, &c);
	if (nr)
		*nr = r.rc == 0 ? c.dirty.out_nr_dirty : 0;
	return r;
}

/* len bytes of anonymous (or memfd, *mfd set) memory aligned to align, touched. */
static inline void *alloc_buf(int memfd, __u64 len, __u64 align, int *mfd)
{
	char *p;
	void *base;

	*mfd = -1;
	base = mmap(NULL, len + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		die("mmap reserve");
	p = (char *)(((uintptr_t)base + align - 1) & ~(uintptr_t)(align - 1));
	if (memfd) {
		*mfd = memfd_create("selftest", 0);
		if (*mfd < 0 || ftruncate(*mfd, len))
			die("memfd");
		if (mmap(p, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, *mfd, 0) == MAP_FAILED)
			die("mmap memfd");
	} else {
		if (mmap(p, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) ==
		    MAP_FAILED)
			die("mmap anon");
		madvise(p, len, MADV_NOHUGEPAGE);
	}
	for (__u64 i = 0; i < len; i += PAGE)
		p[i] = (char)(i / PAGE + 1);
	return p;
}

#endif
