/* I/O on the daemon's own FUSE mount, done by a forked child.
 *
 * A thread of the daemon blocked on a request to its own mount cannot be
 * killed: if the daemon dies with SIGKILL the thread waits forever for the
 * reply, and the process can never exit. A child that holds no other file
 * than the one it needs (not /dev/fuse) does not have that problem: when the
 * daemon dies its fuse connection is aborted and the child's call fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "icuse.h"

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

/* Closes every descriptor but keep_a and keep_b (either may be -1). */
static void close_all_but(int keep_a, int keep_b)
{
	int lo = keep_a < keep_b ? keep_a : keep_b, hi = keep_a < keep_b ? keep_b : keep_a;

	if (lo < 0)
		lo = hi, hi = -1;
	if (lo > 0)
		syscall(SYS_close_range, 0, lo - 1, 0);
	if (hi < 0) {
		syscall(SYS_close_range, lo + 1, ~0u, 0);
		return;
	}
	if (hi > lo + 1)
		syscall(SYS_close_range, lo + 1, hi - 1, 0);
	syscall(SYS_close_range, hi + 1, ~0u, 0);
}

int icuse_loopback_ioctl_register(int fd, unsigned long cmd, unsigned long arg, int epfd, int slot)
{
	pid_t parent = getpid();
	pid_t pid = fork();

	if (pid < 0)
		return -errno;
	if (pid == 0) {
		/* Only async-signal-safe calls from here on: the parent is threaded. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(126);
		close_all_but(fd, epfd);
		if (ioctl(fd, cmd, arg) != 0)
			_exit(1);
		if (epfd < 0)
			_exit(0);
		struct epoll_event ev = { .events = 0 };

		/* The slot is a descriptor number of this child (below its RLIMIT_NOFILE). */
		if (slot == fd || slot == epfd || dup2(fd, slot) != slot)
			_exit(2);
		_exit(epoll_ctl(epfd, EPOLL_CTL_ADD, slot, &ev) == 0 ? 0 : 2);
	}
	return pid;
}

int icuse_loopback_ioctl(int fd, unsigned long cmd, unsigned long arg)
{
	return icuse_loopback_ioctl_register(fd, cmd, arg, -1, -1);
}

/* The answer to one request: err, and the file when err is 0. */
static void opener_answer(int sock, int32_t err, int fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { &err, sizeof(err) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *cm;

	if (!err) {
		memset(cbuf, 0, sizeof(cbuf));
		msg.msg_control = cbuf;
		msg.msg_controllen = sizeof(cbuf);
		cm = CMSG_FIRSTHDR(&msg);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	}
	if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0)
		_exit(0);
}

int icuse_opener_start(int sock)
{
	pid_t parent = getpid();
	pid_t pid = fork();

	if (pid < 0)
		return -errno;
	if (pid == 0) {
		/* Only async-signal-safe calls from here on: the parent is threaded. */
		static struct icuse_open_request req;

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(0);
		close_all_but(sock, -1);
		for (;;) {
			ssize_t n = recv(sock, &req, sizeof(req), 0);
			int fd;

			if (n <= 0)
				_exit(0);
			if ((size_t)n != sizeof(req) || !memchr(req.path, 0, sizeof(req.path))) {
				opener_answer(sock, EINVAL, -1);
				continue;
			}
			fd = open(req.path, O_RDWR | O_CLOEXEC);
			if (fd < 0) {
				opener_answer(sock, errno, -1);
				continue;
			}
			if (ioctl(fd, req.cmd, req.arg) != 0) {
				int err = errno;

				close(fd);
				opener_answer(sock, err, -1);
				continue;
			}
			opener_answer(sock, 0, fd);
			close(fd);
		}
	}
	return pid;
}

#ifndef SYS_kcmp
#define SYS_kcmp 312
#endif
#define KCMP_EPOLL_TFD 7

struct kcmp_epoll_slot {
	uint32_t efd, tfd, toff;
};

int icuse_same_file_as_slot(int pid, int fd, int epfd, int slot)
{
	struct kcmp_epoll_slot s = { .efd = (uint32_t)epfd, .tfd = (uint32_t)slot, .toff = 0 };
	long rc = syscall(SYS_kcmp, pid, getpid(), KCMP_EPOLL_TFD, fd, (unsigned long)&s);

	if (rc < 0)
		return -errno;
	return rc == 0;
}
