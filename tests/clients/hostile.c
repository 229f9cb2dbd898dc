/* A hostile client: one of the calls that used to stall every other client of
 * the daemon, made `count` times (0: until killed).
 *
 *   hostile MODE IOMMU_NODE DEVICE_NODE COUNT
 *
 * MODE: alloc_tail  IOMMU_IOAS_ALLOC with size 0xffffffff over 4 GiB of zero pages
 *       hw_info     IOMMU_GET_HW_INFO, data_len 0xffffffff, one page then a PROT_NONE page
 *       allow_iovas IOMMU_IOAS_ALLOW_IOVAS with 2^20 disjoint ranges (given in reverse)
 *       map_high    IOMMU_IOAS_MAP of user_va 2^63, then VFIO_DEVICE_ATTACH_IOMMUFD_PT
 *
 * Prints "READY" once set up, then a STEP line per call. SIGUSR1 interrupts a call
 * (the handler is installed without SA_RESTART, so the ioctl returns EINTR). */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
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

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1 };
	const char *mode;
	long count, i;
	int fd, dev = -1;
	__u32 ioas = 0, dev_id = 0;
	void *arg = NULL;
	unsigned long cmd = 0;

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
	} else {
		return fprintf(stderr, "unknown mode %s\n", mode), 2;
	}
	printf("READY\n");
	for (i = 0; count == 0 || i < count; i++) {
		if (cmd) {
			step0(mode, xioctl(fd, cmd, arg));
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
