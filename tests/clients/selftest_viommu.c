/*
 * selftest_viommu PATH [plain]: vIOMMUs of the mock IOMMU (IOMMU_VIOMMU_ALLOC),
 * vdevices, nested HWPTs on a vIOMMU, IOMMU_HWPT_INVALIDATE of a vIOMMU read back
 * with DEV_CHECK_CACHE, and vEVENT queues (IOMMU_VEVENTQ_ALLOC, with the companion
 * library preloaded) fed by TRIGGER_VEVENT: read, lost events, poll, lifetime.
 * With "plain" the companion is not preloaded: VEVENTQ_ALLOC only.
 * One STEP line per call; expectations in tests/iommufd/test_selftest.py.
 */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <sys/wait.h>
#include <time.h>

#include "selftest_util.h"

static int fd;

struct vevent {
	struct iommufd_vevent_header hdr;
	struct iommu_viommu_event_selftest ev;
};

static struct res viommu_alloc(__u32 dev, __u32 hwpt, __u32 flags, __u32 type, void *data, __u32 len,
			       __u32 *out)
{
	struct iommu_viommu_alloc a = {
		.size = sizeof(a), .flags = flags, .type = type, .dev_id = dev, .hwpt_id = hwpt,
		.data_len = len, .data_uptr = (uintptr_t)data,
	};
	struct res r = xioctl(fd, IOMMU_VIOMMU_ALLOC, &a);

	*out = r.rc == 0 ? a.out_viommu_id : 0;
	return r;
}

static struct res vdevice_alloc(__u32 viommu, __u32 dev, __u64 virt_id, __u32 *out)
{
	struct iommu_vdevice_alloc a = { .size = sizeof(a), .viommu_id = viommu, .dev_id = dev, .virt_id = virt_id };
	struct res r = xioctl(fd, IOMMU_VDEVICE_ALLOC, &a);

	*out = r.rc == 0 ? a.out_vdevice_id : 0;
	return r;
}

static struct res veventq_alloc(__u32 viommu, __u32 flags, __u32 type, __u32 depth, __u32 reserved, __u32 *id,
				int *qfd)
{
	struct iommu_veventq_alloc a = {
		.size = sizeof(a), .flags = flags, .viommu_id = viommu, .type = type, .veventq_depth = depth,
		.__reserved = reserved,
	};
	struct res r = xioctl(fd, IOMMU_VEVENTQ_ALLOC, &a);

	*id = r.rc == 0 ? a.out_veventq_id : 0;
	*qfd = r.rc == 0 ? (int)a.out_veventq_fd : -1;
	return r;
}

static struct res hw_queue_alloc(__u32 viommu, __u32 flags, __u32 type, __u64 iova, __u64 length)
{
	struct iommu_hw_queue_alloc a = {
		.size = sizeof(a), .flags = flags, .viommu_id = viommu, .type = type,
		.nesting_parent_iova = iova, .length = length,
	};

	return xioctl(fd, IOMMU_HW_QUEUE_ALLOC, &a);
}

static struct res nested(__u32 dev, __u32 pt, __u32 flags, __u32 *out)
{
	struct iommu_hwpt_selftest data = { .iotlb = IOMMU_TEST_IOTLB_DEFAULT };

	return hwpt_alloc(fd, dev, pt, flags, IOMMU_HWPT_DATA_SELFTEST, &data, sizeof(data), out);
}

static struct res invalidate(__u32 id, __u32 type, void *entries, __u32 len, __u32 *num)
{
	struct iommu_hwpt_invalidate c = {
		.size = sizeof(c), .hwpt_id = id, .data_type = type, .data_uptr = (uintptr_t)entries,
		.entry_len = len, .entry_num = *num,
	};
	struct res r = xioctl(fd, IOMMU_HWPT_INVALIDATE, &c);

	*num = c.entry_num;
	return r;
}

static struct res inv1(__u32 viommu, __u32 flags, __u32 vdev_id, __u32 cache_id, __u32 *num)
{
	struct iommu_viommu_invalidate_selftest e = { .flags = flags, .vdev_id = vdev_id, .cache_id = cache_id };

	*num = 1;
	return invalidate(viommu, IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST, &e, sizeof(e), num);
}

static struct res check_cache(__u32 idev, __u32 cache_id, __u32 value)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_DEV_CHECK_CACHE, idev);

	c.check_dev_cache.id = cache_id;
	c.check_dev_cache.cache = value;
	return test_cmd(fd, &c);
}

/* The first cache entry that no longer holds the default, or -1. */
static int caches(__u32 idev)
{
	for (int i = 0; i < MOCK_DEV_CACHE_NUM; i++)
		if (check_cache(idev, i, IOMMU_TEST_DEV_CACHE_DEFAULT).rc)
			return i;
	return -1;
}

static int cache_mask(__u32 idev)
{
	int m = 0;

	for (int i = 0; i < MOCK_DEV_CACHE_NUM; i++)
		if (check_cache(idev, i, 0).rc == 0)
			m |= 1 << i;
	return m;
}

static struct res trigger(__u32 idev)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_TRIGGER_VEVENT, 0);

	c.trigger_vevent.dev_id = idev;
	return test_cmd(fd, &c);
}

static int revents(int qfd, int timeout)
{
	struct pollfd p = { .fd = qfd, .events = POLLIN | POLLOUT };

	return poll(&p, 1, timeout) < 0 ? -1 : p.revents;
}

struct later {
	__u32 idev;
};

static void *trigger_later(void *arg)
{
	struct later *l = arg;
	struct timespec ts = { 0, 200 * 1000 * 1000 };

	nanosleep(&ts, NULL);
	trigger(l->idev);
	return NULL;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	__u32 ioas, stdev, stdev2, hwpt_mock, hwpt_mock2, idev, idev2, parent, paging, viommu, viommu2, vdev, vdev2,
		id, nest, qid, qid2, num;
	struct iommu_viommu_selftest data = { .in_data = 0xbadbeef };
	struct vevent ev[4];
	int qfd, qfd2, plain = argc > 2 && !strcmp(argv[2], "plain");

	if (argc < 2)
		die("usage: selftest_viommu PATH [plain]");
	fd = open(argv[1], O_RDWR);
	if (fd < 0)
		die("open");

	step0("ioas", ioas_alloc(fd, &ioas));
	step0("mock", mock_domain(fd, ioas, &stdev, &hwpt_mock, &idev));
	step0("mock2", mock_domain(fd, ioas, &stdev2, &hwpt_mock2, &idev2));
	step0("parent", hwpt_alloc(fd, idev, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, IOMMU_HWPT_DATA_NONE, NULL, 0,
				    &parent));
	step0("paging", hwpt_alloc(fd, idev, ioas, 0, IOMMU_HWPT_DATA_NONE, NULL, 0, &paging));

	if (plain) {
		step0("viommu", viommu_alloc(idev, parent, 0, IOMMU_VIOMMU_TYPE_SELFTEST, &data, sizeof(data), &viommu));
		step0("veventq", veventq_alloc(viommu, 0, IOMMU_VEVENTQ_TYPE_SELFTEST, 2, 0, &qid, &qfd));
		/* FUSE answers mmap() of the direct-I/O iommufd itself */
		step0("mmap", xres(mmap(NULL, data.out_mmap_length, PROT_READ, MAP_SHARED, fd, data.out_mmap_offset) ==
					   MAP_FAILED ? -1 : 0));
		/* left for the release: destroying the device there takes its vdevice too */
		step0("vdev", vdevice_alloc(viommu, idev, 0x99, &vdev));
		return 0;
	}

	/* IOMMU_VIOMMU_ALLOC */
	step0("viommu_flags", viommu_alloc(idev, parent, 1, IOMMU_VIOMMU_TYPE_SELFTEST, NULL, 0, &id));
	step0("viommu_type_default", viommu_alloc(idev, parent, 0, IOMMU_VIOMMU_TYPE_DEFAULT, NULL, 0, &id));
	step0("viommu_bad_dev", viommu_alloc(ioas, parent, 0, IOMMU_VIOMMU_TYPE_SELFTEST, NULL, 0, &id));
	step0("viommu_type_smmu", viommu_alloc(idev, parent, 0, IOMMU_VIOMMU_TYPE_ARM_SMMUV3, NULL, 0, &id));
	step0("viommu_bad_hwpt", viommu_alloc(idev, ioas, 0, IOMMU_VIOMMU_TYPE_SELFTEST, NULL, 0, &id));
	step0("viommu_not_parent", viommu_alloc(idev, paging, 0, IOMMU_VIOMMU_TYPE_SELFTEST, NULL, 0, &id));
	step0("viommu_data_short", viommu_alloc(idev, parent, 0, IOMMU_VIOMMU_TYPE_SELFTEST, &data, 4, &id));
	step0("viommu_data_null", viommu_alloc(idev, parent, 0, IOMMU_VIOMMU_TYPE_SELFTEST, NULL, sizeof(data), &id));
	stepv("viommu", viommu_alloc(idev, parent, 0, IOMMU_VIOMMU_TYPE_SELFTEST, &data, sizeof(data), &viommu),
	      "out_data=0x%x mmap_len=%llu mmap_off_ok=%d", data.out_data, (unsigned long long)data.out_mmap_length,
	      data.out_mmap_offset >= PAGE && data.out_mmap_offset % PAGE == 0);
	step0("viommu2", viommu_alloc(idev, parent, 0, IOMMU_VIOMMU_TYPE_SELFTEST, NULL, 0, &viommu2));

	/* mmap() of the vIOMMU's region, through the companion */
	{
		struct iommu_viommu_selftest d3 = { .in_data = 0x5eed };
		__u32 viommu3;
		__u64 off, len;
		__u32 *m, *m2;
		int status;
		pid_t child;

		step0("viommu3", viommu_alloc(idev, parent, 0, IOMMU_VIOMMU_TYPE_SELFTEST, &d3, sizeof(d3), &viommu3));
		off = d3.out_mmap_offset;
		len = d3.out_mmap_length;
		step0("mmap_past_start", xres(mmap(NULL, len, PROT_READ, MAP_SHARED, fd, off + PAGE) == MAP_FAILED ? -1 : 0));
		step0("mmap_half", xres(mmap(NULL, len / 2, PROT_READ, MAP_SHARED, fd, off) == MAP_FAILED ? -1 : 0));
		step0("mmap_double", xres(mmap(NULL, len * 2, PROT_READ, MAP_SHARED, fd, off) == MAP_FAILED ? -1 : 0));
		step0("mmap_none", xres(mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 64 * MIB) == MAP_FAILED ? -1 : 0));
		step0("mmap_private", xres(mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, off) == MAP_FAILED ? -1 : 0));
		step0("mmap_exec", xres(mmap(NULL, len, PROT_READ | PROT_EXEC, MAP_SHARED, fd, off) == MAP_FAILED ? -1 : 0));
		m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off);
		stepv("mmap", xres(m == MAP_FAILED ? -1 : 0), "in_data=0x%x", m == MAP_FAILED ? 0 : *m);
		m2 = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, off);
		stepv("mmap_twice", xres(m2 == MAP_FAILED ? -1 : 0), "in_data=0x%x", m2 == MAP_FAILED ? 0 : *m2);
		step0("mmap_destroy_busy", destroy(fd, viommu3));
		if (m != MAP_FAILED)
			munmap(m, len);
		if (m2 != MAP_FAILED) {
			/* a forked child keeps the mapping (and the vIOMMU) after the parent's munmap */
			child = fork();
			if (child == 0) {
				sleep(1);
				_exit(*m2 == 0x5eed ? 0 : 1);
			}
			munmap(m2, len);
			step0("mmap_child_busy", destroy(fd, viommu3));
			waitpid(child, &status, 0);
			stepv("mmap_child", xres(0), "ok=%d", WIFEXITED(status) && WEXITSTATUS(status) == 0);
		}
		step0("mmap_destroy", destroy_eventually(fd, viommu3));
		step0("mmap_gone", xres(mmap(NULL, len, PROT_READ, MAP_SHARED, fd, off) == MAP_FAILED ? -1 : 0));
	}
	step0("destroy_parent_busy", destroy(fd, parent));

	/* IOMMU_VDEVICE_ALLOC */
	step0("vdev_bad_viommu", vdevice_alloc(ioas, idev, 0x99, &id));
	step0("vdev_bad_dev", vdevice_alloc(viommu, ioas, 0x99, &id));
	step0("vdev", vdevice_alloc(viommu, idev, 0x99, &vdev));
	step0("vdev_again", vdevice_alloc(viommu, idev, 0x98, &id));
	step0("vdev_other_viommu", vdevice_alloc(viommu2, idev, 0x97, &id));
	step0("vdev_id_taken", vdevice_alloc(viommu, idev2, 0x99, &id));
	step0("vdev2", vdevice_alloc(viommu, idev2, 0x88, &vdev2));
	step0("destroy_viommu_busy", destroy(fd, viommu));

	/* nested HWPT on the vIOMMU */
	step0("nest_bad_flags", nested(idev, viommu, IOMMU_HWPT_ALLOC_NEST_PARENT, &id));
	step0("nest_no_data", hwpt_alloc(fd, idev, viommu, 0, IOMMU_HWPT_DATA_NONE, NULL, 0, &id));
	step0("nest", nested(idev, viommu2, 0, &id));
	step0("replace_no_vdev", mock_replace(fd, stdev, id, NULL)); /* no vdevice on viommu2 */
	step0("destroy_nest_viommu2", destroy(fd, id));
	step0("nest_viommu", nested(idev, viommu, 0, &nest));
	step0("replace", mock_replace(fd, stdev, nest, NULL));
	step0("destroy_nest_busy", destroy(fd, nest));

	/* IOMMU_HWPT_INVALIDATE on the vIOMMU */
	stepv("cache_default", xres(0), "first_changed=%d", caches(idev));
	num = 0;
	stepv("inv_empty", invalidate(viommu, IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST, NULL, 0, &num), "num=%u", num);
	num = 0;
	stepv("inv_empty_bad_type", invalidate(viommu, IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID, NULL, 0, &num),
	      "num=%u", num);
	{
		struct iommu_viommu_invalidate_selftest e = { .vdev_id = 0x99, .cache_id = 1 };

		num = 1;
		stepv("inv_bad_type", invalidate(viommu, IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST_INVALID, &e, sizeof(e),
						 &num), "num=%u", num);
	}
	stepv("inv_bad_flags", inv1(viommu, 0xffff, 0x99, 1, &num), "num=%u", num);
	stepv("inv_bad_cache_id", inv1(viommu, 0, 0x99, MOCK_DEV_CACHE_ID_MAX + 1, &num), "num=%u", num);
	stepv("inv_bad_vdev_id", inv1(viommu, 0, 0x77, 1, &num), "num=%u", num);
	stepv("inv_one", inv1(viommu, 0, 0x99, 1, &num), "num=%u mask=%d", num, cache_mask(idev));
	{
		struct iommu_viommu_invalidate_selftest e[3] = {
			{ .vdev_id = 0x88, .cache_id = 0 },
			{ .vdev_id = 0x88, .cache_id = 3 },
			{ .flags = 0xf0, .vdev_id = 0x88, .cache_id = 2 },
		};

		num = 3;
		stepv("inv_partial", invalidate(viommu, IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST, e, sizeof(e[0]), &num),
		      "num=%u mask=%d", num, cache_mask(idev2));
		num = 2;
		stepv("inv_bad_ptr", invalidate(viommu, IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST, (void *)8, sizeof(e[0]),
						&num), "num=%u", num);
	}
	stepv("inv_all", inv1(viommu, IOMMU_TEST_INVALIDATE_FLAG_ALL, 0x99, MOCK_DEV_CACHE_ID_MAX, &num),
	      "num=%u mask=%d", num, cache_mask(idev));

	/* HW queues: mainline's checks up to the vIOMMU */
	step0("hwq_flags", hw_queue_alloc(viommu, 1, IOMMU_HW_QUEUE_TYPE_SELFTEST, 0, 4096));
	step0("hwq_type_default", hw_queue_alloc(viommu, 0, IOMMU_HW_QUEUE_TYPE_DEFAULT, 0, 4096));
	step0("hwq_length0", hw_queue_alloc(viommu, 0, IOMMU_HW_QUEUE_TYPE_SELFTEST, 0, 0));
	step0("hwq_wraps", hw_queue_alloc(viommu, 0, IOMMU_HW_QUEUE_TYPE_SELFTEST, ~0ull - 4095, 8192));
	step0("hwq_bad_viommu", hw_queue_alloc(ioas, 0, IOMMU_HW_QUEUE_TYPE_SELFTEST, 0, 4096));
	{
		/* the mock's HW queues, on memory of the parent's IOAS (two areas, one page each) */
		__u64 iova = MOCK_APERTURE_START;
		char *buf = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		struct iommu_hw_queue_alloc a = {
			.size = sizeof(a), .viommu_id = viommu, .type = IOMMU_HW_QUEUE_TYPE_SELFTEST,
			.nesting_parent_iova = iova, .length = PAGE,
		};
		__u32 q0 = 0, q1 = 0;

		memset(buf, 1, 2 * PAGE);
		step0("hwq_unmapped", hw_queue_alloc(viommu, 0, IOMMU_HW_QUEUE_TYPE_SELFTEST, iova, PAGE));
		step0("hwq_map", ioas_map(fd, ioas, buf, PAGE, iova));
		step0("hwq_map2", ioas_map(fd, ioas, buf + PAGE, PAGE, iova + PAGE));
		step0("hwq_other_type", hw_queue_alloc(viommu, 0, IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV, iova, PAGE));
		a.index = 1;
		step0("hwq_index1_first", xioctl(fd, IOMMU_HW_QUEUE_ALLOC, &a));
		a.index = IOMMU_TEST_HW_QUEUE_MAX;
		step0("hwq_index_max", xioctl(fd, IOMMU_HW_QUEUE_ALLOC, &a));
		a.index = 0;
		a.length = 2 * PAGE; /* two maps: not physically contiguous */
		step0("hwq_not_contiguous", xioctl(fd, IOMMU_HW_QUEUE_ALLOC, &a));
		a.length = PAGE;
		stepv("hwq0", xioctl(fd, IOMMU_HW_QUEUE_ALLOC, &a), "id_ok=%d", (q0 = a.out_hw_queue_id) != 0);
		step0("hwq0_again", xioctl(fd, IOMMU_HW_QUEUE_ALLOC, &a));
		step0("hwq_unmap_pinned", ioas_unmap(fd, ioas, iova, PAGE));
		step0("hwq_unmap_other", ioas_unmap(fd, ioas, iova + PAGE, PAGE));
		a.index = 1;
		a.nesting_parent_iova = iova + PAGE / 2; /* unaligned, inside the same page */
		a.length = PAGE / 2;
		stepv("hwq1", xioctl(fd, IOMMU_HW_QUEUE_ALLOC, &a), "id_ok=%d", (q1 = a.out_hw_queue_id) != 0);
		step0("hwq_destroy_busy", destroy(fd, q0)); /* queue 1 depends on it */
		step0("hwq_destroy_viommu_busy", destroy(fd, viommu));
		step0("hwq_destroy1", destroy(fd, q1));
		step0("hwq_destroy0", destroy(fd, q0));
		step0("hwq_unmap", ioas_unmap(fd, ioas, iova, PAGE));
		munmap(buf, 2 * PAGE);
	}

	/* vEVENT queues */
	step0("trigger_no_queue", trigger(idev));
	step0("trigger_not_attached", trigger(idev2));
	step0("veventq_flags", veventq_alloc(viommu, 1, IOMMU_VEVENTQ_TYPE_SELFTEST, 2, 0, &id, &qfd));
	step0("veventq_reserved", veventq_alloc(viommu, 0, IOMMU_VEVENTQ_TYPE_SELFTEST, 2, 1, &id, &qfd));
	step0("veventq_type_default", veventq_alloc(viommu, 0, IOMMU_VEVENTQ_TYPE_DEFAULT, 2, 0, &id, &qfd));
	step0("veventq_depth0", veventq_alloc(viommu, 0, IOMMU_VEVENTQ_TYPE_SELFTEST, 0, 0, &id, &qfd));
	step0("veventq_depth_over", veventq_alloc(viommu, 0, IOMMU_VEVENTQ_TYPE_SELFTEST, (1u << 19) + 1, 0, &id, &qfd));
	step0("veventq_depth_max", veventq_alloc(viommu, 0, IOMMU_VEVENTQ_TYPE_SELFTEST, 1u << 19, 0, &id, &qfd));
	if (qfd >= 0) {
		close(qfd);
		step0("destroy_veventq_max", destroy_eventually(fd, id));
	}
	step0("veventq_bad_viommu", veventq_alloc(ioas, 0, IOMMU_VEVENTQ_TYPE_SELFTEST, 2, 0, &id, &qfd));
	stepv("veventq", veventq_alloc(viommu, 0, IOMMU_VEVENTQ_TYPE_SELFTEST, 2, 0, &qid, &qfd),
	      "fd_ok=%d cloexec=%d", qfd > 2, qfd >= 0 && (fcntl(qfd, F_GETFD) & FD_CLOEXEC) != 0);
	if (qfd < 0)
		return 0;
	step0("veventq_same_type", veventq_alloc(viommu, 0, IOMMU_VEVENTQ_TYPE_SELFTEST, 2, 0, &id, &qfd2));
	step0("veventq_other_type", veventq_alloc(viommu, 0, IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, 2, 0, &qid2, &qfd2));
	stepv("poll_empty", xres(0), "revents=%d", revents(qfd, 0));
	step0("read_empty", xres(read(qfd, ev, sizeof(ev))));
	step0("read_zero", xres(read(qfd, ev, 0)));
	step0("read_below_header", xres(read(qfd, ev, sizeof(struct iommufd_vevent_header) - 1)));
	step0("write", xres(write(qfd, ev, sizeof(ev[0]))));

	step0("trigger", trigger(idev));
	stepv("poll_ready", xres(0), "revents=%d", revents(qfd, 0));
	step0("read_too_short", xres(read(qfd, ev, sizeof(ev[0]) - 1)));
	memset(ev, 0xff, sizeof(ev));
	stepv("read", xres(read(qfd, ev, sizeof(ev))), "flags=%u seq=%u virt_id=0x%x", ev[0].hdr.flags,
	      ev[0].hdr.sequence, ev[0].ev.virt_id);
	stepv("poll_drained", xres(0), "revents=%d", revents(qfd, 0));

	/* depth 2: the third and fourth are lost; one header stands for them */
	step0("trigger_a", trigger(idev));
	step0("trigger_b", trigger(idev));
	step0("trigger_c", trigger(idev));
	step0("trigger_d", trigger(idev));
	memset(ev, 0xff, sizeof(ev));
	stepv("read_overflow", xres(read(qfd, ev, sizeof(ev))),
	      "seq0=%u flags0=%u seq1=%u flags1=%u lost_flags=%u lost_seq=%u", ev[0].hdr.sequence, ev[0].hdr.flags,
	      ev[1].hdr.sequence, ev[1].hdr.flags, ((struct iommufd_vevent_header *)&ev[2])->flags,
	      ((struct iommufd_vevent_header *)&ev[2])->sequence);
	/* a lost header followed by a new event: the header goes, the sequence tells */
	step0("trigger_e", trigger(idev));
	step0("trigger_f", trigger(idev));
	step0("trigger_g", trigger(idev));
	step0("trigger_h", trigger(idev));
	stepv("read_one", xres(read(qfd, ev, sizeof(ev[0]))), "seq=%u", ev[0].hdr.sequence);
	step0("trigger_i", trigger(idev)); /* room again: the lost header at the tail is replaced */
	memset(ev, 0xff, sizeof(ev));
	stepv("read_rest", xres(read(qfd, ev, sizeof(ev))), "seq0=%u seq1=%u flags1=%u", ev[0].hdr.sequence,
	      ev[1].hdr.sequence, ev[1].hdr.flags);

	/* a blocking poll woken by an event that arrives later */
	{
		struct later l = { idev };
		pthread_t t;
		double t0 = now();
		int rev;

		pthread_create(&t, NULL, trigger_later, &l);
		rev = revents(qfd, 5000);
		pthread_join(t, NULL);
		stepv("poll_wakeup", xres(0), "revents=%d fast=%d", rev, now() - t0 < 4);
		stepv("read_woken", xres(read(qfd, ev, sizeof(ev))), "virt_id=0x%x", ev[0].ev.virt_id);
	}

	/* detached: no vIOMMU for the device any more */
	step0("replace_back", mock_replace(fd, stdev, ioas, NULL));
	step0("trigger_detached", trigger(idev));

	/* lifetime */
	step0("destroy_viommu_in_use", destroy(fd, viommu));
	step0("destroy_veventq_open", destroy(fd, qid));
	close(qfd);
	step0("destroy_veventq", destroy_eventually(fd, qid));
	step0("destroy_nest", destroy(fd, nest));
	step0("destroy_vdev", destroy(fd, vdev));
	step0("destroy_vdev_again", destroy(fd, vdev));
	close(qfd2);
	step0("destroy_veventq2", destroy_eventually(fd, qid2));
	step0("destroy_stdev2", destroy(fd, stdev2)); /* its vdevice goes with the device */
	step0("destroy_vdev2_gone", destroy(fd, vdev2));
	step0("destroy_viommu", destroy(fd, viommu));
	step0("destroy_viommu2", destroy(fd, viommu2));
	step0("destroy_parent", destroy(fd, parent));
	return 0;
}
