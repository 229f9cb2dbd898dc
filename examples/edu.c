/*
 * edu: a userspace driver for QEMU's educational PCI device (1234:11e8),
 * through iommufd and the VFIO device cdev.
 *
 * It does what a VMM or a userspace driver does with an assigned device:
 *
 *   1. open /dev/iommu and the device's cdev /dev/vfio/devices/vfioN;
 *   2. bind the device to the iommufd (VFIO_DEVICE_BIND_IOMMUFD);
 *   3. allocate an I/O address space (IOMMU_IOAS_ALLOC) and map a buffer of
 *      ordinary anonymous memory into it at a fixed IOVA (IOMMU_IOAS_MAP);
 *   4. attach the device to that IOAS (VFIO_DEVICE_ATTACH_IOMMUFD_PT): from
 *      now on the device's DMA goes through it;
 *   5. turn bus mastering on in the PCI command register, and route the
 *      device's MSI to an eventfd (VFIO_DEVICE_SET_IRQS);
 *   6. DMA a block RAM -> the device's buffer -> RAM at another IOVA, each
 *      transfer raising an interrupt (edu command bit 4: irq status 0x100),
 *      which is waited for with poll(), checked and acknowledged;
 *   7. DMA to an IOVA that is no longer mapped: the IOMMU refuses it (a DMA
 *      fault) and no memory changes;
 *   8. tear everything down.
 *
 * The same program runs against iommufd-cuse and against a kernel with
 * CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV with edu bound to vfio-pci.
 *
 *   cc -Iinclude -o edu examples/edu.c
 *   ./edu [/dev/iommu [/dev/vfio/devices/vfio0]]
 *
 * The edu registers (QEMU docs/specs/edu.rst), all in BAR0:
 *   0x00 identification 0x010000ed   0x24 interrupt status   0x64 interrupt ack
 *   0x80 DMA source address          0x88 DMA destination    0x90 DMA count
 *   0x98 DMA command: bit 0 start, bit 1 direction (1: edu -> RAM),
 *        bit 2 raise interrupt 0x100 when done
 *   0x40000 the device's 4 KiB DMA buffer
 * The device drives 28 address bits: every IOVA it uses is below 0x10000000.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#define EDU_IDENT 0x00
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_COUNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_DMA_START 0x1
#define EDU_DMA_TO_RAM 0x2
#define EDU_DMA_IRQ 0x4
#define EDU_DMA_IRQ_STATUS 0x100
#define EDU_BUFFER 0x40000 /* device address of edu's buffer */

#define PCI_COMMAND 0x04
#define PCI_COMMAND_MASTER 0x4

/* Our memory: one 2 MiB buffer of anonymous memory, mapped at IOVA 0x400000. */
#define BUF_SIZE (2u << 20)
#define BUF_IOVA 0x400000ull
#define SRC_OFF 0x1000u	  /* the block to send: IOVA 0x401000 */
#define DST_OFF 0x100000u /* where it comes back: IOVA 0x500000 */
#define XFER 2048u	  /* bytes per DMA */
/* A second page, mapped and then unmapped again before the device writes to it. */
#define GONE_IOVA 0x600000ull
#define PAGE 4096u

static int dev_fd = -1;
static uint64_t bar0, config; /* region offsets in the device fd */

static void die(const char *what)
{
	fprintf(stderr, "edu: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *what)
{
	fprintf(stderr, "edu: FAILED: %s\n", what);
	exit(1);
}

/* Device registers are reached with pread/pwrite at the region's offset. */
static uint32_t rd32(uint64_t reg)
{
	uint32_t v;

	if (pread(dev_fd, &v, 4, bar0 + reg) != 4)
		die("pread BAR0");
	return v;
}

static void wr32(uint64_t reg, uint32_t v)
{
	if (pwrite(dev_fd, &v, 4, bar0 + reg) != 4)
		die("pwrite BAR0");
}

static void wr64(uint64_t reg, uint64_t v) /* edu's DMA registers are 64-bit */
{
	if (pwrite(dev_fd, &v, 8, bar0 + reg) != 8)
		die("pwrite BAR0");
}

static uint64_t region_offset(uint32_t index, const char *name)
{
	struct vfio_region_info info = { .argsz = sizeof(info), .index = index };

	if (ioctl(dev_fd, VFIO_DEVICE_GET_REGION_INFO, &info))
		die("VFIO_DEVICE_GET_REGION_INFO");
	printf("region %s: size 0x%llx at offset 0x%llx\n", name, (unsigned long long)info.size,
	       (unsigned long long)info.offset);
	return info.offset;
}

static void ioas_map(int iommufd, uint32_t ioas, void *va, uint64_t len, uint64_t iova)
{
	struct iommu_ioas_map map = {
		.size = sizeof(map),
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
		.ioas_id = ioas,
		.user_va = (uintptr_t)va,
		.length = len,
		.iova = iova,
	};

	if (ioctl(iommufd, IOMMU_IOAS_MAP, &map))
		die("IOMMU_IOAS_MAP");
	printf("mapped %p +0x%llx at iova 0x%llx\n", va, (unsigned long long)len,
	       (unsigned long long)iova);
}

static void ioas_unmap(int iommufd, uint32_t ioas, uint64_t iova, uint64_t len)
{
	struct iommu_ioas_unmap unmap = { .size = sizeof(unmap), .ioas_id = ioas, .iova = iova, .length = len };

	if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &unmap))
		die("IOMMU_IOAS_UNMAP");
	printf("unmapped iova 0x%llx +0x%llx\n", (unsigned long long)iova, (unsigned long long)unmap.length);
}

/* One DMA command; with EDU_DMA_IRQ, wait for its interrupt and acknowledge it. */
static void edu_dma(int irq_fd, uint64_t src, uint64_t dst, uint32_t count, uint32_t cmd)
{
	printf("dma 0x%llx -> 0x%llx, %u bytes, cmd 0x%x\n", (unsigned long long)src,
	       (unsigned long long)dst, count, cmd);
	wr64(EDU_DMA_SRC, src);
	wr64(EDU_DMA_DST, dst);
	wr64(EDU_DMA_COUNT, count);
	wr64(EDU_DMA_CMD, cmd | EDU_DMA_START);

	if (cmd & EDU_DMA_IRQ) {
		struct pollfd p = { .fd = irq_fd, .events = POLLIN };
		uint64_t n;
		int r = poll(&p, 1, 5000);

		if (r < 0)
			die("poll");
		if (r == 0)
			fail("no interrupt within 5 s");
		if (read(irq_fd, &n, sizeof(n)) != sizeof(n))
			die("read eventfd");
		uint32_t status = rd32(EDU_IRQ_STATUS);
		printf("  interrupt: eventfd count %llu, irq status 0x%x\n", (unsigned long long)n, status);
		if (!(status & EDU_DMA_IRQ_STATUS))
			fail("irq status lacks 0x100 (DMA done)");
		wr32(EDU_IRQ_ACK, EDU_DMA_IRQ_STATUS);
		if (rd32(EDU_IRQ_STATUS) & EDU_DMA_IRQ_STATUS)
			fail("irq status still set after the acknowledgement");
		printf("  acknowledged: irq status now 0x%x\n", rd32(EDU_IRQ_STATUS));
	}
	/* The start bit clears when the transfer is done (at once in the
	 * emulation; after a while on QEMU). */
	for (int i = 0; rd32(EDU_DMA_CMD) & EDU_DMA_START; i++) {
		if (i == 5000)
			fail("DMA did not finish");
		usleep(1000);
	}
}

int main(int argc, char **argv)
{
	const char *iommu_path = argc > 1 ? argv[1] : "/dev/iommu";
	const char *dev_path = argc > 2 ? argv[2] : "/dev/vfio/devices/vfio0";

	/* 1. The two nodes. */
	int iommufd = open(iommu_path, O_RDWR | O_CLOEXEC);
	if (iommufd < 0)
		die(iommu_path);
	dev_fd = open(dev_path, O_RDWR | O_CLOEXEC);
	if (dev_fd < 0)
		die(dev_path);

	/* 2. Bind: the device joins this iommufd, its DMA blocked until attached. */
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = iommufd };
	if (ioctl(dev_fd, VFIO_DEVICE_BIND_IOMMUFD, &bind))
		die("VFIO_DEVICE_BIND_IOMMUFD");
	printf("bound %s as device id %u\n", dev_path, bind.out_devid);

	bar0 = region_offset(VFIO_PCI_BAR0_REGION_INDEX, "BAR0");
	config = region_offset(VFIO_PCI_CONFIG_REGION_INDEX, "config");
	uint32_t ident = rd32(EDU_IDENT);
	printf("edu ident 0x%08x\n", ident);
	if (ident != 0x010000ed)
		fail("not an edu device");

	/* 3. An IOAS, and our buffer in it. The IOVAs are what the device uses as
	 * addresses; they need not match the buffer's virtual address. */
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc))
		die("IOMMU_IOAS_ALLOC");
	uint32_t ioas = alloc.out_ioas_id;
	printf("ioas id %u\n", ioas);

	uint8_t *buf = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint8_t *gone = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED || gone == MAP_FAILED)
		die("mmap");
	for (uint32_t i = 0; i < XFER; i++)
		buf[SRC_OFF + i] = (uint8_t)(7 * i + 3);
	memset(buf + DST_OFF, 0, XFER);
	memset(gone, 0xee, PAGE);
	ioas_map(iommufd, ioas, buf, BUF_SIZE, BUF_IOVA);

	/* 4. Attach: the IOAS becomes the device's address space. */
	struct vfio_device_attach_iommufd_pt attach = { .argsz = sizeof(attach), .pt_id = ioas };
	if (ioctl(dev_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
		die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
	printf("attached to ioas %u (hw pagetable %u)\n", ioas, attach.pt_id);

	/* 5a. Bus mastering: without it a PCI function may not start DMA. */
	uint16_t cmd;
	if (pread(dev_fd, &cmd, 2, config + PCI_COMMAND) != 2)
		die("pread config");
	cmd |= PCI_COMMAND_MASTER;
	if (pwrite(dev_fd, &cmd, 2, config + PCI_COMMAND) != 2)
		die("pwrite config");
	if (pread(dev_fd, &cmd, 2, config + PCI_COMMAND) != 2)
		die("pread config");
	printf("pci command 0x%04x (bus master %s)\n", cmd, cmd & PCI_COMMAND_MASTER ? "on" : "off");

	/* 5b. MSI vector 0 -> an eventfd: each interrupt adds 1 to its counter. */
	int irq_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (irq_fd < 0)
		die("eventfd");
	char irq_buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *irq = (struct vfio_irq_set *)irq_buf;
	*irq = (struct vfio_irq_set){
		.argsz = sizeof(irq_buf),
		.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
		.index = VFIO_PCI_MSI_IRQ_INDEX,
		.start = 0,
		.count = 1,
	};
	memcpy(irq->data, &irq_fd, sizeof(int32_t));
	if (ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, irq))
		die("VFIO_DEVICE_SET_IRQS (MSI eventfd)");
	printf("MSI enabled, signalled on eventfd %d\n", irq_fd);

	/* 6. RAM -> edu buffer -> RAM, with an interrupt for each transfer. */
	uint64_t src = BUF_IOVA + SRC_OFF, dst = BUF_IOVA + DST_OFF;
	edu_dma(irq_fd, src, EDU_BUFFER, XFER, EDU_DMA_IRQ);
	edu_dma(irq_fd, EDU_BUFFER, dst, XFER, EDU_DMA_TO_RAM | EDU_DMA_IRQ);
	if (memcmp(buf + SRC_OFF, buf + DST_OFF, XFER))
		fail("the data that came back differs from what was sent");
	printf("verified: %u bytes went RAM -> device -> RAM (first bytes %02x %02x %02x %02x)\n", XFER,
	       buf[DST_OFF], buf[DST_OFF + 1], buf[DST_OFF + 2], buf[DST_OFF + 3]);

	/* 7. A driver bug: DMA to memory that is no longer mapped. The page was
	 * mapped for the device and unmapped again; the IOMMU now refuses the
	 * device's write (a DMA fault, which the IOMMU records: the daemon logs
	 * it, a kernel logs a DMAR fault), and memory stays untouched. edu itself
	 * cannot tell: as on QEMU, the command completes and interrupts. */
	ioas_map(iommufd, ioas, gone, PAGE, GONE_IOVA);
	ioas_unmap(iommufd, ioas, GONE_IOVA, PAGE);
	uint8_t before[PAGE];
	memcpy(before, gone, PAGE);
	edu_dma(irq_fd, EDU_BUFFER, GONE_IOVA, 256, EDU_DMA_TO_RAM | EDU_DMA_IRQ);
	if (memcmp(before, gone, PAGE))
		fail("a DMA to an unmapped IOVA changed memory");
	printf("dma to unmapped iova 0x%llx: refused by the IOMMU, memory unchanged (still 0x%02x)\n",
	       (unsigned long long)GONE_IOVA, gone[0]);

	/* 8. Tear down, in the reverse order. */
	struct vfio_irq_set off = {
		.argsz = sizeof(off),
		.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
		.index = VFIO_PCI_MSI_IRQ_INDEX,
		.count = 0,
	};
	if (ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, &off))
		die("VFIO_DEVICE_SET_IRQS (MSI off)");
	close(irq_fd);
	cmd &= ~PCI_COMMAND_MASTER;
	if (pwrite(dev_fd, &cmd, 2, config + PCI_COMMAND) != 2)
		die("pwrite config");
	struct vfio_device_detach_iommufd_pt detach = { .argsz = sizeof(detach) };
	if (ioctl(dev_fd, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach))
		die("VFIO_DEVICE_DETACH_IOMMUFD_PT");
	ioas_unmap(iommufd, ioas, BUF_IOVA, BUF_SIZE);
	struct iommu_destroy destroy = { .size = sizeof(destroy), .id = ioas };
	if (ioctl(iommufd, IOMMU_DESTROY, &destroy))
		die("IOMMU_DESTROY");
	close(dev_fd); /* unbinds the device */
	close(iommufd);
	munmap(buf, BUF_SIZE);
	munmap(gone, PAGE);
	printf("done\n");
	return 0;
}
