/*
 * selftest_nested PATH: nested HWPTs of the mock IOMMU (HWPT_ALLOC on a
 * NEST_PARENT parent with an iommu_hwpt_selftest), IOMMU_HWPT_INVALIDATE with
 * iommu_hwpt_invalidate_selftest entries, IOMMU_TEST_OP_MD_CHECK_IOTLB, and
 * attaching mock devices (RID and PASID) to nested HWPTs. One STEP line per
 * call; expectations in tests/iommufd/test_selftest.py.
 */
#define _GNU_SOURCE
#include <stddef.h>

#include "selftest_util.h"

static int fd;

static struct res nested(__u32 dev, __u32 parent, __u32 flags, __u32 type, void *data, __u32 len, __u32 *out)
{
	return hwpt_alloc(fd, dev, parent, flags, type, data, len, out);
}

static struct res check_iotlb(__u32 hwpt, __u32 id, __u32 value)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_MD_CHECK_IOTLB, hwpt);

	c.check_iotlb.id = id;
	c.check_iotlb.iotlb = value;
	return test_cmd(fd, &c);
}

/* the four entries: how many hold value (all four must pass for "all=4") */
static int iotlb_count(__u32 hwpt, __u32 value)
{
	int n = 0;

	for (__u32 i = 0; i < MOCK_NESTED_DOMAIN_IOTLB_NUM; i++)
		n += check_iotlb(hwpt, i, value).rc == 0;
	return n;
}

/* iotlb entries 0..3 as a string of 'V' (the value allocated with), '0' (cleared), '?' (other) */
static const char *iotlb_state(__u32 hwpt, __u32 value)
{
	static char s[MOCK_NESTED_DOMAIN_IOTLB_NUM + 1];

	for (__u32 i = 0; i < MOCK_NESTED_DOMAIN_IOTLB_NUM; i++) {
		if (check_iotlb(hwpt, i, value).rc == 0)
			s[i] = 'V';
		else if (check_iotlb(hwpt, i, 0).rc == 0)
			s[i] = '0';
		else
			s[i] = '?';
	}
	s[MOCK_NESTED_DOMAIN_IOTLB_NUM] = 0;
	return s;
}

static __u32 num_out;

static struct res invalidate_cmd(struct iommu_hwpt_invalidate *inv)
{
	struct res r = xioctl(fd, IOMMU_HWPT_INVALIDATE, inv);

	num_out = inv->entry_num;
	return r;
}

static struct res invalidate(__u32 hwpt, void *reqs, __u32 type, __u32 len, __u32 num)
{
	struct iommu_hwpt_invalidate inv = {
		.size = sizeof(inv), .hwpt_id = hwpt, .data_uptr = (uintptr_t)reqs, .data_type = type,
		.entry_len = len, .entry_num = num,
	};

	return invalidate_cmd(&inv);
}

#define INV IOMMU_HWPT_INVALIDATE_DATA_SELFTEST
#define ENT sizeof(struct iommu_hwpt_invalidate_selftest)
#define DFLT IOMMU_TEST_IOTLB_DEFAULT

static struct res pasid_op(__u32 op, __u32 stdev, __u32 pasid, __u32 pt)
{
	struct iommu_test_cmd c = tcmd(op, stdev);

	c.pasid_attach.pasid = pasid;
	c.pasid_attach.pt_id = pt;
	return test_cmd(fd, &c);
}

int main(int argc, char **argv)
{
	struct iommu_hwpt_selftest data = { .iotlb = IOMMU_TEST_IOTLB_DEFAULT };
	struct iommu_hwpt_invalidate_selftest reqs[2];
	unsigned char big[sizeof(data) + 8];
	__u32 ioas, stdev, auto_hwpt, idev, parent, plain, n0, n1, n2, h, out, s2, h2, i2;
	const __u32 min_len = offsetof(struct iommu_hwpt_selftest, iotlb) + sizeof(data.iotlb);

	if (argc != 2)
		return 2;
	fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open");
	ioas_alloc(fd, &ioas);
	step0("mock", mock_domain(fd, ioas, &stdev, &auto_hwpt, &idev));
	step0("parent", hwpt_alloc(fd, idev, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, 0, NULL, 0, &parent));
	step0("plain", hwpt_alloc(fd, idev, ioas, 0, 0, NULL, 0, &plain));

	/* HWPT_ALLOC of a nested HWPT: bad inputs */
	step0("data_none_with_data", nested(idev, parent, 0, IOMMU_HWPT_DATA_NONE, &data, sizeof(data), &h));
	step0("data_none", nested(idev, parent, 0, IOMMU_HWPT_DATA_NONE, NULL, 0, &h));
	step0("data_type_unknown", nested(idev, parent, 0, IOMMU_HWPT_DATA_SELFTEST + 1, &data, sizeof(data), &h));
	step0("data_short", nested(idev, parent, 0, IOMMU_HWPT_DATA_SELFTEST, &data, min_len - 1, &h));
	memset(big, 0, sizeof(big));
	memcpy(big, &data, sizeof(data));
	step0("data_long_zero_tail", nested(idev, parent, 0, IOMMU_HWPT_DATA_SELFTEST, big, sizeof(big), &h));
	big[sizeof(big) - 1] = 1;
	step0("data_long_nonzero_tail", nested(idev, parent, 0, IOMMU_HWPT_DATA_SELFTEST, big, sizeof(big), &h));
	step0("data_null", nested(idev, parent, 0, IOMMU_HWPT_DATA_SELFTEST, NULL, sizeof(data), &h));
	/* the same copy rules for a paging HWPT's selftest data */
	big[sizeof(big) - 1] = 0;
	step0("paging_data_long_zero_tail", nested(idev, ioas, 0, IOMMU_HWPT_DATA_SELFTEST, big, sizeof(big), &h));
	step0("paging_data_null", nested(idev, ioas, 0, IOMMU_HWPT_DATA_SELFTEST, NULL, sizeof(data), &h));
	step0("flag_nest_parent",
	      nested(idev, parent, IOMMU_HWPT_ALLOC_NEST_PARENT, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &h));
	step0("flag_dirty",
	      nested(idev, parent, IOMMU_HWPT_ALLOC_DIRTY_TRACKING, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &h));
	step0("flag_unknown", nested(idev, parent, 1 << 10, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &h));
	{
		struct iommu_hwpt_alloc a = {
			.size = sizeof(a), .flags = IOMMU_HWPT_FAULT_ID_VALID, .dev_id = idev, .pt_id = parent,
			.data_type = IOMMU_HWPT_DATA_SELFTEST, .data_len = sizeof(data), .data_uptr = (uintptr_t)&data,
			.fault_id = 999,
		};
		step0("fault_id", xioctl(fd, IOMMU_HWPT_ALLOC, &a));
	}
	step0("parent_not_nest_parent", nested(idev, plain, 0, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &h));
	step0("parent_auto", nested(idev, auto_hwpt, 0, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &h));
	step0("parent_device", nested(idev, idev, 0, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &h));
	step0("parent_missing", nested(idev, 999, 0, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &h));
	step0("dev_missing", nested(999, parent, 0, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &h));

	/* two nested HWPTs on one parent, and one with a smaller struct and its own value */
	stepv("nested0", nested(idev, parent, 0, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &n0), "id=%u", n0);
	stepv("nested1", nested(idev, parent, 0, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &n1), "id=%u", n1);
	{
		struct iommu_hwpt_selftest d2 = { .iotlb = 0x1234 };
		step0("nested2_min_len", nested(idev, parent, 0, IOMMU_HWPT_DATA_SELFTEST, &d2, min_len, &n2));
	}
	stepv("iotlb_default", check_iotlb(n0, 0, IOMMU_TEST_IOTLB_DEFAULT), "all0=%d all1=%d all2=%d",
	      iotlb_count(n0, IOMMU_TEST_IOTLB_DEFAULT), iotlb_count(n1, IOMMU_TEST_IOTLB_DEFAULT),
	      iotlb_count(n2, 0x1234));
	step0("iotlb_wrong_value", check_iotlb(n0, 0, 0));
	step0("iotlb_bad_id", check_iotlb(n0, MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1, IOMMU_TEST_IOTLB_DEFAULT));
	step0("iotlb_parent", check_iotlb(parent, 0, IOMMU_TEST_IOTLB_DEFAULT));
	step0("iotlb_missing", check_iotlb(999, 0, IOMMU_TEST_IOTLB_DEFAULT));

	step0("nested_on_nested", nested(idev, n0, 0, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &h));
	step0("destroy_parent_busy", destroy(fd, parent));
	step0("check_map_nested", check_map(fd, n0, MOCK_APERTURE_START, 0, NULL));
	step0("dirty_tracking_nested", set_dirty_tracking(fd, n0, 0));

	/* IOMMU_HWPT_INVALIDATE */
	memset(reqs, 0, sizeof(reqs));
	stepv("inv_parent", invalidate(parent, reqs, INV, ENT, 1), "num=%u", num_out);
	stepv("inv_ioas", invalidate(ioas, reqs, INV, ENT, 1), "num=%u", num_out);
	stepv("inv_missing", invalidate(999, reqs, INV, ENT, 1), "num=%u", num_out);
	stepv("inv_empty", invalidate(n0, reqs, INV, ENT, 0), "num=%u", num_out);
	stepv("inv_empty_null", invalidate(n0, NULL, INV, 0, 0), "num=%u", num_out);
	stepv("inv_bad_type", invalidate(n0, reqs, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID, ENT, 1), "num=%u",
	      num_out);
	stepv("inv_bad_type_empty", invalidate(n0, reqs, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID, ENT, 0),
	      "num=%u", num_out);
	stepv("inv_len_plus_1", invalidate(n0, reqs, INV, ENT + 1, 1), "num=%u", num_out);
	stepv("inv_len_1", invalidate(n0, reqs, INV, 1, 1), "num=%u", num_out);
	/* mainline bounds entry_len by PAGE_SIZE and entry_num by 2^19, before the object */
	stepv("inv_len_page_plus_1", invalidate(n0, reqs, INV, PAGE + 1, 1), "num=%u", num_out);
	stepv("inv_num_over_max", invalidate(n0, reqs, INV, ENT, (1u << 19) + 1), "num=%u", num_out);
	stepv("inv_num_over_max_missing", invalidate(0xfffff, reqs, INV, ENT, (1u << 19) + 1), "num=%u", num_out);
	stepv("inv_null", invalidate(n0, NULL, INV, ENT, 1), "num=%u", num_out);
	stepv("inv_len_0", invalidate(n0, reqs, INV, 0, 1), "num=%u", num_out);
	reqs[0].flags = 0xffffffff;
	stepv("inv_bad_flags", invalidate(n0, reqs, INV, ENT, 1), "num=%u", num_out);
	reqs[0].flags = 0;
	reqs[0].iotlb_id = MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1;
	stepv("inv_bad_id", invalidate(n0, reqs, INV, ENT, 1), "num=%u", num_out);
	reqs[0].iotlb_id = 0;
	{
		struct iommu_hwpt_invalidate inv = {
			.size = sizeof(inv), .hwpt_id = n0, .data_uptr = (uintptr_t)reqs, .data_type = INV,
			.entry_len = ENT, .entry_num = 1, .__reserved = 1,
		};
		stepv("inv_reserved", invalidate_cmd(&inv), "num=%u", num_out);
	}
	{
		char *p = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED || mprotect(p + PAGE, PAGE, PROT_NONE))
			die("mmap");
		/* entry 0 readable (and valid), entry 1 in the PROT_NONE page */
		memset(p, 0, PAGE);
		stepv("inv_unreadable_entry", invalidate(n2, p + PAGE - ENT, INV, ENT, 2), "num=%u iotlb=%s", num_out,
		      iotlb_state(n2, 0x1234));
		munmap(p, 2 * PAGE);
	}
	stepv("iotlb_untouched", check_iotlb(n0, 0, IOMMU_TEST_IOTLB_DEFAULT), "all=%d",
	      iotlb_count(n0, IOMMU_TEST_IOTLB_DEFAULT));

	/* the 1st entry is done, the 2nd fails: entry_num says 1 */
	reqs[0] = (struct iommu_hwpt_invalidate_selftest){ .flags = 0, .iotlb_id = 0 };
	reqs[1] = (struct iommu_hwpt_invalidate_selftest){ .flags = 0xffffffff, .iotlb_id = 1 };
	stepv("inv_partial_flags", invalidate(n0, reqs, INV, ENT, 2), "num=%u iotlb=%s", num_out, iotlb_state(n0, DFLT));
	reqs[1] = (struct iommu_hwpt_invalidate_selftest){ .flags = 0, .iotlb_id = MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1 };
	stepv("inv_partial_id", invalidate(n0, reqs, INV, ENT, 2), "num=%u iotlb=%s", num_out, iotlb_state(n0, DFLT));
	reqs[0] = (struct iommu_hwpt_invalidate_selftest){ .flags = 0, .iotlb_id = 1 };
	stepv("inv_one", invalidate(n0, reqs, INV, ENT, 1), "num=%u iotlb=%s", num_out, iotlb_state(n0, DFLT));
	reqs[0] = (struct iommu_hwpt_invalidate_selftest){ .flags = 0, .iotlb_id = 2 };
	reqs[1] = (struct iommu_hwpt_invalidate_selftest){ .flags = 0, .iotlb_id = 3 };
	stepv("inv_two", invalidate(n0, reqs, INV, ENT, 2), "num=%u iotlb=%s", num_out, iotlb_state(n0, DFLT));
	/* FLAG_ALL clears every entry whatever iotlb_id says, but iotlb_id is range-checked first */
	reqs[0] = (struct iommu_hwpt_invalidate_selftest){
		.flags = IOMMU_TEST_INVALIDATE_FLAG_ALL, .iotlb_id = MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1 };
	stepv("inv_all_bad_id", invalidate(n1, reqs, INV, ENT, 1), "num=%u iotlb=%s", num_out, iotlb_state(n1, DFLT));
	reqs[0] = (struct iommu_hwpt_invalidate_selftest){ .flags = IOMMU_TEST_INVALIDATE_FLAG_ALL, .iotlb_id = 2 };
	stepv("inv_all", invalidate(n1, reqs, INV, ENT, 1), "num=%u iotlb=%s", num_out, iotlb_state(n1, DFLT));
	/* an entry shorter than up to iotlb_id (the first version's last member) */
	stepv("inv_len_4", invalidate(n2, reqs, INV, 4, 1), "num=%u", num_out);
	/* the struct is read-only: the work is done, entry_num cannot be written back: EFAULT */
	{
		struct iommu_hwpt_invalidate *inv = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
							 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (inv == MAP_FAILED)
			die("mmap");
		reqs[0] = (struct iommu_hwpt_invalidate_selftest){ .flags = 0, .iotlb_id = 2 };
		*inv = (struct iommu_hwpt_invalidate){
			.size = sizeof(*inv), .hwpt_id = n2, .data_uptr = (uintptr_t)reqs, .data_type = INV,
			.entry_len = ENT, .entry_num = 1,
		};
		mprotect(inv, PAGE, PROT_READ);
		stepv("inv_readonly_cmd", xioctl(fd, IOMMU_HWPT_INVALIDATE, inv), "num=%u iotlb2_cleared=%d",
		      inv->entry_num, check_iotlb(n2, 2, 0).rc == 0);
		munmap(inv, PAGE);
	}

	/* attaching: a nested HWPT in use cannot be destroyed; its parent neither */
	stepv("replace_nested0", mock_replace(fd, stdev, n0, &out), "same=%d", out == n0);
	step0("check_rid_nested0", pasid_op(IOMMU_TEST_OP_PASID_CHECK_HWPT, stdev, 0, n0));
	step0("destroy_nested0_busy", destroy(fd, n0));
	stepv("replace_nested1", mock_replace(fd, stdev, n1, &out), "same=%d", out == n1);
	step0("destroy_nested1_busy", destroy(fd, n1));
	step0("destroy_nested0", destroy(fd, n0));
	step0("iotlb_destroyed", check_iotlb(n0, 0, 0));
	stepv("mock_on_nested", mock_domain(fd, n1, &s2, &h2, &i2), "same=%d", h2 == n1);
	step0("destroy_mock_on_nested", destroy(fd, s2));
	step0("replace_parent", mock_replace(fd, stdev, parent, &out));
	step0("destroy_nested1", destroy(fd, n1));
	step0("replace_nested2", mock_replace(fd, stdev, n2, &out));
	step0("replace_ioas", mock_replace(fd, stdev, ioas, &out));
	step0("destroy_parent_busy_n2", destroy(fd, parent));
	step0("destroy_nested2", destroy(fd, n2));
	step0("destroy_parent", destroy(fd, parent));
	step0("destroy_plain", destroy(fd, plain));

	/* PASIDs on nested HWPTs (a device with MOCK_FLAGS_DEVICE_PASID) */
	{
		__u32 ps, ph, pi, pp, np, nn;

		step0("mock_pasid", mock_domain_flags(fd, ioas, MOCK_FLAGS_DEVICE_PASID, &ps, &ph, &pi));
		step0("parent_pasid",
		      hwpt_alloc(fd, pi, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID, 0, NULL, 0, &pp));
		step0("nested_pasid",
		      nested(pi, pp, IOMMU_HWPT_ALLOC_PASID, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &np));
		step0("nested_no_pasid", nested(pi, pp, 0, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), &nn));
		step0("replace_rid_parent_pasid", mock_replace(fd, ps, pp, &out));
		step0("pasid_attach_nested", pasid_op(IOMMU_TEST_OP_PASID_ATTACH, ps, 100, np));
		step0("pasid_check_nested", pasid_op(IOMMU_TEST_OP_PASID_CHECK_HWPT, ps, 100, np));
		step0("pasid_attach_not_compat", pasid_op(IOMMU_TEST_OP_PASID_ATTACH, ps, 101, nn));
		step0("pasid_replace_parent", pasid_op(IOMMU_TEST_OP_PASID_REPLACE, ps, 100, pp));
		step0("pasid_replace_nested", pasid_op(IOMMU_TEST_OP_PASID_REPLACE, ps, 100, np));
		step0("destroy_nested_pasid_busy", destroy(fd, np));
		step0("replace_rid_nested_pasid", mock_replace(fd, ps, np, &out));
		step0("replace_rid_nested_no_pasid", mock_replace(fd, ps, nn, &out));
		step0("pasid_detach", pasid_op(IOMMU_TEST_OP_PASID_DETACH, ps, 100, 0));
		step0("replace_rid_nested_no_pasid_now", mock_replace(fd, ps, nn, &out));
		/* left attached and allocated: the context's release takes them */
	}
	return 0;
}
