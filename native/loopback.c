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
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "icuse.h"

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

int icuse_loopback_ioctl(int fd, unsigned long cmd, unsigned long arg)
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
		if (fd > 0)
			syscall(SYS_close_range, 0, fd - 1, 0);
		syscall(SYS_close_range, fd + 1, ~0u, 0);
		_exit(ioctl(fd, cmd, arg) == 0 ? 0 : 1);
	}
	return pid;
}
