/*
 * virtio_blk: a userspace driver for an assigned virtio-blk 1.x PCI device
 * ("modern", non-transitional: 1af4:1042), written from the virtio 1.2
 * specification (4.1 Virtio Over PCI Bus, 5.2 Block Device, 2.7 Split
 * Virtqueues) in the style of examples/nvme.c: bind the VFIO device cdev to an
 * iommufd, map our memory into an IOAS, attach, memory decoding and bus
 * mastering on, MSI-X on eventfds (vector 0 configuration changes, vector 1
 * request queue 0), then
 *
 *   - find the virtio structures (common, notify, ISR, device configuration) by
 *     walking the capability list in config space, as Linux and DPDK do;
 *   - reset the device, ACKNOWLEDGE | DRIVER, negotiate features, FEATURES_OK,
 *     read the device configuration (generation-checked), set up request
 *     queue 0 as a split ring in our memory, DRIVER_OK;
 *   - write a pattern in multi-segment requests (header, several data
 *     descriptors, status), read it back into other memory with other segment
 *     sizes and compare; one read through an indirect descriptor table, and one
 *     whose header is a normal descriptor followed by an indirect table (a
 *     layout 2.7.5.3.2 says the device MUST handle); GET_ID; FLUSH;
 *     WRITE_ZEROES and the zeros read back; the interrupts counted.
 *
 * Options (each after the above):
 *   -e  error cases: a data buffer at an unmapped IOVA (IOERR, and the device
 *       still works), sectors beyond the capacity (IOERR), an unknown request
 *       type (UNSUPP), a descriptor table at an unmapped IOVA (DEVICE_NEEDS_RESET
 *       and a configuration change interrupt; reset, set up again, I/O works)
 *   -r  function-level reset (VFIO_DEVICE_RESET) with a request queued, then
 *       set up again, I/O works
 *   -B FILE  the benchmark (bench/virtio_blk/run.py): the round trip has written
 *       the first BYTES of the disk through the device, so FILE (the disk's backing
 *       file) has them in the page cache; then 4 KiB random reads at queue depth 1
 *       and 32, 1 MiB sequential reads at queue depth 1 and 8 (each a chain of
 *       size_max segments, within seg_max), into our memory, timed from the first
 *       notification to the last completion, completions waited for on vector 1's
 *       eventfd; each case against the same reads of FILE with pread in this
 *       process, into the same memory, right after. A line per case:
 *       "bench NAME: device N IOPS X GB/s, pread N IOPS X GB/s, ratio R"
 *   -m anon|memfd  the memory the device reads and writes (default memfd)
 *   -n BYTES  how much of the disk the round trip (and the benchmark) uses (default 8M)
 *
 *   cc -O2 -Wall -Wextra -Werror -Iinclude -o virtio_blk examples/virtio_blk.c
 *   ./virtio_blk [-e] [-r] [-B FILE] [-m KIND] [-n BYTES] [IOMMU [DEVICE]]
 *
 * The pattern (as examples/nvme.c's): sector n holds n as a little-endian u64,
 * then bytes (n % 251 + i) & 0xff for i = 0 .. 503. It prints a line per check
 * and exits 0 when everything checked. A check after which the driver can go on
 * (a device reset brings it back) prints a FAILED line and the run continues;
 * the exit status is then 1 and the last line says how many failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

/* PCI config space */
#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_REVISION_CLASS 0x08
#define PCI_CAPABILITY_LIST 0x34
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CAP_ID_VNDR 0x09

/* struct virtio_pci_cap (4.1.4) */
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4
#define VIRTIO_PCI_CAP_PCI_CFG 5
#define CAP_CFG_TYPE 3
#define CAP_BAR 4
#define CAP_OFFSET 8
#define CAP_LENGTH 12
#define CAP_NOTIFY_MULT 16

/* struct virtio_pci_common_cfg (4.1.4.3) */
#define CC_DEVICE_FEATURE_SELECT 0x00
#define CC_DEVICE_FEATURE 0x04
#define CC_DRIVER_FEATURE_SELECT 0x08
#define CC_DRIVER_FEATURE 0x0c
#define CC_CONFIG_MSIX_VECTOR 0x10
#define CC_NUM_QUEUES 0x12
#define CC_DEVICE_STATUS 0x14
#define CC_CONFIG_GENERATION 0x15
#define CC_QUEUE_SELECT 0x16
#define CC_QUEUE_SIZE 0x18
#define CC_QUEUE_MSIX_VECTOR 0x1a
#define CC_QUEUE_ENABLE 0x1c
#define CC_QUEUE_NOTIFY_OFF 0x1e
#define CC_QUEUE_DESC 0x20
#define CC_QUEUE_DRIVER 0x28
#define CC_QUEUE_DEVICE 0x30
#define CC_SIZE 0x38
#define VIRTIO_MSI_NO_VECTOR 0xffff

/* device status (2.1) */
#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_DEVICE_NEEDS_RESET 0x40
#define S_FAILED 0x80

/* ISR status (4.1.4.5) */
#define ISR_QUEUE 1
#define ISR_CONFIG 2

/* feature bits (6, 5.2.3) */
#define F_SIZE_MAX (1ull << 1)
#define F_SEG_MAX (1ull << 2)
#define F_RO (1ull << 5)
#define F_BLK_SIZE (1ull << 6)
#define F_FLUSH (1ull << 9)
#define F_MQ (1ull << 12)
#define F_WRITE_ZEROES (1ull << 14)
#define F_INDIRECT_DESC (1ull << 28)
#define F_VERSION_1 (1ull << 32)
#define F_ACCESS_PLATFORM (1ull << 33)
#define WANTED                                                                                       \
	(F_VERSION_1 | F_ACCESS_PLATFORM | F_SEG_MAX | F_SIZE_MAX | F_BLK_SIZE | F_FLUSH | F_MQ |     \
	 F_WRITE_ZEROES | F_INDIRECT_DESC)

/* struct virtio_blk_config (5.2.4) */
#define BC_CAPACITY 0x00
#define BC_SIZE_MAX 0x08
#define BC_SEG_MAX 0x0c
#define BC_BLK_SIZE 0x14
#define BC_NUM_QUEUES 0x22
#define BC_MAX_WRITE_ZEROES_SECTORS 0x30
#define BC_MAX_WRITE_ZEROES_SEG 0x34
#define BC_SIZE 0x38 /* what this driver reads: up to max_write_zeroes_seg */

/* requests (5.2.6) */
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_WRITE_ZEROES 13
#define T_UNKNOWN 0x7e
#define ST_OK 0
#define ST_IOERR 1
#define ST_UNSUPP 2
#define ID_BYTES 20

/* split virtqueues (2.7) */
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define USED_F_NO_NOTIFY 1

struct desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags, next;
};

struct used_elem {
	uint32_t id, len;
};

struct blk_hdr {
	uint32_t type, reserved;
	uint64_t sector;
};

struct write_zeroes {
	uint64_t sector;
	uint32_t num_sectors, flags;
};

#define PAGE 4096u
#define SECTOR 512u
#define QSIZE_MAX 256
#define QD 16 /* requests in flight */
#define BAD_IOVA 0x7f0000000000ull /* never mapped */

/* Our memory, one mapping in the IOAS at IOVA_BASE; offsets into it: */
#define IOVA_BASE (1ull << 32)
#define OFF_DESC 0x0000  /* 256 x 16 bytes */
#define OFF_AVAIL 0x1000 /* 6 + 2 x 256 bytes */
#define OFF_USED 0x2000  /* 6 + 8 x 256 bytes */
#define OFF_HDRS 0x4000  /* per request slot: the header (16 bytes), then its status byte */
#define OFF_INDIRECT 0x8000
#define OFF_ID 0x9000
#define OFF_WZ 0xa000
#define OFF_SCRATCH 0x10000 /* 64 KiB for single requests */
#define OFF_DATA 0x100000   /* the two buffers of the round trip; with -B, the benchmark's slots after them */

static int dev_fd = -1, iommufd = -1, irq[2] = { -1, -1 };
static uint32_t ioas;
static uint64_t config;
static uint8_t *mem;
static size_t mem_size;

/* where the virtio structures are: file offsets of the device fd */
static uint64_t common, notify_base, isr, devcfg;
static uint32_t notify_mult, devcfg_len;

/* the negotiated state and the device's configuration */
static uint64_t features, capacity;
static uint32_t size_max, seg_max, blk_size, cfg_queues, wz_max_sectors, wz_max_seg;

/* request queue 0 */
static volatile struct desc *desc;
static volatile uint16_t *avail; /* flags, idx, ring[qsize], used_event */
static volatile uint8_t *used;   /* flags, idx, ring[qsize] of used_elem, avail_event */
static uint16_t qsize, avail_idx, last_used, notify_off;
static uint64_t interrupts, config_interrupts, notifications, requests;

static void die(const char *what)
{
	fprintf(stderr, "virtio_blk: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *what)
{
	fprintf(stderr, "virtio_blk: FAILED: %s\n", what);
	exit(1);
}

/* A check that failed where the driver can go on (a reset brings the device back):
 * reported, counted, and the exit status is 1. */
static unsigned failures;

static void failed(const char *what)
{
	fprintf(stderr, "virtio_blk: FAILED: %s\n", what);
	printf("FAILED: %s\n", what);
	failures++;
}

static uint64_t rd(uint64_t off, unsigned size)
{
	uint64_t v = 0;

	if (pread(dev_fd, &v, size, off) != (ssize_t)size)
		die("pread");
	return v;
}

static void wr(uint64_t off, unsigned size, uint64_t v)
{
	if (pwrite(dev_fd, &v, size, off) != (ssize_t)size)
		die("pwrite");
}

/* Each field of the common configuration by its natural width (4.1.3.1). */
static uint8_t rd8(uint64_t off) { return rd(off, 1); }
static uint16_t rd16(uint64_t off) { return rd(off, 2); }
static uint32_t rd32(uint64_t off) { return rd(off, 4); }
static void wr8(uint64_t off, uint8_t v) { wr(off, 1, v); }
static void wr16(uint64_t off, uint16_t v) { wr(off, 2, v); }
static void wr32(uint64_t off, uint32_t v) { wr(off, 4, v); }

/* 64-bit fields as two 32-bit halves, low first (as Linux's vp_iowrite64_twopart). */
static void wr64(uint64_t off, uint64_t v)
{
	wr32(off, (uint32_t)v);
	wr32(off + 4, v >> 32);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t iova(const volatile void *p)
{
	return IOVA_BASE + ((const volatile uint8_t *)p - mem);
}

static uint8_t status(void)
{
	return rd8(common + CC_DEVICE_STATUS);
}

static void fill_pattern(uint8_t *p, uint64_t sector, uint64_t n)
{
	for (uint64_t b = 0; b < n; b++, sector++, p += SECTOR) {
		memcpy(p, &sector, 8);
		for (unsigned i = 0; i < SECTOR - 8; i++)
			p[8 + i] = (sector % 251 + i) & 0xff;
	}
}

/* -- finding the device's structures ---------------------------------------------------- */

static const char *cfg_name(unsigned type)
{
	static const char *names[] = { "?", "common", "notify", "isr", "device", "pci" };
	return type < 6 ? names[type] : "reserved";
}

static uint64_t bar_region(unsigned bar, uint64_t *size)
{
	struct vfio_region_info reg = { .argsz = sizeof(reg), .index = bar };

	if (ioctl(dev_fd, VFIO_DEVICE_GET_REGION_INFO, &reg))
		die("VFIO_DEVICE_GET_REGION_INFO");
	*size = reg.size;
	return reg.offset;
}

/* Walk the capability list; the first capability of each virtio structure type counts
 * (4.1.4: "the driver SHOULD use the first instance"), reserved types are ignored. */
static void find_structures(void)
{
	uint32_t found = 0, len[5] = { 0 };
	uint64_t where[5] = { 0 };
	int hops = 0;

	if (!(rd(config + PCI_STATUS, 2) & PCI_STATUS_CAP_LIST))
		fail("no capability list");
	for (unsigned pos = rd(config + PCI_CAPABILITY_LIST, 1) & ~3u; pos; pos = rd(config + pos + 1, 1) & ~3u) {
		if (++hops > 48 || pos < 0x40)
			fail("capability list is malformed");
		if (rd(config + pos, 1) != PCI_CAP_ID_VNDR)
			continue;
		unsigned type = rd(config + pos + CAP_CFG_TYPE, 1), bar = rd(config + pos + CAP_BAR, 1);
		uint32_t off = rd(config + pos + CAP_OFFSET, 4), length = rd(config + pos + CAP_LENGTH, 4);
		if (type == VIRTIO_PCI_CAP_NOTIFY_CFG)
			printf("capability 0x%02x: virtio %s cfg: bar %u offset 0x%x length 0x%x multiplier %u\n", pos,
			       cfg_name(type), bar, off, length, (unsigned)rd(config + pos + CAP_NOTIFY_MULT, 4));
		else
			printf("capability 0x%02x: virtio %s cfg: bar %u offset 0x%x length 0x%x\n", pos, cfg_name(type),
			       bar, off, length);
		if (type < VIRTIO_PCI_CAP_COMMON_CFG || type > VIRTIO_PCI_CAP_DEVICE_CFG || found & 1u << type)
			continue; /* PCI_CFG access (type 5) is not needed: BARs are read with pread */
		if (bar > 5)
			fail("a virtio capability names a reserved BAR");
		uint64_t bar_size, base = bar_region(bar, &bar_size);
		if ((uint64_t)off + length > bar_size)
			fail("a virtio structure lies outside its BAR");
		found |= 1u << type;
		where[type] = base + off;
		len[type] = length;
		if (type == VIRTIO_PCI_CAP_NOTIFY_CFG)
			notify_mult = rd(config + pos + CAP_NOTIFY_MULT, 4);
	}
	if ((found & 0x1e) != 0x1e)
		fail("a virtio structure is missing (common, notify, isr and device cfg are needed)");
	if (len[VIRTIO_PCI_CAP_COMMON_CFG] < CC_SIZE)
		fail("common cfg too short");
	if (len[VIRTIO_PCI_CAP_ISR_CFG] < 1)
		fail("isr cfg too short");
	common = where[VIRTIO_PCI_CAP_COMMON_CFG];
	notify_base = where[VIRTIO_PCI_CAP_NOTIFY_CFG];
	isr = where[VIRTIO_PCI_CAP_ISR_CFG];
	devcfg = where[VIRTIO_PCI_CAP_DEVICE_CFG];
	devcfg_len = len[VIRTIO_PCI_CAP_DEVICE_CFG];
	if (devcfg_len < BC_SIZE)
		fail("device cfg too short for struct virtio_blk_config");
	printf("virtio structures: common, notify, isr and device cfg found\n");
}

/* -- set-up ------------------------------------------------------------------------------- */

static void set_status(uint8_t s)
{
	wr8(common + CC_DEVICE_STATUS, s);
}

/* Reset (2.4): write 0, wait until device_status reads 0; then queues and the
 * configuration change event are unmapped from MSI-X vectors (4.1.5.1.2.1) and
 * queue 0 is disabled. */
static void reset_device(const char *when)
{
	double t0 = now();

	set_status(0);
	while (status() != 0) {
		if (now() - t0 > 10)
			fail("device_status did not read 0 after the reset");
		usleep(1000);
	}
	uint16_t cv = rd16(common + CC_CONFIG_MSIX_VECTOR);
	wr16(common + CC_QUEUE_SELECT, 0);
	uint16_t qe = rd16(common + CC_QUEUE_ENABLE), qv = rd16(common + CC_QUEUE_MSIX_VECTOR);
	if (cv != VIRTIO_MSI_NO_VECTOR || qv != VIRTIO_MSI_NO_VECTOR)
		fail("a vector is still mapped after the reset");
	if (qe)
		fail("queue 0 is still enabled after the reset");
	if (when)
		printf("reset (%s): device_status 0x0, config_msix_vector 0x%x, queue 0 enable %u msix_vector 0x%x\n", when,
		       cv, qe, qv);
}

static uint64_t device_features(void)
{
	wr32(common + CC_DEVICE_FEATURE_SELECT, 0);
	uint64_t lo = rd32(common + CC_DEVICE_FEATURE);
	wr32(common + CC_DEVICE_FEATURE_SELECT, 1);
	return lo | (uint64_t)rd32(common + CC_DEVICE_FEATURE) << 32;
}

static void driver_features(uint64_t f)
{
	wr32(common + CC_DRIVER_FEATURE_SELECT, 0);
	wr32(common + CC_DRIVER_FEATURE, (uint32_t)f);
	wr32(common + CC_DRIVER_FEATURE_SELECT, 1);
	wr32(common + CC_DRIVER_FEATURE, f >> 32);
}

/* The device configuration, read until config_generation is the same before and
 * after (2.5.1). 64-bit fields as two 32-bit reads (4.1.3.1). */
static void read_device_config(void)
{
	for (int tries = 0;; tries++) {
		uint8_t gen = rd8(common + CC_CONFIG_GENERATION);
		capacity = rd32(devcfg + BC_CAPACITY) | (uint64_t)rd32(devcfg + BC_CAPACITY + 4) << 32;
		size_max = features & F_SIZE_MAX ? rd32(devcfg + BC_SIZE_MAX) : 0;
		seg_max = features & F_SEG_MAX ? rd32(devcfg + BC_SEG_MAX) : 0;
		blk_size = features & F_BLK_SIZE ? rd32(devcfg + BC_BLK_SIZE) : SECTOR;
		cfg_queues = features & F_MQ ? rd16(devcfg + BC_NUM_QUEUES) : 1;
		wz_max_sectors = features & F_WRITE_ZEROES ? rd32(devcfg + BC_MAX_WRITE_ZEROES_SECTORS) : 0;
		wz_max_seg = features & F_WRITE_ZEROES ? rd32(devcfg + BC_MAX_WRITE_ZEROES_SEG) : 0;
		if (rd8(common + CC_CONFIG_GENERATION) == gen)
			break;
		if (tries > 100)
			fail("config_generation keeps changing");
	}
}

/* Reset, initialization (3.1.1), request queue 0 with its descriptor table at desc_iova
 * (our table, or an address the IOMMU refuses), MSI-X vectors, DRIVER_OK. */
static void bring_up(int verbose, uint64_t desc_iova)
{
	reset_device(verbose ? "initial" : NULL);
	set_status(S_ACKNOWLEDGE);
	set_status(S_ACKNOWLEDGE | S_DRIVER);

	uint64_t offered = device_features();
	if (!(offered & F_VERSION_1))
		fail("VIRTIO_F_VERSION_1 not offered: not a virtio 1.x device");
	if (!(offered & F_ACCESS_PLATFORM))
		fail("VIRTIO_F_ACCESS_PLATFORM not offered: the device's DMA would bypass the IOMMU");
	features = offered & WANTED;
	driver_features(features);
	set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	uint8_t st = status();
	if (!(st & S_FEATURES_OK))
		fail("FEATURES_OK did not stay set");
	if (verbose)
		printf("features: device 0x%016llx, accepted 0x%016llx, device_status 0x%x (FEATURES_OK)\n",
		       (unsigned long long)offered, (unsigned long long)features, st);

	read_device_config();
	if (features & F_SIZE_MAX && size_max < SECTOR)
		fail("size_max below a sector");
	if (verbose)
		printf("config: capacity %llu sectors, size_max %u, seg_max %u, blk_size %u, num_queues %u, "
		       "max_write_zeroes_sectors %u, max_write_zeroes_seg %u\n",
		       (unsigned long long)capacity, size_max, seg_max, blk_size, cfg_queues, wz_max_sectors, wz_max_seg);

	/* MSI-X: configuration changes on vector 0; a failed mapping reads back NO_VECTOR */
	wr16(common + CC_CONFIG_MSIX_VECTOR, 0);
	if (rd16(common + CC_CONFIG_MSIX_VECTOR) != 0)
		fail("config_msix_vector 0 not taken");
	uint16_t nq = rd16(common + CC_NUM_QUEUES);
	if (nq < 1 || (features & F_MQ && nq < cfg_queues))
		fail("num_queues of the common cfg");

	wr16(common + CC_QUEUE_SELECT, 0);
	uint16_t qmax = rd16(common + CC_QUEUE_SIZE);
	if (!qmax)
		fail("queue 0 not available (queue_size 0)");
	qsize = 1;
	while (qsize * 2 <= qmax && qsize * 2 <= QSIZE_MAX)
		qsize *= 2;
	wr16(common + CC_QUEUE_SIZE, qsize);
	wr16(common + CC_QUEUE_MSIX_VECTOR, 1);
	if (rd16(common + CC_QUEUE_MSIX_VECTOR) != 1)
		fail("queue_msix_vector 1 not taken");
	desc = (volatile struct desc *)(mem + OFF_DESC);
	avail = (volatile uint16_t *)(mem + OFF_AVAIL);
	used = mem + OFF_USED;
	memset(mem + OFF_DESC, 0, OFF_HDRS - OFF_DESC);
	avail_idx = last_used = 0;
	wr64(common + CC_QUEUE_DESC, desc_iova);
	wr64(common + CC_QUEUE_DRIVER, IOVA_BASE + OFF_AVAIL);
	wr64(common + CC_QUEUE_DEVICE, IOVA_BASE + OFF_USED);
	notify_off = rd16(common + CC_QUEUE_NOTIFY_OFF);
	wr16(common + CC_QUEUE_ENABLE, 1);
	if (rd16(common + CC_QUEUE_ENABLE) != 1)
		fail("queue_enable did not read back 1");
	set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	st = status();
	if (st & (S_DEVICE_NEEDS_RESET | S_FAILED) || !(st & S_DRIVER_OK))
		fail("device_status after DRIVER_OK");
	if (verbose)
		printf("queue 0: size %u (max %u), notify_off %u, msix vector 1; common num_queues %u; "
		       "device_status 0x%x (DRIVER_OK)\n",
		       qsize, qmax, notify_off, nq, st);
}

/* -- requests ----------------------------------------------------------------------------- */

static struct blk_hdr *hdr_of(unsigned slot)
{
	return (struct blk_hdr *)(mem + OFF_HDRS + slot * 32);
}

static volatile uint8_t *status_of(unsigned slot)
{
	return mem + OFF_HDRS + slot * 32 + 16;
}

static void put_desc(uint16_t i, uint64_t addr, uint32_t len, uint16_t flags)
{
	desc[i].addr = addr;
	desc[i].len = len;
	desc[i].flags = flags;
	desc[i].next = flags & DESC_F_NEXT ? i + 1 : 0;
}

static void push(uint16_t head)
{
	avail[2 + avail_idx % qsize] = head;
	avail_idx++;
	requests++;
}

/* Publish what was pushed and notify the device unless it asked not to be (2.7.7). */
static void kick(void)
{
	__atomic_thread_fence(__ATOMIC_RELEASE);
	__atomic_store_n(&avail[1], avail_idx, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (!(__atomic_load_n((volatile uint16_t *)used, __ATOMIC_ACQUIRE) & USED_F_NO_NOTIFY)) {
		wr16(notify_base + (uint64_t)notify_off * notify_mult, 0);
		notifications++;
	}
}

static uint64_t drain(int fd)
{
	uint64_t n = 0;

	if (read(fd, &n, sizeof(n)) != sizeof(n) && errno != EAGAIN)
		die("read eventfd");
	return n;
}

/* The next used element, waiting for the queue's interrupt when there is none yet. */
static struct used_elem reap(void)
{
	for (;;) {
		uint16_t idx = __atomic_load_n((volatile uint16_t *)(used + 2), __ATOMIC_ACQUIRE);
		if (idx != last_used) {
			struct used_elem e;
			memcpy(&e, (const void *)(used + 4 + 8 * (last_used % qsize)), sizeof(e));
			last_used++;
			return e;
		}
		struct pollfd p = { .fd = irq[1], .events = POLLIN };
		int r = poll(&p, 1, 10000);
		if (r < 0)
			die("poll");
		if (r == 0) {
			fprintf(stderr, "virtio_blk: device_status 0x%x\n", status());
			fail("no completion within 10 s");
		}
		interrupts += drain(irq[1]);
	}
}

/* The next used element (1), or 0 when the configuration vector fired and the device
 * reads DEVICE_NEEDS_RESET instead. */
static int reap_or_needs_reset(struct used_elem *e)
{
	for (;;) {
		uint16_t idx = __atomic_load_n((volatile uint16_t *)(used + 2), __ATOMIC_ACQUIRE);
		if (idx != last_used) {
			*e = reap();
			return 1;
		}
		struct pollfd p[2] = { { .fd = irq[0], .events = POLLIN }, { .fd = irq[1], .events = POLLIN } };
		int r = poll(p, 2, 10000);
		if (r < 0)
			die("poll");
		if (r == 0) {
			fprintf(stderr, "virtio_blk: device_status 0x%x\n", status());
			fail("no completion and no configuration change within 10 s");
		}
		if (p[1].revents)
			interrupts += drain(irq[1]);
		if (p[0].revents) {
			config_interrupts += drain(irq[0]);
			if (status() & S_DEVICE_NEEDS_RESET)
				return 0;
		}
	}
}

struct seg {
	uint64_t addr;
	uint32_t len;
	uint16_t write; /* device-writable */
};

/* One request (header, segments, status) waited for: its status; the used length to *len. */
static uint8_t request(uint32_t type, uint64_t sector, const struct seg *segs, unsigned n, uint32_t *len)
{
	struct blk_hdr *h = hdr_of(0);
	uint16_t d = 0;

	*h = (struct blk_hdr){ .type = type, .sector = sector };
	*status_of(0) = 0xff;
	put_desc(d++, iova(h), sizeof(*h), DESC_F_NEXT);
	for (unsigned i = 0; i < n; i++, d++)
		put_desc(d, segs[i].addr, segs[i].len, DESC_F_NEXT | (segs[i].write ? DESC_F_WRITE : 0));
	put_desc(d, iova(status_of(0)), 1, DESC_F_WRITE);
	push(0);
	kick();
	struct used_elem e = reap();
	if (e.id != 0)
		fail("used element for another chain");
	if (len)
		*len = e.len;
	return *status_of(0);
}

static void must_ok(uint8_t st, uint32_t len, uint32_t want_len, const char *what)
{
	if (st != ST_OK) {
		fprintf(stderr, "virtio_blk: FAILED: %s: status %u\n", what, st);
		exit(1);
	}
	/* len: the bytes written into the device-writable part of the chain (2.7.8) */
	if (len != want_len) {
		fprintf(stderr, "virtio_blk: FAILED: %s: used length %u, expected %u\n", what, len, want_len);
		exit(1);
	}
}

/* One request that must succeed with want_len bytes written into its writable part. */
static void request_ok(uint32_t type, uint64_t sector, const struct seg *segs, unsigned n, uint32_t want_len,
		       const char *what)
{
	uint32_t len;
	uint8_t st = request(type, sector, segs, n, &len);

	must_ok(st, len, want_len, what);
}

/* Read or write bytes at buf from sector, in requests of at most max_segs data segments of
 * at most seg_bytes each, up to QD requests in flight. Returns the number of requests. */
static unsigned transfer(uint32_t type, uint8_t *buf, uint64_t sector, uint64_t bytes, uint32_t seg_bytes,
			 unsigned max_segs)
{
	unsigned total = 0;

	for (uint64_t off = 0; off < bytes;) {
		unsigned nreq = 0;
		uint16_t d = 0, heads[QD];
		uint32_t want[QD];

		while (off < bytes && nreq < QD && d + max_segs + 2 <= qsize) {
			struct blk_hdr *h = hdr_of(nreq);
			*h = (struct blk_hdr){ .type = type, .sector = sector + off / SECTOR };
			*status_of(nreq) = 0xff;
			heads[nreq] = d;
			put_desc(d++, iova(h), sizeof(*h), DESC_F_NEXT);
			uint64_t n = 0;
			for (unsigned s = 0; s < max_segs && off + n < bytes; s++) {
				uint32_t k = bytes - off - n < seg_bytes ? bytes - off - n : seg_bytes;
				put_desc(d++, iova(buf + off + n), k, DESC_F_NEXT | (type == T_IN ? DESC_F_WRITE : 0));
				n += k;
			}
			put_desc(d++, iova(status_of(nreq)), 1, DESC_F_WRITE);
			want[nreq] = (type == T_IN ? n : 0) + 1;
			push(heads[nreq]);
			off += n;
			nreq++;
		}
		kick();
		for (unsigned i = 0; i < nreq; i++) {
			struct used_elem e = reap();
			unsigned slot = 0;
			while (slot < nreq && heads[slot] != e.id)
				slot++;
			if (slot == nreq)
				fail("used element with an id we did not submit");
			must_ok(*status_of(slot), e.len, want[slot], type == T_IN ? "read" : "write");
		}
		total += nreq;
	}
	return total;
}

static uint32_t seg_limit(uint32_t want)
{
	uint32_t s = size_max && size_max < want ? size_max : want;
	return s & ~(SECTOR - 1);
}

static unsigned segs_limit(unsigned want)
{
	unsigned m = seg_max && seg_max < want ? seg_max : want;
	return m ? m : 1;
}

static void read_check(const char *when)
{
	uint8_t *buf = mem + OFF_SCRATCH, want[8 * SECTOR];
	struct seg s = { iova(buf), sizeof(want), 1 };

	memset(buf, 0, sizeof(want));
	request_ok(T_IN, 0, &s, 1, sizeof(want) + 1, when);
	fill_pattern(want, 0, 8);
	if (memcmp(buf, want, sizeof(want)))
		fail("data differs");
	printf("%s: device_status 0x%x, data intact\n", when, status());
}

/* -- the round trip ----------------------------------------------------------------------- */

static void round_trip(uint64_t bytes)
{
	uint8_t *out = mem + OFF_DATA, *in = out + bytes + PAGE;
	uint64_t sectors = bytes / SECTOR;

	/* writes: 64 KiB segments (or size_max), 8 per request (or seg_max) */
	uint32_t wseg = seg_limit(64 << 10);
	unsigned wsegs = segs_limit(8);
	fill_pattern(out, 0, sectors);
	unsigned wreq = transfer(T_OUT, out, 0, bytes, wseg, wsegs);
	/* reads: 3.5 KiB segments (7 sectors: they straddle pages), 16 per request */
	uint32_t rseg = seg_limit(7 * SECTOR);
	unsigned rsegs = segs_limit(16);
	memset(in, 0xee, bytes);
	unsigned rreq = transfer(T_IN, in, 0, bytes, rseg, rsegs);
	if (memcmp(in, out, bytes))
		fail("read back differs from what was written");
	printf("round trip: wrote %llu bytes (sectors 0-%llu) in %u requests of %u x %u-byte segments, read back in "
	       "%u requests of %u x %u-byte segments: equal\n",
	       (unsigned long long)bytes, (unsigned long long)sectors - 1, wreq, wsegs, wseg, rreq, rsegs, rseg);

	/* One read through an indirect table (2.7.5.3): header, 4 segments of 16 KiB put
	 * in reverse order in memory, status; one descriptor in the ring. */
	if (!(features & F_INDIRECT_DESC))
		fail("VIRTIO_RING_F_INDIRECT_DESC not negotiated");
	if (segs_limit(4) < 4 || seg_limit(16 << 10) < (16 << 10))
		fail("seg_max / size_max too small for the indirect request");
	struct desc *t = (struct desc *)(mem + OFF_INDIRECT);
	uint8_t *buf = mem + OFF_SCRATCH;
	struct blk_hdr *h = hdr_of(0);
	*h = (struct blk_hdr){ .type = T_IN, .sector = 128 };
	*status_of(0) = 0xff;
	memset(buf, 0, 64 << 10);
	t[0] = (struct desc){ iova(h), sizeof(*h), DESC_F_NEXT, 1 };
	for (unsigned i = 0; i < 4; i++)
		t[1 + i] = (struct desc){ iova(buf + (3 - i) * (16 << 10)), 16 << 10, DESC_F_NEXT | DESC_F_WRITE, 2 + i };
	t[5] = (struct desc){ iova(status_of(0)), 1, DESC_F_WRITE, 0 };
	put_desc(0, iova(t), 6 * sizeof(*t), DESC_F_INDIRECT);
	push(0);
	kick();
	struct used_elem e = reap();
	if (e.id != 0)
		fail("used element for another chain");
	must_ok(*status_of(0), e.len, (64 << 10) + 1, "indirect read");
	for (unsigned i = 0; i < 4; i++)
		if (memcmp(buf + (3 - i) * (16 << 10), out + 128 * SECTOR + i * (16 << 10), 16 << 10))
			fail("read through the indirect table differs");
	printf("indirect: 64 KiB read (sector 128) through a table of 6 descriptors, 4 segments in reverse order: "
	       "equal\n");

	/* 2.7.5.3.2: "The device MUST handle the case of zero or more normal chained
	 * descriptors followed by a single descriptor with VIRTQ_DESC_F_INDIRECT": the header
	 * in the ring's table, then an indirect table with 2 data segments and the status. */
	t = (struct desc *)(mem + OFF_INDIRECT + 0x800);
	*h = (struct blk_hdr){ .type = T_IN, .sector = 256 };
	*status_of(0) = 0xff;
	memset(buf, 0, 8 << 10);
	t[0] = (struct desc){ iova(buf + (4 << 10)), 4 << 10, DESC_F_NEXT | DESC_F_WRITE, 1 };
	t[1] = (struct desc){ iova(buf), 4 << 10, DESC_F_NEXT | DESC_F_WRITE, 2 };
	t[2] = (struct desc){ iova(status_of(0)), 1, DESC_F_WRITE, 0 };
	put_desc(0, iova(h), sizeof(*h), DESC_F_NEXT);
	put_desc(1, iova(t), 3 * sizeof(*t), DESC_F_INDIRECT);
	push(0);
	kick();
	if (!reap_or_needs_reset(&e)) {
		failed("a chain of a normal descriptor then an indirect one: the device went to DEVICE_NEEDS_RESET "
		       "(2.7.5.3.2)");
		bring_up(0, IOVA_BASE + OFF_DESC);
	} else {
		if (e.id != 0)
			fail("used element for another chain");
		must_ok(*status_of(0), e.len, (8 << 10) + 1, "read through a normal then an indirect descriptor");
		if (memcmp(buf + (4 << 10), out + 256 * SECTOR, 4 << 10) || memcmp(buf, out + 256 * SECTOR + (4 << 10), 4 << 10))
			fail("read through a normal then an indirect descriptor differs");
		printf("indirect after a normal descriptor: 8 KiB read (sector 256), header in the ring's table, data "
		       "and status in an indirect table: equal\n");
	}

	/* GET_ID: 20 bytes, NUL-padded (not NUL-terminated when 20 long) */
	uint8_t *id = mem + OFF_ID;
	char serial[ID_BYTES + 1] = { 0 };
	memset(id, 0xee, ID_BYTES);
	struct seg s = { iova(id), ID_BYTES, 1 };
	request_ok(T_GET_ID, 0, &s, 1, ID_BYTES + 1, "GET_ID");
	memcpy(serial, id, ID_BYTES);
	for (unsigned i = strlen(serial); i < ID_BYTES; i++)
		if (id[i])
			fail("GET_ID: the serial is not NUL-padded");
	printf("get id: serial '%s'\n", serial);

	if (!(features & F_FLUSH))
		fail("VIRTIO_BLK_F_FLUSH not negotiated");
	request_ok(T_FLUSH, 0, NULL, 0, 1, "FLUSH");
	printf("flush: status 0\n");

	/* WRITE_ZEROES over the last 64 sectors of the round trip, read back */
	if (!(features & F_WRITE_ZEROES) || wz_max_sectors < 64 || wz_max_seg < 1)
		fail("WRITE_ZEROES of 64 sectors not possible");
	struct write_zeroes *wz = (struct write_zeroes *)(mem + OFF_WZ);
	*wz = (struct write_zeroes){ .sector = sectors - 64, .num_sectors = 64, .flags = 0 };
	s = (struct seg){ iova(wz), sizeof(*wz), 0 };
	request_ok(T_WRITE_ZEROES, 0, &s, 1, 1, "WRITE_ZEROES");
	memset(buf, 0xee, 64 * SECTOR);
	s = (struct seg){ iova(buf), 64 * SECTOR, 1 };
	request_ok(T_IN, sectors - 64, &s, 1, 64 * SECTOR + 1, "read of the zeroes");
	for (unsigned i = 0; i < 64 * SECTOR; i++)
		if (buf[i])
			fail("WRITE_ZEROES left data");
	printf("write zeroes (sectors %llu-%llu) and read back: zeros\n", (unsigned long long)sectors - 64,
	       (unsigned long long)sectors - 1);

	interrupts += drain(irq[1]);
	if (!interrupts)
		fail("no interrupt on vector 1");
	printf("interrupts: %llu on vector 1 for %llu requests (%llu notifications)\n", (unsigned long long)interrupts,
	       (unsigned long long)requests, (unsigned long long)notifications);
}

/* -- error cases --------------------------------------------------------------------------- */

static void expect(uint8_t got, uint8_t want, const char *what)
{
	static const char *names[] = { "OK", "IOERR", "UNSUPP" };

	if (got != want) {
		fprintf(stderr, "virtio_blk: FAILED: %s: status %u, expected %u\n", what, got, want);
		exit(1);
	}
	printf("%s: status %u (%s)\n", what, got, names[got]);
}

static void ring_fault(void)
{
	config_interrupts += drain(irq[0]);
	/* the descriptor table at an address the IOMMU refuses; avail and used rings are ours */
	bring_up(0, BAD_IOVA);
	struct blk_hdr *h = hdr_of(0);
	*h = (struct blk_hdr){ .type = T_IN, .sector = 0 };
	push(0);
	kick();
	struct pollfd p = { .fd = irq[0], .events = POLLIN };
	int r = poll(&p, 1, 10000);
	if (r < 0)
		die("poll");
	if (r == 0) {
		fprintf(stderr, "virtio_blk: device_status 0x%x\n", status());
		fail("no configuration change interrupt within 10 s");
	}
	uint64_t n = drain(irq[0]);
	config_interrupts += n;
	uint8_t st = status(), i = rd8(isr);
	if (!(st & S_DEVICE_NEEDS_RESET))
		fail("DEVICE_NEEDS_RESET not set");
	/* 4.1.4.5.1: the device MUST set the Device Configuration Interrupt bit in ISR
	 * status before sending a configuration change notification (MSI-X or not) */
	if (!(i & ISR_CONFIG))
		failed("ISR: the device configuration interrupt bit is not set with the configuration change "
		       "notification (4.1.4.5.1)");
	printf("descriptor table at an unmapped IOVA: device_status 0x%x (DEVICE_NEEDS_RESET), "
	       "config interrupt on vector 0, ISR 0x%x\n",
	       st, i);
	bring_up(0, IOVA_BASE + OFF_DESC);
	read_check("after the reset from DEVICE_NEEDS_RESET");
}

static void errors(void)
{
	uint8_t *buf = mem + OFF_SCRATCH;
	struct seg s[2];

	s[0] = (struct seg){ BAD_IOVA, 4096, 1 };
	expect(request(T_IN, 0, s, 1, NULL), ST_IOERR, "read into an unmapped buffer");
	fill_pattern(buf, 0, 16); /* what sectors 0-15 hold: whatever part lands changes nothing */
	s[0] = (struct seg){ iova(buf), 4096, 0 };
	s[1] = (struct seg){ BAD_IOVA, 4096, 0 };
	expect(request(T_OUT, 0, s, 2, NULL), ST_IOERR, "write from an unmapped buffer");
	read_check("after the unmapped buffers");

	char what[96];
	s[0] = (struct seg){ iova(buf), 8 * SECTOR, 1 };
	snprintf(what, sizeof(what), "read at sector %llu (the capacity)", (unsigned long long)capacity);
	expect(request(T_IN, capacity, s, 1, NULL), ST_IOERR, what);
	snprintf(what, sizeof(what), "read across the end (sector %llu, 8 sectors)", (unsigned long long)capacity - 4);
	expect(request(T_IN, capacity - 4, s, 1, NULL), ST_IOERR, what);
	expect(request(T_UNKNOWN, 0, NULL, 0, NULL), ST_UNSUPP, "unknown request type 0x7e");
	read_check("after the errors");
	ring_fault();
}

static void resets(void)
{
	/* a request in the available ring, not yet notified */
	struct seg s = { iova(mem + OFF_SCRATCH), 8 * SECTOR, 1 };
	struct blk_hdr *h = hdr_of(0);
	*h = (struct blk_hdr){ .type = T_IN, .sector = 0 };
	put_desc(0, iova(h), sizeof(*h), DESC_F_NEXT);
	put_desc(1, s.addr, s.len, DESC_F_NEXT | DESC_F_WRITE);
	put_desc(2, iova(status_of(0)), 1, DESC_F_WRITE);
	push(0);
	avail[1] = avail_idx;
	if (ioctl(dev_fd, VFIO_DEVICE_RESET))
		die("VFIO_DEVICE_RESET");
	reset_device("function-level reset");
	bring_up(0, IOVA_BASE + OFF_DESC);
	read_check("after the function-level reset");
}

/* -- benchmark ------------------------------------------------------------------------------ */

#define SLOT (1u << 20)   /* a request's buffer */
#define BENCH_SLOTS 32    /* the deepest queue of the benchmark */
#define SEED 0x9e3779b97f4a7c15ull

static uint64_t bench_off; /* where the slots are in our memory: after the round trip's buffers */
static uint64_t rng = SEED;

static uint64_t next_rand(void)
{
	rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
	return rng;
}

static uint8_t *slot_buf(unsigned slot)
{
	return mem + bench_off + (uint64_t)slot * SLOT;
}

static int used_pending(void)
{
	return __atomic_load_n((volatile uint16_t *)(used + 2), __ATOMIC_ACQUIRE) != last_used;
}

struct result {
	double iops, gbps;
};

/* count reads of size bytes, qd in flight, random (within span) or sequential. A request in
 * slot s is a chain at descriptors s * per ..: header, data segments of at most size_max
 * bytes (at most seg_max of them), status. Notified once per batch of requests made
 * available; every used element there is taken before the slots are refilled. */
static struct result bench_dev(uint32_t size, unsigned qd, uint64_t span, int random, uint64_t count)
{
	uint32_t seg = seg_limit(size);
	unsigned nseg = (size + seg - 1) / seg, per = nseg + 2;
	unsigned free_slots[BENCH_SLOTS], nfree = 0;
	uint64_t issued = 0, done = 0, seq = 0;
	double t0 = 0;

	if (!seg || nseg > segs_limit(nseg))
		fail("a benchmark request does not fit in seg_max x size_max");
	if (qd > BENCH_SLOTS || qd * per > qsize)
		fail("the benchmark's requests do not fit in the queue");
	for (unsigned s = qd; s-- > 0;)
		free_slots[nfree++] = s;
	rng = SEED;
	while (done < count) {
		int pushed = 0;
		while (issued < count && nfree) {
			uint64_t off = random ? next_rand() % (span / size) * size : seq;
			seq = (seq + size) % span;
			unsigned slot = free_slots[--nfree];
			uint16_t d = slot * per;
			struct blk_hdr *h = hdr_of(slot);
			*h = (struct blk_hdr){ .type = T_IN, .sector = off / SECTOR };
			*status_of(slot) = 0xff;
			put_desc(d++, iova(h), sizeof(*h), DESC_F_NEXT);
			for (uint32_t n = 0; n < size; n += seg)
				put_desc(d++, iova(slot_buf(slot) + n), size - n < seg ? size - n : seg,
					 DESC_F_NEXT | DESC_F_WRITE);
			put_desc(d, iova(status_of(slot)), 1, DESC_F_WRITE);
			push(slot * per);
			issued++;
			pushed = 1;
		}
		if (pushed) {
			if (!t0)
				t0 = now();
			kick();
		}
		do {
			struct used_elem e = reap();
			unsigned slot = e.id / per;
			if (e.id % per || slot >= qd)
				fail("used element with an id we did not submit");
			must_ok(*status_of(slot), e.len, size + 1, "benchmark read");
			free_slots[nfree++] = slot;
			done++;
		} while (used_pending());
	}
	double t = now() - t0;
	return (struct result){ count / t, count * (double)size / t / 1e9 };
}

/* The same reads with pread, in the same order, into the same slots. */
static struct result bench_pread(int fd, uint32_t size, unsigned qd, uint64_t span, int random, uint64_t count)
{
	uint64_t seq = 0;
	double t0 = now();

	rng = SEED;
	for (uint64_t i = 0; i < count; i++) {
		uint64_t off = random ? next_rand() % (span / size) * size : seq;
		seq = (seq + size) % span;
		if (pread(fd, slot_buf(i % qd), size, off) != (ssize_t)size)
			die("pread of the backing file");
	}
	double t = now() - t0;
	return (struct result){ count / t, count * (double)size / t / 1e9 };
}

static void bench(const char *file, uint64_t span)
{
	int fd = open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die(file);
	static const struct {
		const char *name;
		uint32_t size;
		unsigned qd;
		int random;
		uint64_t count;
	} cases[] = {
		{ "4k-random-qd1", 4096, 1, 1, 4000 },
		{ "4k-random-qd32", 4096, 32, 1, 16000 },
		{ "1m-seq-qd1", 1 << 20, 1, 0, 512 },
		{ "1m-seq-qd8", 1 << 20, 8, 0, 1024 },
	};
	for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct result d = bench_dev(cases[i].size, cases[i].qd, span, cases[i].random, cases[i].count);
		struct result p = bench_pread(fd, cases[i].size, cases[i].qd, span, cases[i].random, cases[i].count);
		printf("bench %s: device %.0f IOPS %.3f GB/s, pread %.0f IOPS %.3f GB/s, ratio %.3f\n", cases[i].name,
		       d.iops, d.gbps, p.iops, p.gbps, d.iops / p.iops);
	}
	close(fd);
}

/* -- main ---------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
	int do_errors = 0, do_reset = 0, use_memfd = 1, opt;
	const char *bench_file = NULL;
	uint64_t bytes = 8 << 20;

	while ((opt = getopt(argc, argv, "erB:m:n:")) != -1) {
		switch (opt) {
		case 'e': do_errors = 1; break;
		case 'r': do_reset = 1; break;
		case 'B': bench_file = optarg; break;
		case 'm': use_memfd = strcmp(optarg, "anon") != 0; break;
		case 'n': bytes = strtoull(optarg, NULL, 0) << (strchr(optarg, 'M') ? 20 : 0); break;
		default:
			fprintf(stderr, "usage: %s [-e] [-r] [-B FILE] [-m anon|memfd] [-n BYTES] [IOMMU [DEVICE]]\n",
				argv[0]);
			return 2;
		}
	}
	if (!bytes || bytes % (1 << 20))
		fail("-n takes a multiple of 1 MiB");
	const char *iommu_path = optind < argc ? argv[optind] : "/dev/iommu";
	const char *dev_path = optind + 1 < argc ? argv[optind + 1] : "/dev/vfio/devices/vfio5";

	iommufd = open(iommu_path, O_RDWR | O_CLOEXEC);
	if (iommufd < 0)
		die(iommu_path);
	dev_fd = open(dev_path, O_RDWR | O_CLOEXEC);
	if (dev_fd < 0)
		die(dev_path);
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = iommufd };
	if (ioctl(dev_fd, VFIO_DEVICE_BIND_IOMMUFD, &bind))
		die("VFIO_DEVICE_BIND_IOMMUFD");
	uint64_t config_size;
	config = bar_region(VFIO_PCI_CONFIG_REGION_INDEX, &config_size);
	uint16_t vendor = rd(config + PCI_VENDOR_ID, 2), device = rd(config + PCI_DEVICE_ID, 2);
	uint32_t rev_class = rd(config + PCI_REVISION_CLASS, 4);
	/* 4.1.2: a non-transitional device is 0x1040 + the virtio device id (block: 2),
	 * revision 1 or higher */
	if (vendor != 0x1af4 || device != 0x1040 + 2)
		fail("not a virtio 1.x block device (1af4:1042)");
	if ((rev_class & 0xff) < 1)
		fail("revision 0: a transitional device");
	printf("bound %s (device id %u): virtio-blk %04x:%04x rev %u, class %02x:%02x:%02x\n", dev_path,
	       bind.out_devid, vendor, device, rev_class & 0xff, rev_class >> 24, rev_class >> 16 & 0xff,
	       rev_class >> 8 & 0xff);
	find_structures();
	struct vfio_irq_info irq_info = { .argsz = sizeof(irq_info), .index = VFIO_PCI_MSIX_IRQ_INDEX };
	if (ioctl(dev_fd, VFIO_DEVICE_GET_IRQ_INFO, &irq_info))
		die("VFIO_DEVICE_GET_IRQ_INFO");
	if (irq_info.count < 2)
		fail("fewer than 2 MSI-X vectors");
	printf("msi-x: %u vectors\n", irq_info.count);

	/* Memory: rings, headers, tables, scratch, then the two buffers of the round trip
	 * (and, with -B, the benchmark's slots of 1 MiB). */
	mem_size = OFF_DATA + 2 * (bytes + PAGE);
	mem_size = (mem_size + (1 << 20) - 1) & ~(uint64_t)((1 << 20) - 1);
	bench_off = mem_size;
	if (bench_file)
		mem_size += BENCH_SLOTS * SLOT;
	if (use_memfd) {
		int fd = memfd_create("virtio_blk", MFD_CLOEXEC);
		if (fd < 0 || ftruncate(fd, mem_size))
			die("memfd");
		mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		close(fd);
	} else {
		mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	}
	if (mem == MAP_FAILED)
		die("mmap");
	memset(mem, 0, mem_size);

	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc))
		die("IOMMU_IOAS_ALLOC");
	ioas = alloc.out_ioas_id;
	struct iommu_ioas_map map = {
		.size = sizeof(map),
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
		.ioas_id = ioas,
		.user_va = (uintptr_t)mem,
		.length = mem_size,
		.iova = IOVA_BASE,
	};
	if (ioctl(iommufd, IOMMU_IOAS_MAP, &map))
		die("IOMMU_IOAS_MAP");
	struct vfio_device_attach_iommufd_pt attach = { .argsz = sizeof(attach), .pt_id = ioas };
	if (ioctl(dev_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
		die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
	uint16_t cmd = rd(config + PCI_COMMAND, 2);
	wr(config + PCI_COMMAND, 2, cmd | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY);

	for (int i = 0; i < 2; i++)
		if ((irq[i] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
			die("eventfd");
	char irq_buf[sizeof(struct vfio_irq_set) + 2 * sizeof(int32_t)];
	struct vfio_irq_set *set = (struct vfio_irq_set *)irq_buf;
	*set = (struct vfio_irq_set){
		.argsz = sizeof(irq_buf),
		.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
		.index = VFIO_PCI_MSIX_IRQ_INDEX,
		.count = 2,
	};
	memcpy(set->data, irq, sizeof(irq));
	if (ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, set))
		die("VFIO_DEVICE_SET_IRQS (MSI-X)");

	bring_up(1, IOVA_BASE + OFF_DESC);
	if (bytes / SECTOR > capacity || bytes < 1 << 20)
		fail("-n is larger than the disk");
	round_trip(bytes);
	if (do_errors)
		errors();
	if (do_reset)
		resets();
	if (bench_file)
		bench(bench_file, bytes);

	/* A clean stop: reset the device, as a driver's remove path does. */
	reset_device(NULL);
	config_interrupts += drain(irq[0]);
	close(irq[0]);
	close(irq[1]);
	close(dev_fd);
	close(iommufd);
	munmap(mem, mem_size);
	if (failures) {
		printf("%u checks FAILED\n", failures);
		return 1;
	}
	printf("done\n");
	return 0;
}
