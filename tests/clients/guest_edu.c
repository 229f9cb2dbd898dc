/*
 * guest_edu: runs INSIDE a QEMU guest (static, no driver bound): finds QEMU's edu (1234:11e8) on the guest's
 * PCI bus through sysfs, turns on memory decoding and bus mastering in its config space, maps BAR0 from
 * resource0 and does a DMA round trip: guest RAM A -> the device's buffer -> guest RAM B, with A and B found
 * by their guest-physical addresses in /proc/self/pagemap. Without a vIOMMU QEMU maps all guest RAM at
 * IOVA = GPA, so the transfer goes through the daemon's IOAS. One STEP line per step (stepper.h).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "stepper.h"

#define EDU_IDENT 0x00
#define EDU_LIVENESS 0x04
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_CNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_BUF 0x40000
#define EDU_CMD_START 1
#define EDU_CMD_TO_RAM 2
#define EDU_DMA_MASK ((1ULL << 28) - 1) /* edu's 28-bit DMA addresses */
#define PAGE 4096
#define LEN 2048

static int read_hex(const char *dir, const char *file, unsigned long *val)
{
	char path[512], buf[32] = "";
	snprintf(path, sizeof(path), "%s/%s", dir, file);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	*val = strtoul(buf, NULL, 16);
	return 0;
}

/* The guest-physical address of a (locked, touched) virtual address. */
static uint64_t gpa_of(void *va)
{
	uint64_t ent = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		return 0;
	off_t off = ((uintptr_t)va / PAGE) * sizeof(ent);
	ssize_t n = pread(fd, &ent, sizeof(ent), off);
	close(fd);
	if (n != sizeof(ent) || !(ent & (1ULL << 63)))
		return 0;
	return (ent & ((1ULL << 55) - 1)) * PAGE + (uintptr_t)va % PAGE;
}

static volatile uint32_t *r32(volatile uint8_t *bar, unsigned off)
{
	return (volatile uint32_t *)(bar + off);
}

static volatile uint64_t *r64(volatile uint8_t *bar, unsigned off)
{
	return (volatile uint64_t *)(bar + off);
}

/* One transfer; 0 when the start bit cleared. */
static int dma(volatile uint8_t *bar, uint64_t src, uint64_t dst, uint64_t cmd)
{
	*r64(bar, EDU_DMA_SRC) = src;
	*r64(bar, EDU_DMA_DST) = dst;
	*r64(bar, EDU_DMA_CNT) = LEN;
	*r64(bar, EDU_DMA_CMD) = cmd | EDU_CMD_START;
	for (int i = 0; i < 1000000; i++)
		if (!(*r64(bar, EDU_DMA_CMD) & EDU_CMD_START))
			return 0;
	return -1;
}

int main(void)
{
	char dir[300] = "";
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	while (d && (e = readdir(d))) {
		char p[300];
		unsigned long ven = 0, dev = 0;
		snprintf(p, sizeof(p), "/sys/bus/pci/devices/%s", e->d_name);
		if (!read_hex(p, "vendor", &ven) && !read_hex(p, "device", &dev) && ven == 0x1234 && dev == 0x11e8) {
			snprintf(dir, sizeof(dir), "%s", p);
			break;
		}
	}
	step("FIND_EDU", xres(dir[0] ? 0 : -1), "dev=%s", dir[0] ? strrchr(dir, '/') + 1 : "none");
	if (!dir[0])
		return 1;

	/* memory decoding and bus mastering: no driver in the guest does it for us */
	char path[400];
	snprintf(path, sizeof(path), "%s/config", dir);
	int cfg = open(path, O_RDWR);
	uint16_t command = 0;
	struct res r = xres(cfg < 0 ? -1 : pread(cfg, &command, 2, 4));
	if (r.rc >= 0) {
		command |= 0x6;
		r = xres(pwrite(cfg, &command, 2, 4));
		pread(cfg, &command, 2, 4);
	}
	step("COMMAND", r, "command=%#06x", command);

	snprintf(path, sizeof(path), "%s/resource0", dir);
	int res0 = open(path, O_RDWR | O_SYNC);
	volatile uint8_t *bar = res0 < 0 ? MAP_FAILED : mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, res0, 0);
	step("MMAP_BAR0", xres(bar == MAP_FAILED ? -1 : 0), "len=%d", 1 << 20);
	if (bar == MAP_FAILED)
		return 1;
	*r32(bar, EDU_LIVENESS) = 0x12345678;
	step("IDENT", xres(0), "ident=%#x liveness=%#x", *r32(bar, EDU_IDENT), *r32(bar, EDU_LIVENESS));

	uint8_t *buf = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
	if (buf == MAP_FAILED)
		return 1;
	uint8_t *a = buf, *b = buf + PAGE;
	for (int i = 0; i < LEN; i++) {
		a[i] = (uint8_t)(i * 7 + 3);
		b[i] = 0;
	}
	uint64_t ga = gpa_of(a), gb = gpa_of(b);
	int in_mask = ga && gb && (ga + LEN - 1) <= EDU_DMA_MASK && (gb + LEN - 1) <= EDU_DMA_MASK;
	step("GPA", xres(in_mask ? 0 : -1), "a=%#llx b=%#llx", (unsigned long long)ga, (unsigned long long)gb);
	if (!in_mask)
		return 1;

	int rc1 = dma(bar, ga, EDU_BUF, 0);
	int rc2 = rc1 ? -1 : dma(bar, EDU_BUF, gb, EDU_CMD_TO_RAM);
	int same = !rc2 && memcmp(a, b, LEN) == 0;
	step("DMA_ROUND_TRIP", xres(same ? 0 : -1), "to_dev=%d to_ram=%d same=%d b0=%02x%02x%02x%02x", rc1, rc2, same,
	     b[0], b[1], b[2], b[3]);
	return same ? 0 : 1;
}
