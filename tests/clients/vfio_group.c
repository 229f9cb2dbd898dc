/* The legacy VFIO group path, as QEMU's `-device vfio-pci,host=BDF` and DPDK take it:
 * /dev/vfio/<group>, /dev/vfio/vfio (an iommufd), SET_CONTAINER, SET_IOMMU, MAP_DMA,
 * GET_DEVICE_FD by name, then the device. Bad inputs on the way, one STEP line each.
 *
 *   vfio_group <dev dir> <group> <bdf> <bdf of another group> <cdev of bdf>
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "stepper.h"

#define IOVA 0x100000ull
#define EDU_BUFFER 0x40000ull
#define REGION(i) ((uint64_t)(i) << 40)

static int devfd;

static uint32_t rd(uint64_t reg)
{
	uint32_t v = 0;

	if (pread(devfd, &v, 4, REGION(0) + reg) != 4)
		die("pread BAR0");
	return v;
}

static void wr64(uint64_t reg, uint64_t v)
{
	if (pwrite(devfd, &v, 8, REGION(0) + reg) != 8)
		die("pwrite BAR0");
}

/* One edu DMA, polled until the command's start bit clears. */
static void edu_dma(uint64_t src, uint64_t dst, uint64_t n, uint64_t cmd)
{
	wr64(0x80, src);
	wr64(0x88, dst);
	wr64(0x90, n);
	wr64(0x98, cmd | 1);
	for (int i = 0; i < 100000 && (rd(0x98) & 1); i++)
		usleep(100);
}

static struct res group_status(int g, uint32_t argsz, uint32_t *flags)
{
	struct vfio_group_status st = { .argsz = argsz };
	struct res r = xioctl(g, VFIO_GROUP_GET_STATUS, &st);

	*flags = st.flags;
	return r;
}

static struct res set_container(int g, int fd)
{
	return xioctl(g, VFIO_GROUP_SET_CONTAINER, &fd);
}

int main(int argc, char **argv)
{
	char path[4096], other[256];
	uint32_t flags;

	if (argc < 6)
		return 2;
	snprintf(path, sizeof(path), "%s/vfio/%s", argv[1], argv[2]);
	const char *bdf = argv[3];

	int g = open(path, O_RDWR);
	step0("open_group", xres(g));
	if (g < 0)
		return 1;
	step0("open_group_again", xres(open(path, O_RDWR)));
	step0("status_short", group_status(g, 4, &flags));
	struct res r = group_status(g, sizeof(struct vfio_group_status), &flags);
	step("status", r, "flags=%u", flags);
	step0("get_device_no_container", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, bdf)));
	step0("set_container_bad_fd", set_container(g, -1));
	int closed = open(argv[1], O_RDONLY);
	close(closed);
	step0("set_container_closed_fd", set_container(g, closed));
	int pipefd[2];
	if (pipe(pipefd))
		die("pipe");
	step0("set_container_pipe", set_container(g, pipefd[0]));
	step0("set_container_group", set_container(g, g));
	step0("unset_container_none", xres(ioctl(g, VFIO_GROUP_UNSET_CONTAINER)));

	snprintf(path, sizeof(path), "%s/vfio/vfio", argv[1]);
	int c = open(path, O_RDWR);
	step0("open_container", xres(c));
	step0("api_version", xres(ioctl(c, VFIO_GET_API_VERSION)));
	step0("ext_type1v2", xres(ioctl(c, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)));
	step0("set_iommu_no_group", xres(ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));
	step0("set_container", set_container(g, c));
	step0("set_container_again", set_container(g, c));
	r = group_status(g, sizeof(struct vfio_group_status), &flags);
	step("status_set", r, "flags=%u", flags);
	step0("set_iommu", xres(ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));

	char *buf = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED)
		die("mmap");
	struct vfio_iommu_type1_dma_map map = { .argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)buf, .iova = IOVA, .size = 1 << 20 };
	step0("map_dma", xioctl(c, VFIO_IOMMU_MAP_DMA, &map));

	/* Names: mainline's vfio-pci match. */
	snprintf(other, sizeof(other), "%sx", bdf);
	step0("name_trailing_garbage", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, other)));
	snprintf(other, sizeof(other), "%s junk", bdf);
	step0("name_unknown_option", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, other)));
	snprintf(other, sizeof(other), "%s vf_token=bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3", bdf);
	step0("name_vf_token", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, other)));
	snprintf(other, sizeof(other), "%s vf_token=nonsense", bdf);
	step0("name_bad_token", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, other)));
	step0("name_other_group", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, argv[4])));
	step0("name_prefix", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, "0000:00")));
	step0("name_null", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, NULL)));
	char *page = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(page, 'a', 8192);
	step0("name_too_long", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, page)));
	munmap(page + 4096, 4096);
	memcpy(page + 4096 - 5, "abcde", 5);
	step0("name_runs_into_hole", xres(ioctl(g, VFIO_GROUP_GET_DEVICE_FD, page + 4096 - 5)));
	snprintf(other, sizeof(other), "%s ", bdf);
	devfd = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, other);
	step0("get_device_fd", xres(devfd));
	if (devfd < 0)
		return 1;
	step("cloexec", xres(fcntl(devfd, F_GETFD)), "set=%d", !!(fcntl(devfd, F_GETFD) & FD_CLOEXEC));
	int devfd2 = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, bdf);
	step0("get_device_fd_again", xres(devfd2));

	struct vfio_device_info info = { .argsz = sizeof(info) };
	r = xioctl(devfd, VFIO_DEVICE_GET_INFO, &info);
	step("device_info", r, "flags=%#x regions=%u irqs=%u", info.flags, info.num_regions, info.num_irqs);
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = c };
	step0("bind_on_group_device", xioctl(devfd, VFIO_DEVICE_BIND_IOMMUFD, &bind));
	struct vfio_device_attach_iommufd_pt at = { .argsz = sizeof(at), .pt_id = 1 };
	step0("attach_on_group_device", xioctl(devfd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at));
	/* The cdev of a device whose group is open cannot be bound. */
	int cdev = open(argv[5], O_RDWR);
	step0("open_cdev", xres(cdev));
	step0("bind_cdev_group_open", xioctl(cdev, VFIO_DEVICE_BIND_IOMMUFD, &bind));
	close(cdev);

	/* edu, through the compat IOAS the group's device was attached to. */
	step("edu_id", xres(0), "id=%#x", rd(0));
	uint16_t cmd;
	if (pread(devfd, &cmd, 2, REGION(VFIO_PCI_CONFIG_REGION_INDEX) + 4) != 2)
		die("pread config");
	cmd |= 0x6; /* memory, bus master */
	if (pwrite(devfd, &cmd, 2, REGION(VFIO_PCI_CONFIG_REGION_INDEX) + 4) != 2)
		die("pwrite config");
	for (int i = 0; i < 256; i++)
		buf[i] = (char)(i * 7 + 1);
	edu_dma(IOVA, EDU_BUFFER, 256, 0);
	edu_dma(EDU_BUFFER, IOVA + 0x1000, 256, 2);
	step("edu_dma", xres(0), "same=%d", !memcmp(buf, buf + 0x1000, 256));

	/* Device files hold the group: its file closed, the group stays open. */
	close(g);
	snprintf(path, sizeof(path), "%s/vfio/%s", argv[1], argv[2]);
	int g2 = -1;
	for (int i = 0; i < 50; i++) {
		g2 = open(path, O_RDWR);
		if (g2 >= 0 || errno != EBUSY)
			break;
		usleep(2000);
	}
	step0("reopen_while_devices_open", xres(g2));
	step("edu_after_group_close", xres(0), "id=%#x", rd(0));
	close(devfd2);
	close(devfd);
	/* Release is asynchronous with FUSE: wait for it. */
	for (int i = 0; i < 500 && g2 < 0; i++) {
		g2 = open(path, O_RDWR);
		if (g2 < 0)
			usleep(2000);
	}
	step0("reopen_after_close", xres(g2));
	r = group_status(g2, sizeof(struct vfio_group_status), &flags);
	step("status_reopened", r, "flags=%u", flags);
	step0("set_container_reopened", set_container(g2, c));
	step0("unset_container", xres(ioctl(g2, VFIO_GROUP_UNSET_CONTAINER)));
	step0("unset_container_again", xres(ioctl(g2, VFIO_GROUP_UNSET_CONTAINER)));
	step0("unknown_ioctl", xres(ioctl(g2, VFIO_GET_API_VERSION)));
	close(g2);
	close(c);
	return 0;
}
