/* Caller memory: the ioctl struct lives in the calling thread's address space. */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/uio.h>

#include "icuse.h"

static int vm_rw(int tid, uint64_t addr, void *buf, size_t len, int write)
{
	struct iovec local = { .iov_base = buf, .iov_len = len };
	struct iovec remote = { .iov_base = (void *)(uintptr_t)addr, .iov_len = len };
	ssize_t n;

	if (len == 0)
		return 0;
	if (addr + len < addr)
		return -EFAULT;
	n = write ? process_vm_writev(tid, &local, 1, &remote, 1, 0)
		  : process_vm_readv(tid, &local, 1, &remote, 1, 0);
	if (n < 0)
		return errno == ESRCH ? -ESRCH : -EFAULT;
	/* A partial copy means part of the range is not mapped: the kernel's
	 * copy_from_user would fault too. */
	return (size_t)n == len ? 0 : -EFAULT;
}

int icuse_vm_read(int tid, uint64_t addr, void *buf, size_t len)
{
	return vm_rw(tid, addr, buf, len, 0);
}

int icuse_vm_write(int tid, uint64_t addr, const void *buf, size_t len)
{
	return vm_rw(tid, addr, (void *)buf, len, 1);
}
