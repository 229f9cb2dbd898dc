/*
 * iommufd_selftest_preload.so -- the companion of `iommufd-cuse serve`.
 *
 * IOMMU_TEST_OP_CREATE_ACCESS answers with a new file descriptor, which a FUSE
 * server cannot create in its caller. Preloaded into the client, this library
 * marks that one command as coming from a process that has the companion
 * (iommu_test_cmd.__reserved = "ICUS"); the daemon then answers with a token in
 * create_access.out_access_fd, and the library opens the daemon's access node,
 * hands it the token (the node's claim ioctl) and puts the new descriptor in
 * out_access_fd. Everything else (the access, its pins, its lifetime: it ends
 * when that descriptor is closed) is the daemon's.
 *
 * IOMMU_TEST_OP_DMABUF_GET likewise, but its answer is the ioctl's return value
 * (the dma-buf's fd): marked the same way, the daemon returns a token, which the
 * library claims on the daemon's dma-buf node; it returns the new descriptor
 * (opened with the command's open_flags).
 *
 * IOMMU_FAULT_QUEUE_ALLOC (any mode, not only the test mode) likewise: on an
 * iommufd that is a FUSE file (fstatfs), a call with flags 0 goes out with
 * flags = "ICUS"; the daemon answers with a token in out_fault_fd, and the
 * library opens the daemon's fault node, claims the token and puts the new
 * descriptor in out_fault_fd. read/write/poll on it are served by the daemon.
 *
 * IOMMU_VEVENTQ_ALLOC the same way (flags "ICUS" on a FUSE iommufd, a token in
 * out_veventq_fd, claimed on the daemon's vEVENT queue node); read/poll on the
 * new descriptor are served by the daemon.
 *
 * mmap() of a FUSE iommufd never reaches the daemon (FUSE answers itself, ENODEV
 * for MAP_SHARED on a direct-I/O file): the library asks the daemon with
 * MMAP_REGION (offset, length, prot, flags), which makes the kernel's checks and
 * answers a token naming a node of the region, MMAP_DIR/<token>; the library maps
 * that node instead and closes it (the mapping keeps the file, as a VMA keeps the
 * iommufd). See iommufd_cuse/iommufd/mmap.py.
 *
 * A read() of 0 bytes never reaches a FUSE server (the kernel answers 0), where
 * the kernel's vEVENT queue file answers EINVAL: on a vEVENT queue file of the
 * daemon the library asks the daemon instead (the node's ZERO_READ ioctl).
 *
 * VFIO_GROUP_GET_DEVICE_FD on a group that is a FUSE file goes out as the daemon's
 * GROUP_GET_DEVICE_TOKEN with the same name; the answer is a token, claimed on the
 * daemon's device node, and the call returns the new descriptor (close-on-exec, as
 * the kernel's). The daemon opens the device when the token is claimed, so an error
 * of that open is the call's errno.
 *
 * Every other call passes through untouched. Against a real kernel the library
 * does nothing: it ignores __reserved in IOMMU_TEST_CMD and returns a real
 * descriptor, never a token; and a real /dev/iommu is no FUSE file, so
 * FAULT_QUEUE_ALLOC and VEVENTQ_ALLOC are not even marked.
 *
 * Build:  cc -shared -fPIC -O2 -Iinclude -o libiommufd_selftest_preload.so \
 *             tools/iommufd_selftest_preload.c -ldl
 * Use:    LD_PRELOAD=$PWD/libiommufd_selftest_preload.so ./iommufd_selftest_binary
 *
 * Limits: only calls through libc's ioctl() are seen (not raw syscall(2)).
 * See docs/selftest.md.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#define COMPANION_MAGIC 0x49435553u		/* "ICUS" */
#define TOKEN_BASE 0x40000000u			/* tokens are never fd numbers */
#define CLAIM _IO(IOMMUFD_TYPE, 0xE0)		/* on a node, arg: the token */
#define ZERO_READ _IO(IOMMUFD_TYPE, 0xE1)	/* on a vEVENT queue: what read(fd, buf, 0) answers */
#define MMAP_REGION _IO(IOMMUFD_TYPE, 0xE2)	/* on an iommufd, arg: struct mmap_region */
#define MMAP_DIR "iommufd-cuse/mmap"
#define ACCESS_NODE "iommufd-selftest/access"
#define DMABUF_NODE "iommufd-selftest/dmabuf"
#define FAULT_NODE "iommufd-cuse/fault"
#define VEVENTQ_NODE "iommufd-cuse/veventq"
#define DEVICE_NODE "iommufd-cuse/vfio-device"
#define GROUP_GET_DEVICE_TOKEN _IO(VFIO_TYPE, 0xE3)	/* arg: the device's name */
#define FUSE_SUPER_MAGIC 0x65735546

typedef int (*ioctl_fn)(int, unsigned long, ...);
typedef ssize_t (*read_fn)(int, void *, size_t);
typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);

struct mmap_region {
	__u64 offset;
	__u64 length;
	__u32 prot;
	__u32 flags;
};

static ioctl_fn real_ioctl(void)
{
	static ioctl_fn fn;

	if (!fn)
		fn = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
	return fn;
}

/* Open a node of the daemon that serves iommufd: it sits in the same FUSE
 * mount, `name` below the mount's root, which is the iommufd node's directory
 * or one of its parents (/dev/vfio/vfio is one level down). */
static int open_daemon_node(int iommufd, const char *name, int flags)
{
	char proc[64], path[PATH_MAX], node[2 * PATH_MAX];
	ssize_t n;
	char *slash;

	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", iommufd);
	n = readlink(proc, path, sizeof(path) - 1);
	if (n <= 0)
		return -1;
	path[n] = 0;
	while ((slash = strrchr(path, '/')) != NULL) {
		*slash = 0;
		snprintf(node, sizeof(node), "%s/%s", path, name);
		int fd = open(node, flags);
		if (fd >= 0 || errno != ENOENT)
			return fd;
	}
	errno = ENOENT;
	return -1;
}

/* The command on fd (marked, and its mark undone) returned rc with errno err.
 * If it answered a token in *out_fd, open the daemon's node `name`, claim the
 * token on it and put the new descriptor in *out_fd; failing that, the call
 * fails with that errno. */
static int receive_file(int fd, const char *name, __u32 *out_fd, int rc, int err)
{
	__u32 token;
	int nfd;

	if (rc)
		goto out;
	token = *out_fd;
	if (token < TOKEN_BASE)
		goto out; /* a real descriptor: not our daemon */
	nfd = open_daemon_node(fd, name, O_RDWR | O_CLOEXEC);
	if (nfd < 0) {
		err = errno;
		rc = -1;
		goto out;
	}
	if (real_ioctl()(nfd, CLAIM, (unsigned long)token)) {
		err = errno;
		close(nfd);
		rc = -1;
		goto out;
	}
	*out_fd = nfd;
out:
	errno = err;
	return rc;
}

static int create_access(int fd, unsigned long request, struct iommu_test_cmd *cmd)
{
	__u32 saved = cmd->__reserved;
	int rc, err;

	cmd->__reserved = COMPANION_MAGIC;
	rc = real_ioctl()(fd, request, cmd);
	err = errno;
	cmd->__reserved = saved;
	return receive_file(fd, ACCESS_NODE, &cmd->create_access.out_access_fd, rc, err);
}

/* IOMMU_TEST_OP_DMABUF_GET: the token is the return value, and so is the fd. */
static int dmabuf_get(int fd, unsigned long request, struct iommu_test_cmd *cmd)
{
	__u32 saved = cmd->__reserved;
	int rc, err, nfd;

	cmd->__reserved = COMPANION_MAGIC;
	rc = real_ioctl()(fd, request, cmd);
	err = errno;
	cmd->__reserved = saved;
	if (rc < 0 || (__u32)rc < TOKEN_BASE) {
		errno = err;
		return rc; /* an error, or a real descriptor: not our daemon */
	}
	nfd = open_daemon_node(fd, DMABUF_NODE, cmd->dmabuf_get.open_flags & (O_ACCMODE | O_CLOEXEC));
	if (nfd < 0)
		return -1;
	if (real_ioctl()(nfd, CLAIM, (unsigned long)rc)) {
		err = errno;
		close(nfd);
		errno = err;
		return -1;
	}
	return nfd;
}

static int fault_alloc(int fd, unsigned long request, struct iommu_fault_alloc *cmd)
{
	int rc, err;

	cmd->flags = COMPANION_MAGIC;
	rc = real_ioctl()(fd, request, cmd);
	err = errno;
	cmd->flags = 0;
	return receive_file(fd, FAULT_NODE, &cmd->out_fault_fd, rc, err);
}

/* IOMMU_VEVENTQ_ALLOC: as fault_alloc, on the vEVENT queue node. */
static int veventq_alloc(int fd, unsigned long request, struct iommu_veventq_alloc *cmd)
{
	int rc, err;

	cmd->flags = COMPANION_MAGIC;
	rc = real_ioctl()(fd, request, cmd);
	err = errno;
	cmd->flags = 0;
	return receive_file(fd, VEVENTQ_NODE, &cmd->out_veventq_fd, rc, err);
}

static int on_fuse(int fd);

/* VFIO_GROUP_GET_DEVICE_FD on a group of the daemon: a token, claimed on its device node. */
static int group_get_device_fd(int fd, const char *name)
{
	__u32 token;
	int rc = real_ioctl()(fd, GROUP_GET_DEVICE_TOKEN, name);

	if (rc < 0)
		return rc;
	token = (__u32)rc;
	if (receive_file(fd, DEVICE_NODE, &token, 0, 0))
		return -1;
	return (int)token;
}

static int on_fuse(int fd)
{
	struct statfs st;

	return fstatfs(fd, &st) == 0 && st.f_type == FUSE_SUPER_MAGIC;
}

/* Read n bytes at p without faulting (a bad pointer is the daemon's EFAULT). */
static int peek(const void *p, void *out, size_t n)
{
	struct iovec local = { out, n }, remote = { (void *)p, n };

	return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)n ? 0 : -1;
}

int ioctl(int fd, unsigned long request, ...)
{
	struct iommu_test_cmd head;
	struct iommu_fault_alloc falloc;
	struct iommu_veventq_alloc qalloc;
	va_list ap;
	void *arg;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (request == IOMMU_TEST_CMD && !peek(arg, &head, sizeof(head)) &&
	    head.size >= offsetof(struct iommu_test_cmd, last) + sizeof(head.last)) {
		if (head.op == IOMMU_TEST_OP_CREATE_ACCESS)
			return create_access(fd, request, arg);
		if (head.op == IOMMU_TEST_OP_DMABUF_GET)
			return dmabuf_get(fd, request, arg);
	}
	/* flags 0 only: other flags are the daemon's EOPNOTSUPP, as mainline's */
	if (request == IOMMU_FAULT_QUEUE_ALLOC && !peek(arg, &falloc, sizeof(falloc)) &&
	    falloc.size >= sizeof(falloc) && falloc.flags == 0 && on_fuse(fd))
		return fault_alloc(fd, request, arg);
	if (request == IOMMU_VEVENTQ_ALLOC && !peek(arg, &qalloc, sizeof(qalloc)) &&
	    qalloc.size >= sizeof(qalloc) && qalloc.flags == 0 && on_fuse(fd))
		return veventq_alloc(fd, request, arg);
	if (request == VFIO_GROUP_GET_DEVICE_FD && on_fuse(fd))
		return group_get_device_fd(fd, arg);
	return real_ioctl()(fd, request, arg);
}

/* Whether fd is a file of the daemon's node `name` (a FUSE file whose path ends so). */
static int is_daemon_node(int fd, const char *name)
{
	char proc[64], path[PATH_MAX];
	size_t len = strlen(name);
	ssize_t n;

	if (!on_fuse(fd))
		return 0;
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
	n = readlink(proc, path, sizeof(path) - 1);
	if (n <= (ssize_t)len)
		return 0;
	path[n] = 0;
	return path[n - len - 1] == '/' && strcmp(path + n - len, name) == 0;
}

ssize_t read(int fd, void *buf, size_t count)
{
	static read_fn real_read;

	if (!real_read)
		real_read = (read_fn)dlsym(RTLD_NEXT, "read");
	if (count == 0 && is_daemon_node(fd, VEVENTQ_NODE))
		return real_ioctl()(fd, ZERO_READ, 0);
	return real_read(fd, buf, count);
}

static int is_iommufd(int fd)
{
	return is_daemon_node(fd, "iommu") || is_daemon_node(fd, "vfio/vfio");
}

/* mmap() of an iommufd of the daemon: see the top of this file. */
static void *mmap_iommufd(mmap_fn real_mmap, int fd, void *addr, size_t length, int prot, int flags, off_t offset)
{
	struct mmap_region r = { (__u64)offset, length, (__u32)prot, (__u32)flags };
	char name[64];
	int token, nfd, err;
	void *p;

	token = real_ioctl()(fd, MMAP_REGION, &r);
	if (token < 0 && errno == ENOTTY) /* not our daemon after all */
		return real_mmap(addr, length, prot, flags, fd, offset);
	if (token < 0)
		return MAP_FAILED;
	snprintf(name, sizeof(name), MMAP_DIR "/%d", token);
	nfd = open_daemon_node(fd, name, O_RDWR | O_CLOEXEC);
	if (nfd < 0)
		return MAP_FAILED;
	p = real_mmap(addr, length, prot, flags, nfd, 0);
	err = errno;
	close(nfd); /* the mapping holds the file; its release drops the region's owner */
	errno = err;
	return p;
}

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	static mmap_fn real_mmap;

	if (!real_mmap)
		real_mmap = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
	if (fd >= 0 && !(flags & MAP_ANONYMOUS) && is_iommufd(fd))
		return mmap_iommufd(real_mmap, fd, addr, length, prot, flags, offset);
	return real_mmap(addr, length, prot, flags, fd, offset);
}

void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
	return mmap(addr, length, prot, flags, fd, offset);
}
