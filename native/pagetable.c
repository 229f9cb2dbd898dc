/* I/O page table of the emulated IOMMU: a radix tree of 512-entry tables.
 *
 * Level 0 holds granule leaves; an entry at level k covers
 * 1 << (granule_shift + 9 * k) bytes and is either empty, a leaf of that
 * size, or a pointer to a level k - 1 table. Tables are 4 KiB, 4 KiB aligned.
 *
 * Entry layout (low byte is flags, the rest an address):
 *   bit 0 V  present        bit 3 W  writable
 *   bit 1 L  leaf           bit 4 A  accessed (set by translate)
 *   bit 2 R  readable       bit 5 D  dirty (set by translate for writes)
 * A leaf holds its pa (leaf aligned, so at least granule aligned: the low
 * byte is free since granules are >= 512 bytes); a table entry holds the
 * table's address. Level 0 entries always carry L so the walk needs no
 * level test to know it reached a leaf.
 *
 * Locking: map, unmap and read_and_clear_dirty change the tree and hold the
 * lock for writing. walk and translate hold it for reading; translate ORs A/D
 * into leaves with atomics since several translates may run at once, so
 * readers load entries atomically too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "icuse_internal.h"

#define PTE_V (1ull << 0)
#define PTE_L (1ull << 1)
#define PTE_R (1ull << 2)
#define PTE_W (1ull << 3)
#define PTE_A (1ull << 4)
#define PTE_D (1ull << 5)
#define PTE_ADDR (~0xffull)
#define PTE_PROT (PTE_R | PTE_W)
#define PTE_AD (PTE_A | PTE_D)

#define PT_ENTRIES 512
#define PT_TABLE_SIZE 4096

struct icuse_pt {
	pthread_rwlock_t lock;
	unsigned gs;       /* granule shift */
	unsigned levels;   /* root is level levels - 1 */
	uint64_t leaf_ok;  /* bit k: leaves allowed at level k */
	uint64_t max_iova; /* last valid iova */
	uint64_t *root;
	uint64_t tables, leaves, mapped;
};

static inline unsigned lvl_shift(const struct icuse_pt *pt, unsigned level)
{
	return pt->gs + 9 * level;
}

static inline unsigned pt_index(uint64_t iova, unsigned shift)
{
	return (iova >> shift) & (PT_ENTRIES - 1);
}

static inline uint64_t *pte_table(uint64_t e)
{
	return (uint64_t *)(uintptr_t)(e & PTE_ADDR);
}

static inline int pte_is_leaf(uint64_t e)
{
	return (e & (PTE_V | PTE_L)) == (PTE_V | PTE_L);
}

static inline int pte_is_table(uint64_t e)
{
	return (e & (PTE_V | PTE_L)) == PTE_V;
}

static inline uint64_t pte_load(const uint64_t *ep)
{
	return __atomic_load_n(ep, __ATOMIC_RELAXED);
}

static inline uint64_t min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static uint64_t *table_alloc(struct icuse_pt *pt)
{
	void *p;

	if (icuse_alloc_fails() || posix_memalign(&p, PT_TABLE_SIZE, PT_TABLE_SIZE))
		return NULL;
	memset(p, 0, PT_TABLE_SIZE);
	pt->tables++;
	return p;
}

static void table_free(struct icuse_pt *pt, uint64_t *t)
{
	free(t);
	pt->tables--;
}

static int table_empty(const uint64_t *t)
{
	for (unsigned i = 0; i < PT_ENTRIES; i++)
		if (t[i])
			return 0;
	return 1;
}

/* Free a table and everything below it. */
static void free_subtree(struct icuse_pt *pt, uint64_t *t, unsigned level)
{
	for (unsigned i = 0; i < PT_ENTRIES; i++) {
		if (pte_is_leaf(t[i]))
			pt->leaves--;
		else if (pte_is_table(t[i]))
			free_subtree(pt, pte_table(t[i]), level - 1);
	}
	table_free(pt, t);
}

struct icuse_pt *icuse_pt_alloc(unsigned granule_shift, uint64_t pgsize_bitmap, unsigned iova_bits)
{
	struct icuse_pt *pt;
	pthread_rwlockattr_t attr;

	/* The low byte of an entry holds flags, so granules are >= 512 bytes. */
	if (granule_shift < 9 || granule_shift > 32 || iova_bits <= granule_shift || iova_bits > 64)
		return NULL;
	if (!(pgsize_bitmap & (1ull << granule_shift)))
		return NULL;
	pt = calloc(1, sizeof(*pt));
	if (!pt)
		return NULL;
	pt->gs = granule_shift;
	pt->levels = (iova_bits - granule_shift + 8) / 9;
	pt->max_iova = iova_bits == 64 ? ~0ull : (1ull << iova_bits) - 1;
	/* Bitmap bits that are not a level's leaf size are ignored. */
	for (unsigned k = 0; k < pt->levels; k++)
		if (pgsize_bitmap & (1ull << lvl_shift(pt, k)))
			pt->leaf_ok |= 1ull << k;
	pt->root = table_alloc(pt);
	if (!pt->root) {
		free(pt);
		return NULL;
	}
	/* Prefer writers: a stream of DMA chunks must not starve unmap. Nothing
	 * takes a pt lock twice, and dma.c orders two pts by address. */
	pthread_rwlockattr_init(&attr);
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&pt->lock, &attr);
	pthread_rwlockattr_destroy(&attr);
	return pt;
}

void icuse_pt_free(struct icuse_pt *pt)
{
	if (!pt)
		return;
	free_subtree(pt, pt->root, pt->levels - 1);
	pthread_rwlock_destroy(&pt->lock);
	free(pt);
}

void icuse_pt_rdlock(struct icuse_pt *pt)
{
	pthread_rwlock_rdlock(&pt->lock);
}

void icuse_pt_unlock(struct icuse_pt *pt)
{
	pthread_rwlock_unlock(&pt->lock);
}

/* [iova, iova + length) granule aligned, non-empty, inside the iova space. */
static int range_ok(const struct icuse_pt *pt, uint64_t iova, uint64_t length, uint64_t *last)
{
	uint64_t mask = (1ull << pt->gs) - 1;

	if (!length || ((iova | length) & mask))
		return 0;
	*last = iova + length - 1;
	return *last >= iova && *last <= pt->max_iova;
}

/*
 * The recursive helpers below all work on a range [iova, last] that lies
 * inside table t at level `level`, one entry at a time: `elast` is the last
 * address of the entry holding iova and `end` the part of the range in it.
 */

static int any_mapped(struct icuse_pt *pt, uint64_t *t, unsigned level, uint64_t iova,
		      uint64_t last)
{
	unsigned shift = lvl_shift(pt, level);

	for (;;) {
		uint64_t e = t[pt_index(iova, shift)];
		uint64_t end = min_u64(iova | ((1ull << shift) - 1), last);

		if (pte_is_leaf(e))
			return 1;
		if (pte_is_table(e) && any_mapped(pt, pte_table(e), level - 1, iova, end))
			return 1;
		if (end == last)
			return 0;
		iova = end + 1;
	}
}

/* The range is known to be unmapped. On -ENOMEM the caller unmaps it again. */
static int map_level(struct icuse_pt *pt, uint64_t *t, unsigned level, uint64_t iova, uint64_t last,
		     uint64_t pa, uint64_t bits, uint64_t leaf_levels)
{
	unsigned shift = lvl_shift(pt, level);
	uint64_t esize = 1ull << shift;
	int leaf_ok = (leaf_levels >> level) & 1;

	for (;;) {
		uint64_t *ep = &t[pt_index(iova, shift)];
		uint64_t elast = iova | (esize - 1);
		uint64_t end = min_u64(elast, last);

		if (leaf_ok && !((iova | pa) & (esize - 1)) && end == elast) {
			*ep = pa | bits | PTE_V | PTE_L;
			pt->leaves++;
		} else {
			uint64_t *child;
			int ret;

			/* level > 0 here: granule leaves always fit. */
			if (!*ep) {
				child = table_alloc(pt);
				if (!child)
					return -ENOMEM;
				*ep = (uint64_t)(uintptr_t)child | PTE_V;
			}
			ret = map_level(pt, pte_table(*ep), level - 1, iova, end, pa, bits, leaf_levels);
			if (ret)
				return ret;
		}
		if (end == last)
			return 0;
		pa += end - iova + 1;
		iova = end + 1;
	}
}

/* Remove every leaf in the range; straddling leaves were split beforehand,
 * so every leaf met lies wholly inside. Frees tables left empty. */
static uint64_t unmap_level(struct icuse_pt *pt, uint64_t *t, unsigned level, uint64_t iova,
			    uint64_t last)
{
	unsigned shift = lvl_shift(pt, level);
	uint64_t esize = 1ull << shift;
	uint64_t bytes = 0;

	for (;;) {
		uint64_t *ep = &t[pt_index(iova, shift)];
		uint64_t elast = iova | (esize - 1);
		uint64_t end = min_u64(elast, last);

		if (pte_is_leaf(*ep)) {
			*ep = 0;
			pt->leaves--;
			bytes += esize;
		} else if (pte_is_table(*ep)) {
			uint64_t *child = pte_table(*ep);
			int whole = !(iova & (esize - 1)) && end == elast;

			bytes += unmap_level(pt, child, level - 1, iova, end);
			if (whole || table_empty(child)) {
				*ep = 0;
				table_free(pt, child);
			}
		}
		if (end == last)
			return bytes;
		iova = end + 1;
	}
}

/* A table at `level` translating its whole span to pa onwards with the given
 * prot/A/D bits, made of the largest allowed leaves (tables of smaller ones
 * where this level's size is not in the bitmap). */
static uint64_t *fill_table(struct icuse_pt *pt, unsigned level, uint64_t pa, uint64_t bits)
{
	uint64_t esize = 1ull << lvl_shift(pt, level);
	uint64_t *t = table_alloc(pt);

	if (!t)
		return NULL;
	if ((pt->leaf_ok >> level) & 1) {
		for (unsigned i = 0; i < PT_ENTRIES; i++)
			t[i] = (pa + i * esize) | bits | PTE_V | PTE_L;
		pt->leaves += PT_ENTRIES;
		return t;
	}
	for (unsigned i = 0; i < PT_ENTRIES; i++) {
		uint64_t *child = fill_table(pt, level - 1, pa + i * esize, bits);

		if (!child) {
			free_subtree(pt, t, level);
			return NULL;
		}
		t[i] = (uint64_t)(uintptr_t)child | PTE_V;
	}
	return t;
}

/* Make `a` a leaf boundary by splitting the leaves that straddle it. A split
 * keeps every translation as it was, so a failure half way changes nothing
 * a caller can see. */
static int split_edge(struct icuse_pt *pt, uint64_t a)
{
	uint64_t *t = pt->root;

	for (unsigned level = pt->levels - 1;; level--) {
		unsigned shift = lvl_shift(pt, level);
		uint64_t *ep = &t[pt_index(a, shift)];

		if (!(*ep & PTE_V))
			return 0;
		if (pte_is_leaf(*ep)) {
			uint64_t *child;

			if (!(a & ((1ull << shift) - 1)))
				return 0;
			/* a is granule aligned, so level > 0 here. */
			child = fill_table(pt, level - 1, *ep & PTE_ADDR,
					   *ep & (PTE_PROT | PTE_AD));
			if (!child)
				return -ENOMEM;
			*ep = (uint64_t)(uintptr_t)child | PTE_V;
			pt->leaves--;
		}
		t = pte_table(*ep);
	}
}

int icuse_pt_map(struct icuse_pt *pt, uint64_t iova, uint64_t pa, uint64_t length, uint32_t prot)
{
	return icuse_pt_map_max(pt, iova, pa, length, prot, 0);
}

int icuse_pt_map_max(struct icuse_pt *pt, uint64_t iova, uint64_t pa, uint64_t length, uint32_t prot,
		     uint64_t max_leaf)
{
	uint64_t last, bits = 0, leaf_levels = pt->leaf_ok;
	unsigned k;
	int ret;

	/* The granule is always allowed; larger leaves only up to max_leaf. */
	for (k = 1; max_leaf && k < 64; k++)
		if (lvl_shift(pt, k) >= 64 || (1ull << lvl_shift(pt, k)) > max_leaf)
			leaf_levels &= ~(1ull << k);

	if (!range_ok(pt, iova, length, &last) || (pa & ((1ull << pt->gs) - 1)) ||
	    pa + length - 1 < pa || (prot & ~(ICUSE_PROT_READ | ICUSE_PROT_WRITE)))
		return -EINVAL;
	if (prot & ICUSE_PROT_READ)
		bits |= PTE_R;
	if (prot & ICUSE_PROT_WRITE)
		bits |= PTE_W;

	pthread_rwlock_wrlock(&pt->lock);
	if (any_mapped(pt, pt->root, pt->levels - 1, iova, last)) {
		ret = -EEXIST;
	} else {
		ret = map_level(pt, pt->root, pt->levels - 1, iova, last, pa, bits, leaf_levels);
		if (ret)
			/* The range was empty: unmapping it removes exactly what
			 * was added, and the tables left empty by the failure. */
			unmap_level(pt, pt->root, pt->levels - 1, iova, last);
		else
			pt->mapped += length;
	}
	pthread_rwlock_unlock(&pt->lock);
	return ret;
}

int64_t icuse_pt_unmap(struct icuse_pt *pt, uint64_t iova, uint64_t length)
{
	uint64_t last, bytes;
	int ret;

	if (!range_ok(pt, iova, length, &last))
		return -EINVAL;
	pthread_rwlock_wrlock(&pt->lock);
	ret = split_edge(pt, iova);
	if (!ret && last != pt->max_iova)
		ret = split_edge(pt, last + 1);
	if (ret) {
		pthread_rwlock_unlock(&pt->lock);
		return ret;
	}
	bytes = unmap_level(pt, pt->root, pt->levels - 1, iova, last);
	pt->mapped -= bytes;
	pthread_rwlock_unlock(&pt->lock);
	return (int64_t)bytes;
}

/* Descend from entry ep at `level` to the leaf translating iova. */
static uint64_t *descend(const struct icuse_pt *pt, uint64_t *ep, unsigned level, uint64_t iova,
			 unsigned *leaf_level)
{
	for (;;) {
		uint64_t e = pte_load(ep);

		if (!(e & PTE_V))
			return NULL;
		if (e & PTE_L) {
			*leaf_level = level;
			return ep;
		}
		level--;
		ep = &pte_table(e)[pt_index(iova, lvl_shift(pt, level))];
	}
}

static uint64_t *find_leaf(const struct icuse_pt *pt, uint64_t iova, unsigned *leaf_level)
{
	unsigned top = pt->levels - 1;

	if (iova > pt->max_iova)
		return NULL;
	return descend(pt, &pt->root[pt_index(iova, lvl_shift(pt, top))], top, iova, leaf_level);
}

/*
 * Leaf iterator for translate: consecutive leaves usually sit side by side in
 * one table, so step to the next entry and descend from there, and start again
 * from the root only when the walk leaves a table.
 */
struct leaf_iter {
	uint64_t *ep;
	unsigned level;
};

static uint64_t *next_leaf(const struct icuse_pt *pt, struct leaf_iter *it, uint64_t iova)
{
	if (it->ep && pt_index(iova, lvl_shift(pt, it->level)) != 0)
		it->ep = descend(pt, it->ep + 1, it->level, iova, &it->level);
	else
		it->ep = find_leaf(pt, iova, &it->level);
	return it->ep;
}

int icuse_pt_mark_dirty(struct icuse_pt *pt, uint64_t iova)
{
	unsigned level;
	uint64_t *ep;

	pthread_rwlock_rdlock(&pt->lock);
	ep = find_leaf(pt, iova, &level);
	if (ep)
		__atomic_fetch_or(ep, PTE_D, __ATOMIC_RELAXED);
	pthread_rwlock_unlock(&pt->lock);
	return ep ? 0 : -ENOENT;
}

uint64_t icuse_pt_mark_dirty_bitmap(struct icuse_pt *pt, uint64_t iova, uint64_t page_size,
				    const uint64_t *bitmap, uint64_t nbits)
{
	uint64_t count = 0, i;

	pthread_rwlock_rdlock(&pt->lock);
	for (i = 0; i < (nbits + 63) / 64; i++) {
		uint64_t w = bitmap[i];

		if (i == nbits / 64)
			w &= (1ull << (nbits % 64)) - 1; /* bits past nbits do not count */
		while (w) {
			unsigned level;
			uint64_t *ep = find_leaf(pt, iova + (i * 64 + (uint64_t)__builtin_ctzll(w)) * page_size, &level);

			if (ep)
				__atomic_fetch_or(ep, PTE_D, __ATOMIC_RELAXED);
			count++;
			w &= w - 1;
		}
	}
	pthread_rwlock_unlock(&pt->lock);
	return count;
}

int icuse_pt_walk(struct icuse_pt *pt, uint64_t iova, struct icuse_pte_info *out)
{
	unsigned level;
	uint64_t *ep, e, esize;
	int ret = -ENOENT;

	pthread_rwlock_rdlock(&pt->lock);
	ep = find_leaf(pt, iova, &level);
	if (ep) {
		e = pte_load(ep);
		esize = 1ull << lvl_shift(pt, level);
		out->pa = (e & PTE_ADDR) + (iova & (esize - 1));
		out->leaf_size = esize;
		out->prot = ((e & PTE_R) ? ICUSE_PROT_READ : 0) |
			    ((e & PTE_W) ? ICUSE_PROT_WRITE : 0);
		out->flags = ((e & PTE_A) ? ICUSE_PTE_ACCESSED : 0) |
			     ((e & PTE_D) ? ICUSE_PTE_DIRTY : 0);
		ret = 0;
	}
	pthread_rwlock_unlock(&pt->lock);
	return ret;
}

int64_t icuse_pt_translate_locked(struct icuse_pt *pt, uint64_t iova, uint64_t length,
				  uint32_t access, struct icuse_seg *segs, size_t max_segs,
				  uint64_t *fault_iova)
{
	uint64_t need = 0, set = PTE_A, last, cur;
	struct leaf_iter it = { 0 };
	size_t nsegs = 0;

	if (!access || (access & ~(ICUSE_PROT_READ | ICUSE_PROT_WRITE)))
		return -EINVAL;
	if (!length)
		return 0;
	last = iova + length - 1;
	if (last < iova)
		return -EINVAL;
	if (access & ICUSE_PROT_READ)
		need |= PTE_R;
	if (access & ICUSE_PROT_WRITE) {
		need |= PTE_W;
		set |= PTE_D;
	}

	/* Pass 1: check the whole range and collect segments. */
	for (cur = iova;;) {
		uint64_t *ep = next_leaf(pt, &it, cur);
		uint64_t e, esize, pa, end;

		if (!ep) {
			if (fault_iova)
				*fault_iova = cur;
			return -ENOENT;
		}
		e = pte_load(ep);
		if ((e & need) != need) {
			if (fault_iova)
				*fault_iova = cur;
			return -EACCES;
		}
		esize = 1ull << lvl_shift(pt, it.level);
		end = min_u64(cur | (esize - 1), last);
		pa = (e & PTE_ADDR) + (cur & (esize - 1));
		if (!segs) {
			/* check only */
		} else if (nsegs && segs[nsegs - 1].pa + segs[nsegs - 1].len == pa) {
			segs[nsegs - 1].len += end - cur + 1;
		} else {
			if (nsegs == max_segs)
				return -ENOSPC;
			segs[nsegs].pa = pa;
			segs[nsegs].len = end - cur + 1;
			nsegs++;
		}
		if (end == last)
			break;
		cur = end + 1;
	}

	if (!segs)
		return 0; /* a check: nothing was accessed */

	/* Pass 2: the access happens, so mark the leaves. Test first: once set,
	 * the bits stay, and a plain load keeps the line shared between CPUs. */
	it.ep = NULL;
	for (cur = iova;;) {
		uint64_t *ep = next_leaf(pt, &it, cur);
		uint64_t end = min_u64(cur | ((1ull << lvl_shift(pt, it.level)) - 1), last);

		if ((pte_load(ep) & set) != set)
			__atomic_fetch_or(ep, set, __ATOMIC_RELAXED);
		if (end == last)
			break;
		cur = end + 1;
	}
	return (int64_t)nsegs;
}

int64_t icuse_pt_translate(struct icuse_pt *pt, uint64_t iova, uint64_t length, uint32_t access,
			   struct icuse_seg *segs, size_t max_segs, uint64_t *fault_iova)
{
	int64_t ret;

	pthread_rwlock_rdlock(&pt->lock);
	ret = icuse_pt_translate_locked(pt, iova, length, access, segs, max_segs, fault_iova);
	pthread_rwlock_unlock(&pt->lock);
	return ret;
}

struct dirty_ctx {
	uint64_t iova, last; /* the whole query */
	unsigned ps_shift;
	uint64_t *bitmap;
	uint64_t next_page;  /* pages below this are already counted */
	int64_t count;
	int no_clear;
};

static void set_bits(uint64_t *bm, uint64_t first, uint64_t last)
{
	while (first <= last) {
		unsigned b = first % 64;
		uint64_t n = min_u64(64 - b, last - first + 1);

		bm[first / 64] |= (n == 64 ? ~0ull : ((1ull << n) - 1) << b);
		first += n;
	}
}

/* Mark the pages overlapping [a, b]. Leaves come in iova order, so a page
 * shared by two dirty leaves is only counted at the first. */
static void mark_dirty(struct dirty_ctx *c, uint64_t a, uint64_t b)
{
	uint64_t p0 = (a - c->iova) >> c->ps_shift;
	uint64_t p1 = (b - c->iova) >> c->ps_shift;

	if (p0 < c->next_page)
		p0 = c->next_page;
	if (p0 > p1)
		return;
	set_bits(c->bitmap, p0, p1);
	c->count += p1 - p0 + 1;
	c->next_page = p1 + 1;
}

static void dirty_level(struct icuse_pt *pt, uint64_t *t, unsigned level, uint64_t iova,
			uint64_t last, struct dirty_ctx *c)
{
	unsigned shift = lvl_shift(pt, level);
	uint64_t esize = 1ull << shift;

	for (;;) {
		uint64_t *ep = &t[pt_index(iova, shift)];
		uint64_t elast = iova | (esize - 1);
		uint64_t end = min_u64(elast, last);

		if (pte_is_leaf(*ep)) {
			uint64_t lfirst = elast - (esize - 1);

			if (*ep & PTE_D) {
				mark_dirty(c, iova, end);
				/* A leaf reaching outside the query keeps its D: the
				 * part outside was not reported, and reporting a
				 * clean page as dirty later is harmless, losing a
				 * dirty one is not. */
				if (!c->no_clear && lfirst >= c->iova && elast <= c->last)
					*ep &= ~PTE_D;
			}
		} else if (pte_is_table(*ep)) {
			dirty_level(pt, pte_table(*ep), level - 1, iova, end, c);
		}
		if (end == last)
			return;
		iova = end + 1;
	}
}

int64_t icuse_pt_read_and_clear_dirty(struct icuse_pt *pt, uint64_t iova, uint64_t length,
				      uint64_t page_size, uint64_t *bitmap, int no_clear)
{
	struct dirty_ctx c = { 0 };
	uint64_t last;

	if (!range_ok(pt, iova, length, &last) || page_size < (1ull << pt->gs) ||
	    (page_size & (page_size - 1)))
		return -EINVAL;
	c.iova = iova;
	c.last = last;
	c.ps_shift = __builtin_ctzll(page_size);
	c.bitmap = bitmap;
	c.no_clear = no_clear;
	/* Clearing D changes leaves under translate's feet: take it for writing. */
	pthread_rwlock_wrlock(&pt->lock);
	dirty_level(pt, pt->root, pt->levels - 1, iova, last, &c);
	pthread_rwlock_unlock(&pt->lock);
	return c.count;
}

void icuse_pt_get_stats(struct icuse_pt *pt, struct icuse_pt_stats *out)
{
	pthread_rwlock_rdlock(&pt->lock);
	out->tables = pt->tables;
	out->leaves = pt->leaves;
	out->mapped_bytes = pt->mapped;
	pthread_rwlock_unlock(&pt->lock);
}
