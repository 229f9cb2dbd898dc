/*
 * guest_vfio_edu: runs INSIDE a QEMU guest that has a vIOMMU (intel-iommu, intel_iommu=on): a userspace
 * VFIO driver of the guest's own kernel (type1 container) for the daemon's edu. It binds the edu to the
 * guest's vfio-pci, maps a buffer at IOVAs it chose (MAP_DMA), moves data RAM -> device -> RAM, unmaps the
 * destination page and lets the device write there again: the guest's IOMMU no longer maps it, so QEMU has
 * unmapped it from the daemon's IOAS too, and the daemon's IOMMU refuses the write (a fault it records).
 * One STEP line per step (stepper.h).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "stepper.h"

#define IOVA 0x1230000ull /* the driver's choice: below edu's 28-bit DMA mask, far from its RAM's GPAs */
#define EDU_BUF 0x40000ull
#define LEN 2048
#define PAGE 4096
#define REGION(i) ((uint64_t)(i) << 40)

static int devfd;

static uint32_t rd32(uint64_t reg)
{
	uint32_t v = 0;
	pread(devfd, &v, 4, REGION(0) + reg);
	return v;
}

static uint64_t rd64(uint64_t reg)
{
	uint64_t v = 0;
	pread(devfd, &v, 8, REGION(0) + reg);
	return v;
}

static void wr64(uint64_t reg, uint64_t v)
{
	pwrite(devfd, &v, 8, REGION(0) + reg);
}

static int dma(uint64_t src, uint64_t dst, uint64_t cmd)
{
	wr64(0x80, src);
	wr64(0x88, dst);
	wr64(0x90, LEN);
	wr64(0x98, cmd | 1);
	for (int i = 0; i < 100000; i++)
		if (!(rd64(0x98) & 1))
			return 0;
	return -1;
}

static int write_file(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0)
		return -1;
	int rc = write(fd, s, strlen(s)) == (ssize_t)strlen(s) ? 0 : -1;
	close(fd);
	return rc;
}

static int is_edu(const char *dir)
{
	char p[1100], buf[32] = "";
	snprintf(p, sizeof(p), "%s/vendor", dir);
	int fd = open(p, O_RDONLY);
	if (fd < 0)
		return 0;
	read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (strtoul(buf, NULL, 16) != 0x1234)
		return 0;
	snprintf(p, sizeof(p), "%s/device", dir);
	fd = open(p, O_RDONLY);
	memset(buf, 0, sizeof(buf));
	read(fd, buf, sizeof(buf) - 1);
	close(fd);
	return strtoul(buf, NULL, 16) == 0x11e8;
}

int main(void)
{
	char dir[300] = "", bdf[256] = "", p[300], link[300];
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	while (d && (e = readdir(d))) {
		snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s", e->d_name);
		if (e->d_name[0] != '.' && is_edu(p)) {
			snprintf(dir, sizeof(dir), "%s", p);
			snprintf(bdf, sizeof(bdf), "%s", e->d_name);
			break;
		}
	}
	step("FIND_EDU", xres(dir[0] ? 0 : -1), "dev=%s", dir[0] ? bdf : "none");
	if (!dir[0])
		return 1;
	snprintf(p, sizeof(p), "%s/driver_override", dir);
	struct res r = xres(write_file(p, "vfio-pci"));
	if (!r.rc)
		r = xres(write_file("/sys/bus/pci/drivers/vfio-pci/bind", bdf));
	step0("BIND_VFIO_PCI", r);
	snprintf(p, sizeof(p), "%s/iommu_group", dir);
	ssize_t n = readlink(p, link, sizeof(link) - 1);
	if (n <= 0)
		return 1;
	link[n] = 0;
	snprintf(p, sizeof(p), "/dev/vfio/%s", basename(link));
	int group = open(p, O_RDWR), container = open("/dev/vfio/vfio", O_RDWR);
	step("OPEN", xres(group < 0 || container < 0 ? -1 : 0), "group=%s", basename(link));
	struct vfio_group_status st = { .argsz = sizeof(st) };
	step("GROUP_STATUS", xioctl(group, VFIO_GROUP_GET_STATUS, &st), "flags=%u", st.flags);
	step0("SET_CONTAINER", xioctl(group, VFIO_GROUP_SET_CONTAINER, &container));
	step0("SET_IOMMU", xres(ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));
	devfd = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
	step0("GET_DEVICE_FD", xres(devfd));
	if (devfd < 0)
		return 1;

	uint8_t *buf = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	uint8_t *a = buf, *b = buf + PAGE;
	for (int i = 0; i < LEN; i++)
		a[i] = (uint8_t)(i * 5 + 1), b[i] = 0;
	/* two mappings: type1 v2 unmaps whole mappings only */
	struct vfio_iommu_type1_dma_map map = { .argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)a, .iova = IOVA, .size = PAGE };
	r = xioctl(container, VFIO_IOMMU_MAP_DMA, &map);
	map.vaddr = (uintptr_t)b;
	map.iova = IOVA + PAGE;
	if (!r.rc)
		r = xioctl(container, VFIO_IOMMU_MAP_DMA, &map);
	step("MAP_DMA", r, "iova=%#llx", IOVA);

	uint16_t cmd = 0;
	pread(devfd, &cmd, 2, REGION(VFIO_PCI_CONFIG_REGION_INDEX) + 4);
	cmd |= 0x6;
	pwrite(devfd, &cmd, 2, REGION(VFIO_PCI_CONFIG_REGION_INDEX) + 4);
	step("IDENT", xres(0), "ident=%#x", rd32(0));
	int rc1 = dma(IOVA, EDU_BUF, 0);
	int rc2 = rc1 ? -1 : dma(EDU_BUF, IOVA + PAGE, 2);
	int same = !rc2 && !memcmp(a, b, LEN);
	step("DMA_ROUND_TRIP", xres(same ? 0 : -1), "same=%d b0=%02x%02x%02x%02x", same, b[0], b[1], b[2], b[3]);

	/* the driver's bug: DMA to a page it has unmapped */
	struct vfio_iommu_type1_dma_unmap um = { .argsz = sizeof(um), .iova = IOVA + PAGE, .size = PAGE };
	step0("UNMAP_DMA", xioctl(container, VFIO_IOMMU_UNMAP_DMA, &um));
	memset(b, 0xee, LEN);
	int rc3 = dma(EDU_BUF, IOVA + PAGE, 2);
	step("DMA_AFTER_UNMAP", xres(rc3), "unchanged=%d iova=%#llx", b[0] == 0xee && b[LEN - 1] == 0xee, IOVA + PAGE);
	close(devfd);
	close(group);
	close(container);
	return same ? 0 : 1;
}
