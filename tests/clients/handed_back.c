/* Files handed back by the daemon, used: a device file from VFIO_GROUP_GET_DEVICE_FD
 * and a fault queue's file from IOMMU_FAULT_QUEUE_ALLOC; and the same calls on files
 * that are not the daemon's, which must get the kernel's own answers. Built -static
 * by the tests, so no companion can reach it: under `iommufd-cuse run` the files come
 * through the seccomp filter.
 *
 *   handed_back <dev dir> <group> <bdf>
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "stepper.h"

static struct res fault_alloc(int fd, __u32 *id, __u32 *qfd)
{
	struct iommu_fault_alloc a = { .size = sizeof(a) };
	struct res r = xioctl(fd, IOMMU_FAULT_QUEUE_ALLOC, &a);

	*id = a.out_fault_id;
	*qfd = a.out_fault_fd;
	return r;
}

int main(int argc, char **argv)
{
	char path[4096];
	__u32 fault_id, qfd;

	if (argc < 4)
		return 2;
	const char *bdf = argv[3];

	snprintf(path, sizeof(path), "%s/vfio/vfio", argv[1]);
	int c = open(path, O_RDWR);
	step0("open_container", xres(c));
	snprintf(path, sizeof(path), "%s/vfio/%s", argv[1], argv[2]);
	int g = open(path, O_RDWR);
	step0("open_group", xres(g));
	if (c < 0 || g < 0)
		return 1;
	step0("set_container", xioctl(g, VFIO_GROUP_SET_CONTAINER, &c));
	step0("set_iommu", xres(ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));

	int dev = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, bdf);
	step0("get_device_fd", xres(dev));
	if (dev < 0)
		return 1;
	step("device_cloexec", xres(fcntl(dev, F_GETFD)), "set=%d", !!(fcntl(dev, F_GETFD) & FD_CLOEXEC));
	struct vfio_device_info info = { .argsz = sizeof(info) };
	struct res r = xioctl(dev, VFIO_DEVICE_GET_INFO, &info);
	step("device_info", r, "regions=%u irqs=%u", info.num_regions, info.num_irqs);
	uint32_t id = 0;
	r = xres(pread(dev, &id, 4, 0));
	step("edu_id", r, "id=0x%x", id);

	snprintf(path, sizeof(path), "%s/iommu", argv[1]);
	int iommufd = open(path, O_RDWR);
	step0("open_iommufd", xres(iommufd));
	r = fault_alloc(iommufd, &fault_id, &qfd);
	step("fault_alloc", r, "fd=%d", (int)qfd);
	if (r.rc == 0) {
		int q = (int)qfd;
		struct iommu_hwpt_pgfault buf[2];
		struct pollfd p = { .fd = q, .events = POLLIN | POLLOUT };

		step("fault_cloexec", xres(fcntl(q, F_GETFD)), "set=%d", !!(fcntl(q, F_GETFD) & FD_CLOEXEC));
		r = xres(poll(&p, 1, 0));
		step("fault_poll", r, "revents=0x%x", p.revents);
		step0("fault_read_empty", xres(read(q, buf, sizeof(buf))));
		step0("fault_read_partial", xres(read(q, buf, sizeof(buf[0]) + 1)));
		step0("fault_destroy_open", destroy(iommufd, fault_id)); /* the file holds it */
		close(q);
		/* The release of a FUSE file is asynchronous: wait for the daemon to see it. */
		for (int i = 0; i < 200; i++) {
			r = destroy(iommufd, fault_id);
			if (r.rc == 0 || r.err != EBUSY)
				break;
			usleep(10000);
		}
		step0("fault_destroy_closed", r);
	}
	struct iommu_fault_alloc bad = { .size = sizeof(bad), .flags = 1 };
	step0("fault_alloc_bad_flags", xioctl(iommufd, IOMMU_FAULT_QUEUE_ALLOC, &bad));
	step0("fault_alloc_bad_pointer", xioctl(iommufd, IOMMU_FAULT_QUEUE_ALLOC, (void *)8));

	/* Files that are not the daemon's: the kernel's answers. */
	int null = open("/dev/null", O_RDWR);
	step0("fault_alloc_devnull", fault_alloc(null, &fault_id, &qfd));
	step0("fault_alloc_bad_fd", fault_alloc(999, &fault_id, &qfd));
	step0("get_device_fd_devnull", xres(ioctl(null, VFIO_GROUP_GET_DEVICE_FD, bdf)));
	step0("get_device_fd_on_iommufd", xres(ioctl(iommufd, VFIO_GROUP_GET_DEVICE_FD, bdf)));
	close(dev);
	return 0;
}
