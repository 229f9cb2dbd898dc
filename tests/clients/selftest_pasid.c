/*
 * selftest_pasid PATH: the PASID ops of IOMMU_TEST_CMD on mock devices made
 * with MOCK_FLAGS_DEVICE_PASID (and one without). One STEP line per call;
 * expectations in tests/iommufd/test_selftest.py.
 */
#define _GNU_SOURCE
#include "selftest_util.h"

static int fd;

static struct res pasid_op(__u32 op, __u32 stdev, __u32 pasid, __u32 pt, __u32 *out)
{
	struct iommu_test_cmd c = tcmd(op, stdev);
	struct res r;

	c.pasid_attach.pasid = pasid;
	c.pasid_attach.pt_id = pt;
	r = test_cmd(fd, &c);
	if (out)
		*out = r.rc == 0 ? c.pasid_attach.pt_id : 0;
	return r;
}

#define attach(s, p, pt, o) pasid_op(IOMMU_TEST_OP_PASID_ATTACH, s, p, pt, o)
#define replace(s, p, pt, o) pasid_op(IOMMU_TEST_OP_PASID_REPLACE, s, p, pt, o)
#define detach(s, p) pasid_op(IOMMU_TEST_OP_PASID_DETACH, s, p, 0, NULL)
#define check(s, p, h) pasid_op(IOMMU_TEST_OP_PASID_CHECK_HWPT, s, p, h, NULL)

int main(int argc, char **argv)
{
	__u32 ioas, stdev, hwpt, idev, hp, hp2, hn, out, s2, h2, i2;

	if (argc != 2)
		return 2;
	fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open");
	ioas_alloc(fd, &ioas);
	step0("mock", mock_domain_flags(fd, ioas, MOCK_FLAGS_DEVICE_PASID, &stdev, &hwpt, &idev));
	{
		struct iommu_hw_info h = { .size = sizeof(h), .dev_id = idev };
		stepv("hw_info", xioctl(fd, IOMMU_GET_HW_INFO, &h), "pasid_log2=%u", h.out_max_pasid_log2);
	}
	step0("hwpt_pasid", hwpt_alloc(fd, idev, ioas, IOMMU_HWPT_ALLOC_PASID, 0, NULL, 0, &hp));
	step0("hwpt_pasid2", hwpt_alloc(fd, idev, ioas, IOMMU_HWPT_ALLOC_PASID, 0, NULL, 0, &hp2));
	step0("hwpt_plain", hwpt_alloc(fd, idev, ioas, 0, 0, NULL, 0, &hn));

	step0("attach_rid_not_compat", attach(stdev, 100, hp, &out));
	step0("replace_rid", mock_replace(fd, stdev, hp, &out));
	step0("attach_plain", attach(stdev, 100, hn, &out));
	stepv("attach", attach(stdev, 100, hp, &out), "same=%d", out == hp);
	step0("check", check(stdev, 100, hp));
	step0("check_detached", check(stdev, 100, 0));
	step0("check_other", check(stdev, 100, hn));
	step0("check_free_pasid", check(stdev, 200, 0));
	step0("check_missing_hwpt", check(stdev, 100, 999));
	step0("check_ioas", check(stdev, 100, ioas));
	step0("check_rid", check(stdev, 0, hp));
	step0("check_bad_stdev", check(999, 100, hp));
	step0("attach_again", attach(stdev, 100, hp, &out));
	step0("attach_again_ioas", attach(stdev, 100, ioas, &out));
	step0("attach_ioas", attach(stdev, 101, ioas, &out));
	step0("attach_device", attach(stdev, 101, idev, &out));
	step0("attach_missing", attach(stdev, 101, 999, &out));
	step0("attach_bad_stdev", attach(999, 101, hp, &out));
	step0("attach_idev_not_stdev", attach(idev, 101, hp, &out));
	step0("attach_pasid_too_big", attach(stdev, 1 << MOCK_PASID_WIDTH, hp, &out));
	step0("replace_rid_plain", mock_replace(fd, stdev, hn, &out));
	step0("destroy_in_use", destroy(fd, hp));

	step0("replace", replace(stdev, 100, hp2, &out));
	step0("check_replaced", check(stdev, 100, hp2));
	step0("replace_plain", replace(stdev, 100, hn, &out));
	step0("replace_not_attached", replace(stdev, 300, hp2, &out));
	step0("replace_same", replace(stdev, 100, hp2, &out));
	step0("replace_ioas", replace(stdev, 100, ioas, &out));

	/* the mock fails every second change of PASID 1024 */
	step0("attach_1024", attach(stdev, IOMMU_TEST_PASID_RESERVED, hp, &out));
	step0("replace_1024_fails", replace(stdev, IOMMU_TEST_PASID_RESERVED, hp2, &out));
	step0("check_1024_unchanged", check(stdev, IOMMU_TEST_PASID_RESERVED, hp));
	step0("replace_1024", replace(stdev, IOMMU_TEST_PASID_RESERVED, hp2, &out));
	step0("check_1024", check(stdev, IOMMU_TEST_PASID_RESERVED, hp2));
	step0("detach_1024", detach(stdev, IOMMU_TEST_PASID_RESERVED));
	step0("check_1024_detached", check(stdev, IOMMU_TEST_PASID_RESERVED, 0));

	step0("detach", detach(stdev, 100));
	step0("detach_again", detach(stdev, 100));
	step0("check_after_detach", check(stdev, 100, 0));
	step0("replace_rid_plain_now", mock_replace(fd, stdev, hn, &out));

	/* a device without PASID support */
	step0("mock_no_pasid", mock_domain(fd, hp, &s2, &h2, &i2));
	step0("attach_no_pasid_dev", attach(s2, 100, hp, &out));
	step0("destroy_no_pasid", destroy(fd, s2));

	/* a PASID still attached goes with the device */
	step0("replace_rid_back", mock_replace(fd, stdev, hp, &out));
	step0("attach_last", attach(stdev, 7, hp2, &out));
	step0("destroy_hp2_in_use", destroy(fd, hp2));
	step0("destroy_stdev", destroy(fd, stdev));
	step0("destroy_hp2", destroy(fd, hp2));
	step0("destroy_hp", destroy(fd, hp));
	return 0;
}
