/*
 * guest_nvme: inside a QEMU guest without a vIOMMU (device addresses are guest physical), a userspace NVMe
 * driver for the passed-through controller once the kernel's nvme driver has let go of it: BAR0 through
 * sysfs resource0, queues and data in locked pages whose physical addresses /proc/self/pagemap gives. It
 * brings the controller up, identifies it, then reads LBA 0 twice: into a PRP that no memory backs (a
 * guest physical address far above the guest's RAM: the daemon's IOMMU has no translation for it), which
 * must complete with Data Transfer Error, and into a good page, which must return the data. It leaves the
 * controller shut down, for the kernel's driver to take it back.
 *
 *   guest_nvme BDF   (prints RESULT lines; exits 0 when everything checked)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define REG_CC 0x14
#define REG_CSTS 0x1c
#define REG_AQA 0x24
#define REG_ASQ 0x28
#define REG_ACQ 0x30
#define PAGE 4096
#define ENTRIES 8
#define BAD_PRP 0xf00000000ull /* 60 GiB: no RAM of this guest */

struct sqe {
	uint32_t cdw0, nsid;
	uint64_t rsvd, mptr, prp1, prp2;
	uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct cqe {
	uint32_t dw0, dw1;
	uint16_t sqhd, sqid, cid, status;
};

static volatile uint32_t *bar;
static uint8_t *pages; /* 0: admin SQ, 1: admin CQ, 2: I/O SQ, 3: I/O CQ, 4: data */
static uint64_t phys[5];

static void fail(const char *what)
{
	printf("RESULT guest_nvme_failed %s (%s)\n", what, strerror(errno));
	exit(1);
}

static uint64_t phys_of(void *p)
{
	uint64_t e;
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (fd < 0 || pread(fd, &e, 8, (uintptr_t)p / PAGE * 8) != 8)
		fail("pagemap");
	close(fd);
	if (!(e >> 63) || !(e & ((1ull << 55) - 1)))
		fail("page not present");
	return (e & ((1ull << 55) - 1)) * PAGE;
}

static void wait_csts(uint32_t mask, uint32_t want)
{
	for (int i = 0; i < 10000; i++) {
		if ((bar[REG_CSTS / 4] & mask) == want)
			return;
		usleep(1000);
	}
	fail("CSTS");
}

struct q {
	struct sqe *sq;
	volatile struct cqe *cq;
	int qid;
	uint16_t tail, head, phase;
};

static uint16_t run(struct q *q, struct sqe c, uint32_t *dw0)
{
	static uint16_t cid;

	c.cdw0 |= (uint32_t)++cid << 16;
	q->sq[q->tail] = c;
	q->tail = (q->tail + 1) % ENTRIES;
	__sync_synchronize();
	bar[(0x1000 + 8 * q->qid) / 4] = q->tail;
	for (int i = 0; i < 10000; i++) {
		volatile struct cqe *e = &q->cq[q->head];
		if ((e->status & 1) == q->phase) {
			uint16_t st = e->status >> 1 & 0x3fff;
			if (dw0)
				*dw0 = e->dw0;
			if (++q->head == ENTRIES) {
				q->head = 0;
				q->phase ^= 1;
			}
			bar[(0x1000 + 8 * q->qid + 4) / 4] = q->head;
			return st;
		}
		usleep(1000);
	}
	fail("no completion");
	return 0;
}

int main(int argc, char **argv)
{
	char path[256];
	uint16_t cmd;

	if (argc < 2)
		return 2;
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", argv[1]);
	int cfg = open(path, O_RDWR);
	if (cfg < 0 || pread(cfg, &cmd, 2, 4) != 2)
		fail("config");
	cmd |= 0x6; /* memory space, bus master */
	if (pwrite(cfg, &cmd, 2, 4) != 2)
		fail("config write");
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource0", argv[1]);
	int res = open(path, O_RDWR | O_SYNC);
	if (res < 0)
		fail("resource0");
	bar = mmap(NULL, 16384, PROT_READ | PROT_WRITE, MAP_SHARED, res, 0);
	pages = mmap(NULL, 5 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
	if (bar == MAP_FAILED || pages == MAP_FAILED)
		fail("mmap");
	memset(pages, 0, 5 * PAGE);
	for (int i = 0; i < 5; i++)
		phys[i] = phys_of(pages + i * PAGE);

	bar[REG_CC / 4] = 0;
	wait_csts(1, 0);
	bar[REG_AQA / 4] = (ENTRIES - 1) << 16 | (ENTRIES - 1);
	bar[REG_ASQ / 4] = (uint32_t)phys[0];
	bar[REG_ASQ / 4 + 1] = phys[0] >> 32;
	bar[REG_ACQ / 4] = (uint32_t)phys[1];
	bar[REG_ACQ / 4 + 1] = phys[1] >> 32;
	bar[REG_CC / 4] = 1 | 6 << 16 | 4 << 20;
	wait_csts(1, 1);
	struct q admin = { (struct sqe *)pages, (volatile struct cqe *)(pages + PAGE), 0, 0, 0, 1 };
	struct q io = { (struct sqe *)(pages + 2 * PAGE), (volatile struct cqe *)(pages + 3 * PAGE), 1, 0, 0, 1 };

	if (run(&admin, (struct sqe){ .cdw0 = 0x06, .cdw10 = 1, .prp1 = phys[4] }, NULL))
		fail("identify");
	printf("RESULT user_identify_vid 0x%04x\n", pages[4 * PAGE] | pages[4 * PAGE + 1] << 8);
	if (run(&admin, (struct sqe){ .cdw0 = 0x05, .prp1 = phys[3], .cdw10 = (ENTRIES - 1) << 16 | 1, .cdw11 = 1 },
		NULL))
		fail("create cq");
	if (run(&admin,
		(struct sqe){ .cdw0 = 0x01, .prp1 = phys[2], .cdw10 = (ENTRIES - 1) << 16 | 1, .cdw11 = 1 << 16 | 1 },
		NULL))
		fail("create sq");

	uint16_t st = run(&io, (struct sqe){ .cdw0 = 0x02, .nsid = 1, .prp1 = BAD_PRP, .cdw12 = 7 }, NULL);
	printf("RESULT bad_prp_status 0x%03x\n", st);
	st = run(&io, (struct sqe){ .cdw0 = 0x02, .nsid = 1, .prp1 = phys[4], .cdw12 = 7 }, NULL);
	printf("RESULT good_read_status 0x%03x\n", st);
	fwrite(pages + 4 * PAGE, 1, PAGE, stderr); /* LBA 0-7, for the script to compare */

	run(&admin, (struct sqe){ .cdw0 = 0x00, .cdw10 = 1 }, NULL);
	run(&admin, (struct sqe){ .cdw0 = 0x04, .cdw10 = 1 }, NULL);
	bar[REG_CC / 4] |= 1 << 14; /* shutdown notification */
	wait_csts(0xc, 0x8);
	bar[REG_CC / 4] = 0;
	printf("RESULT user_driver done\n");
	return 0;
}
