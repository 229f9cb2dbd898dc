/* iommufd-cuse native core: caller memory, I/O page tables, the page store, DMA.
 *
 * Plain C, no Python objects. Every call that can fail returns 0 (or a count)
 * on success and a negative errno on failure. Batch interfaces: one call per
 * ioctl or per DMA transfer, never one per page.
 *
 * Threading: every object carries its own lock, so calls may come from the
 * trio thread and from worker threads at once.
 */
#ifndef ICUSE_H
#define ICUSE_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------
 * Caller memory: the memory of the thread that issued a request. The thread
 * id is the one the kernel put in the FUSE request header.
 */
int icuse_vm_read(int tid, uint64_t addr, void *buf, size_t len);
int icuse_vm_write(int tid, uint64_t addr, const void *buf, size_t len);

/* Scans and fills of caller memory, O(1) per byte, stopping at the first fault.
 * The caller bounds len per call (and goes off its event loop for long ones).
 * check_zero: 0 if all len bytes at addr are zero, 1 at the first non-zero
 * byte (found before any fault after it), -EFAULT or -ESRCH.
 * clear: write len zero bytes at addr (clear_user); 0, -EFAULT at the first
 * page that cannot be written (those before it are cleared), or -ESRCH. */
int64_t icuse_vm_check_zero(int tid, uint64_t addr, uint64_t len);
int64_t icuse_vm_clear(int tid, uint64_t addr, uint64_t len);

/* ---------------------------------------------------------------------------
 * IOVA range lists: n (start, last) pairs, as struct iommu_iova_range arrays.
 * ranges_check: the index of the first range that is empty (start >= last)
 * or overlaps an earlier one, n if none, or -ENOMEM; when n, sorted (room for
 * 2n words, may be NULL) gets the ranges sorted by start.
 * iova_alloc: the lowest iova inside one of the sorted windows (each clipped
 * to [lo, hi]) that misses every used range (sorted, merged) and is align
 * aligned, or'ed with page_offset, with room for length bytes: 0 and *out,
 * or -ENOSPC. */
int64_t icuse_ranges_check(const uint64_t *ranges, uint64_t n, uint64_t *sorted);
int icuse_iova_alloc(const uint64_t *windows, uint64_t nwin, const uint64_t *used, uint64_t nused,
		     uint64_t lo, uint64_t hi, uint64_t length, uint64_t align, uint64_t page_offset,
		     uint64_t *out);

/* Issue ioctl(fd, cmd, arg) from a forked child that keeps no other file
 * open; returns the child's pid (it exits 0 when the ioctl returned 0) or
 * -errno. For I/O on the daemon's own mount, which must never be done by a
 * thread of the daemon itself. */
int icuse_loopback_ioctl(int fd, unsigned long cmd, unsigned long arg);

/* The same, and when the ioctl returned 0 the child also registers the file in the
 * epoll set epfd under target number slot (events 0; a descriptor number below
 * RLIMIT_NOFILE): the set then refers to the file without holding it, until its
 * last close. The child exits 0 (ioctl and registration done), 1 (the ioctl
 * failed) or 2 (no registration). */
int icuse_loopback_ioctl_register(int fd, unsigned long cmd, unsigned long arg, int epfd, int slot);

/* Whether the file behind descriptor fd of process pid is the one registered under
 * slot in this process's epoll set epfd (kcmp KCMP_EPOLL_TFD): 1, 0, or -errno (none
 * registered there any more: -ENOENT). One syscall. */
int icuse_same_file_as_slot(int pid, int fd, int epfd, int slot);

/* A forked child that keeps no other file than sock (a SOCK_SEQPACKET socket) and,
 * for each request read from it, opens path (a node of the daemon's own mount),
 * issues ioctl(fd, cmd, arg) on it and answers: int32 0 with the open file attached
 * (SCM_RIGHTS), or int32 errno of the step that failed. It exits when sock reaches
 * EOF or the daemon dies. Returns the child's pid or -errno. For files the daemon
 * hands to a caller (seccomp ADDFD): one child for all, not a fork per file. */
struct icuse_open_request {
	uint64_t cmd;
	uint64_t arg;
	char path[4096];
};
int icuse_opener_start(int sock);

/* ---------------------------------------------------------------------------
 * I/O page table: a radix tree of 512-entry tables. The granule is
 * 1 << granule_shift (11: 2 KiB, 12: 4 KiB); level k leaves are
 * 1 << (granule_shift + 9 * k) bytes. pgsize_bitmap says which leaf sizes may
 * be used (bit n set: 1 << n bytes allowed); it must contain the granule.
 * Addresses are "physical addresses" (pa) of the emulated machine, which the
 * page store hands out.
 */
#define ICUSE_PROT_READ 1u
#define ICUSE_PROT_WRITE 2u

/* icuse_pte_info.flags */
#define ICUSE_PTE_ACCESSED 1u
#define ICUSE_PTE_DIRTY 2u

struct icuse_pt;

struct icuse_pte_info {
	uint64_t pa;        /* address that iova translates to */
	uint64_t leaf_size; /* size of the leaf holding it */
	uint32_t prot;      /* ICUSE_PROT_* */
	uint32_t flags;     /* ICUSE_PTE_* */
};

struct icuse_seg {
	uint64_t pa;
	uint64_t len;
};

struct icuse_pt_stats {
	uint64_t tables;       /* number of 4 KiB tables allocated */
	uint64_t leaves;       /* leaf entries present */
	uint64_t mapped_bytes; /* bytes translated */
};

struct icuse_pt *icuse_pt_alloc(unsigned granule_shift, uint64_t pgsize_bitmap, unsigned iova_bits);
void icuse_pt_free(struct icuse_pt *pt);

/* Map [iova, iova + length) to [pa, pa + length) with prot, using the largest
 * allowed leaf that alignment of iova and pa and the remaining length permit.
 * -EINVAL: unaligned to the granule, zero length, or beyond iova_bits.
 * -EEXIST: some part is already mapped (nothing is changed).
 * -ENOMEM: out of memory (nothing is changed). */
int icuse_pt_map(struct icuse_pt *pt, uint64_t iova, uint64_t pa, uint64_t length, uint32_t prot);
/* The same with no leaf larger than max_leaf bytes (0: no limit); the granule
 * is always used. For an IOAS with large pages disabled. */
int icuse_pt_map_max(struct icuse_pt *pt, uint64_t iova, uint64_t pa, uint64_t length, uint32_t prot,
		     uint64_t max_leaf);

/* Remove every translation in [iova, iova + length) (granule aligned), splitting
 * large leaves that straddle its edges. Returns the number of bytes that were
 * mapped inside the range (0 if none), or -EINVAL/-ENOMEM (the split needs a table). */
int64_t icuse_pt_unmap(struct icuse_pt *pt, uint64_t iova, uint64_t length);

/* Set the dirty bit of the leaf holding iova, whatever its permissions (the
 * selftest's IOMMU_TEST_OP_DIRTY, which the mock does to any present entry).
 * 0, or -ENOENT when unmapped. */
int icuse_pt_mark_dirty(struct icuse_pt *pt, uint64_t iova);

/* The same for every page_size page of iova whose bit is set in bitmap (bit i:
 * the page at iova + i * page_size, little-endian u64 words, nbits bits);
 * returns the number of bits set, mapped or not (the selftest's IOMMU_TEST_OP_DIRTY). */
uint64_t icuse_pt_mark_dirty_bitmap(struct icuse_pt *pt, uint64_t iova, uint64_t page_size,
				    const uint64_t *bitmap, uint64_t nbits);

/* Translation of one iova: 0, or -ENOENT when unmapped. Does not touch A/D bits. */
int icuse_pt_walk(struct icuse_pt *pt, uint64_t iova, struct icuse_pte_info *out);

/* Translate [iova, iova + length) for a device access (ICUSE_PROT_READ or
 * ICUSE_PROT_WRITE): fills up to max_segs segments (adjacent pa merged), sets
 * the accessed bit, and the dirty bit for writes. Returns the number of
 * segments; -ENOENT (no translation) or -EACCES (permission) with *fault_iova
 * set to the first faulting address; -ENOSPC when more than max_segs are needed.
 * A/D bits are only set when the whole range translates. With segs NULL it
 * only checks the range (0 or the fault) and marks nothing. */
int64_t icuse_pt_translate(struct icuse_pt *pt, uint64_t iova, uint64_t length, uint32_t access,
			   struct icuse_seg *segs, size_t max_segs, uint64_t *fault_iova);

/* For each page_size page of [iova, iova + length) that a dirty leaf overlaps,
 * set bit (page index from iova) in bitmap (little-endian u64 words, the
 * kernel's bitmap layout). Clears the dirty bits unless no_clear.
 * Returns the number of bits set, or -EINVAL. */
int64_t icuse_pt_read_and_clear_dirty(struct icuse_pt *pt, uint64_t iova, uint64_t length,
				      uint64_t page_size, uint64_t *bitmap, int no_clear);

void icuse_pt_get_stats(struct icuse_pt *pt, struct icuse_pt_stats *out);

/* ---------------------------------------------------------------------------
 * Page store: every page that iommufd has pinned. A "pages" entry (the
 * kernel's iopt_pages) covers npages host pages (4 KiB) and owns a contiguous
 * range of emulated physical addresses, stable for its lifetime:
 * pa(index) = pa_base + index * 4096. Pin counts are kept as ranges.
 *
 * Backings, set per page range:
 *   ICUSE_BACKING_MEM:  memory mapped in the daemon (a shared file mapping);
 *                       addr is the daemon address of the first page.
 *   ICUSE_BACKING_PROC: memory of another process, reached through fd, an open
 *                       /proc/<pid>/mem (tied to that process's mm, so a reused
 *                       pid never aliases); addr is its virtual address. When
 *                       the process is gone, access fails with -ESRCH.
 */
#define ICUSE_PAGE_SIZE 4096u
#define ICUSE_BACKING_NONE 0
#define ICUSE_BACKING_MEM 1
#define ICUSE_BACKING_PROC 2

struct icuse_store;

struct icuse_store *icuse_store_new(void);
void icuse_store_free(struct icuse_store *st);

/* New pages entry; its pa_base is congruent to align_offset modulo 1 GiB, so
 * that iova and pa can share large-leaf alignment. Returns id > 0 or -errno. */
int64_t icuse_pages_new(struct icuse_store *st, uint64_t npages, uint64_t align_offset, uint64_t *pa_base);
/* Remove: -EBUSY while any page is pinned. Does not close fds or unmap memory
 * given as backings: the caller owns those and releases them after this. */
int icuse_pages_remove(struct icuse_store *st, int64_t id);
int icuse_pages_set_backing(struct icuse_store *st, int64_t id, uint64_t first, uint64_t npages,
			    int kind, int fd, uint64_t addr);

/* Pin counts over [first, first + npages). pin returns how many pages went
 * from 0 to 1 pins, unpin how many went from 1 to 0 (-EINVAL and no change
 * if some page is not pinned). */
int64_t icuse_pages_pin(struct icuse_store *st, int64_t id, uint64_t first, uint64_t npages);
int64_t icuse_pages_unpin(struct icuse_store *st, int64_t id, uint64_t first, uint64_t npages);
int64_t icuse_pages_pin_count(struct icuse_store *st, int64_t id, uint64_t index);
uint64_t icuse_store_pinned_pages(struct icuse_store *st);

/* Access emulated physical memory: every page touched must be pinned
 * (-EFAULT otherwise), and its backing reachable (-ESRCH: owner gone). */
int icuse_pa_rw(struct icuse_store *st, uint64_t pa, void *buf, size_t len, int write);

/* Resolve a pa to (pages id, index); -ENOENT if no pages entry holds it. */
int icuse_pa_lookup(struct icuse_store *st, uint64_t pa, int64_t *id, uint64_t *index);

/* ---------------------------------------------------------------------------
 * DMA: a device access through an I/O page table. Faults report the iova and
 * a reason: -ENOENT no translation, -EACCES permission, -EFAULT unpinned page,
 * -ESRCH the owning process is gone. Nothing is copied on a fault of a read;
 * a write stops at the faulting page. The page table stays locked against
 * unmap for the duration of each chunk, so no access survives an unmap.
 */
int64_t icuse_dma_rw(struct icuse_store *st, struct icuse_pt *pt, uint64_t iova, void *buf,
		     size_t len, int write, uint64_t *fault_iova);
/* Device-internal copy from one iova to another (each through its own table). */
int64_t icuse_dma_copy(struct icuse_store *st, struct icuse_pt *src_pt, uint64_t src_iova,
		       struct icuse_pt *dst_pt, uint64_t dst_iova, size_t len, uint64_t *fault_iova,
		       int *fault_is_dst);

/* ---------------------------------------------------------------------------
 * NVMe data transfers: a batch of commands, each moving len bytes between a
 * buffer of the daemon (the device's side: its namespace memory) and the host
 * memory that PRP1, PRP2 and the PRP lists (read by DMA, as the controller
 * does) describe, through one I/O page table. Memory pages are page_size
 * bytes (CC.MPS). Contiguous data pointers are moved in one access.
 * result: 0, a DMA fault (-ENOENT, -EACCES, -EFAULT, -ESRCH as above, with
 * fault_iova/fault_write), or -EINVAL: a data pointer or list pointer with an
 * offset the PRP rules forbid (NVMe "PRP Offset Invalid"). A transfer to the
 * host stops at a fault; one from the host moves nothing of the faulting chunk.
 */
struct icuse_prp_io {
	uint64_t prp1;
	uint64_t prp2;
	uint64_t len;         /* bytes, > 0 */
	uint64_t buf;         /* daemon address of the device side */
	uint32_t to_host;     /* 1: device -> host memory (a Read), 0: host -> device */
	int32_t result;       /* out */
	uint64_t fault_iova;  /* out, with a fault */
	uint32_t fault_write; /* out, with a fault: the faulting access was a write to the host */
	uint32_t pad;
};

/* Run n transfers; returns how many failed (each has its own result). */
int64_t icuse_dma_prp_batch(struct icuse_store *st, struct icuse_pt *pt, uint64_t page_size,
			    struct icuse_prp_io *ios, size_t n);

/* ---------------------------------------------------------------------------
 * Testing: make the nth internal allocation from now fail (as if out of
 * memory), to exercise -ENOMEM paths; 0 turns it off. Process wide.
 */
void icuse_test_fail_nth_alloc(uint64_t nth);

#endif
