/*
 * nvme: a userspace NVMe driver for an assigned controller (docs/nvme.md), in
 * the style of SPDK's and libvfn's: bind the VFIO device cdev to an iommufd,
 * map our memory into an IOAS, attach, bus mastering on, MSI-X on eventfds
 * (vector 0 the admin queue, vector 1 the I/O queue), then
 *
 *   - reset and enable the controller (CC.EN, CSTS.RDY), admin queues in our memory;
 *   - Identify the controller, the active namespaces and namespace 1;
 *   - Set Features Number of Queues, Create I/O CQ 1 and SQ 1;
 *   - write a pattern with PRP1/PRP2 and PRP lists (1 MiB commands, a list
 *     that continues on a second list page, a buffer at an offset, pages in
 *     reverse order), read it back into other memory and compare; Flush;
 *     Write Zeroes and read the zeros back.
 *
 * Options (each after the above):
 *   -e  error cases: an unmapped PRP (Data Transfer Error, and the controller
 *       still works), an LBA out of range, namespace 2, an SGL, an unknown
 *       opcode, a transfer over MDTS: each its status code
 *   -r  controller reset (CC.EN 1 -> 0) with I/O queues live, and a
 *       function-level reset (VFIO_DEVICE_RESET): both times set up again, I/O works
 *   -s  shutdown notification (CC.SHN, CSTS.SHST), then reset and enable again
 *   -B FILE  the benchmark: 4 KiB random reads at QD 1 and QD 32, 1 MiB
 *       sequential reads at QD 1 and QD 8, against the same reads of FILE (the
 *       namespace's backing file) with pread in this process
 *   -m anon|memfd  the memory the controller reads and writes (default memfd)
 *   -n BYTES  how much of the namespace the round trip (and the benchmark) uses (default 8M)
 *
 *   cc -O2 -Iinclude -o nvme examples/nvme.c
 *   ./nvme [-e] [-r] [-s] [-B FILE] [-m KIND] [-n BYTES] [IOMMU [DEVICE]]
 *
 * The pattern: LBA n holds n as a little-endian u64, then bytes
 * (n % 251 + i) & 0xff for i = 0 .. 503. It exits 0 when everything checked.
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

/* BAR0 */
#define REG_CAP 0x00
#define REG_VS 0x08
#define REG_CC 0x14
#define REG_CSTS 0x1c
#define REG_AQA 0x24
#define REG_ASQ 0x28
#define REG_ACQ 0x30
#define DOORBELL 0x1000
#define CC_EN 1u
#define CC_SHN_NORMAL (1u << 14)
#define CC_IOSQES (6u << 16)
#define CC_IOCQES (4u << 20)
#define CSTS_RDY 1u
#define CSTS_CFS 2u
#define CSTS_SHST_MASK (3u << 2)
#define CSTS_SHST_CMPLT (2u << 2)

#define PCI_COMMAND 0x04
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4

#define PAGE 4096u
#define LBA 512u
#define QD_MAX 32
#define ADMIN_ENTRIES 32
#define IO_ENTRIES 256

struct sqe {
	uint32_t cdw0; /* opcode 7:0, PSDT 15:14, CID 31:16 */
	uint32_t nsid;
	uint64_t rsvd;
	uint64_t mptr;
	uint64_t prp1, prp2;
	uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct cqe {
	uint32_t dw0, dw1;
	uint16_t sqhd, sqid, cid, status; /* status: phase bit 0, status field 15:1 */
};

/* Status field values (SCT << 8 | SC) */
#define SC_INVALID_OPCODE 0x001
#define SC_INVALID_FIELD 0x002
#define SC_DATA_TRANSFER_ERROR 0x004
#define SC_INVALID_NS 0x00b
#define SC_LBA_RANGE 0x080

/* Our memory, one mapping in the IOAS at IOVA_BASE; offsets into it: */
#define IOVA_BASE (1ull << 32)
#define OFF_ASQ 0x0000
#define OFF_ACQ 0x1000
#define OFF_ID 0x2000
#define OFF_IOSQ 0x10000   /* 256 x 64 bytes */
#define OFF_IOCQ 0x20000   /* 256 x 16 bytes */
#define OFF_LISTS 0x100000 /* a PRP list page per slot, and spares */
#define OFF_DATA 0x200000  /* slots of 1 MiB, then the buffers of the round trip */
#define SLOT (1u << 20)

static int dev_fd = -1, iommufd = -1, irq[2] = { -1, -1 };
static uint32_t ioas;
static uint64_t bar0, config;
static uint8_t *mem;
static size_t mem_size;
static uint32_t cmd_id;

static void die(const char *what)
{
	fprintf(stderr, "nvme: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *what)
{
	fprintf(stderr, "nvme: FAILED: %s\n", what);
	exit(1);
}

static uint32_t rd32(uint64_t reg)
{
	uint32_t v;

	if (pread(dev_fd, &v, 4, bar0 + reg) != 4)
		die("pread BAR0");
	return v;
}

static uint64_t rd64(uint64_t reg)
{
	uint64_t v;

	if (pread(dev_fd, &v, 8, bar0 + reg) != 8)
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

static uint64_t iova(const void *p)
{
	return IOVA_BASE + ((const uint8_t *)p - mem);
}

/* -- queues ---------------------------------------------------------------------------- */

struct queue {
	struct sqe *sq;
	volatile struct cqe *cq;
	uint16_t qid, entries, sq_tail, cq_head, phase, unreported;
	int irq;
};

static struct queue admin, ioq;

static void queue_init(struct queue *q, uint16_t qid, uint32_t sq_off, uint32_t cq_off, uint16_t entries, int irqfd)
{
	q->sq = (struct sqe *)(mem + sq_off);
	q->cq = (volatile struct cqe *)(mem + cq_off);
	q->qid = qid;
	q->entries = entries;
	q->sq_tail = q->cq_head = q->unreported = 0;
	q->phase = 1;
	q->irq = irqfd;
	memset(mem + sq_off, 0, entries * sizeof(struct sqe));
	memset(mem + cq_off, 0, entries * sizeof(struct cqe));
}

/* Queue a command (the doorbell is rung by ring()); returns its command id. */
static uint16_t submit(struct queue *q, struct sqe *c)
{
	uint16_t cid = ++cmd_id & 0xffff;

	c->cdw0 = (c->cdw0 & 0xffff) | (uint32_t)cid << 16;
	q->sq[q->sq_tail] = *c;
	q->sq_tail = (q->sq_tail + 1) % q->entries;
	return cid;
}

static void ring(struct queue *q)
{
	__atomic_thread_fence(__ATOMIC_RELEASE);
	wr32(DOORBELL + 8 * q->qid, q->sq_tail);
}

/* The next completion, waiting for the interrupt when there is none yet. */
static struct cqe reap(struct queue *q)
{
	for (;;) {
		volatile struct cqe *e = &q->cq[q->cq_head];
		if ((e->status & 1) == q->phase) {
			__atomic_thread_fence(__ATOMIC_ACQUIRE);
			struct cqe c = *(struct cqe *)e;
			if (++q->cq_head == q->entries) {
				q->cq_head = 0;
				q->phase ^= 1;
			}
			/* Tell the controller what we consumed once half the queue is,
			 * as it only needs to know before the queue fills: one doorbell
			 * write (a trap to the device) per many completions. */
			if (++q->unreported >= q->entries / 2) {
				wr32(DOORBELL + 8 * q->qid + 4, q->cq_head);
				q->unreported = 0;
			}
			return c;
		}
		struct pollfd p = { .fd = q->irq, .events = POLLIN };
		int r = poll(&p, 1, 10000);
		uint64_t n;
		if (r < 0)
			die("poll");
		if (r == 0) {
			fprintf(stderr, "nvme: CSTS 0x%x\n", rd32(REG_CSTS));
			fail("no completion within 10 s");
		}
		if (read(q->irq, &n, sizeof(n)) != sizeof(n) && errno != EAGAIN)
			die("read eventfd");
	}
}

static uint16_t status_of(const struct cqe *c)
{
	return c->status >> 1 & 0x3fff; /* SCT and SC, without DNR and More */
}

/* One command, waited for; returns its status (SCT << 8 | SC); dw0 to *res. */
static uint16_t run(struct queue *q, struct sqe c, uint32_t *res)
{
	uint16_t cid = submit(q, &c);

	ring(q);
	struct cqe e = reap(q);
	if (e.cid != cid || e.sqid != q->qid)
		fail("completion for another command");
	if (res)
		*res = e.dw0;
	return status_of(&e);
}

static void must(uint16_t status, const char *what)
{
	if (status) {
		fprintf(stderr, "nvme: FAILED: %s: status 0x%03x\n", what, status);
		exit(1);
	}
}

/* -- PRPs ----------------------------------------------------------------------------- */

/* PRP1/PRP2 for len bytes at buf (contiguous in our memory), a list at list if needed. */
static void prps(struct sqe *c, void *buf, uint32_t len, uint64_t *list)
{
	uint64_t a = iova(buf), first = PAGE - (a & (PAGE - 1));

	c->prp1 = a;
	c->prp2 = 0;
	if (len <= first)
		return;
	if (len - first <= PAGE) {
		c->prp2 = a + first;
		return;
	}
	uint32_t n = 0;
	for (uint64_t p = a + first; p < a + len; p += PAGE)
		list[n++] = p;
	c->prp2 = iova(list);
}

static struct sqe rw_cmd(uint8_t opcode, uint64_t slba, uint32_t blocks)
{
	struct sqe c = { .cdw0 = opcode, .nsid = 1 };

	c.cdw10 = (uint32_t)slba;
	c.cdw11 = slba >> 32;
	c.cdw12 = blocks - 1;
	return c;
}

static void fill_pattern(uint8_t *p, uint64_t lba, uint64_t blocks)
{
	for (uint64_t b = 0; b < blocks; b++, lba++, p += LBA) {
		memcpy(p, &lba, 8);
		for (unsigned i = 0; i < LBA - 8; i++)
			p[8 + i] = (lba % 251 + i) & 0xff;
	}
}

/* -- set-up --------------------------------------------------------------------------- */

static uint32_t ns_blocks, mdts_bytes;

static void trim(char *s)
{
	for (size_t n = strlen(s); n && s[n - 1] == ' '; n--)
		s[n - 1] = 0;
}

static void wait_csts(uint32_t mask, uint32_t want, const char *what)
{
	double t0 = now();

	while ((rd32(REG_CSTS) & mask) != want) {
		if (rd32(REG_CSTS) & CSTS_CFS)
			fail("controller fatal status");
		if (now() - t0 > 10)
			fail(what);
		usleep(1000);
	}
}

/* Controller reset, admin queues, enable, identify, the I/O queue pair. */
static void bring_up(int verbose)
{
	uint64_t cap = rd64(REG_CAP);
	uint32_t res;

	wr32(REG_CC, 0);
	wait_csts(CSTS_RDY, 0, "CSTS.RDY did not clear");
	queue_init(&admin, 0, OFF_ASQ, OFF_ACQ, ADMIN_ENTRIES, irq[0]);
	wr32(REG_AQA, (ADMIN_ENTRIES - 1) << 16 | (ADMIN_ENTRIES - 1));
	wr64(REG_ASQ, IOVA_BASE + OFF_ASQ);
	wr64(REG_ACQ, IOVA_BASE + OFF_ACQ);
	wr32(REG_CC, CC_EN | CC_IOSQES | CC_IOCQES); /* NVM command set, 4 KiB pages, round robin */
	wait_csts(CSTS_RDY, CSTS_RDY, "CSTS.RDY did not set");

	uint8_t *id = mem + OFF_ID;
	struct sqe c = { .cdw0 = 0x06, .cdw10 = 1, .prp1 = IOVA_BASE + OFF_ID };
	memset(id, 0, PAGE);
	must(run(&admin, c, NULL), "Identify controller");
	mdts_bytes = id[77] ? PAGE << id[77] : 0;
	if (verbose) {
		char sn[21] = { 0 }, mn[41] = { 0 }, fr[9] = { 0 };
		memcpy(sn, id + 4, 20);
		memcpy(mn, id + 24, 40);
		memcpy(fr, id + 64, 8);
		trim(sn), trim(mn), trim(fr); /* ASCII fields are padded with spaces */
		uint32_t nn;
		memcpy(&nn, id + 516, 4);
		printf("controller: CAP 0x%llx (MQES %u, TO %u ms, DSTRD %u), VS 0x%08x\n", (unsigned long long)cap,
		       (unsigned)(cap & 0xffff) + 1, (unsigned)(cap >> 24 & 0xff) * 500, (unsigned)(cap >> 32 & 0xf),
		       rd32(REG_VS));
		printf("identify: vid 0x%04x sn '%s' mn '%s' fr '%s' mdts %u namespaces %u\n", id[0] | id[1] << 8, sn,
		       mn, fr, id[77], nn);
	}

	c = (struct sqe){ .cdw0 = 0x06, .cdw10 = 2, .prp1 = IOVA_BASE + OFF_ID };
	must(run(&admin, c, NULL), "Identify active namespace list");
	uint32_t first_ns;
	memcpy(&first_ns, id, 4);
	if (first_ns != 1)
		fail("namespace 1 is not active");

	c = (struct sqe){ .cdw0 = 0x06, .nsid = 1, .cdw10 = 0, .prp1 = IOVA_BASE + OFF_ID };
	must(run(&admin, c, NULL), "Identify namespace 1");
	uint64_t nsze;
	memcpy(&nsze, id, 8);
	uint32_t lbaf;
	memcpy(&lbaf, id + 128 + 4 * (id[26] & 0xf), 4);
	if ((lbaf >> 16 & 0xff) != 9)
		fail("namespace 1 does not have 512-byte LBAs");
	ns_blocks = nsze;
	if (verbose)
		printf("namespace 1: %llu blocks of %u bytes\n", (unsigned long long)nsze, 1u << (lbaf >> 16 & 0xff));

	c = (struct sqe){ .cdw0 = 0x09, .cdw10 = 0x07, .cdw11 = 0 }; /* one SQ and one CQ */
	must(run(&admin, c, &res), "Set Features (Number of Queues)");
	if (verbose)
		printf("number of queues: %u SQs, %u CQs allocated\n", (res & 0xffff) + 1, (res >> 16) + 1);

	queue_init(&ioq, 1, OFF_IOSQ, OFF_IOCQ, IO_ENTRIES, irq[1]);
	c = (struct sqe){ .cdw0 = 0x05, .prp1 = IOVA_BASE + OFF_IOCQ };
	c.cdw10 = (uint32_t)(IO_ENTRIES - 1) << 16 | 1;
	c.cdw11 = 1u << 16 | 1 << 1 | 1; /* vector 1, interrupts on, contiguous */
	must(run(&admin, c, NULL), "Create I/O Completion Queue");
	c = (struct sqe){ .cdw0 = 0x01, .prp1 = IOVA_BASE + OFF_IOSQ };
	c.cdw10 = (uint32_t)(IO_ENTRIES - 1) << 16 | 1;
	c.cdw11 = 1u << 16 | 1; /* CQ 1, contiguous */
	must(run(&admin, c, NULL), "Create I/O Submission Queue");
}

/* -- the round trip ----------------------------------------------------------------------- */

static uint64_t *list_page(unsigned i)
{
	return (uint64_t *)(mem + OFF_LISTS + i * PAGE);
}

/* Read or write buf (blocks from lba) in commands of at most chunk bytes, up to 32 at a time. */
static void transfer(uint8_t opcode, uint8_t *buf, uint64_t lba, uint64_t bytes, uint32_t chunk)
{
	for (uint64_t off = 0; off < bytes;) {
		int queued = 0;

		for (; off < bytes && queued < QD_MAX; queued++) {
			uint32_t n = bytes - off < chunk ? bytes - off : chunk;
			struct sqe c = rw_cmd(opcode, lba + off / LBA, n / LBA);
			prps(&c, buf + off, n, list_page(queued));
			submit(&ioq, &c);
			off += n;
		}
		ring(&ioq);
		while (queued--) {
			struct cqe e = reap(&ioq);
			must(status_of(&e), opcode == 1 ? "Write" : "Read");
		}
	}
}

static void round_trip(uint64_t bytes)
{
	uint8_t *out = mem + OFF_DATA + QD_MAX * SLOT, *in = out + bytes + PAGE;
	uint64_t blocks = bytes / LBA;
	struct sqe c;

	fill_pattern(out, 0, blocks);
	transfer(0x01, out, 0, bytes, SLOT);
	memset(in, 0xee, bytes);
	transfer(0x02, in, 0, bytes, SLOT);
	if (memcmp(in, out, bytes))
		fail("read back differs from what was written");
	printf("round trip: wrote and read back %llu bytes (LBA 0-%llu) in 1 MiB commands with PRP lists: equal\n",
	       (unsigned long long)bytes, (unsigned long long)blocks - 1);

	/* A 1 MiB read whose PRP list starts 16 bytes before the end of a list page:
	 * one data pointer there, then a pointer to the next list page. */
	uint64_t *l = (uint64_t *)((uint8_t *)list_page(40) + PAGE - 16), *l2 = list_page(42);
	memset(in, 0, SLOT);
	c = rw_cmd(0x02, 0, SLOT / LBA);
	c.prp1 = iova(in);
	l[0] = iova(in) + PAGE;
	l[1] = iova(l2);
	for (unsigned i = 0; i < SLOT / PAGE - 2; i++)
		l2[i] = iova(in) + (i + 2) * PAGE;
	c.prp2 = iova(l);
	must(run(&ioq, c, NULL), "Read with a chained PRP list");
	if (memcmp(in, out, SLOT))
		fail("read through a chained PRP list differs");
	printf("chained PRP list: 1 MiB read through two list pages: equal\n");

	/* 64 KiB into pages in reverse order, and 12 KiB to a buffer at offset 0x200. */
	uint8_t *scatter = in;
	uint64_t *rl = list_page(44);
	memset(scatter, 0, 64 << 10);
	c = rw_cmd(0x02, 8, 128);
	c.prp1 = iova(scatter + 15 * PAGE);
	for (unsigned i = 1; i < 16; i++)
		rl[i - 1] = iova(scatter + (15 - i) * PAGE);
	c.prp2 = iova(rl);
	must(run(&ioq, c, NULL), "Read into scattered pages");
	for (unsigned i = 0; i < 16; i++)
		if (memcmp(scatter + (15 - i) * PAGE, out + 8 * LBA + i * PAGE, PAGE))
			fail("scattered read differs");
	memset(in, 0, 4 * PAGE);
	c = rw_cmd(0x02, 16, 24);
	prps(&c, in + 0x200, 24 * LBA, list_page(45));
	must(run(&ioq, c, NULL), "Read to an offset buffer");
	if (memcmp(in + 0x200, out + 16 * LBA, 24 * LBA))
		fail("offset read differs");
	printf("scatter: reverse-order pages and a buffer at offset 0x200: equal\n");

	c = (struct sqe){ .cdw0 = 0x00, .nsid = 1 };
	must(run(&ioq, c, NULL), "Flush");
	c = rw_cmd(0x08, blocks - 64, 64); /* Write Zeroes over the last 32 KiB */
	must(run(&ioq, c, NULL), "Write Zeroes");
	memset(in, 0xee, 64 * LBA);
	c = rw_cmd(0x02, blocks - 64, 64);
	prps(&c, in, 64 * LBA, list_page(46));
	must(run(&ioq, c, NULL), "Read of the zeroes");
	for (unsigned i = 0; i < 64 * LBA; i++)
		if (in[i])
			fail("Write Zeroes left data");
	printf("flush, write zeroes (LBA %llu-%llu) and read back: zeros\n", (unsigned long long)blocks - 64,
	       (unsigned long long)blocks - 1);
}

/* -- error cases ----------------------------------------------------------------------- */

static void expect(uint16_t got, uint16_t want, const char *what)
{
	if (got != want) {
		fprintf(stderr, "nvme: FAILED: %s: status 0x%03x, expected 0x%03x\n", what, got, want);
		exit(1);
	}
	printf("%s: status 0x%03x\n", what, got);
}

static void errors(void)
{
	uint8_t *buf = mem + OFF_DATA;
	struct sqe c;

	c = rw_cmd(0x02, 0, 8);
	c.prp1 = 0x7f0000000000ull; /* never mapped */
	expect(run(&ioq, c, NULL), SC_DATA_TRANSFER_ERROR, "read to an unmapped PRP (data transfer error)");
	fill_pattern(buf, 0, 16); /* what LBA 0-15 hold: the part before the fault may land */
	c = rw_cmd(0x01, 0, 16);
	c.prp1 = iova(buf);
	c.prp2 = 0x7f0000000000ull;
	expect(run(&ioq, c, NULL), SC_DATA_TRANSFER_ERROR, "write from an unmapped PRP2 (data transfer error)");
	c = rw_cmd(0x02, ns_blocks - 4, 8);
	prps(&c, buf, 8 * LBA, list_page(0));
	expect(run(&ioq, c, NULL), SC_LBA_RANGE, "read past the namespace (LBA out of range)");
	c = rw_cmd(0x02, 0, 8);
	c.nsid = 2;
	prps(&c, buf, 8 * LBA, list_page(0));
	expect(run(&ioq, c, NULL), SC_INVALID_NS, "read of namespace 2 (invalid namespace)");
	c = rw_cmd(0x02, 0, 8);
	c.cdw0 |= 1u << 14; /* PSDT: an SGL */
	expect(run(&ioq, c, NULL), SC_INVALID_FIELD, "read with an SGL (invalid field: SGLs not supported)");
	c = (struct sqe){ .cdw0 = 0x7e, .nsid = 1 };
	expect(run(&ioq, c, NULL), SC_INVALID_OPCODE, "unknown I/O opcode (invalid opcode)");
	if (mdts_bytes) {
		c = rw_cmd(0x02, 0, 2 * mdts_bytes / LBA);
		prps(&c, buf, PAGE, list_page(0));
		expect(run(&ioq, c, NULL), SC_INVALID_FIELD, "read over MDTS (invalid field)");
	}
	/* The controller still works. */
	memset(buf, 0, 8 * LBA);
	c = rw_cmd(0x02, 0, 8);
	prps(&c, buf, 8 * LBA, list_page(0));
	must(run(&ioq, c, NULL), "Read after the errors");
	uint8_t want[8 * LBA];
	fill_pattern(want, 0, 8);
	if (memcmp(buf, want, sizeof(want)))
		fail("read after the errors differs");
	printf("after the errors: CSTS 0x%x, a read returns the data\n", rd32(REG_CSTS));
}

static void read_check(const char *when)
{
	uint8_t *buf = mem + OFF_DATA, want[8 * LBA];
	struct sqe c = rw_cmd(0x02, 0, 8);

	memset(buf, 0, sizeof(want));
	prps(&c, buf, sizeof(want), list_page(0));
	must(run(&ioq, c, NULL), when);
	fill_pattern(want, 0, 8);
	if (memcmp(buf, want, sizeof(want)))
		fail("data differs");
	printf("%s: controller ready, data intact\n", when);
}

static void resets(void)
{
	/* A controller reset with a command queued but its doorbell not rung:
	 * it is dropped with the queues. */
	struct sqe c = rw_cmd(0x02, 0, 8);
	prps(&c, mem + OFF_DATA, 8 * LBA, list_page(0));
	submit(&ioq, &c);
	wr32(REG_CC, rd32(REG_CC) & ~CC_EN);
	wait_csts(CSTS_RDY, 0, "CSTS.RDY did not clear");
	uint64_t asq = rd64(REG_ASQ);
	printf("controller reset: CSTS 0x%x, ASQ kept (0x%llx)\n", rd32(REG_CSTS), (unsigned long long)asq);
	bring_up(0);
	read_check("after the controller reset");

	if (ioctl(dev_fd, VFIO_DEVICE_RESET))
		die("VFIO_DEVICE_RESET");
	printf("function-level reset: CC 0x%x CSTS 0x%x AQA 0x%x\n", rd32(REG_CC), rd32(REG_CSTS), rd32(REG_AQA));
	bring_up(0);
	read_check("after the function-level reset");
}

static void shutdown_ctrl(void)
{
	struct sqe c = { .cdw0 = 0x00, .cdw10 = 1 }; /* Delete I/O SQ 1, then CQ 1, as a driver does */
	must(run(&admin, c, NULL), "Delete I/O Submission Queue");
	c = (struct sqe){ .cdw0 = 0x04, .cdw10 = 1 };
	must(run(&admin, c, NULL), "Delete I/O Completion Queue");
	wr32(REG_CC, (rd32(REG_CC) & ~(3u << 14)) | CC_SHN_NORMAL);
	wait_csts(CSTS_SHST_MASK, CSTS_SHST_CMPLT, "shutdown did not complete");
	printf("shutdown: CSTS 0x%x (shutdown complete)\n", rd32(REG_CSTS));
	bring_up(0);
	read_check("after the shutdown");
}

/* -- benchmark --------------------------------------------------------------------------- */

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next_rand(void)
{
	rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
	return rng;
}

struct result {
	double iops, gbps;
};

/* count reads of size bytes at QD qd, random (within span) or sequential. */
static struct result bench_dev(uint32_t size, int qd, uint64_t span, int random, uint64_t count)
{
	uint64_t issued = 0, done = 0, seq = 0;
	double t0 = now();

	rng = 0x9e3779b97f4a7c15ull;
	while (done < count) {
		int queued = 0;
		while (issued < count && issued - done < (uint64_t)qd) {
			uint64_t off = random ? next_rand() % (span / size) * size : seq;
			seq = (seq + size) % span;
			unsigned slot = issued % QD_MAX;
			struct sqe c = rw_cmd(0x02, off / LBA, size / LBA);
			prps(&c, mem + OFF_DATA + slot * SLOT, size, list_page(slot));
			submit(&ioq, &c);
			issued++;
			queued = 1;
		}
		if (queued)
			ring(&ioq);
		struct cqe e = reap(&ioq);
		must(status_of(&e), "benchmark read");
		done++;
	}
	double t = now() - t0;
	return (struct result){ count / t, count * (double)size / t / 1e9 };
}

/* The same reads with pread, into the same buffers in the same order. */
static struct result bench_pread(int fd, uint32_t size, uint64_t span, int random, uint64_t count)
{
	uint64_t seq = 0;
	double t0 = now();

	rng = 0x9e3779b97f4a7c15ull;
	for (uint64_t i = 0; i < count; i++) {
		uint64_t off = random ? next_rand() % (span / size) * size : seq;
		seq = (seq + size) % span;
		if (pread(fd, mem + OFF_DATA + i % QD_MAX * SLOT, size, off) != (ssize_t)size)
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
		int qd, random;
		uint64_t count;
	} cases[] = {
		{ "4k-random-qd1", 4096, 1, 1, 4000 },
		{ "4k-random-qd32", 4096, 32, 1, 16000 },
		{ "1m-seq-qd1", 1 << 20, 1, 0, 512 },
		{ "1m-seq-qd8", 1 << 20, 8, 0, 1024 },
	};
	for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct result d = bench_dev(cases[i].size, cases[i].qd, span, cases[i].random, cases[i].count);
		struct result p = bench_pread(fd, cases[i].size, span, cases[i].random, cases[i].count);
		printf("bench %s: device %.0f IOPS %.3f GB/s, pread %.0f IOPS %.3f GB/s, ratio %.3f\n", cases[i].name,
		       d.iops, d.gbps, p.iops, p.gbps, d.iops / p.iops);
	}
	close(fd);
}

/* -- main ---------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
	int do_errors = 0, do_reset = 0, do_shutdown = 0, use_memfd = 1, opt;
	const char *bench_file = NULL;
	uint64_t bytes = 8 << 20;

	while ((opt = getopt(argc, argv, "ersB:m:n:")) != -1) {
		switch (opt) {
		case 'e': do_errors = 1; break;
		case 'r': do_reset = 1; break;
		case 's': do_shutdown = 1; break;
		case 'B': bench_file = optarg; break;
		case 'm': use_memfd = strcmp(optarg, "anon") != 0; break;
		case 'n': bytes = strtoull(optarg, NULL, 0) << (strchr(optarg, 'M') ? 20 : 0); break;
		default:
			fprintf(stderr, "usage: %s [-e] [-r] [-s] [-B FILE] [-m anon|memfd] [-n BYTES] [IOMMU [DEVICE]]\n",
				argv[0]);
			return 2;
		}
	}
	if (!bytes || bytes % SLOT)
		fail("-n takes a multiple of 1 MiB");
	const char *iommu_path = optind < argc ? argv[optind] : "/dev/iommu";
	const char *dev_path = optind + 1 < argc ? argv[optind + 1] : "/dev/vfio/devices/vfio4";

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
	uint32_t class;
	if (pread(dev_fd, &class, 4, config + 8) != 4)
		die("pread config");
	if (class >> 8 != 0x010802)
		fail("not an NVMe controller (class 01:08:02)");
	printf("bound %s (device id %u), class 01:08:02\n", dev_path, bind.out_devid);

	/* Memory: queues, lists, 32 slots of 1 MiB, then two buffers of the round trip. */
	mem_size = OFF_DATA + QD_MAX * SLOT + 2 * (bytes + PAGE);
	mem_size = (mem_size + SLOT - 1) & ~(uint64_t)(SLOT - 1);
	if (use_memfd) {
		int fd = memfd_create("nvme", MFD_CLOEXEC);
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
	uint16_t cmd;
	if (pread(dev_fd, &cmd, 2, config + PCI_COMMAND) != 2)
		die("pread config");
	cmd |= PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY;
	if (pwrite(dev_fd, &cmd, 2, config + PCI_COMMAND) != 2)
		die("pwrite config");

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

	bring_up(1);
	if (bytes > (uint64_t)ns_blocks * LBA)
		fail("-n is larger than the namespace");
	round_trip(bytes);
	if (do_errors)
		errors();
	if (do_reset)
		resets();
	if (do_shutdown)
		shutdown_ctrl();
	if (bench_file)
		bench(bench_file, bytes);

	/* A clean stop: shutdown notification, as a driver's remove path does. */
	wr32(REG_CC, (rd32(REG_CC) & ~(3u << 14)) | CC_SHN_NORMAL);
	wait_csts(CSTS_SHST_MASK, CSTS_SHST_CMPLT, "shutdown did not complete");
	wr32(REG_CC, 0);
	close(irq[0]);
	close(irq[1]);
	close(dev_fd);
	close(iommufd);
	munmap(mem, mem_size);
	printf("done\n");
	return 0;
}
