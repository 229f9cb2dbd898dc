/* Internal interfaces shared by the native sources; not part of the cffi cdef. */
#ifndef ICUSE_INTERNAL_H
#define ICUSE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "icuse.h"

/* Allocation wrappers that honour icuse_test_fail_nth_alloc(). */
int icuse_alloc_fails(void);
void *icuse_malloc(size_t size);
void *icuse_realloc(void *p, size_t size);

/* memcpy for a device's writes to memory: large copies bypass the caches. */
void icuse_dma_memcpy(void *dst, const void *src, size_t n);

/* Page table: lock held by the caller (dma.c holds it across a chunk). */
void icuse_pt_rdlock(struct icuse_pt *pt);
void icuse_pt_unlock(struct icuse_pt *pt);
int64_t icuse_pt_translate_locked(struct icuse_pt *pt, uint64_t iova, uint64_t length,
				  uint32_t access, struct icuse_seg *segs, size_t max_segs,
				  uint64_t *fault_iova);

/* Page store, with the read lock held by the caller. */
void icuse_store_rdlock(struct icuse_store *st);
void icuse_store_unlock(struct icuse_store *st);

/* A run of emulated physical memory that is one pages entry, pinned, and one
 * backing run: it can be copied with a single memcpy/pread/pwrite. */
struct icuse_span {
	int kind;      /* ICUSE_BACKING_MEM or ICUSE_BACKING_PROC */
	int fd;        /* PROC: the /proc/<pid>/mem fd */
	int pid;       /* PROC: its process, for process_vm_readv/writev (-1: unknown) */
	uint64_t addr; /* MEM: daemon address; PROC: address in the owner */
	uint64_t len;
};

/* The span starting at pa, at most len bytes long. -EFAULT if the page at pa
 * is not in any pages entry, not pinned, or has no backing. */
int icuse_store_span_locked(struct icuse_store *st, uint64_t pa, uint64_t len,
			    struct icuse_span *sp);

/* Copy n bytes from span s to span d (one of them may be a plain MEM span of
 * the daemon). -ESRCH if a PROC transfer is short or fails, with *dst_failed
 * saying which side; -ENOMEM if no bounce buffer for PROC -> PROC. */
int icuse_span_copy(const struct icuse_span *d, const struct icuse_span *s, uint64_t n,
		    int *dst_failed);

#endif
