/*
 * selftest_ops PATH SCENARIO: the IOMMU_TEST_CMD ops one by one, good and bad
 * inputs, one STEP line per call. Expectations (mainline's answers) are in
 * tests/iommufd/test_selftest.py.
 *
 * Scenarios:
 *   absent   -- a daemon without test mode: IOMMU_TEST_CMD is an unknown ioctl
 *   generic  -- size rules, unknown op, ADD_RESERVED, SET_TEMP_MEMORY_LIMIT
 *   mock     -- MOCK_DOMAIN(_FLAGS), ids, GET_HW_INFO, IOVA ranges, REPLACE,
 *               DESTROY, DEV_CHECK_CACHE, MD_CHECK_IOTLB, TRIGGER_*, HWPT_ALLOC
 *   files    -- CREATE_ACCESS, ACCESS_*, DMABUF_* (what needs an fd handed back)
 *   thp      -- MD_CHECK_REFS on a transparent huge page (compound: not counted)
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <sys/eventfd.h>

#include "selftest_util.h"

#define offsetofend(T, m) (offsetof(T, m) + sizeof(((T *)0)->m))

static int fd;

static void scenario_absent(void)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_ADD_RESERVED, 0);

	step0("test_cmd", test_cmd(fd, &c));
}

static void scenario_generic(void)
{
	struct iommu_test_cmd c;
	char big[sizeof(c) + 16];
	__u32 ioas, ioas2;
	__u64 iova;
	void *buf = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	ioas_alloc(fd, &ioas);
	ioas_alloc(fd, &ioas2);

	/* central validation of the ioctl table */
	c = tcmd(IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT, 0);
	c.memory_limit.limit = 65536;
	c.size = offsetofend(struct iommu_test_cmd, last) - 1;
	step0("size_short", test_cmd(fd, &c));
	c.size = offsetofend(struct iommu_test_cmd, last);
	step0("size_exact", test_cmd(fd, &c));
	memset(big, 0, sizeof(big));
	memcpy(big, &c, sizeof(c));
	((struct iommu_test_cmd *)big)->size = sizeof(big);
	step0("size_long_zero", xioctl(fd, IOMMU_TEST_CMD, big));
	big[sizeof(big) - 1] = 1;
	step0("size_long_nonzero", xioctl(fd, IOMMU_TEST_CMD, big));
	step0("bad_pointer", xioctl(fd, IOMMU_TEST_CMD, (void *)8));
	c = tcmd(0, 0);
	step0("op_zero", test_cmd(fd, &c));
	c = tcmd(1000, 0);
	step0("op_unknown", test_cmd(fd, &c));

	/* ADD_RESERVED */
	c = tcmd(IOMMU_TEST_OP_ADD_RESERVED, ioas);
	c.add_reserved.start = 0x100000;
	c.add_reserved.length = 0;
	step0("reserved_zero_length", test_cmd(fd, &c));
	c.add_reserved.start = ~0ULL - 10;
	c.add_reserved.length = 100;
	step0("reserved_overflow", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_ADD_RESERVED, 999);
	c.add_reserved.start = 0x100000;
	c.add_reserved.length = PAGE;
	step0("reserved_bad_ioas", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_ADD_RESERVED, ioas);
	c.add_reserved.start = 0;
	c.add_reserved.length = 16 * MIB;
	step0("reserved_ok", test_cmd(fd, &c));
	/* allocation avoids it; a fixed map in it is EINVAL */
	stepv("map_auto", ioas_map_auto(fd, ioas, buf, PAGE, &iova), "above=%d", iova >= 16 * MIB);
	step0("map_fixed_in_reserved", ioas_map(fd, ioas, buf, PAGE, 0x200000));
	/* reserving over a mapping */
	c.add_reserved.start = iova;
	c.add_reserved.length = PAGE;
	step0("reserved_over_area", test_cmd(fd, &c));
	/* reserving over an allowed range */
	{
		struct iommu_iova_range r = { .start = 0x40000000, .last = 0x4fffffff };
		struct iommu_ioas_allow_iovas a = {
			.size = sizeof(a), .ioas_id = ioas2, .num_iovas = 1, .allowed_iovas = (uintptr_t)&r,
		};
		step0("allow_iovas", xioctl(fd, IOMMU_IOAS_ALLOW_IOVAS, &a));
		c = tcmd(IOMMU_TEST_OP_ADD_RESERVED, ioas2);
		c.add_reserved.start = 0x40001000;
		c.add_reserved.length = PAGE;
		step0("reserved_over_allowed", test_cmd(fd, &c));
	}
	/* ADD_RESERVED on something that is not an IOAS */
	c = tcmd(IOMMU_TEST_OP_ADD_RESERVED, 0);
	c.add_reserved.start = 0;
	c.add_reserved.length = PAGE;
	step0("reserved_id_zero", test_cmd(fd, &c));

	/* SET_TEMP_MEMORY_LIMIT: below one batch element is EINVAL */
	c = tcmd(IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT, 0);
	c.memory_limit.limit = 11;
	step0("limit_11", test_cmd(fd, &c));
	c.memory_limit.limit = 12;
	step0("limit_12", test_cmd(fd, &c));
	c.memory_limit.limit = 65536;
	step0("limit_default", test_cmd(fd, &c));
}

static void scenario_mock(void)
{
	struct iommu_test_cmd c;
	__u32 ioas, ioas2, stdev, hwpt, idev, stdev2, hwpt2, idev2, out, id;
	void *buf = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	ioas_alloc(fd, &ioas);
	step0("mock_bad_ioas", mock_domain(fd, 999, &stdev, &hwpt, &idev));
	step0("mock_id_zero", mock_domain(fd, 0, &stdev, &hwpt, &idev));
	step0("mock_flags_unknown", mock_domain_flags(fd, ioas, 1 << 3, &stdev, &hwpt, &idev));
	step0("mock_flags_huge_iova_removed", mock_domain_flags(fd, ioas, 1 << 1, &stdev, &hwpt, &idev));
	/* ids: the selftest object first, then the device, then the automatic HWPT */
	stepv("mock", mock_domain(fd, ioas, &stdev, &hwpt, &idev), "stdev=%u idev=%u hwpt=%u", stdev, idev, hwpt);
	/* a second mock device on the same IOAS shares the automatic HWPT */
	stepv("mock2", mock_domain(fd, ioas, &stdev2, &hwpt2, &idev2), "stdev=%u idev=%u hwpt=%u same_hwpt=%d",
	     stdev2, idev2, hwpt2, hwpt2 == hwpt);
	/* a mock device on a HWPT id */
	{
		__u32 s3, h3, i3;
		stepv("mock_on_hwpt", mock_domain(fd, hwpt, &s3, &h3, &i3), "hwpt=%u", h3);
		step0("destroy_mock3", destroy(fd, s3));
	}

	/* what the mock IOMMU reports */
	{
		struct iommu_test_hw_info info;
		struct iommu_hw_info h = {
			.size = sizeof(h), .dev_id = idev, .data_len = sizeof(info), .data_uptr = (uintptr_t)&info,
		};
		memset(&info, 0xff, sizeof(info));
		stepv("hw_info", xioctl(fd, IOMMU_GET_HW_INFO, &h), "type=%#x reg=%#x flags=%u len=%u caps=%#llx pasid=%u",
		     h.out_data_type, info.test_reg, info.flags, h.data_len,
		     (unsigned long long)h.out_capabilities, h.out_max_pasid_log2);
		h.dev_id = stdev;
		step0("hw_info_stdev", xioctl(fd, IOMMU_GET_HW_INFO, &h));
	}
	{
		struct iommu_iova_range r[4];
		struct iommu_ioas_iova_ranges q = {
			.size = sizeof(q), .ioas_id = ioas, .num_iovas = 4, .allowed_iovas = (uintptr_t)r,
		};
		struct res rr = xioctl(fd, IOMMU_IOAS_IOVA_RANGES, &q);
		stepv("iova_ranges", rr, "n=%u start=%#llx last=%#llx align=%llu", q.num_iovas,
		     (unsigned long long)r[0].start, (unsigned long long)r[0].last,
		     (unsigned long long)q.out_iova_alignment);
	}
	/* mapping outside the aperture, and on a 2 KiB boundary */
	step0("map_below_aperture", ioas_map(fd, ioas, buf, PAGE, 0x100000));
	step0("map_2k_offset", ioas_map(fd, ioas, (char *)buf + 2048, 2048, MOCK_APERTURE_START + 2048));

	/* the device object belongs to the selftest object */
	step0("destroy_idev", destroy(fd, idev));
	step0("destroy_hwpt_in_use", destroy(fd, hwpt));

	/* MOCK_DOMAIN_REPLACE */
	ioas_alloc(fd, &ioas2);
	step0("replace_bad_stdev", mock_replace(fd, 999, ioas2, &out));
	step0("replace_idev_not_stdev", mock_replace(fd, idev, ioas2, &out));
	step0("replace_bad_pt", mock_replace(fd, stdev, 999, &out));
	step0("replace_to_device", mock_replace(fd, stdev, idev, &out));
	stepv("replace_same", mock_replace(fd, stdev, hwpt, &out), "pt=%u", out);
	stepv("replace_ioas2", mock_replace(fd, stdev, ioas2, &out), "pt=%u", out);
	stepv("replace_back", mock_replace(fd, stdev, ioas, &out), "pt=%u same=%d", out, out == hwpt);
	{
		__u32 manual;
		stepv("hwpt_alloc", hwpt_alloc(fd, idev, ioas2, 0, 0, NULL, 0, &manual), "id=%u", manual);
		stepv("replace_manual", mock_replace(fd, stdev, manual, &out), "same=%d", out == manual);
		step0("destroy_manual_in_use", destroy(fd, manual));
		step0("replace_from_manual", mock_replace(fd, stdev, ioas, &out));
		step0("destroy_manual", destroy(fd, manual));
	}

	/* HWPT_ALLOC for a mock device */
	{
		struct iommu_hwpt_selftest cfg = { .pagetable_type = 7 };
		__u32 h, nd_stdev, nd_idev, nd_hwpt;
		__u32 short_cfg = 0;
		step0("hwpt_bad_type", hwpt_alloc(fd, idev, ioas2, 0, IOMMU_HWPT_DATA_SELFTEST, &cfg, sizeof(cfg), &h));
		step0("hwpt_short_data", hwpt_alloc(fd, idev, ioas2, 0, IOMMU_HWPT_DATA_SELFTEST, &short_cfg, 2, &h));
		step0("hwpt_other_data", hwpt_alloc(fd, idev, ioas2, 0, 0x1234, &cfg, sizeof(cfg), &h));
		step0("hwpt_unknown_flag", hwpt_alloc_mock(fd, idev, ioas2, 1 << 10, MOCK_IOMMUPT_DEFAULT, &h));
		step0("hwpt_fault_id", hwpt_alloc_mock(fd, idev, ioas2, IOMMU_HWPT_FAULT_ID_VALID, MOCK_IOMMUPT_DEFAULT, &h));
		stepv("hwpt_huge", hwpt_alloc_mock(fd, idev, ioas2, 0, MOCK_IOMMUPT_HUGE, &h), "ok=%d", h != 0);
		step0("destroy_huge", destroy(fd, h));
		stepv("hwpt_nest_parent", hwpt_alloc_mock(fd, idev, ioas2, IOMMU_HWPT_ALLOC_NEST_PARENT, 0, &h), "ok=%d",
		     h != 0);
		step0("destroy_nest_parent", destroy(fd, h));
		/* dirty tracking and a device without it */
		stepv("mock_no_dirty", mock_domain_flags(fd, ioas2, MOCK_FLAGS_DEVICE_NO_DIRTY, &nd_stdev, &nd_hwpt, &nd_idev),
		     "ok=%d", nd_stdev != 0);
		step0("hwpt_dirty_no_dirty_dev", hwpt_alloc(fd, nd_idev, ioas2, IOMMU_HWPT_ALLOC_DIRTY_TRACKING, 0, NULL, 0, &h));
		stepv("hwpt_dirty", hwpt_alloc(fd, idev, ioas2, IOMMU_HWPT_ALLOC_DIRTY_TRACKING, 0, NULL, 0, &h), "ok=%d",
		     h != 0);
		step0("replace_no_dirty_to_dirty", mock_replace(fd, nd_stdev, h, &out));
		step0("mock_no_dirty_on_dirty", mock_domain_flags(fd, h, MOCK_FLAGS_DEVICE_NO_DIRTY, NULL, NULL, NULL));
		{
			struct iommu_hw_info hi = { .size = sizeof(hi), .dev_id = nd_idev };
			stepv("hw_info_no_dirty", xioctl(fd, IOMMU_GET_HW_INFO, &hi), "caps=%#llx",
			     (unsigned long long)hi.out_capabilities);
		}
		step0("destroy_dirty", destroy(fd, h));
		step0("destroy_no_dirty", destroy(fd, nd_stdev));
	}

	/* DEV_CHECK_CACHE: the mock device's caches hold their default */
	for (id = 0; id < MOCK_DEV_CACHE_NUM; id++) {
		char name[32];
		c = tcmd(IOMMU_TEST_OP_DEV_CHECK_CACHE, idev);
		c.check_dev_cache.id = id;
		c.check_dev_cache.cache = IOMMU_TEST_DEV_CACHE_DEFAULT;
		snprintf(name, sizeof(name), "cache_%u", id);
		step0(name, test_cmd(fd, &c));
	}
	c = tcmd(IOMMU_TEST_OP_DEV_CHECK_CACHE, idev);
	c.check_dev_cache.id = MOCK_DEV_CACHE_ID_MAX + 1;
	c.check_dev_cache.cache = IOMMU_TEST_DEV_CACHE_DEFAULT;
	step0("cache_bad_index", test_cmd(fd, &c));
	c.check_dev_cache.id = 0;
	c.check_dev_cache.cache = 0;
	step0("cache_wrong_value", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_DEV_CHECK_CACHE, stdev);
	c.check_dev_cache.cache = IOMMU_TEST_DEV_CACHE_DEFAULT;
	step0("cache_not_device", test_cmd(fd, &c));

	/* MD_CHECK_IOTLB needs a nested HWPT */
	c = tcmd(IOMMU_TEST_OP_MD_CHECK_IOTLB, hwpt);
	c.check_iotlb.iotlb = IOMMU_TEST_IOTLB_DEFAULT;
	step0("iotlb_paging", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_MD_CHECK_IOTLB, 999);
	step0("iotlb_missing", test_cmd(fd, &c));

	/* TRIGGER_IOPF / TRIGGER_VEVENT */
	c = tcmd(IOMMU_TEST_OP_TRIGGER_IOPF, 0);
	c.trigger_iopf.dev_id = idev;
	c.trigger_iopf.addr = MOCK_APERTURE_START;
	step0("iopf", test_cmd(fd, &c));
	c.trigger_iopf.dev_id = stdev;
	step0("iopf_not_device", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_TRIGGER_VEVENT, 0);
	c.trigger_vevent.dev_id = idev;
	step0("vevent_no_viommu", test_cmd(fd, &c));
	c.trigger_vevent.dev_id = 999;
	step0("vevent_missing", test_cmd(fd, &c));

	/* MD_CHECK_MAP on objects that are not mock paging HWPTs */
	step0("check_map_ioas", check_map(fd, ioas, MOCK_APERTURE_START, 0, buf));
	step0("check_map_stdev", check_map(fd, stdev, MOCK_APERTURE_START, 0, buf));
	step0("check_map_empty", check_map(fd, hwpt, MOCK_APERTURE_START, 0, buf));

	/* destroying the selftest object takes the device and the automatic HWPT */
	step0("destroy_stdev2", destroy(fd, stdev2));
	step0("destroy_stdev", destroy(fd, stdev));
	step0("destroy_idev_gone", destroy(fd, idev));
	step0("destroy_hwpt_gone", destroy(fd, hwpt));
	step0("destroy_ioas", destroy(fd, ioas));
	step0("destroy_stdev_again", destroy(fd, stdev));
	/* ids are free again: a new mock device gets the lowest */
	stepv("mock_again", mock_domain(fd, ioas2, &stdev, &hwpt, &idev), "stdev=%u idev=%u hwpt=%u", stdev, idev, hwpt);
}

static void scenario_files(void)
{
	struct iommu_test_cmd c;
	__u32 ioas;
	int efd = eventfd(0, 0);

	ioas_alloc(fd, &ioas);
	c = tcmd(IOMMU_TEST_OP_CREATE_ACCESS, ioas);
	c.create_access.flags = 1 << 5;
	step0("access_bad_flags", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_CREATE_ACCESS, 999);
	step0("access_bad_ioas", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_CREATE_ACCESS, ioas);
	c.create_access.flags = MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES;
	c.create_access.out_access_fd = 12345;
	stepv("access_create", test_cmd(fd, &c), "fd=%u", c.create_access.out_access_fd);

	c = tcmd(IOMMU_TEST_OP_ACCESS_PAGES, efd);
	c.access_pages.length = 16 * MIB + 1;
	step0("access_pages_too_long", test_cmd(fd, &c));
	c.access_pages.length = PAGE;
	c.access_pages.flags = 1 << 3;
	step0("access_pages_bad_flags", test_cmd(fd, &c));
	c.access_pages.flags = MOCK_FLAGS_ACCESS_WRITE;
	step0("access_pages_not_access", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_ACCESS_RW, efd);
	c.access_rw.length = 16 * MIB + 1;
	step0("access_rw_too_long", test_cmd(fd, &c));
	c.access_rw.length = 8;
	c.access_rw.flags = 1 << 1;
	step0("access_rw_bad_flags", test_cmd(fd, &c));
	c.access_rw.flags = MOCK_ACCESS_RW_WRITE | MOCK_ACCESS_RW_SLOW_PATH;
	step0("access_rw_not_access", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_DESTROY_ACCESS_PAGES, efd);
	step0("access_destroy_not_access", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_ACCESS_REPLACE_IOAS, 999);
	c.access_replace_ioas.ioas_id = ioas;
	step0("access_replace_no_fd", test_cmd(fd, &c));

	c = tcmd(IOMMU_TEST_OP_DMABUF_GET, 0);
	c.dmabuf_get.length = 0;
	step0("dmabuf_zero", test_cmd(fd, &c));
	c.dmabuf_get.length = 512 * PAGE + 1;
	step0("dmabuf_too_long", test_cmd(fd, &c));
	c.dmabuf_get.length = PAGE;
	step0("dmabuf_get", test_cmd(fd, &c));
	c = tcmd(IOMMU_TEST_OP_DMABUF_REVOKE, 0);
	c.dmabuf_revoke.dmabuf_fd = 9999;
	step0("dmabuf_revoke_no_fd", test_cmd(fd, &c));
	c.dmabuf_revoke.dmabuf_fd = efd;
	step0("dmabuf_revoke_not_dmabuf", test_cmd(fd, &c));
}

/* kB of AnonHugePages in the mapping that holds addr (from /proc/self/smaps). */
static long anon_huge_kb(void *addr)
{
	char line[256];
	unsigned long s, e;
	int in = 0;
	long kb = -1;
	FILE *f = fopen("/proc/self/smaps", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx-%lx ", &s, &e) == 2)
			in = (uintptr_t)addr >= s && (uintptr_t)addr < e;
		else if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
			break;
	}
	fclose(f);
	return kb;
}

static void scenario_thp(void)
{
	__u64 len = 4 * MIB;
	char *base = mmap(NULL, len + 2 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *p = (char *)(((uintptr_t)base + 2 * MIB - 1) & ~(uintptr_t)(2 * MIB - 1));

	madvise(p, len, MADV_HUGEPAGE);
	memset(p, 1, len);
	stepv("refs_thp", check_refs(fd, p, 2 * MIB, 5), "thp_kb=%ld", anon_huge_kb(p));
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s PATH SCENARIO\n", argv[0]);
		return 2;
	}
	fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open");
	if (!strcmp(argv[2], "absent"))
		scenario_absent();
	else if (!strcmp(argv[2], "generic"))
		scenario_generic();
	else if (!strcmp(argv[2], "mock"))
		scenario_mock();
	else if (!strcmp(argv[2], "files"))
		scenario_files();
	else if (!strcmp(argv[2], "thp"))
		scenario_thp();
	else
		return 2;
	return 0;
}
