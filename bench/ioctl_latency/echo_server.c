/*
 * echo_server MOUNTPOINT [NAME]: the baseline of the ioctl latency benchmark.
 *
 * A minimal FUSE server in C speaking the kernel protocol on /dev/fuse itself
 * (it mounts with mount(2), as root; no libfuse), with one file node NAME
 * (default "iommu") in the root. It answers FUSE_IOCTL the way the daemon
 * answers IOMMU_OPTION(GET): it reads the caller's 24-byte struct
 * iommu_option with process_vm_readv at the raw argument pointer, in the
 * thread whose id the request header carries, writes val64 back with
 * process_vm_writev and replies result 0 -- and does nothing else. Besides
 * that it answers INIT, LOOKUP, GETATTR, OPEN, RELEASE and FLUSH (ENOSYS for
 * the rest), single-threaded, reading requests into one reused buffer.
 *
 * Prints "ready" once the kernel's INIT is answered; unmounts on SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#define FILE_INO 2
#define MAX_WRITE (128 * 1024)

static const char *mountpoint;
static const char *name = "iommu";
static int fusefd = -1;
static unsigned char buf[MAX_WRITE + 4096];

static void reply(__u64 unique, int error, const void *payload, size_t len)
{
	struct fuse_out_header h = { .len = sizeof(h) + (error ? 0 : len), .error = error, .unique = unique };
	struct iovec iov[2] = { { &h, sizeof(h) }, { (void *)payload, len } };
	if (writev(fusefd, iov, error || !len ? 1 : 2) < 0 && errno != ENOENT)
		perror("writev");
}

static void fill_attr(struct fuse_attr *a, __u64 ino)
{
	memset(a, 0, sizeof(*a));
	a->ino = ino;
	a->mode = ino == FUSE_ROOT_ID ? (S_IFDIR | 0755) : (S_IFREG | 0666);
	a->nlink = ino == FUSE_ROOT_ID ? 2 : 1;
	a->blksize = 4096;
	a->atime = a->mtime = a->ctime = (__u64)time(NULL);
}

static void do_init(struct fuse_in_header *in, const struct fuse_init_in *arg)
{
	struct fuse_init_out out = {
		.major = FUSE_KERNEL_VERSION,
		.minor = arg->minor < 31 ? arg->minor : 31,
		.max_readahead = arg->max_readahead,
		.flags = FUSE_BIG_WRITES | FUSE_MAX_PAGES,
		.max_background = 16,
		.congestion_threshold = 12,
		.max_write = MAX_WRITE,
		.time_gran = 1,
		.max_pages = MAX_WRITE / 4096,
	};
	reply(in->unique, 0, &out, sizeof(out));
	printf("ready\n");
	fflush(stdout);
}

static void do_ioctl(struct fuse_in_header *in, const struct fuse_ioctl_in *arg)
{
	struct iommu_option opt;
	struct iovec local = { &opt, sizeof(opt) };
	struct iovec remote = { (void *)(uintptr_t)arg->arg, sizeof(opt) };
	if (process_vm_readv((pid_t)in->pid, &local, 1, &remote, 1, 0) != sizeof(opt)) {
		reply(in->unique, -EFAULT, NULL, 0);
		return;
	}
	opt.val64 = 0; /* RLIMIT_MODE of /dev/iommu */
	local = (struct iovec){ &opt.val64, sizeof(opt.val64) };
	remote = (struct iovec){ (void *)(uintptr_t)(arg->arg + offsetof(struct iommu_option, val64)),
				 sizeof(opt.val64) };
	if (process_vm_writev((pid_t)in->pid, &local, 1, &remote, 1, 0) != sizeof(opt.val64)) {
		reply(in->unique, -EFAULT, NULL, 0);
		return;
	}
	struct fuse_ioctl_out out = { .result = 0 };
	reply(in->unique, 0, &out, sizeof(out));
}

static void dispatch(struct fuse_in_header *in, void *arg)
{
	switch (in->opcode) {
	case FUSE_INIT:
		do_init(in, arg);
		break;
	case FUSE_LOOKUP: {
		if (in->nodeid != FUSE_ROOT_ID || strcmp(arg, name)) {
			reply(in->unique, -ENOENT, NULL, 0);
			break;
		}
		struct fuse_entry_out e = { .nodeid = FILE_INO, .entry_valid = 1, .attr_valid = 1 };
		fill_attr(&e.attr, FILE_INO);
		reply(in->unique, 0, &e, sizeof(e));
		break;
	}
	case FUSE_GETATTR: {
		struct fuse_attr_out a = { .attr_valid = 1 };
		fill_attr(&a.attr, in->nodeid);
		reply(in->unique, 0, &a, sizeof(a));
		break;
	}
	case FUSE_OPEN: {
		struct fuse_open_out o = { .fh = 1, .open_flags = FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE };
		reply(in->unique, 0, &o, sizeof(o));
		break;
	}
	case FUSE_IOCTL:
		do_ioctl(in, arg);
		break;
	case FUSE_RELEASE:
	case FUSE_FLUSH:
	case FUSE_DESTROY:
		reply(in->unique, 0, NULL, 0);
		break;
	case FUSE_FORGET:
	case FUSE_BATCH_FORGET:
	case FUSE_INTERRUPT:
		break; /* no reply */
	default:
		reply(in->unique, -ENOSYS, NULL, 0);
	}
}

static void stop(int sig)
{
	(void)sig;
	umount2(mountpoint, MNT_DETACH);
	_exit(0);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s MOUNTPOINT [NAME]\n", argv[0]);
		return 2;
	}
	mountpoint = argv[1];
	if (argc > 2)
		name = argv[2];
	fusefd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fusefd < 0) {
		perror("/dev/fuse");
		return 1;
	}
	char opts[256];
	snprintf(opts, sizeof(opts),
		 "fd=%d,rootmode=40755,user_id=0,group_id=0,allow_other,default_permissions,max_read=%d",
		 fusefd, MAX_WRITE);
	if (mount("echo", mountpoint, "fuse.echo", MS_NOSUID | MS_NODEV, opts)) {
		perror("mount");
		return 1;
	}
	signal(SIGTERM, stop);
	signal(SIGINT, stop);
	for (;;) {
		ssize_t n = read(fusefd, buf, sizeof(buf));
		if (n < 0) {
			if (errno == ENOENT || errno == EINTR || errno == EAGAIN)
				continue;
			if (errno == ENODEV) /* unmounted */
				return 0;
			perror("read /dev/fuse");
			return 1;
		}
		struct fuse_in_header *in = (void *)buf;
		dispatch(in, buf + sizeof(*in));
	}
}
