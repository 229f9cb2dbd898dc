/*
 * selftest_fork PATH: pages mapped by a child that has exited (the kernel's
 * fork_gone), run with the companion library preloaded. A child maps memory
 * into the parent's IOAS and exits; with a domain the pages were pinned while it
 * lived, and a new domain and an access still reach them; without one nothing
 * can be pinned any more (EFAULT). Shared memory (MAP_SHARED anonymous, as the
 * kernel's selftest uses) and private anonymous memory.
 * One STEP line per call; expectations in tests/iommufd/test_selftest.py.
 */
#define _GNU_SOURCE
#include <sys/wait.h>

#include "selftest_util.h"

#define LEN (16 * PAGE)

static int fd;

static struct res create_access(__u32 ioas, int *afd)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_CREATE_ACCESS, ioas);
	struct res r = test_cmd(fd, &c);

	*afd = r.rc == 0 ? (int)c.create_access.out_access_fd : -1;
	return r;
}

static struct res rw(int afd, __u64 iova, void *buf, __u64 len, int write)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_ACCESS_RW, afd);

	c.access_rw.iova = iova;
	c.access_rw.length = len;
	c.access_rw.uptr = (uintptr_t)buf;
	c.access_rw.flags = write ? MOCK_ACCESS_RW_WRITE : 0;
	return test_cmd(fd, &c);
}

/* A child maps buf at MOCK_APERTURE_START of ioas and exits: 0 if its map succeeded. */
static int map_in_child(__u32 ioas, void *buf)
{
	int status;
	pid_t child = fork();

	if (child == 0)
		_exit(ioas_map(fd, ioas, buf, LEN, MOCK_APERTURE_START).rc ? 1 : 0);
	if (child < 0 || waitpid(child, &status, 0) != child)
		return -1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* One case: memory from mmap(flags), mapped by a child into a new IOAS with (or
 * without) a mock domain first. */
static void one(const char *name, int flags, int with_domain)
{
	char step_name[64], *buf, *out = malloc(LEN);
	__u32 ioas, stdev, hwpt, idev;
	int afd;

	buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, flags | MAP_ANONYMOUS, -1, 0);
	for (unsigned i = 0; i < LEN; i++)
		buf[i] = (char)(i * 7 + 1);
	ioas_alloc(fd, &ioas);
	if (with_domain)
		mock_domain(fd, ioas, &stdev, &hwpt, &idev);
	create_access(ioas, &afd);
	snprintf(step_name, sizeof(step_name), "%s_child_map", name);
	step0(step_name, xres(map_in_child(ioas, buf) ? -1 : 0));
	/* a new domain: loaded from the pinned pages, or pinning them now */
	snprintf(step_name, sizeof(step_name), "%s_new_domain", name);
	step0(step_name, mock_domain(fd, ioas, &stdev, &hwpt, &idev));
	memset(out, 0, LEN);
	snprintf(step_name, sizeof(step_name), "%s_read", name);
	stepv(step_name, rw(afd, MOCK_APERTURE_START, out, LEN, 0), "same=%d", !memcmp(out, buf, LEN));
	snprintf(step_name, sizeof(step_name), "%s_write", name);
	stepv(step_name, rw(afd, MOCK_APERTURE_START + 5, "written", 8, 1), "seen=%d", !memcmp(buf + 5, "written", 8));
	close(afd);
	snprintf(step_name, sizeof(step_name), "%s_unmap", name);
	step0(step_name, ioas_unmap(fd, ioas, 0, ~0ull));
	munmap(buf, LEN);
	free(out);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		die("usage: selftest_fork PATH");
	fd = open(argv[1], O_RDWR);
	if (fd < 0)
		die("open");
	one("shared", MAP_SHARED, 1);
	one("shared_no_domain", MAP_SHARED, 0);
	one("private", MAP_PRIVATE, 1);
	one("private_no_domain", MAP_PRIVATE, 0);
	return 0;
}
