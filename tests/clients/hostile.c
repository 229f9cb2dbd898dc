/* A hostile client: one of the calls that used to stall every other client of
 * the daemon, made `count` times (0: until killed).
 *
 *   hostile MODE IOMMU_NODE DEVICE_NODE COUNT
 *
 * MODE: alloc_tail  IOMMU_IOAS_ALLOC with size 0xffffffff over 4 GiB of zero pages
 *       hw_info     IOMMU_GET_HW_INFO, data_len 0xffffffff, one page then a PROT_NONE page
 *       allow_iovas IOMMU_IOAS_ALLOW_IOVAS with 2^20 disjoint ranges (given in reverse)
 *       map_high    IOMMU_IOAS_MAP of user_va 2^63, then VFIO_DEVICE_ATTACH_IOMMUFD_PT
 *       virtio_chains  a virtio-blk driver (DEVICE_NODE: the virtio-blk's cdev, vfio5 in
 *                   the default topology) whose every request is the longest chain the
 *                   device accepts: one indirect descriptor to a table of 1024 (header,
 *                   1022 data descriptors of 512 bytes, status), a read of 1022 sectors
 *                   into 512-byte buffers none of which follows another in IOVA; a call
 *                   is a round: 256 such requests on a queue of 256, one notification,
 *                   the used index polled until all are used (no interrupts)
 *
 * Prints "READY" once set up, then a STEP line per call. SIGUSR1 interrupts a call
 * (the handler is installed without SA_RESTART, so the ioctl returns EINTR). */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "stepper.h"

#define GIB (1ull << 30)
#define NRANGES (1u << 20)

static void on_usr1(int sig)
{
	(void)sig;
}

static __u32 bind_device(int dev, int iommufd)
{
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = iommufd };

	if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind))
		die("VFIO_DEVICE_BIND_IOMMUFD");
	return bind.out_devid;
}

/* -- virtio_chains: a virtio-blk driver (virtio 1.2: 4.1, 5.2, 2.7) -------------------- */

#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_CAPABILITY_LIST 0x34
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAP_ID_VNDR 0x09
#define VIRTIO_CAP_COMMON 1
#define VIRTIO_CAP_NOTIFY 2
/* struct virtio_pci_common_cfg */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0c
#define CC_STATUS 0x14
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_ENABLE 0x1c
#define CC_Q_NOTIFY_OFF 0x1e
#define CC_Q_DESC 0x20
#define CC_Q_DRIVER 0x28
#define CC_Q_DEVICE 0x30
#define VS_ACKNOWLEDGE 1
#define VS_DRIVER 2
#define VS_DRIVER_OK 4
#define VS_FEATURES_OK 8
#define VS_NEEDS_RESET 0x40
#define VF_INDIRECT_DESC (1ull << 28)
#define VF_VERSION_1 (1ull << 32)
#define VF_ACCESS_PLATFORM (1ull << 33)
#define VDESC_NEXT 1
#define VDESC_WRITE 2
#define VDESC_INDIRECT 4
#define VAVAIL_NO_INTERRUPT 1

#define VQ 256 /* the queue's size: the largest the device takes */
#define VCHAIN 1024 /* descriptors in an indirect table: the most the device follows */
#define VDATA (VCHAIN - 2) /* data descriptors of a request: all but the header and the status */
#define VSECTOR 512u
/* our memory, mapped at VIOVA: the rings, the headers and status bytes, one indirect
 * table per request, then the data buffers (VSECTOR bytes every 2 * VSECTOR: one copy each) */
#define VIOVA (1ull << 32)
#define V_DESC 0x0
#define V_AVAIL 0x1000
#define V_USED 0x2000
#define V_HDRS 0x4000 /* per request: the header (16 bytes), then its status byte */
#define V_TABLES 0x8000
#define V_DATA (V_TABLES + VQ * VCHAIN * 16)
#define V_SIZE (8u << 20) /* past V_DATA + VDATA * 2 * VSECTOR; whole pages (attach refuses less) */

struct vdesc {
	__u64 addr;
	__u32 len;
	__u16 flags, next;
};

static int vdev = -1;

static __u64 vrd(__u64 off, unsigned size)
{
	__u64 v = 0;

	if (pread(vdev, &v, size, off) != (ssize_t)size)
		die("pread");
	return v;
}

static void vwr(__u64 off, unsigned size, __u64 v)
{
	if (pwrite(vdev, &v, size, off) != (ssize_t)size)
		die("pwrite");
}

static __u64 region(unsigned index)
{
	struct vfio_region_info reg = { .argsz = sizeof(reg), .index = index };

	if (ioctl(vdev, VFIO_DEVICE_GET_REGION_INFO, &reg))
		die("VFIO_DEVICE_GET_REGION_INFO");
	return reg.offset;
}

static double vnow(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct vq {
	__u8 *mem;
	volatile __u16 *avail; /* flags, idx, ring[VQ] */
	volatile __u8 *used; /* flags, idx, ring[VQ] of (id, len) */
	__u64 notify, common; /* the notification address, the common configuration */
	__u16 avail_idx;
};

/* Bind, map our memory, attach, bus mastering on, find the common and notify
 * structures, reset, negotiate VERSION_1 | ACCESS_PLATFORM | INDIRECT_DESC, queue 0 of
 * VQ entries without an MSI-X vector, every request set up once, DRIVER_OK. */
static void virtio_setup(int iommufd, const char *node, struct vq *q)
{
	__u64 config, common = 0, notify_base = 0, features;
	__u32 notify_mult = 0, ioas;
	unsigned pos, hops = 0;

	vdev = open(node, O_RDWR);
	if (vdev < 0)
		die(node);
	bind_device(vdev, iommufd);
	q->mem = mmap(NULL, V_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (q->mem == MAP_FAILED || ioas_alloc(iommufd, &ioas).rc)
		die("setup");
	struct iommu_ioas_map map = {
		.size = sizeof(map),
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
		.ioas_id = ioas,
		.user_va = (uintptr_t)q->mem,
		.length = V_SIZE,
		.iova = VIOVA,
	};
	struct vfio_device_attach_iommufd_pt at = { .argsz = sizeof(at), .pt_id = ioas };

	if (ioctl(iommufd, IOMMU_IOAS_MAP, &map))
		die("IOMMU_IOAS_MAP");
	if (ioctl(vdev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at))
		die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
	config = region(VFIO_PCI_CONFIG_REGION_INDEX);
	vwr(config + PCI_COMMAND, 2, vrd(config + PCI_COMMAND, 2) | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY);
	if (!(vrd(config + PCI_STATUS, 2) & PCI_STATUS_CAP_LIST))
		die("no capability list");
	for (pos = vrd(config + PCI_CAPABILITY_LIST, 1) & ~3u; pos; pos = vrd(config + pos + 1, 1) & ~3u) {
		if (++hops > 48)
			die("capability list");
		if (vrd(config + pos, 1) != PCI_CAP_ID_VNDR)
			continue;
		unsigned type = vrd(config + pos + 3, 1); /* struct virtio_pci_cap: cfg_type, bar, offset */

		if (type == VIRTIO_CAP_COMMON && !common)
			common = region(vrd(config + pos + 4, 1)) + vrd(config + pos + 8, 4);
		if (type == VIRTIO_CAP_NOTIFY && !notify_base) {
			notify_base = region(vrd(config + pos + 4, 1)) + vrd(config + pos + 8, 4);
			notify_mult = vrd(config + pos + 16, 4);
		}
	}
	if (!common || !notify_base)
		die("virtio structures");
	vwr(common + CC_STATUS, 1, 0);
	while (vrd(common + CC_STATUS, 1))
		usleep(1000);
	vwr(common + CC_STATUS, 1, VS_ACKNOWLEDGE);
	vwr(common + CC_STATUS, 1, VS_ACKNOWLEDGE | VS_DRIVER);
	vwr(common + CC_DFSELECT, 4, 0);
	features = vrd(common + CC_DF, 4);
	vwr(common + CC_DFSELECT, 4, 1);
	features |= vrd(common + CC_DF, 4) << 32;
	features &= VF_VERSION_1 | VF_ACCESS_PLATFORM | VF_INDIRECT_DESC;
	if (!(features & VF_VERSION_1) || !(features & VF_INDIRECT_DESC))
		die("VERSION_1 and INDIRECT_DESC not offered");
	vwr(common + CC_GFSELECT, 4, 0);
	vwr(common + CC_GF, 4, (__u32)features);
	vwr(common + CC_GFSELECT, 4, 1);
	vwr(common + CC_GF, 4, features >> 32);
	vwr(common + CC_STATUS, 1, VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK);
	if (!(vrd(common + CC_STATUS, 1) & VS_FEATURES_OK))
		die("FEATURES_OK refused");
	vwr(common + CC_Q_SELECT, 2, 0);
	if (vrd(common + CC_Q_SIZE, 2) < VQ)
		die("queue 0 smaller than 256");
	vwr(common + CC_Q_SIZE, 2, VQ); /* its MSI-X vector stays NO_VECTOR from the reset */

	/* every request once: queue entry i is an indirect descriptor to table i; the
	 * available ring's entry i is i, every round the same */
	struct vdesc *desc = (struct vdesc *)(q->mem + V_DESC);

	q->avail = (volatile __u16 *)(q->mem + V_AVAIL);
	q->used = q->mem + V_USED;
	q->avail[0] = VAVAIL_NO_INTERRUPT;
	for (unsigned i = 0; i < VQ; i++) {
		struct vdesc *t = (struct vdesc *)(q->mem + V_TABLES + (__u64)i * VCHAIN * 16);
		__u32 *hdr = (__u32 *)(q->mem + V_HDRS + 32 * i);
		__u64 sector = (__u64)i * VDATA;

		hdr[0] = 0; /* VIRTIO_BLK_T_IN */
		hdr[1] = 0;
		memcpy(&hdr[2], &sector, 8);
		desc[i] = (struct vdesc){ VIOVA + V_TABLES + (__u64)i * VCHAIN * 16, VCHAIN * 16, VDESC_INDIRECT, 0 };
		t[0] = (struct vdesc){ VIOVA + V_HDRS + 32 * i, 16, VDESC_NEXT, 1 };
		for (unsigned j = 1; j <= VDATA; j++)
			t[j] = (struct vdesc){ VIOVA + V_DATA + (__u64)(j - 1) * 2 * VSECTOR, VSECTOR,
					       VDESC_NEXT | VDESC_WRITE, j + 1 };
		t[VCHAIN - 1] = (struct vdesc){ VIOVA + V_HDRS + 32 * i + 16, 1, VDESC_WRITE, 0 };
		q->avail[2 + i] = i;
	}
	vwr(common + CC_Q_DESC, 4, (__u32)(VIOVA + V_DESC));
	vwr(common + CC_Q_DESC + 4, 4, (VIOVA + V_DESC) >> 32);
	vwr(common + CC_Q_DRIVER, 4, (__u32)(VIOVA + V_AVAIL));
	vwr(common + CC_Q_DRIVER + 4, 4, (VIOVA + V_AVAIL) >> 32);
	vwr(common + CC_Q_DEVICE, 4, (__u32)(VIOVA + V_USED));
	vwr(common + CC_Q_DEVICE + 4, 4, (VIOVA + V_USED) >> 32);
	q->notify = notify_base + vrd(common + CC_Q_NOTIFY_OFF, 2) * notify_mult;
	vwr(common + CC_Q_ENABLE, 2, 1);
	vwr(common + CC_STATUS, 1, VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
	if ((vrd(common + CC_STATUS, 1) & (VS_DRIVER_OK | VS_NEEDS_RESET)) != VS_DRIVER_OK)
		die("DRIVER_OK");
	q->common = common;
}

/* One round: all VQ requests made available, one notification, the used index polled
 * until every one is used. 0, or -1 with EIO when a request did not complete with
 * VIRTIO_BLK_S_OK and the whole data length, ENODEV when the device needs a reset,
 * ETIMEDOUT after 60 s. */
static struct res virtio_round(struct vq *q)
{
	double t0 = vnow(), looked = t0;
	unsigned bad = 0;

	for (unsigned i = 0; i < VQ; i++)
		q->mem[V_HDRS + 32 * i + 16] = 0xff;
	q->avail_idx += VQ;
	__atomic_store_n(&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	vwr(q->notify, 2, 0);
	while (__atomic_load_n((volatile __u16 *)(q->used + 2), __ATOMIC_ACQUIRE) != q->avail_idx) {
		double t = vnow();

		if (t - looked > 1) { /* a device that gave up (DEVICE_NEEDS_RESET) uses nothing more */
			looked = t;
			if (vrd(q->common + CC_STATUS, 1) & VS_NEEDS_RESET) {
				errno = ENODEV;
				return xres(-1);
			}
		}
		if (t - t0 > 60) {
			errno = ETIMEDOUT;
			return xres(-1);
		}
		usleep(200);
	}
	for (unsigned i = 0; i < VQ; i++) {
		__u32 len;

		memcpy(&len, (const void *)(q->used + 4 + 8 * i + 4), 4);
		bad += q->mem[V_HDRS + 32 * i + 16] != 0 || len != VDATA * VSECTOR + 1;
	}
	errno = bad ? EIO : 0;
	return xres(bad ? -1 : 0);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1 };
	const char *mode;
	long count, i;
	int fd, dev = -1;
	__u32 ioas = 0, dev_id = 0;
	void *arg = NULL;
	unsigned long cmd = 0;
	struct vq vq = { 0 };

	if (argc != 5)
		return fprintf(stderr, "usage: hostile MODE IOMMU DEVICE COUNT\n"), 2;
	mode = argv[1];
	count = atol(argv[4]);
	sigaction(SIGUSR1, &sa, NULL);
	setvbuf(stdout, NULL, _IOLBF, 0);
	fd = open(argv[2], O_RDWR);
	if (fd < 0)
		die(argv[2]);
	if (!strcmp(mode, "alloc_tail")) {
		struct iommu_ioas_alloc *a = mmap(NULL, 4 * GIB, PROT_READ | PROT_WRITE,
						  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

		if (a == MAP_FAILED)
			die("mmap");
		a->size = 0xffffffff; /* the rest of the 4 GiB stays zero pages, never written */
		cmd = IOMMU_IOAS_ALLOC;
		arg = a;
	} else if (!strcmp(mode, "hw_info")) {
		static struct iommu_hw_info info;
		long page = sysconf(_SC_PAGESIZE);
		char *buf = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (buf == MAP_FAILED || mprotect(buf + page, page, PROT_NONE))
			die("mmap");
		dev = open(argv[3], O_RDWR);
		if (dev < 0)
			die(argv[3]);
		dev_id = bind_device(dev, fd);
		info.size = sizeof(info);
		info.dev_id = dev_id;
		info.data_len = 0xffffffff;
		info.data_uptr = (uintptr_t)buf;
		cmd = IOMMU_GET_HW_INFO;
		arg = &info;
	} else if (!strcmp(mode, "allow_iovas")) {
		static struct iommu_ioas_allow_iovas allow;
		struct iommu_iova_range *r = calloc(NRANGES, sizeof(*r));

		if (!r || ioas_alloc(fd, &ioas).rc)
			die("setup");
		for (i = 0; i < NRANGES; i++) {
			r[i].start = (__u64)(NRANGES - i) << 16;
			r[i].last = r[i].start + 0x7fff;
		}
		allow.size = sizeof(allow);
		allow.ioas_id = ioas;
		allow.num_iovas = NRANGES;
		allow.allowed_iovas = (uintptr_t)r;
		cmd = IOMMU_IOAS_ALLOW_IOVAS;
		arg = &allow;
	} else if (!strcmp(mode, "map_high")) {
		dev = open(argv[3], O_RDWR);
		if (dev < 0 || ioas_alloc(fd, &ioas).rc)
			die("setup");
		bind_device(dev, fd);
	} else if (!strcmp(mode, "virtio_chains")) {
		virtio_setup(fd, argv[3], &vq);
	} else {
		return fprintf(stderr, "unknown mode %s\n", mode), 2;
	}
	printf("READY\n");
	for (i = 0; count == 0 || i < count; i++) {
		if (cmd) {
			step0(mode, xioctl(fd, cmd, arg));
			continue;
		}
		if (vq.mem) {
			step(mode, virtio_round(&vq), "requests=%u", VQ);
			continue;
		}
		/* map_high: a mapping no process can have, accepted without a domain;
		 * the attach that would pin it is EFAULT, as GUP's. */
		struct iommu_ioas_map map = {
			.size = sizeof(map),
			.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
			.ioas_id = ioas,
			.user_va = 1ull << 63,
			.length = 1 << 20,
			.iova = 1 << 20,
		};
		struct vfio_device_attach_iommufd_pt at = { .argsz = sizeof(at), .pt_id = ioas };
		struct iommu_ioas_unmap un = { .size = sizeof(un), .ioas_id = ioas, .iova = 1 << 20, .length = 1 << 20 };

		step0("map_high_map", xioctl(fd, IOMMU_IOAS_MAP, &map));
		step0("map_high_attach", xioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at));
		step0("map_high_unmap", xioctl(fd, IOMMU_IOAS_UNMAP, &un));
	}
	return 0;
}
