/* Caller memory: the ioctl struct lives in the calling thread's address space. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
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

/* Scans go through a stack buffer of this size; clears repeat one zero block. */
#define SCAN_BUF (64u << 10)
#define CLEAR_IOV 16

static int all_zero(const unsigned char *p, size_t n)
{
	const uint64_t *w = (const uint64_t *)p; /* p is the aligned stack buffer */
	size_t i;

	for (i = 0; i < n / 8; i++)
		if (w[i])
			return 0;
	for (i = n / 8 * 8; i < n; i++)
		if (p[i])
			return 0;
	return 1;
}

int64_t icuse_vm_check_zero(int tid, uint64_t addr, uint64_t len)
{
	_Alignas(64) unsigned char buf[SCAN_BUF];
	uint64_t done = 0;

	if (addr + len < addr)
		return -EFAULT;
	while (done < len) {
		size_t n = len - done < SCAN_BUF ? (size_t)(len - done) : SCAN_BUF;
		struct iovec local = { .iov_base = buf, .iov_len = n };
		struct iovec remote = { .iov_base = (void *)(uintptr_t)(addr + done), .iov_len = n };
		ssize_t got = process_vm_readv(tid, &local, 1, &remote, 1, 0);

		if (got < 0)
			return errno == ESRCH ? -ESRCH : -EFAULT;
		/* Bytes read before a fault still count: a non-zero byte before
		 * the fault is found first, as check_zeroed_user finds it. */
		if (!all_zero(buf, (size_t)got))
			return 1;
		if ((size_t)got != n)
			return -EFAULT;
		done += n;
	}
	return 0;
}

int64_t icuse_vm_clear(int tid, uint64_t addr, uint64_t len)
{
	static const unsigned char zeros[SCAN_BUF];
	struct iovec local[CLEAR_IOV];
	uint64_t done = 0;
	int i;

	if (addr + len < addr)
		return -EFAULT;
	for (i = 0; i < CLEAR_IOV; i++)
		local[i].iov_base = (void *)zeros;
	while (done < len) {
		uint64_t want = len - done;
		size_t n = 0;
		struct iovec remote;
		ssize_t put;
		int k = 0;

		/* One call writes up to CLEAR_IOV zero blocks. */
		while (k < CLEAR_IOV && n < want) {
			size_t b = want - n < SCAN_BUF ? (size_t)(want - n) : SCAN_BUF;

			local[k++].iov_len = b;
			n += b;
		}
		remote.iov_base = (void *)(uintptr_t)(addr + done);
		remote.iov_len = n;
		put = process_vm_writev(tid, local, k, &remote, 1, 0);
		if (put < 0)
			return errno == ESRCH ? -ESRCH : -EFAULT;
		done += (uint64_t)put;
		if ((size_t)put != n)
			return -EFAULT;
	}
	return 0;
}
