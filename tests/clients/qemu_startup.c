/*
 * qemu_startup IOMMU_PATH DEVICE_PATH SCENARIO
 *
 * What QEMU does with a device cdev and an iommufd when it starts a guest with
 * `-object iommufd -device vfio-pci,iommufd=...`, and the errnos of the bad
 * calls around it. One STEP line per call (stepper.h); the expectations (the
 * kernel's answers, shared/reference/) live in tests/vfio/test_device_cdev.py.
 *
 * Scenarios:
 *   startup  open, BIND, IOAS_ALLOC, GET_HW_INFO, HWPT_ALLOC, ATTACH (hwpt),
 *            IOVA_RANGES twice, IOAS_MAP of several ranges, GET_INFO, every
 *            region and irq, config space, SET_IRQS (an eventfd on MSI, or
 *            MSI-X when the device has no MSI), an edu DMA round trip with the
 *            completion interrupt (edu only), RESET, teardown.
 *   hold     startup up to SET_IRQS, then waits to be killed.
 *   errors   every ioctl of the sequence with bad input.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "stepper.h"

#define offsetofend(T, m) (offsetof(T, m) + sizeof(((T *)0)->m))
#define REGION_OFF(i) ((uint64_t)(i) << 40)
#define MiB (1ULL << 20)

/* edu (QEMU docs/specs/edu.rst) */
#define EDU_IDENT 0x00
#define EDU_LIVENESS 0x04
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_CNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_BUF 0x40000
#define EDU_CMD_START 1
#define EDU_CMD_TO_RAM 2
#define EDU_CMD_IRQ 4

static const char *iommu_path, *dev_path;
static int hold;

static int xopen(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die(path);
	return fd;
}

/* ---- iommufd ------------------------------------------------------------- */

static struct res hwpt_alloc(int fd, __u32 size, __u32 flags, __u32 dev_id, __u32 pt_id, __u32 *out)
{
	struct iommu_hwpt_alloc a = { .size = size, .flags = flags, .dev_id = dev_id, .pt_id = pt_id };
	struct res r = xioctl(fd, IOMMU_HWPT_ALLOC, &a);
	*out = r.rc == 0 ? a.out_hwpt_id : 0;
	return r;
}

static struct res ioas_map(int fd, __u32 ioas, void *va, __u64 len, __u64 *iova, __u32 flags)
{
	struct iommu_ioas_map m = {
		.size = sizeof(m), .flags = flags, .ioas_id = ioas,
		.user_va = (uintptr_t)va, .length = len, .iova = *iova,
	};
	struct res r = xioctl(fd, IOMMU_IOAS_MAP, &m);
	if (r.rc == 0)
		*iova = m.iova;
	return r;
}

static struct res hw_info(int fd, __u32 size, __u32 flags, __u32 dev_id, __u8 reserved0, struct iommu_hw_info *out,
			  void *data, __u32 data_len)
{
	struct iommu_hw_info h = {
		.size = size, .flags = flags, .dev_id = dev_id, .data_len = data_len, .data_uptr = (uintptr_t)data,
	};
	h.__reserved[0] = reserved0;
	struct res r = xioctl(fd, IOMMU_GET_HW_INFO, &h);
	*out = h;
	return r;
}

/* ---- device cdev ---------------------------------------------------------- */

static struct res bind_dev(int dev, __u32 argsz, __u32 flags, int iommufd, __u32 *devid)
{
	struct vfio_device_bind_iommufd b = { .argsz = argsz, .flags = flags, .iommufd = iommufd };
	struct res r = xioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &b);
	*devid = r.rc == 0 ? b.out_devid : 0;
	return r;
}

static struct res attach_pt(int dev, __u32 argsz, __u32 flags, __u32 pt_id, __u32 *out)
{
	struct vfio_device_attach_iommufd_pt a = { .argsz = argsz, .flags = flags, .pt_id = pt_id };
	struct res r = xioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &a);
	*out = a.pt_id;
	return r;
}

static struct res detach_pt(int dev, __u32 argsz, __u32 flags)
{
	struct vfio_device_detach_iommufd_pt d = { .argsz = argsz, .flags = flags };
	return xioctl(dev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &d);
}

static struct res get_info(int dev, __u32 argsz, struct vfio_device_info *out)
{
	struct vfio_device_info i = { .argsz = argsz };
	struct res r = xioctl(dev, VFIO_DEVICE_GET_INFO, &i);
	*out = i;
	return r;
}

static struct res region_info(int dev, __u32 argsz, __u32 index, struct vfio_region_info *out)
{
	struct vfio_region_info i = { .argsz = argsz, .index = index };
	struct res r = xioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &i);
	*out = i;
	return r;
}

static struct res irq_info(int dev, __u32 argsz, __u32 index, struct vfio_irq_info *out)
{
	struct vfio_irq_info i = { .argsz = argsz, .index = index };
	struct res r = xioctl(dev, VFIO_DEVICE_GET_IRQ_INFO, &i);
	*out = i;
	return r;
}

/* SET_IRQS with count eventfds (or none) in data; argsz as given (0: exact). */
static struct res set_irqs(int dev, __u32 argsz, __u32 flags, __u32 index, __u32 start, __u32 count,
			   const __s32 *fds, unsigned nfds)
{
	char buf[sizeof(struct vfio_irq_set) + 16 * sizeof(__s32)] = { 0 };
	struct vfio_irq_set *s = (struct vfio_irq_set *)buf;
	if (nfds > 16)
		nfds = 16;
	s->argsz = argsz ? argsz : sizeof(*s) + nfds * sizeof(__s32);
	s->flags = flags;
	s->index = index;
	s->start = start;
	s->count = count;
	if (nfds)
		memcpy(s->data, fds, nfds * sizeof(__s32));
	return xioctl(dev, VFIO_DEVICE_SET_IRQS, s);
}

static struct res reset_dev(int dev)
{
	return xioctl(dev, VFIO_DEVICE_RESET, NULL);
}

static struct res rd(int dev, uint64_t off, void *buf, size_t n)
{
	errno = 0;
	return xres(pread(dev, buf, n, off));
}

static struct res wr(int dev, uint64_t off, const void *buf, size_t n)
{
	errno = 0;
	return xres(pwrite(dev, buf, n, off));
}

static uint32_t rd32(int dev, uint64_t off)
{
	uint32_t v = 0xffffffff;
	if (pread(dev, &v, 4, off) != 4)
		die("pread32");
	return v;
}

static void wr32(int dev, uint64_t off, uint32_t v)
{
	if (pwrite(dev, &v, 4, off) != 4)
		die("pwrite32");
}

static void wr64(int dev, uint64_t off, uint64_t v)
{
	if (pwrite(dev, &v, 8, off) != 8)
		die("pwrite64");
}

static uint64_t rd64(int dev, uint64_t off)
{
	uint64_t v = ~0ULL;
	if (pread(dev, &v, 8, off) != 8)
		die("pread64");
	return v;
}

/* One edu transfer; returns the command register once the start bit cleared. */
static uint64_t edu_dma(int dev, uint64_t src, uint64_t dst, uint64_t cnt, uint64_t cmd)
{
	uint64_t v = 0;
	wr64(dev, EDU_DMA_SRC, src);
	wr64(dev, EDU_DMA_DST, dst);
	wr64(dev, EDU_DMA_CNT, cnt);
	wr64(dev, EDU_DMA_CMD, cmd | EDU_CMD_START);
	for (int i = 0; i < 1000; i++) {
		v = rd64(dev, EDU_DMA_CMD);
		if (!(v & EDU_CMD_START))
			break;
		usleep(1000);
	}
	return v;
}

static int readable(int fd, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int n = poll(&p, 1, timeout_ms);
	return n > 0 && (p.revents & POLLIN);
}

static void *anon(size_t len, int shared)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	memset(p, 0, len);
	return p;
}

static void *memfd_ram(size_t len)
{
	int mfd = memfd_create("guest-ram", MFD_CLOEXEC);
	if (mfd < 0 || ftruncate(mfd, len))
		die("memfd");
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	if (p == MAP_FAILED)
		die("mmap memfd");
	close(mfd);
	return p;
}

/* ---- startup ---------------------------------------------------------------- */

static int startup(void)
{
	struct res r;

	int iommufd = xopen(iommu_path);
	errno = 0;
	int dev = open(dev_path, O_RDWR | O_CLOEXEC);
	step("open_cdev", xres(dev), "path=%s", dev_path);
	if (dev < 0)
		return 1;

	__u32 devid;
	r = bind_dev(dev, sizeof(struct vfio_device_bind_iommufd), 0, iommufd, &devid);
	step("BIND_IOMMUFD", r, "out_devid=%u", devid);

	__u32 ioas;
	r = ioas_alloc(iommufd, &ioas);
	step("IOAS_ALLOC", r, "out_ioas_id=%u", ioas);

	/* hw info: a buffer larger than the VT-d data; the kernel zeroes the rest */
	uint8_t data[64];
	memset(data, 0xa5, sizeof(data));
	struct iommu_hw_info hi;
	r = hw_info(iommufd, sizeof(hi), 0, devid, 0, &hi, data, sizeof(data));
	struct iommu_hw_info_vtd vtd;
	memcpy(&vtd, data, sizeof(vtd));
	int tail_zero = 1;
	for (size_t i = sizeof(vtd); i < sizeof(data); i++)
		tail_zero &= data[i] == 0;
	step("GET_HW_INFO", r,
	     "out_data_type=%u data_len=%u out_capabilities=%#llx out_max_pasid_log2=%u vtd_flags=%#x "
	     "cap_reg=%#llx ecap_reg=%#llx tail_zero=%d",
	     hi.out_data_type, hi.data_len, (unsigned long long)hi.out_capabilities, hi.out_max_pasid_log2,
	     vtd.flags, (unsigned long long)vtd.cap_reg, (unsigned long long)vtd.ecap_reg, tail_zero);

	__u32 hwpt;
	r = hwpt_alloc(iommufd, sizeof(struct iommu_hwpt_alloc), 0, devid, ioas, &hwpt);
	step("HWPT_ALLOC", r, "out_hwpt_id=%u", hwpt);

	__u32 pt;
	r = attach_pt(dev, sizeof(struct vfio_device_attach_iommufd_pt), 0, hwpt, &pt);
	step("ATTACH_IOMMUFD_PT", r, "pt_id=%u", pt);

	/* the EMSGSIZE protocol, as QEMU's iommufd_cdev_get_info_iova_range does */
	struct iommu_ioas_iova_ranges q = { .size = sizeof(q), .ioas_id = ioas, .num_iovas = 0 };
	r = xioctl(iommufd, IOMMU_IOAS_IOVA_RANGES, &q);
	step("IOVA_RANGES_0", r, "num_iovas=%u out_iova_alignment=%#llx", q.num_iovas,
	     (unsigned long long)q.out_iova_alignment);
	struct iommu_iova_range ranges[8] = { 0 };
	q.num_iovas = q.num_iovas > 8 ? 8 : q.num_iovas;
	q.allowed_iovas = (uintptr_t)ranges;
	r = xioctl(iommufd, IOMMU_IOAS_IOVA_RANGES, &q);
	char rbuf[256] = "", *p = rbuf;
	for (unsigned i = 0; i < q.num_iovas && i < 8; i++)
		p += snprintf(p, rbuf + sizeof(rbuf) - p, "%s%#llx-%#llx", i ? "," : "",
			      (unsigned long long)ranges[i].start, (unsigned long long)ranges[i].last);
	step("IOVA_RANGES_N", r, "num_iovas=%u out_iova_alignment=%#llx ranges=%s", q.num_iovas,
	     (unsigned long long)q.out_iova_alignment, rbuf);

	/* guest RAM, as several ranges: A = 2 MiB of memfd at 0x400000 (the reference's
	 * mapping), B = 1 MiB of private anonymous memory at 0x600000, C = a read-only
	 * shared page at 0x800000, D = 64 KiB above 4 GiB, E = 64 KiB at an automatic iova. */
	uint8_t *ram_a = memfd_ram(2 * MiB);
	uint8_t *ram_b = anon(MiB, 0);
	uint8_t *ram_c = anon(4096, 1);
	uint8_t *ram_d = anon(64 << 10, 0);
	uint8_t *ram_e = anon(64 << 10, 0);
	const __u32 rw = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_FIXED_IOVA;
	__u64 iova_a = 0x400000, iova_b = 0x600000, iova_c = 0x800000, iova_d = 0x100000000ULL, iova_e = 0;
	r = ioas_map(iommufd, ioas, ram_a, 2 * MiB, &iova_a, rw);
	step("MAP_A", r, "iova=%#llx", (unsigned long long)iova_a);
	r = ioas_map(iommufd, ioas, ram_b, MiB, &iova_b, rw);
	step("MAP_B", r, "iova=%#llx", (unsigned long long)iova_b);
	r = ioas_map(iommufd, ioas, ram_c, 4096, &iova_c, IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_FIXED_IOVA);
	step("MAP_C_RO", r, "iova=%#llx", (unsigned long long)iova_c);
	r = ioas_map(iommufd, ioas, ram_d, 64 << 10, &iova_d, rw);
	step("MAP_D", r, "iova=%#llx", (unsigned long long)iova_d);
	r = ioas_map(iommufd, ioas, ram_e, 64 << 10, &iova_e, rw & ~IOMMU_IOAS_MAP_FIXED_IOVA);
	step("MAP_E_AUTO", r, "iova=%#llx", (unsigned long long)iova_e);

	struct vfio_device_info di;
	r = get_info(dev, sizeof(di), &di);
	step("GET_INFO", r, "flags=%#x num_regions=%u num_irqs=%u cap_offset=%u argsz=%u", di.flags, di.num_regions,
	     di.num_irqs, di.cap_offset, di.argsz);

	uint64_t bar0_off = REGION_OFF(0), config_off = REGION_OFF(VFIO_PCI_CONFIG_REGION_INDEX);
	for (__u32 i = 0; i < di.num_regions; i++) {
		struct vfio_region_info ri;
		char name[32];
		snprintf(name, sizeof(name), "REGION_INFO[%u]", i);
		r = region_info(dev, sizeof(ri), i, &ri);
		step(name, r, "flags=%#x size=%#llx offset=%#llx cap_offset=%u argsz=%u", ri.flags,
		     (unsigned long long)ri.size, (unsigned long long)ri.offset, ri.cap_offset, ri.argsz);
		if (i == 0)
			bar0_off = ri.offset;
		if (i == VFIO_PCI_CONFIG_REGION_INDEX)
			config_off = ri.offset;
	}

	/* config space: QEMU reads it all, then the ids and the command register */
	uint8_t cfg[256];
	r = rd(dev, config_off, cfg, sizeof(cfg));
	step("CONFIG_READ_ALL", r, "n=%ld", r.rc);
	uint16_t vendor = 0, device = 0, command = 0;
	rd(dev, config_off + 0, &vendor, 2);
	rd(dev, config_off + 2, &device, 2);
	r = rd(dev, config_off + 4, &command, 2);
	step("CONFIG_IDS", r, "vendor=%#06x device=%#06x command=%#06x", vendor, device, command);
	int is_edu = vendor == 0x1234 && device == 0x11e8;

	__u32 irq_count[VFIO_PCI_NUM_IRQS] = { 0 };
	for (__u32 i = 0; i < di.num_irqs; i++) {
		struct vfio_irq_info ii;
		char name[32];
		snprintf(name, sizeof(name), "IRQ_INFO[%u]", i);
		r = irq_info(dev, sizeof(ii), i, &ii);
		step(name, r, "flags=%#x count=%u", ii.flags, ii.count);
		if (r.rc == 0 && i < VFIO_PCI_NUM_IRQS)
			irq_count[i] = ii.count;
	}

	int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (efd < 0)
		die("eventfd");
	__u32 irq_index = irq_count[VFIO_PCI_MSI_IRQ_INDEX] ? VFIO_PCI_MSI_IRQ_INDEX : VFIO_PCI_MSIX_IRQ_INDEX;
	r = set_irqs(dev, 0, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, irq_index, 0, 1, &efd, 1);
	step("SET_IRQS_EVENTFD", r, "index=%u", irq_index);
	step("IRQ_NOT_YET", xres(0), "readable=%d", readable(efd, 0));

	if (hold) { /* everything set up: wait to be killed */
		step0("HOLD", xres(0));
		for (;;)
			pause();
	}

	if (is_edu) {
		uint32_t ident = rd32(dev, bar0_off + EDU_IDENT);
		wr32(dev, bar0_off + EDU_LIVENESS, 0x12345678);
		uint32_t live = rd32(dev, bar0_off + EDU_LIVENESS);
		step("EDU_REGS", xres(0), "ident=%#010x liveness=%#010x", ident, live);

		/* DMA before bus mastering: refused by the device's bus master gate */
		memset(ram_a + 0x100000, 0, 16);
		wr32(dev, bar0_off + EDU_BUF, 0xdeadbeef);
		uint64_t cmd = edu_dma(dev, EDU_BUF, iova_a + 0x100000, 16, EDU_CMD_TO_RAM);
		int nothing = 1;
		for (int i = 0; i < 16; i++)
			nothing &= ram_a[0x100000 + i] == 0;
		step("EDU_DMA_NO_BME", xres(0), "cmd=%#llx untouched=%d", (unsigned long long)cmd, nothing);

		uint16_t c = command | 0x4;
		r = wr(dev, config_off + 4, &c, 2);
		rd(dev, config_off + 4, &command, 2);
		step("SET_BUS_MASTER", r, "command=%#06x", command);

		/* RAM A+0x1000 -> edu buffer -> RAM A+0x100000 (0x401000 -> 0x40000 -> 0x500000) */
		for (int i = 0; i < 2048; i++)
			ram_a[0x1000 + i] = (uint8_t)(i * 7 + 3);
		cmd = edu_dma(dev, iova_a + 0x1000, EDU_BUF, 2048, 0);
		step("EDU_DMA_TO_DEV", xres(0), "cmd=%#llx", (unsigned long long)cmd);
		cmd = edu_dma(dev, EDU_BUF, iova_a + 0x100000, 2048, EDU_CMD_TO_RAM | EDU_CMD_IRQ);
		int got_irq = readable(efd, 2000);
		uint64_t count = 0;
		if (got_irq && read(efd, &count, 8) != 8)
			count = 0;
		int same = memcmp(ram_a + 0x1000, ram_a + 0x100000, 2048) == 0;
		step("EDU_DMA_TO_RAM", xres(0), "cmd=%#llx same=%d first=%02x%02x%02x%02x irq=%d eventfd_count=%llu",
		     (unsigned long long)cmd, same, ram_a[0x100000], ram_a[0x100001], ram_a[0x100002], ram_a[0x100003],
		     got_irq, (unsigned long long)count);
		uint32_t st = rd32(dev, bar0_off + EDU_IRQ_STATUS);
		wr32(dev, bar0_off + EDU_IRQ_ACK, st);
		step("EDU_IRQ_ACK", xres(0), "status=%#x after=%#x", st, rd32(dev, bar0_off + EDU_IRQ_STATUS));

		/* through the other ranges: private anonymous B, and read-only C */
		memset(ram_b, 0, 64);
		cmd = edu_dma(dev, EDU_BUF, iova_b + 0x10, 64, EDU_CMD_TO_RAM);
		step("EDU_DMA_ANON", xres(0), "same=%d", memcmp(ram_b + 0x10, ram_a + 0x1000, 64) == 0);
		memset(ram_c, 0x5a, 64);
		cmd = edu_dma(dev, EDU_BUF, iova_c, 64, EDU_CMD_TO_RAM);
		int untouched = 1;
		for (int i = 0; i < 64; i++)
			untouched &= ram_c[i] == 0x5a;
		step("EDU_DMA_READ_ONLY", xres(0), "untouched=%d cmd=%#llx", untouched, (unsigned long long)cmd);
		/* a device read of the read-only page works */
		cmd = edu_dma(dev, iova_c, EDU_BUF, 64, 0);
		uint32_t first = rd32(dev, bar0_off + EDU_BUF);
		step("EDU_DMA_FROM_READ_ONLY", xres(0), "buf=%#010x", first);
		/* an IOVA that nothing maps */
		cmd = edu_dma(dev, EDU_BUF, 0x8000000, 64, EDU_CMD_TO_RAM);
		step("EDU_DMA_UNMAPPED", xres(0), "cmd=%#llx", (unsigned long long)cmd);
	}

	r = reset_dev(dev);
	step0("RESET", r);

	/* teardown, as QEMU does it at exit */
	r = set_irqs(dev, 0, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, irq_index, 0, 0, NULL, 0);
	step0("SET_IRQS_DISABLE", r);
	struct iommu_ioas_unmap um = { .size = sizeof(um), .ioas_id = ioas, .iova = 0, .length = ~0ULL };
	r = xioctl(iommufd, IOMMU_IOAS_UNMAP, &um);
	step("UNMAP_ALL", r, "length=%#llx", (unsigned long long)um.length);
	step0("DETACH_IOMMUFD_PT", detach_pt(dev, sizeof(struct vfio_device_detach_iommufd_pt), 0));
	step0("DESTROY_HWPT", destroy(iommufd, hwpt));
	step0("DESTROY_IOAS", destroy(iommufd, ioas));
	step0("CLOSE_DEVICE", xres(close(dev)));
	step0("CLOSE_IOMMUFD", xres(close(iommufd)));
	close(efd);
	return 0;
}

/* ---- errors ------------------------------------------------------------------ */

static int errors(void)
{
	struct res r;
	__u32 out, devid;
	char buf[64];
	struct vfio_device_info di;
	struct vfio_region_info ri;
	struct vfio_irq_info ii;
	const __u32 trig_efd = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

	int iommufd = xopen(iommu_path);
	int dev = xopen(dev_path);
	int efd = eventfd(0, EFD_CLOEXEC);
	int pipefd[2];
	if (efd < 0 || pipe(pipefd))
		die("eventfd/pipe");

	/* no access before bind: every ioctl, read and write */
	step0("unbound:GET_INFO", get_info(dev, sizeof(di), &di));
	step0("unbound:GET_REGION_INFO", region_info(dev, sizeof(ri), 0, &ri));
	step0("unbound:GET_IRQ_INFO", irq_info(dev, sizeof(ii), 1, &ii));
	step0("unbound:SET_IRQS", set_irqs(dev, 0, trig_efd, 1, 0, 1, &efd, 1));
	step0("unbound:RESET", reset_dev(dev));
	step0("unbound:ATTACH", attach_pt(dev, sizeof(struct vfio_device_attach_iommufd_pt), 0, 1, &out));
	step0("unbound:DETACH", detach_pt(dev, sizeof(struct vfio_device_detach_iommufd_pt), 0));
	step0("unbound:pread_config", rd(dev, REGION_OFF(VFIO_PCI_CONFIG_REGION_INDEX), buf, 4));
	step0("unbound:pwrite_bar0", wr(dev, REGION_OFF(0) + 4, buf, 4));
	step0("unbound:pread_bar0", rd(dev, REGION_OFF(0), buf, 4));

	/* BIND with bad input */
	const __u32 bsz = sizeof(struct vfio_device_bind_iommufd);
	const __u32 bmin = offsetofend(struct vfio_device_bind_iommufd, out_devid);
	step0("bind:argsz_below_min", bind_dev(dev, bmin - 1, 0, iommufd, &devid));
	step0("bind:argsz_0", bind_dev(dev, 0, 0, iommufd, &devid));
	step0("bind:unknown_flag", bind_dev(dev, bsz, 1u << 1, iommufd, &devid));
	step0("bind:negative_fd", bind_dev(dev, bsz, 0, -1, &devid));
	step0("bind:eventfd", bind_dev(dev, bsz, 0, efd, &devid));
	step0("bind:pipe", bind_dev(dev, bsz, 0, pipefd[0], &devid));
	step0("bind:device_fd", bind_dev(dev, bsz, 0, dev, &devid));
	int closed = dup(efd);
	close(closed);
	step0("bind:closed_fd", bind_dev(dev, bsz, 0, closed, &devid));
	step0("unbound:still_GET_INFO", get_info(dev, sizeof(di), &di));
	r = bind_dev(dev, bmin, 0, iommufd, &devid); /* the minimum size is enough */
	step("bind:ok", r, "out_devid=%u", devid);
	step0("bind:again", bind_dev(dev, bsz, 0, iommufd, &out));
	step0("bind:again_bad_fd", bind_dev(dev, bsz, 0, closed, &out));
	int dev2 = xopen(dev_path);
	step0("bind:second_open", bind_dev(dev2, bsz, 0, iommufd, &out));
	step0("second_open:GET_INFO", get_info(dev2, sizeof(di), &di));
	int iommufd2 = xopen(iommu_path);
	step0("bind:second_open_other_ctx", bind_dev(dev2, bsz, 0, iommufd2, &out));
	close(dev2);

	/* GET_INFO / REGION_INFO / IRQ_INFO */
	const __u32 imin = offsetofend(struct vfio_device_info, num_irqs);
	step0("GET_INFO:argsz_below_min", get_info(dev, imin - 1, &di));
	r = get_info(dev, imin, &di);
	step("GET_INFO:argsz_min", r, "flags=%#x", di.flags);
	const __u32 rmin = offsetofend(struct vfio_region_info, offset);
	step0("REGION_INFO:argsz_below_min", region_info(dev, rmin - 1, 0, &ri));
	step0("REGION_INFO:index_9", region_info(dev, sizeof(ri), VFIO_PCI_NUM_REGIONS, &ri));
	step0("REGION_INFO:index_1000", region_info(dev, sizeof(ri), 1000, &ri));
	step0("REGION_INFO:index_max", region_info(dev, sizeof(ri), 0xffffffff, &ri));
	const __u32 qmin = offsetofend(struct vfio_irq_info, count);
	step0("IRQ_INFO:argsz_below_min", irq_info(dev, qmin - 1, 1, &ii));
	step0("IRQ_INFO:index_5", irq_info(dev, sizeof(ii), VFIO_PCI_NUM_IRQS, &ii));
	step0("IRQ_INFO:index_max", irq_info(dev, sizeof(ii), 0xffffffff, &ii));
	step0("IRQ_INFO:ERR", irq_info(dev, sizeof(ii), VFIO_PCI_ERR_IRQ_INDEX, &ii));

	/* region access outside the regions */
	step0("pread:empty_region_1", rd(dev, REGION_OFF(1), buf, 4));
	step0("pread:region_9", rd(dev, REGION_OFF(VFIO_PCI_NUM_REGIONS), buf, 4));
	step0("pread:bar0_past_end", rd(dev, REGION_OFF(0) + MiB, buf, 4));
	step0("pread:config_past_end", rd(dev, REGION_OFF(VFIO_PCI_CONFIG_REGION_INDEX) + 0xfe, buf, 4));
	step0("pwrite:bar0_past_end", wr(dev, REGION_OFF(0) + MiB, buf, 4));

	/* SET_IRQS */
	const __u32 smin = offsetofend(struct vfio_irq_set, count);
	step0("SET_IRQS:argsz_below_min", set_irqs(dev, smin - 1, trig_efd, 1, 0, 1, &efd, 1));
	step0("SET_IRQS:unknown_flag", set_irqs(dev, 0, trig_efd | (1u << 6), 1, 0, 1, &efd, 1));
	step0("SET_IRQS:index_5", set_irqs(dev, 0, trig_efd, VFIO_PCI_NUM_IRQS, 0, 1, &efd, 1));
	step0("SET_IRQS:start_past", set_irqs(dev, 0, trig_efd, 1, 1, 1, &efd, 1));
	step0("SET_IRQS:count_past", set_irqs(dev, 0, trig_efd, 1, 0, 2, (const __s32[]){ efd, efd }, 2));
	step0("SET_IRQS:start_past_count0",
	      set_irqs(dev, 0, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 1, 1, 0, NULL, 0));
	step0("SET_IRQS:count_overflow", set_irqs(dev, 0, trig_efd, 1, 1, 0xffffffff, &efd, 1));
	step0("SET_IRQS:no_data_type", set_irqs(dev, 0, VFIO_IRQ_SET_ACTION_TRIGGER, 1, 0, 1, &efd, 1));
	step0("SET_IRQS:two_data_types",
	      set_irqs(dev, 0, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER, 1, 0, 1,
		       &efd, 1));
	step0("SET_IRQS:data_short", set_irqs(dev, smin, trig_efd, 1, 0, 1, &efd, 1));
	step0("SET_IRQS:ERR_index", set_irqs(dev, 0, trig_efd, VFIO_PCI_ERR_IRQ_INDEX, 0, 1, &efd, 1));
	step0("SET_IRQS:ERR_count0",
	      set_irqs(dev, 0, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_ERR_IRQ_INDEX, 0, 0, NULL, 0));
	step0("SET_IRQS:no_action", set_irqs(dev, 0, VFIO_IRQ_SET_DATA_NONE, 1, 0, 1, NULL, 0));
	step0("SET_IRQS:two_actions",
	      set_irqs(dev, 0, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_TRIGGER, 1, 0, 1,
		       NULL, 0));
	step0("SET_IRQS:MSI_mask", set_irqs(dev, 0, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK, 1, 0, 1, NULL, 0));
	step0("SET_IRQS:not_eventfd", set_irqs(dev, 0, trig_efd, 1, 0, 1, &pipefd[0], 1));
	step0("SET_IRQS:closed_fd", set_irqs(dev, 0, trig_efd, 1, 0, 1, &closed, 1));
	step0("SET_IRQS:ok", set_irqs(dev, 0, trig_efd, 1, 0, 1, &efd, 1));
	step0("SET_IRQS:INTx_while_MSI", set_irqs(dev, 0, trig_efd, 0, 0, 1, &efd, 1));
	step0("SET_IRQS:disable", set_irqs(dev, 0, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 1, 0, 0, NULL, 0));

	step0("RESET:edu", reset_dev(dev));

	/* iommufd objects for the device */
	__u32 ioas, ioas2, hwpt;
	ioas_alloc(iommufd, &ioas);
	ioas_alloc(iommufd, &ioas2);
	const __u32 hsz = sizeof(struct iommu_hwpt_alloc);
	const __u32 hmin = offsetofend(struct iommu_hwpt_alloc, __reserved);
	step0("HWPT_ALLOC:size_below_min", hwpt_alloc(iommufd, hmin - 1, 0, devid, ioas, &out));
	step0("HWPT_ALLOC:unknown_flag", hwpt_alloc(iommufd, hsz, 1u << 8, devid, ioas, &out));
	step0("HWPT_ALLOC:dirty_tracking", hwpt_alloc(iommufd, hsz, IOMMU_HWPT_ALLOC_DIRTY_TRACKING, devid, ioas, &out));
	step0("HWPT_ALLOC:bad_dev_id", hwpt_alloc(iommufd, hsz, 0, 999, ioas, &out));
	step0("HWPT_ALLOC:dev_id_is_ioas", hwpt_alloc(iommufd, hsz, 0, ioas, ioas, &out));
	step0("HWPT_ALLOC:bad_pt_id", hwpt_alloc(iommufd, hsz, 0, devid, 999, &out));
	step0("HWPT_ALLOC:pt_id_is_device", hwpt_alloc(iommufd, hsz, 0, devid, devid, &out));
	{
		struct iommu_hwpt_alloc a = { .size = hsz, .dev_id = devid, .pt_id = ioas, .__reserved = 1 };
		step0("HWPT_ALLOC:reserved", xioctl(iommufd, IOMMU_HWPT_ALLOC, &a));
	}
	r = hwpt_alloc(iommufd, hsz, 0, devid, ioas, &hwpt);
	step("HWPT_ALLOC:ok", r, "out_hwpt_id=%u", hwpt);

	struct iommu_hw_info hi;
	const __u32 wsz = sizeof(struct iommu_hw_info);
	const __u32 wmin = offsetofend(struct iommu_hw_info, __reserved);
	step0("GET_HW_INFO:size_below_min", hw_info(iommufd, wmin - 1, 0, devid, 0, &hi, buf, 24));
	step0("GET_HW_INFO:reserved", hw_info(iommufd, wsz, 0, devid, 1, &hi, buf, 24));
	step0("GET_HW_INFO:unknown_flag", hw_info(iommufd, wsz, 1u << 1, devid, 0, &hi, buf, 24));
	step0("GET_HW_INFO:bad_dev_id", hw_info(iommufd, wsz, 0, 999, 0, &hi, buf, 24));
	step0("GET_HW_INFO:dev_id_is_ioas", hw_info(iommufd, wsz, 0, ioas, 0, &hi, buf, 24));
	r = hw_info(iommufd, wsz, 0, devid, 0, &hi, NULL, 0);
	step("GET_HW_INFO:data_len_0", r, "data_len=%u out_data_type=%u", hi.data_len, hi.out_data_type);

	/* ATTACH / DETACH */
	const __u32 asz = sizeof(struct vfio_device_attach_iommufd_pt);
	const __u32 amin = offsetofend(struct vfio_device_attach_iommufd_pt, pt_id);
	step0("ATTACH:argsz_4", attach_pt(dev, 4, 0, ioas, &out));
	step0("ATTACH:argsz_below_min", attach_pt(dev, amin - 1, 0, ioas, &out));
	step0("ATTACH:unknown_flag", attach_pt(dev, asz, 1u << 1, ioas, &out));
	step0("ATTACH:bad_pt_id", attach_pt(dev, asz, 0, 999, &out));
	step0("ATTACH:pt_id_is_device", attach_pt(dev, asz, 0, devid, &out));
	const __u32 dsz = sizeof(struct vfio_device_detach_iommufd_pt);
	const __u32 dmin = offsetofend(struct vfio_device_detach_iommufd_pt, flags);
	step0("DETACH:not_attached", detach_pt(dev, dsz, 0));
	r = attach_pt(dev, amin, 0, hwpt, &out);
	step("ATTACH:hwpt", r, "pt_id=%u", out);

	/* destroy of what is in use */
	step0("DESTROY:device", destroy(iommufd, devid));
	step0("DESTROY:attached_hwpt", destroy(iommufd, hwpt));
	step0("DESTROY:ioas_with_hwpt", destroy(iommufd, ioas));

	/* replace: attach while attached */
	r = attach_pt(dev, asz, 0, ioas2, &out);
	step("ATTACH:replace_ioas2", r, "pt_id=%u", out);
	__u32 auto_hwpt = out;
	step0("DESTROY:ioas2_in_use", destroy(iommufd, ioas2));
	step0("DESTROY:hwpt_after_replace", destroy(iommufd, hwpt));
	step0("DESTROY:ioas_after_replace", destroy(iommufd, ioas));

	step0("DETACH:argsz_4", detach_pt(dev, 4, 0));
	step0("DETACH:argsz_below_min", detach_pt(dev, dmin - 1, 0));
	step0("DETACH:unknown_flag", detach_pt(dev, dsz, 1u << 1));
	step0("DETACH:ok", detach_pt(dev, dsz, 0));
	step0("DETACH:again", detach_pt(dev, dsz, 0));
	/* the automatic hwpt went away with its last device */
	step0("DESTROY:auto_hwpt_gone", destroy(iommufd, auto_hwpt));
	step0("DESTROY:ioas2_after_detach", destroy(iommufd, ioas2));
	step0("DESTROY:device_after_detach", destroy(iommufd, devid));

	close(dev);
	/* after the device file is gone, its id is too. FUSE sends RELEASE after close()
	 * returned (the kernel releases before), so give the daemon a moment. */
	int tries = 0;
	do {
		r = destroy(iommufd, devid);
		if (r.err != EBUSY)
			break;
		usleep(10000);
	} while (++tries < 200);
	step("DESTROY:device_after_close", r, "tries=%d", tries);
	close(iommufd2);
	close(iommufd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s IOMMU DEVICE startup|hold|errors\n", argv[0]);
		return 2;
	}
	iommu_path = argv[1];
	dev_path = argv[2];
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(argv[3], "startup"))
		return startup();
	if (!strcmp(argv[3], "hold")) {
		hold = 1;
		return startup();
	}
	if (!strcmp(argv[3], "errors"))
		return errors();
	fprintf(stderr, "unknown scenario %s\n", argv[3]);
	return 2;
}
