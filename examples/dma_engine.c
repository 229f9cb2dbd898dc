/*
 * dma_engine: a userspace driver for the iommufd-cuse dma-engine (1de5:0001),
 * a descriptor-ring copy engine (docs/dma-engine.md is its manual).
 *
 * Set-up as for any assigned device (see examples/edu.c for the basics):
 * bind the device cdev to an iommufd, map memory into an IOAS, attach the
 * device to it, turn bus mastering on. Then:
 *
 *   - MSI-X through VFIO_DEVICE_SET_IRQS: vector 0 (completions) and
 *     vector 1 (faults) each signal an eventfd;
 *   - a ring of 32-byte descriptors in our own memory, mapped in the IOAS:
 *     the engine fetches them by DMA;
 *   - the copy: SIZE bytes from a source buffer to a destination buffer, in
 *     CHUNK-sized descriptors chained into transfers of XFER bytes
 *     (scatter-gather: one completion, one interrupt per transfer);
 *   - every byte of the destination is compared with the source;
 *   - the time from the first doorbell (TAIL write) to the last completion
 *     gives the throughput.
 *
 * With -u the driver makes a classic mistake on purpose: right after queueing
 * the whole copy it unmaps (IOMMU_IOAS_UNMAP) the destination of the last
 * transfer. The engine gets there, the IOMMU refuses the write, and the engine
 * halts on that descriptor and logs the fault (the descriptors behind it are
 * not processed); the driver reads the fault log, checks that the unmapped
 * memory was not written after the unmap, maps it again and restarts the
 * engine, which finishes the copy.
 *
 *   cc -O2 -Iinclude -o dma_engine examples/dma_engine.c
 *   ./dma_engine [-s SIZE] [-c CHUNK] [-x XFER] [-m anon|thp|memfd] [-r RUNS] [-u]
 *                [IOMMU [DEVICE]]
 *
 *   IOMMU, DEVICE  /dev/iommu and /dev/vfio/devices/vfio1 by default
 *   -s SIZE        bytes to copy (default 64M; K, M and G suffixes)
 *   -c CHUNK       bytes per descriptor (default 1M)
 *   -x XFER        bytes per transfer, a multiple of CHUNK (default 16M)
 *   -m KIND        the memory: anon (MAP_PRIVATE|MAP_ANONYMOUS, default),
 *                  thp (the same, 2 MiB aligned and madvise(MADV_HUGEPAGE):
 *                  transparent huge pages where the kernel has them to give)
 *                  or memfd (MAP_SHARED of a memfd)
 *   -r RUNS        copy RUNS times; the throughput printed is the median
 *   -u             unmap a queued destination (see above); with -r, in the first run
 *
 * It exits 0 when every copy verified (and, with -u, the fault was seen and
 * the engine recovered).
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

/* BAR0 registers (docs/dma-engine.md) */
#define REG_MAGIC 0x000
#define REG_CONTROL 0x010
#define REG_STATUS 0x014
#define REG_INT_STATUS 0x018
#define REG_RING_BASE 0x020 /* 64-bit: LO at 0x20, HI at 0x24 */
#define REG_RING_SIZE 0x028
#define REG_HEAD 0x030
#define REG_TAIL 0x034
#define REG_COMPLETED 0x038
#define REG_FAULT_COUNT 0x040
#define REG_FAULT_CTRL 0x044
#define FAULT_LOG 0x1000 /* 16 records of 32 bytes */

#define DMAE_MAGIC 0x45414d44 /* "DMAE" */
#define CTL_ENABLE (1u << 0)
#define CTL_DONE_IRQ (1u << 1)
#define CTL_FAULT_IRQ (1u << 2)
#define ST_BUSY (1u << 0)
#define ST_HALTED (1u << 1)
#define INT_DONE (1u << 0)
#define INT_FAULT (1u << 1)
#define FAULT_LOG_ENTRIES 16

/* A descriptor, as the engine reads it from the ring. */
struct dmae_desc {
	uint64_t src; /* source IOVA */
	uint64_t dst; /* destination IOVA */
	uint32_t len;
	uint32_t flags;
	uint32_t status; /* written by the device */
	uint32_t cookie; /* ours */
};
#define DESC_IRQ (1u << 0)   /* interrupt when this transfer completes */
#define DESC_CHAIN (1u << 1) /* the next descriptor continues this transfer */
#define DESC_DONE 0x1u
#define DESC_ERROR 0x2u

#define VEC_DONE 0
#define VEC_FAULT 1

#define PCI_COMMAND 0x04
#define PCI_COMMAND_MASTER 0x4

/* Where things are in the device's address space (the IOAS). */
#define RING_IOVA 0x100000ull
#define SRC_IOVA (1ull << 32)
#define DST_IOVA (1ull << 36)
#define RING_ENTRIES 256u

static int dev_fd = -1, iommufd = -1;
static uint32_t ioas;
static uint64_t bar0, config;

static void die(const char *what)
{
	fprintf(stderr, "dma_engine: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *what)
{
	fprintf(stderr, "dma_engine: FAILED: %s\n", what);
	exit(1);
}

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

static void wr64(uint64_t reg, uint64_t v)
{
	if (pwrite(dev_fd, &v, 8, bar0 + reg) != 8)
		die("pwrite BAR0");
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t parse_size(const char *s)
{
	char *end;
	uint64_t v = strtoull(s, &end, 0);

	switch (*end) {
	case 'G': case 'g': v <<= 10; /* fall through */
	case 'M': case 'm': v <<= 10; /* fall through */
	case 'K': case 'k': v <<= 10; end++; break;
	}
	if (*end || !v) {
		fprintf(stderr, "dma_engine: bad size %s\n", s);
		exit(2);
	}
	return v;
}

/* Memory for the device: anonymous, anonymous on huge pages, or a
 * MAP_SHARED mapping of a memfd. */
enum mem_kind { MEM_ANON, MEM_THP, MEM_MEMFD };
static enum mem_kind mem_kind = MEM_ANON;
#define HPAGE (2ull << 20)

/* Bytes a buffer of size takes: huge page buffers are whole huge pages. */
static size_t mem_len(size_t size)
{
	return mem_kind == MEM_THP ? (size + HPAGE - 1) & ~(HPAGE - 1) : size;
}

static void *alloc_mem(size_t size)
{
	size_t len = mem_len(size);
	void *p;

	if (mem_kind == MEM_MEMFD) {
		int fd = memfd_create("dma_engine", MFD_CLOEXEC);
		if (fd < 0)
			die("memfd_create");
		if (ftruncate(fd, size))
			die("ftruncate");
		p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		close(fd); /* the mapping keeps the file */
	} else if (mem_kind == MEM_THP) {
		/* Over-allocate, keep the 2 MiB aligned middle: huge pages need
		 * aligned virtual addresses, and the IOMMU then maps 2 MiB leaves. */
		uint8_t *raw = mmap(NULL, len + HPAGE, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (raw == MAP_FAILED)
			die("mmap");
		uint8_t *aligned = (uint8_t *)(((uintptr_t)raw + HPAGE - 1) & ~(uintptr_t)(HPAGE - 1));
		if (aligned > raw)
			munmap(raw, aligned - raw);
		munmap(aligned + len, raw + HPAGE - aligned);
		if (madvise(aligned, len, MADV_HUGEPAGE))
			perror("madvise(MADV_HUGEPAGE): going on with small pages");
		p = aligned;
	} else {
		p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	}
	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

static void ioas_map(void *va, uint64_t len, uint64_t iova, uint32_t prot)
{
	struct iommu_ioas_map map = {
		.size = sizeof(map),
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | prot,
		.ioas_id = ioas,
		.user_va = (uintptr_t)va,
		.length = len,
		.iova = iova,
	};

	if (ioctl(iommufd, IOMMU_IOAS_MAP, &map))
		die("IOMMU_IOAS_MAP");
}

static void ioas_unmap(uint64_t iova, uint64_t len)
{
	struct iommu_ioas_unmap unmap = { .size = sizeof(unmap), .ioas_id = ioas, .iova = iova, .length = len };

	if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &unmap))
		die("IOMMU_IOAS_UNMAP");
}

static const char *reason_name(uint32_t code)
{
	switch (code) {
	case 0x01: return "no translation";
	case 0x02: return "no permission";
	case 0x03: return "DMA blocked";
	case 0x04: return "bus mastering off";
	case 0x05: return "memory gone";
	case 0x10: return "invalid descriptor";
	case 0x11: return "invalid ring";
	default: return "other";
	}
}

static const char *where_name(uint32_t where)
{
	static const char *names[] = { "fetching the descriptor", "reading the source",
				       "writing the destination", "writing the status",
				       "checking the ring" };
	return where < 5 ? names[where] : "?";
}

/* Print the newest fault log record; returns the descriptor index it names. */
static uint32_t print_last_fault(void)
{
	uint32_t count = rd32(REG_FAULT_COUNT);
	uint32_t rec = FAULT_LOG + 32 * ((count - 1) % FAULT_LOG_ENTRIES);
	uint64_t iova = rd32(rec + 0x0) | (uint64_t)rd32(rec + 0x4) << 32;
	uint32_t desc = rd32(rec + 0x8), info = rd32(rec + 0xc), seq = rd32(rec + 0x10);

	printf("fault log: %u record(s); #%u: descriptor %u, iova 0x%llx, %s while %s: %s (0x%02x)\n",
	       count, seq, desc, (unsigned long long)iova, info & 1 ? "write" : "read",
	       where_name(info >> 4 & 0xf), reason_name(info >> 8 & 0xff), info >> 8 & 0xff);
	return desc;
}

/* The driver's view of the ring. */
static struct dmae_desc *ring;
static uint32_t ring_next;	/* ring index of the next descriptor we queue */
static int irq_done = -1, irq_fault = -1;

struct copy {
	uint64_t size, chunk, xfer;
	uint8_t *dst;
	int unmap_last; /* -u: unmap the last transfer's destination once all is queued */
};

static uint32_t desc_status(uint32_t slot)
{
	return __atomic_load_n(&ring[slot].status, __ATOMIC_ACQUIRE);
}

/*
 * One copy of c->size bytes. Returns the time from the first doorbell to the
 * last completion.
 */
static double run_copy(const struct copy *c)
{
	uint64_t ndesc = (c->size + c->chunk - 1) / c->chunk;
	uint64_t per_xfer = c->xfer / c->chunk;
	uint64_t queued = 0, reaped = 0; /* descriptors, counted from this copy's first */
	uint32_t base = ring_next;
	uint64_t last_iova = 0, last_len = 0;
	uint8_t *snapshot = NULL;
	int faulted = 0;
	double t0 = 0;

	if (c->unmap_last) {
		/* The destination of the last transfer, mapped on its own below. */
		uint64_t first = (ndesc - 1) / per_xfer * per_xfer;
		last_iova = DST_IOVA + first * c->chunk;
		last_len = c->size - first * c->chunk;
	}

	while (reaped < ndesc) {
		/* Queue what fits: a ring of N entries holds N - 1 descriptors. */
		uint64_t before = queued;
		while (queued < ndesc && queued - reaped < RING_ENTRIES - 1) {
			struct dmae_desc *d = &ring[(base + queued) % RING_ENTRIES];
			uint64_t off = queued * c->chunk;
			int last_of_xfer = (queued + 1) % per_xfer == 0 || queued + 1 == ndesc;

			d->src = SRC_IOVA + off;
			d->dst = DST_IOVA + off;
			d->len = c->size - off < c->chunk ? c->size - off : c->chunk;
			d->flags = last_of_xfer ? DESC_IRQ : DESC_CHAIN;
			d->cookie = queued;
			__atomic_store_n(&d->status, 0, __ATOMIC_RELEASE);
			queued++;
		}
		if (queued != before) {
			if (!t0)
				t0 = now();
			wr32(REG_TAIL, (base + queued) % RING_ENTRIES); /* the doorbell */
		}
		if (c->unmap_last && queued == ndesc && !snapshot) {
			ioas_unmap(last_iova, last_len);
			printf("unmapped the destination of the last transfer (iova 0x%llx +0x%llx) "
			       "with %llu descriptors queued\n", (unsigned long long)last_iova,
			       (unsigned long long)last_len, (unsigned long long)(queued - reaped));
			/* From here on the device must not write there. */
			snapshot = malloc(last_len);
			if (!snapshot)
				die("malloc");
			memcpy(snapshot, c->dst + (last_iova - DST_IOVA), last_len);
		}

		/* Sleep until an interrupt: a completion or a fault. */
		struct pollfd p[2] = { { .fd = irq_done, .events = POLLIN }, { .fd = irq_fault, .events = POLLIN } };
		int r = poll(p, 2, 10000);
		uint64_t n;
		if (r < 0)
			die("poll");
		if (r == 0)
			fail("no interrupt within 10 s");
		if (p[0].revents && read(irq_done, &n, sizeof(n)) != sizeof(n))
			die("read eventfd");

		if (p[1].revents) {
			if (read(irq_fault, &n, sizeof(n)) != sizeof(n))
				die("read eventfd");
			uint32_t st = rd32(REG_STATUS);
			uint32_t head = rd32(REG_HEAD), tail = rd32(REG_TAIL);
			printf("fault interrupt: STATUS 0x%x (halted %d, error 0x%02x), HEAD %u, TAIL %u: "
			       "%u descriptors not processed\n", st, !!(st & ST_HALTED), st >> 8 & 0xff, head,
			       tail, (tail - head) % RING_ENTRIES);
			uint32_t bad = print_last_fault();
			if (!snapshot || faulted || !(st & ST_HALTED))
				fail("unexpected fault");
			uint64_t bad_dst = ring[bad].dst;
			if (bad_dst < last_iova || bad_dst >= last_iova + last_len)
				fail("the fault is not in the unmapped buffer");
			printf("descriptor %u (destination 0x%llx) faulted: it and the %u behind it "
			       "wait in the ring\n", bad, (unsigned long long)bad_dst,
			       (tail - head - 1) % RING_ENTRIES);
			if (memcmp(snapshot, c->dst + (last_iova - DST_IOVA), last_len))
				fail("the device wrote to memory after it was unmapped");
			printf("no DMA after the unmap: the unmapped buffer is unchanged\n");
			/* Fix the cause and restart on the same descriptor. */
			ioas_map(c->dst + (last_iova - DST_IOVA), last_len, last_iova, IOMMU_IOAS_MAP_WRITEABLE);
			wr32(REG_INT_STATUS, INT_FAULT);
			wr32(REG_STATUS, ST_HALTED); /* write 1 to clear: the engine retries */
			printf("mapped it again and cleared the halt: the engine carries on\n");
			faulted = 1;
		}

		/* Reap whole transfers: the STATUS of a transfer's last descriptor
		 * turns DONE when all of it has landed. */
		while (reaped < ndesc) {
			uint64_t end = reaped + per_xfer < ndesc ? reaped + per_xfer : ndesc;
			if (end > queued)
				break; /* its last descriptor is not even queued yet */
			uint32_t st = desc_status((base + end - 1) % RING_ENTRIES);
			if (st & DESC_ERROR)
				fail("a descriptor completed with an error");
			if (!(st & DESC_DONE))
				break;
			reaped = end;
		}
	}
	double t = now() - t0;
	ring_next = (base + ndesc) % RING_ENTRIES;
	if (c->unmap_last && !faulted) {
		printf("note: the engine finished before the unmap took effect: no fault to show\n");
		exit(3);
	}
	free(snapshot);
	return t;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	struct copy c = { .size = 64ull << 20, .chunk = 1u << 20, .xfer = 16u << 20 };
	int runs = 1, opt;

	while ((opt = getopt(argc, argv, "s:c:x:m:r:u")) != -1) {
		switch (opt) {
		case 's': c.size = parse_size(optarg); break;
		case 'c': c.chunk = parse_size(optarg); break;
		case 'x': c.xfer = parse_size(optarg); break;
		case 'm':
			if (!strcmp(optarg, "memfd"))
				mem_kind = MEM_MEMFD;
			else if (!strcmp(optarg, "thp"))
				mem_kind = MEM_THP;
			else if (strcmp(optarg, "anon"))
				fail("-m takes anon, thp or memfd");
			break;
		case 'r': runs = atoi(optarg); break;
		case 'u': c.unmap_last = 1; break;
		default:
			fprintf(stderr, "usage: %s [-s SIZE] [-c CHUNK] [-x XFER] [-m anon|thp|memfd] "
				"[-r RUNS] [-u] [IOMMU [DEVICE]]\n", argv[0]);
			return 2;
		}
	}
	const char *iommu_path = optind < argc ? argv[optind] : "/dev/iommu";
	const char *dev_path = optind + 1 < argc ? argv[optind + 1] : "/dev/vfio/devices/vfio1";
	if (c.chunk > UINT32_MAX || c.xfer % c.chunk || c.xfer / c.chunk > RING_ENTRIES / 2 || runs < 1)
		fail("CHUNK must fit a descriptor, XFER be a multiple of it (at most 128 chunks), RUNS >= 1");
	if (c.xfer > c.size)
		c.xfer = (c.size + c.chunk - 1) / c.chunk * c.chunk;
	printf("copy %llu bytes of %s memory: %llu-byte descriptors, %llu per transfer\n",
	       (unsigned long long)c.size,
	       (const char *[]){ "anonymous", "anonymous huge page", "memfd" }[mem_kind],
	       (unsigned long long)c.chunk, (unsigned long long)(c.xfer / c.chunk));

	/* Open, bind, find the registers. */
	iommufd = open(iommu_path, O_RDWR | O_CLOEXEC);
	if (iommufd < 0)
		die(iommu_path);
	dev_fd = open(dev_path, O_RDWR | O_CLOEXEC);
	if (dev_fd < 0)
		die(dev_path);
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = iommufd };
	if (ioctl(dev_fd, VFIO_DEVICE_BIND_IOMMUFD, &bind))
		die("VFIO_DEVICE_BIND_IOMMUFD");
	struct vfio_region_info reg = { .argsz = sizeof(reg), .index = VFIO_PCI_BAR0_REGION_INDEX };
	if (ioctl(dev_fd, VFIO_DEVICE_GET_REGION_INFO, &reg))
		die("VFIO_DEVICE_GET_REGION_INFO");
	bar0 = reg.offset;
	reg = (struct vfio_region_info){ .argsz = sizeof(reg), .index = VFIO_PCI_CONFIG_REGION_INDEX };
	if (ioctl(dev_fd, VFIO_DEVICE_GET_REGION_INFO, &reg))
		die("VFIO_DEVICE_GET_REGION_INFO");
	config = reg.offset;
	if (rd32(REG_MAGIC) != DMAE_MAGIC)
		fail("not a dma-engine");
	printf("bound %s (device id %u), magic DMAE\n", dev_path, bind.out_devid);

	/* Memory: the ring, the source and the destination. */
	size_t ring_bytes = RING_ENTRIES * sizeof(struct dmae_desc);
	ring = alloc_mem(ring_bytes);
	uint8_t *src = alloc_mem(c.size);
	uint8_t *dst = alloc_mem(c.size);
	c.dst = dst;
	uint64_t x = 0x9e3779b97f4a7c15ull; /* xorshift: data that shows any misplaced byte */
	for (uint64_t i = 0; i < c.size; i += 8) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		memcpy(src + i, &x, c.size - i < 8 ? c.size - i : 8);
	}
	memset(dst, 0, c.size);
	memset(ring, 0, ring_bytes);

	/* The IOAS: ring read/write, source readable, destination writable; the
	 * destination as one mapping per transfer, as a driver maps each buffer
	 * it hands out (and may unmap it again). */
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc))
		die("IOMMU_IOAS_ALLOC");
	ioas = alloc.out_ioas_id;
	ioas_map(ring, ring_bytes, RING_IOVA, IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE);
	ioas_map(src, c.size, SRC_IOVA, IOMMU_IOAS_MAP_READABLE);
	for (uint64_t off = 0; off < c.size; off += c.xfer) {
		uint64_t len = c.size - off < c.xfer ? c.size - off : c.xfer;
		ioas_map(dst + off, len, DST_IOVA + off, IOMMU_IOAS_MAP_WRITEABLE);
	}
	printf("ioas %u: ring at 0x%llx, source at 0x%llx, destination at 0x%llx\n", ioas,
	       RING_IOVA, SRC_IOVA, DST_IOVA);
	struct vfio_device_attach_iommufd_pt attach = { .argsz = sizeof(attach), .pt_id = ioas };
	if (ioctl(dev_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
		die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");

	uint16_t cmd;
	if (pread(dev_fd, &cmd, 2, config + PCI_COMMAND) != 2)
		die("pread config");
	cmd |= PCI_COMMAND_MASTER;
	if (pwrite(dev_fd, &cmd, 2, config + PCI_COMMAND) != 2)
		die("pwrite config");

	/* MSI-X: vector 0 completions, vector 1 faults, each on an eventfd. */
	irq_done = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	irq_fault = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (irq_done < 0 || irq_fault < 0)
		die("eventfd");
	char irq_buf[sizeof(struct vfio_irq_set) + 2 * sizeof(int32_t)];
	struct vfio_irq_set *irq = (struct vfio_irq_set *)irq_buf;
	*irq = (struct vfio_irq_set){
		.argsz = sizeof(irq_buf),
		.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
		.index = VFIO_PCI_MSIX_IRQ_INDEX,
		.start = 0,
		.count = 2,
	};
	int32_t fds[2] = { irq_done, irq_fault };
	memcpy(irq->data, fds, sizeof(fds));
	if (ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, irq))
		die("VFIO_DEVICE_SET_IRQS (MSI-X)");

	/* The ring, then enable the engine with both interrupts. */
	wr64(REG_RING_BASE, RING_IOVA);
	wr32(REG_RING_SIZE, RING_ENTRIES);
	wr32(REG_CONTROL, CTL_ENABLE | CTL_DONE_IRQ | CTL_FAULT_IRQ);
	printf("engine enabled: %u-entry ring, MSI-X vector 0 completions, vector 1 faults\n",
	       RING_ENTRIES);

	double *times = calloc(runs, sizeof(double));
	if (!times)
		die("calloc");
	for (int i = 0; i < runs; i++) {
		if (i)
			memset(dst, 0, c.size);
		times[i] = run_copy(&c);
		c.unmap_last = 0;
		if (memcmp(src, dst, c.size)) {
			uint64_t k = 0;
			while (src[k] == dst[k])
				k++;
			fprintf(stderr, "dma_engine: FAILED: destination differs from source at byte %llu\n",
				(unsigned long long)k);
			return 1;
		}
		printf("run %d: %llu MiB in %.2f ms: %.2f GB/s, verified byte for byte\n", i + 1,
		       (unsigned long long)(c.size >> 20), times[i] * 1e3, c.size / times[i] / 1e9);
	}
	qsort(times, runs, sizeof(double), cmp_double);
	double med = runs % 2 ? times[runs / 2] : (times[runs / 2 - 1] + times[runs / 2]) / 2;
	printf("completed %u transfers, fault log %u record(s)\n", rd32(REG_COMPLETED), rd32(REG_FAULT_COUNT));
	printf("result size=%llu runs=%d median_ms=%.3f best_ms=%.3f median_gbps=%.3f\n",
	       (unsigned long long)c.size, runs, med * 1e3, times[0] * 1e3, c.size / med / 1e9);

	/* Tear down: engine off, interrupts off, bus mastering off, detach, unmap. */
	wr32(REG_CONTROL, 0);
	struct vfio_irq_set off = {
		.argsz = sizeof(off),
		.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
		.index = VFIO_PCI_MSIX_IRQ_INDEX,
	};
	if (ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, &off))
		die("VFIO_DEVICE_SET_IRQS (off)");
	cmd &= ~PCI_COMMAND_MASTER;
	if (pwrite(dev_fd, &cmd, 2, config + PCI_COMMAND) != 2)
		die("pwrite config");
	struct vfio_device_detach_iommufd_pt detach = { .argsz = sizeof(detach) };
	if (ioctl(dev_fd, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach))
		die("VFIO_DEVICE_DETACH_IOMMUFD_PT");
	ioas_unmap(0, UINT64_MAX); /* everything */
	struct iommu_destroy destroy = { .size = sizeof(destroy), .id = ioas };
	if (ioctl(iommufd, IOMMU_DESTROY, &destroy))
		die("IOMMU_DESTROY");
	close(irq_done);
	close(irq_fault);
	close(dev_fd);
	close(iommufd);
	munmap(ring, mem_len(ring_bytes));
	munmap(src, mem_len(c.size));
	munmap(dst, mem_len(c.size));
	free(times);
	printf("done\n");
	return 0;
}
