/*
 * selftest_iopf PATH [plain]: fault queues (IOMMU_FAULT_QUEUE_ALLOC) with the
 * companion library preloaded: alloc, HWPT_ALLOC with FAULT_ID_VALID,
 * TRIGGER_IOPF, poll, read, page responses, bad inputs. With "plain" (a daemon
 * without test mode) only what needs no IOMMU_TEST_CMD. One STEP line per call;
 * expectations in tests/iommufd/test_selftest.py.
 */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <time.h>

#include "selftest_util.h"

static int fd;

static struct res fault_alloc(__u32 flags, __u32 *id, int *ffd)
{
	struct iommu_fault_alloc a = { .size = sizeof(a), .flags = flags };
	struct res r = xioctl(fd, IOMMU_FAULT_QUEUE_ALLOC, &a);

	*id = r.rc == 0 ? a.out_fault_id : 0;
	*ffd = r.rc == 0 ? (int)a.out_fault_fd : -1;
	return r;
}

static struct res hwpt_fault(__u32 dev, __u32 pt, __u32 flags, __u32 fault_id, __u32 *out)
{
	struct iommu_hwpt_alloc a = {
		.size = sizeof(a), .flags = flags, .dev_id = dev, .pt_id = pt, .fault_id = fault_id,
	};
	struct res r = xioctl(fd, IOMMU_HWPT_ALLOC, &a);

	*out = r.rc == 0 ? a.out_hwpt_id : 0;
	return r;
}

static struct res hwpt_nested_fault(__u32 dev, __u32 parent, __u32 fault_id, __u32 *out)
{
	struct iommu_hwpt_selftest data = { .iotlb = IOMMU_TEST_IOTLB_DEFAULT };
	struct iommu_hwpt_alloc a = {
		.size = sizeof(a), .flags = IOMMU_HWPT_FAULT_ID_VALID, .dev_id = dev, .pt_id = parent,
		.fault_id = fault_id, .data_type = IOMMU_HWPT_DATA_SELFTEST, .data_len = sizeof(data),
		.data_uptr = (uintptr_t)&data,
	};
	struct res r = xioctl(fd, IOMMU_HWPT_ALLOC, &a);

	*out = r.rc == 0 ? a.out_hwpt_id : 0;
	return r;
}

static struct res trigger(__u32 idev, __u32 pasid, __u32 grpid, __u64 addr)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_TRIGGER_IOPF, 0);

	c.trigger_iopf.dev_id = idev;
	c.trigger_iopf.pasid = pasid;
	c.trigger_iopf.grpid = grpid;
	c.trigger_iopf.perm = IOMMU_PGFAULT_PERM_READ | IOMMU_PGFAULT_PERM_WRITE;
	c.trigger_iopf.addr = addr;
	return test_cmd(fd, &c);
}

static int revents(int ffd, int timeout)
{
	struct pollfd p = { .fd = ffd, .events = POLLIN };

	return poll(&p, 1, timeout) < 0 ? -1 : p.revents;
}

static struct res respond(int ffd, __u32 cookie, __u32 code)
{
	struct iommu_hwpt_page_response r = { .cookie = cookie, .code = code };

	return xres(write(ffd, &r, sizeof(r)));
}

struct later {
	__u32 idev;
};

static void *trigger_later(void *arg)
{
	struct later *l = arg;
	struct timespec ts = { 0, 200 * 1000 * 1000 };

	nanosleep(&ts, NULL);
	trigger(l->idev, 0, 7, 0x5000);
	return NULL;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void plain(void)
{
	__u32 fault_id, ioas;
	int ffd;
	struct iommu_hwpt_pgfault rec[2];

	stepv("alloc", fault_alloc(0, &fault_id, &ffd), "id=%u fd_ok=%d cloexec=%d", fault_id, ffd > 2,
	      ffd >= 0 && (fcntl(ffd, F_GETFD) & FD_CLOEXEC) != 0);
	if (ffd < 0)
		return;
	stepv("poll_empty", xres(0), "revents=%d", revents(ffd, 0));
	step0("read_empty", xres(read(ffd, rec, sizeof(rec))));
	step0("write_no_cookie", respond(ffd, 1, 0));
	step0("ioas", ioas_alloc(fd, &ioas));
	step0("destroy_open", destroy(fd, fault_id));
	close(ffd);
	step0("destroy_closed", destroy_eventually(fd, fault_id));
}

int main(int argc, char **argv)
{
	__u32 fault_id, fault2_id, ioas, stdev, hwpt_mock, idev, hwpt, hwpt_np, nested, id;
	struct iommu_hwpt_pgfault rec[3];
	int ffd, ffd2;
	char buf[64];

	if (argc < 2)
		die("usage: selftest_iopf PATH [plain]");
	fd = open(argv[1], O_RDWR);
	if (fd < 0)
		die("open");
	if (argc > 2 && !strcmp(argv[2], "plain")) {
		plain();
		return 0;
	}

	stepv("alloc", fault_alloc(0, &fault_id, &ffd), "id=%u fd_ok=%d cloexec=%d", fault_id, ffd > 2,
	      ffd >= 0 && (fcntl(ffd, F_GETFD) & FD_CLOEXEC) != 0);
	if (ffd < 0)
		return 0;
	stepv("alloc_flags", fault_alloc(1, &id, &ffd2), "fd=%d", ffd2);
	step0("ioas", ioas_alloc(fd, &ioas));
	stepv("mock", mock_domain(fd, ioas, &stdev, &hwpt_mock, &idev), "idev=%u", idev);

	/* HWPT_ALLOC with a fault */
	step0("hwpt_bad_fault_id", hwpt_fault(idev, ioas, IOMMU_HWPT_FAULT_ID_VALID, ioas, &id));
	step0("hwpt_missing_fault_id", hwpt_fault(idev, ioas, IOMMU_HWPT_FAULT_ID_VALID, 999, &id));
	step0("hwpt_fault_nest_parent",
	      hwpt_fault(idev, ioas, IOMMU_HWPT_FAULT_ID_VALID | IOMMU_HWPT_ALLOC_NEST_PARENT, fault_id, &id));
	step0("hwpt_fault", hwpt_fault(idev, ioas, IOMMU_HWPT_FAULT_ID_VALID, fault_id, &hwpt));
	step0("destroy_fault_busy", destroy(fd, fault_id));

	/* nothing queued yet */
	stepv("poll_empty", xres(0), "revents=%d", revents(ffd, 0));
	step0("read_empty", xres(read(ffd, rec, sizeof(rec[0]))));
	step0("trigger_not_attached", trigger(idev, 0, 1, 0x1000));
	step0("read_dropped", xres(read(ffd, rec, sizeof(rec[0]))));
	step0("trigger_bad_dev", trigger(ioas, 0, 1, 0x1000));

	/* attached: records */
	step0("replace", mock_replace(fd, stdev, hwpt, NULL));
	step0("trigger", trigger(idev, 0, 2, 0xdeadbeaf));
	stepv("poll_ready", xres(0), "revents=%d", revents(ffd, 0));
	step0("read_short", xres(read(ffd, rec, sizeof(rec[0]) - 1)));
	step0("read_unaligned", xres(read(ffd, rec, sizeof(rec[0]) + 8)));
	memset(rec, 0xff, sizeof(rec));
	stepv("read", xres(read(ffd, rec, 2 * sizeof(rec[0]))),
	      "flags=%u dev_id=%u pasid=%u grpid=%u perm=%u addr=0x%llx length=%u cookie=%u reserved=%u",
	      rec[0].flags, rec[0].dev_id == idev, rec[0].pasid, rec[0].grpid, rec[0].perm,
	      (unsigned long long)rec[0].addr, rec[0].length, rec[0].cookie, rec[0].__reserved);
	stepv("poll_drained", xres(0), "revents=%d", revents(ffd, 0));
	step0("write_short", xres(write(ffd, buf, 4)));
	step0("write_bad_code", respond(ffd, rec[0].cookie, 2));
	step0("write_bad_cookie", respond(ffd, rec[0].cookie + 100, 0));
	step0("write", respond(ffd, rec[0].cookie, IOMMUFD_PAGE_RESP_SUCCESS));
	step0("write_again", respond(ffd, rec[0].cookie, IOMMUFD_PAGE_RESP_SUCCESS));

	/* two groups, one read; a partial write */
	step0("trigger_a", trigger(idev, 0, 3, 0x2000));
	step0("trigger_b", trigger(idev, 0, 4, 0x3000));
	step0("trigger_pasid_dropped", trigger(idev, 5, 9, 0x4000)); /* no PASID 5, RID not nested */
	stepv("read_one_of_two", xres(read(ffd, rec, sizeof(rec[0]))), "cookie=%u", rec[0].cookie);
	stepv("read_rest", xres(read(ffd, &rec[1], 2 * sizeof(rec[0]))),
	      "cookie=%u pasid=%u flags=%u grpid=%u", rec[1].cookie, rec[1].pasid, rec[1].flags, rec[1].grpid);
	{
		struct iommu_hwpt_page_response r[3] = {
			{ rec[0].cookie, IOMMUFD_PAGE_RESP_SUCCESS },
			{ rec[1].cookie, IOMMUFD_PAGE_RESP_INVALID },
			{ 77, 0 },
		};
		step0("write_partial", xres(write(ffd, r, sizeof(r))));
	}

	/* a blocking poll woken by a fault that arrives later */
	{
		struct later l = { idev };
		pthread_t t;
		double t0 = now();
		int ev;

		pthread_create(&t, NULL, trigger_later, &l);
		ev = revents(ffd, 5000);
		pthread_join(t, NULL);
		stepv("poll_wakeup", xres(0), "revents=%d fast=%d", ev, now() - t0 < 4);
		stepv("read_woken", xres(read(ffd, rec, sizeof(rec[0]))), "grpid=%u cookie=%u", rec[0].grpid,
		      rec[0].cookie);
	}

	/* queued faults of an attachment that ends are dropped */
	step0("trigger_before_replace", trigger(idev, 0, 8, 0x6000));
	step0("replace_back", mock_replace(fd, stdev, ioas, NULL)); /* its automatic HWPT went with the first replace */
	step0("read_after_replace", xres(read(ffd, rec, sizeof(rec[0]))));
	step0("respond_after_replace", respond(ffd, rec[0].cookie, 0));

	/* nested, with the PASID fallback to the RID's nested HWPT */
	step0("fault2", fault_alloc(0, &fault2_id, &ffd2));
	step0("parent", hwpt_fault(idev, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, 0, &hwpt_np));
	step0("nested_fault", hwpt_nested_fault(idev, hwpt_np, fault2_id, &nested));
	step0("replace_nested", mock_replace(fd, stdev, nested, NULL));
	step0("trigger_pasid", trigger(idev, 1, 2, 0xdeadbeaf));
	stepv("read_nested", xres(read(ffd2, rec, sizeof(rec[0]))), "pasid=%u flags=%u cookie=%u",
	      rec[0].pasid, rec[0].flags, rec[0].cookie);
	step0("respond_nested", respond(ffd2, rec[0].cookie, 0));
	step0("read_other_queue", xres(read(ffd, rec, sizeof(rec[0]))));

	/* lifetime */
	step0("destroy_hwpt", destroy(fd, hwpt));
	step0("destroy_fault_open", destroy(fd, fault_id));
	close(ffd);
	step0("destroy_fault", destroy_eventually(fd, fault_id));
	step0("destroy_fault_again", destroy(fd, fault_id));
	step0("destroy_fault2_in_use", destroy(fd, fault2_id));
	return 0;
}
