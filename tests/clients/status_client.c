/* A client for `iommufd-cuse status` tests:
 *
 *   status_client NODE [nodump] [device=PATH]
 *
 * opens the iommufd NODE (after making itself non-dumpable with "nodump", so
 * that only a CAP_SYS_PTRACE holder may reach its memory), allocates an IOAS,
 * maps 64 KiB of private anonymous memory at IOVA 0x100000 (read/write) and
 * 8 KiB of a memfd at an IOVA the daemon picks (read-only); with device=PATH
 * binds that VFIO device cdev to the iommufd and attaches it to the IOAS (which
 * pins the mapped pages). Then it prints
 *
 *   ready pid=<pid> ioas=<id> file_iova=<iova> [devid=<id> hwpt=<id>]
 *
 * and holds all of it until stdin reaches EOF. On a failure it prints
 * "FAIL <step> errno=<errno>" and exits 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#define ANON_IOVA 0x100000ULL
#define ANON_LEN (64 * 1024)
#define FILE_LEN (8 * 1024)

static void fail(const char *step)
{
	printf("FAIL %s errno=%d (%s)\n", step, errno, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	const char *device = NULL;
	if (argc < 2) {
		fprintf(stderr, "usage: %s NODE [nodump] [device=PATH]\n", argv[0]);
		return 2;
	}
	for (int i = 2; i < argc; i++) {
		if (strcmp(argv[i], "nodump") == 0) {
			if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0))
				fail("prctl");
		} else if (strncmp(argv[i], "device=", 7) == 0) {
			device = argv[i] + 7;
		} else {
			fprintf(stderr, "unknown argument %s\n", argv[i]);
			return 2;
		}
	}
	int fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0)
		fail("open");

	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	if (ioctl(fd, IOMMU_IOAS_ALLOC, &alloc))
		fail("ioas_alloc");

	char *buf = mmap(NULL, ANON_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		fail("mmap");
	memset(buf, 0x5a, ANON_LEN);
	struct iommu_ioas_map map = {
		.size = sizeof(map),
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
		.ioas_id = alloc.out_ioas_id,
		.user_va = (__u64)(unsigned long)buf,
		.length = ANON_LEN,
		.iova = ANON_IOVA,
	};
	if (ioctl(fd, IOMMU_IOAS_MAP, &map))
		fail("ioas_map");

	int mfd = memfd_create("status-client", MFD_CLOEXEC);
	if (mfd < 0 || ftruncate(mfd, FILE_LEN))
		fail("memfd");
	struct iommu_ioas_map_file mapf = {
		.size = sizeof(mapf),
		.flags = IOMMU_IOAS_MAP_READABLE,
		.ioas_id = alloc.out_ioas_id,
		.fd = mfd,
		.start = 0,
		.length = FILE_LEN,
	};
	if (ioctl(fd, IOMMU_IOAS_MAP_FILE, &mapf))
		fail("ioas_map_file");

	int dfd = -1;
	struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = fd };
	struct vfio_device_attach_iommufd_pt attach = {
		.argsz = sizeof(attach),
		.pt_id = alloc.out_ioas_id,
	};
	if (device) {
		dfd = open(device, O_RDWR | O_CLOEXEC);
		if (dfd < 0)
			fail("open_device");
		if (ioctl(dfd, VFIO_DEVICE_BIND_IOMMUFD, &bind))
			fail("bind");
		if (ioctl(dfd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
			fail("attach");
	}

	printf("ready pid=%d ioas=%u file_iova=0x%llx", getpid(), alloc.out_ioas_id,
	       (unsigned long long)mapf.iova);
	if (device)
		printf(" devid=%u hwpt=%u", bind.out_devid, attach.pt_id);
	printf("\n");
	fflush(stdout);

	char c;
	while (read(0, &c, 1) > 0)
		;
	if (dfd >= 0)
		close(dfd);
	close(mfd);
	close(fd);
	return 0;
}
