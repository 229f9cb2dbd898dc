/* The page store: every pages entry iommufd holds, with its emulated physical
 * addresses, pin counts and backings.
 *
 * Emulated pa space: each entry gets a slot of whole GiBs from a bump
 * allocator starting at 1 TiB, and its pa_base sits in the slot at the same
 * offset modulo 1 GiB as the iova it will be mapped at, so the page table can
 * use large leaves. pa is never reused: a stale translation to a removed
 * entry faults instead of reaching someone else's memory. 2^62 bytes of pa
 * space hold 2^32 GiB slots, more than any daemon lifetime needs.
 *
 * Entries sit in one array sorted by pa_base. Ids and pa both only grow, so
 * the same order is the id order and both lookups are binary searches.
 *
 * Pin counts and backings are sorted runs of page indexes, so that pinning a
 * GiB costs O(runs), not O(pages). Pin runs hold counts > 0 only; equal
 * neighbours are merged.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/uio.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "icuse_internal.h"

#define GIB (1ull << 30)
#define PA_START (1ull << 40)
#define PA_LIMIT (1ull << 62)
#define PG ((uint64_t)ICUSE_PAGE_SIZE)

struct run {
	uint64_t start, end; /* page indexes, [start, end) */
};

struct pinrun {
	struct run r;
	uint64_t count;
};

struct backrun {
	struct run r;
	uint64_t addr; /* address of page r.start */
	int kind, fd;
	int pid; /* PROC: the process fd is the mem file of (-1: unknown) */
};

struct runvec {
	void *v;
	size_t n, cap;
};

struct pages {
	int64_t id;
	uint64_t npages, pa_base;
	uint64_t npinned; /* pages with a count > 0 */
	struct runvec pins, backs;
};

struct icuse_store {
	pthread_rwlock_t lock;
	struct pages **v; /* sorted by pa_base, hence by id */
	size_t n, cap;
	int64_t next_id;
	uint64_t next_pa;
	uint64_t pinned;
};

static inline uint64_t min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static inline uint64_t max_u64(uint64_t a, uint64_t b)
{
	return a > b ? a : b;
}

static inline const struct run *run_at(const struct runvec *rv, size_t esz, size_t i)
{
	return (const struct run *)((const char *)rv->v + i * esz);
}

/* First run with end > idx: the one holding idx, if any, else the next. */
static size_t run_search(const struct runvec *rv, size_t esz, uint64_t idx)
{
	size_t lo = 0, hi = rv->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (run_at(rv, esz, mid)->end > idx)
			hi = mid;
		else
			lo = mid + 1;
	}
	return lo;
}

/* The run holding idx, or n. */
static size_t run_find(const struct runvec *rv, size_t esz, uint64_t idx)
{
	size_t i = run_search(rv, esz, idx);

	return i < rv->n && run_at(rv, esz, i)->start <= idx ? i : rv->n;
}

/* First run with start >= idx. */
static size_t run_search_start(const struct runvec *rv, size_t esz, uint64_t idx)
{
	size_t lo = 0, hi = rv->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (run_at(rv, esz, mid)->start >= idx)
			hi = mid;
		else
			lo = mid + 1;
	}
	return lo;
}

/* Replace runs [lo, hi) by the tn runs in tmp. Only fails before changing. */
static int run_splice(struct runvec *rv, size_t esz, size_t lo, size_t hi, const void *tmp,
		      size_t tn)
{
	size_t nn = rv->n - (hi - lo) + tn;
	char *a = rv->v;

	if (nn > rv->cap) {
		size_t cap = rv->cap ? rv->cap * 2 : 4;

		while (cap < nn)
			cap *= 2;
		a = icuse_realloc(a, cap * esz);
		if (!a)
			return -ENOMEM;
		rv->v = a;
		rv->cap = cap;
	}
	/* (a may still be NULL when everything is empty.) */
	if (rv->n > hi)
		memmove(a + (lo + tn) * esz, a + hi * esz, (rv->n - hi) * esz);
	if (tn)
		memcpy(a + lo * esz, tmp, tn * esz);
	rv->n = nn;
	return 0;
}

/*
 * Add one pin (pin) or drop one (!pin) over pages [a, b). The runs touched,
 * [lo, hi), and one neighbour each side are rebuilt in a scratch array,
 * merged, and spliced back. Returns the pages that went 0 -> 1 or 1 -> 0.
 */
static int64_t pin_update(struct pages *pg, uint64_t a, uint64_t b, int pin)
{
	const size_t esz = sizeof(struct pinrun);
	struct pinrun *r = pg->pins.v, *tmp;
	size_t n = pg->pins.n, lo, hi, wlo, whi, tn = 0, out;
	uint64_t p = a, changed = 0;
	int ret;

	lo = run_search(&pg->pins, esz, a);
	hi = run_search_start(&pg->pins, esz, b);
	if (!pin) {
		/* Every page must hold a pin: the runs must tile [a, b). */
		for (size_t i = lo; i < hi; i++) {
			if (r[i].r.start > p)
				return -EINVAL;
			p = r[i].r.end;
		}
		if (p < b)
			return -EINVAL;
		p = a;
	}
	wlo = lo > 0 ? lo - 1 : lo;
	whi = hi < n ? hi + 1 : hi;
	tmp = icuse_malloc((2 * (hi - lo) + 3 + (whi - hi) + (lo - wlo)) * esz);
	if (!tmp)
		return -ENOMEM;

	for (size_t i = wlo; i < lo; i++)
		tmp[tn++] = r[i];
	for (size_t i = lo; i < hi; i++) {
		uint64_t s = max_u64(r[i].r.start, a), e = min_u64(r[i].r.end, b);
		uint64_t c = pin ? r[i].count + 1 : r[i].count - 1;

		if (r[i].r.start < a)
			tmp[tn++] = (struct pinrun){ { r[i].r.start, a }, r[i].count };
		if (pin && s > p) {
			tmp[tn++] = (struct pinrun){ { p, s }, 1 };
			changed += s - p;
		}
		if (c)
			tmp[tn++] = (struct pinrun){ { s, e }, c };
		else
			changed += e - s;
		if (r[i].r.end > b)
			tmp[tn++] = (struct pinrun){ { b, r[i].r.end }, r[i].count };
		p = e;
	}
	if (pin && p < b) {
		tmp[tn++] = (struct pinrun){ { p, b }, 1 };
		changed += b - p;
	}
	for (size_t i = hi; i < whi; i++)
		tmp[tn++] = r[i];

	out = 0;
	for (size_t i = 0; i < tn; i++) {
		if (out && tmp[out - 1].r.end == tmp[i].r.start &&
		    tmp[out - 1].count == tmp[i].count)
			tmp[out - 1].r.end = tmp[i].r.end;
		else
			tmp[out++] = tmp[i];
	}
	ret = run_splice(&pg->pins, esz, wlo, whi, tmp, out);
	free(tmp);
	if (ret)
		return ret;
	if (pin)
		pg->npinned += changed;
	else
		pg->npinned -= changed;
	return (int64_t)changed;
}

/* The pid of the process whose /proc/<pid>/mem fd is, or -1: read once per
 * backing, for process_vm_readv/writev. */
static pid_t mem_fd_pid(int fd)
{
	char link[64], path[32];
	ssize_t n;
	long pid;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, link, sizeof(link) - 1);
	if (n <= 0)
		return -1;
	link[n] = 0;
	if (sscanf(link, "/proc/%ld/mem", &pid) != 1)
		return -1;
	return (pid_t)pid;
}

static int back_mergeable(const struct backrun *x, const struct backrun *y)
{
	return x->r.end == y->r.start && x->kind == y->kind && x->fd == y->fd &&
	       x->addr + (x->r.end - x->r.start) * PG == y->addr;
}

static int back_set(struct pages *pg, uint64_t a, uint64_t b, int kind, int fd, int pid,
		    uint64_t addr)
{
	const size_t esz = sizeof(struct backrun);
	struct backrun *r = pg->backs.v, *tmp;
	size_t n = pg->backs.n, lo, hi, wlo, whi, tn = 0, out;
	int ret;

	lo = run_search(&pg->backs, esz, a);
	hi = run_search_start(&pg->backs, esz, b);
	wlo = lo > 0 ? lo - 1 : lo;
	whi = hi < n ? hi + 1 : hi;
	tmp = icuse_malloc((whi - wlo + 3) * esz);
	if (!tmp)
		return -ENOMEM;

	for (size_t i = wlo; i < lo; i++)
		tmp[tn++] = r[i];
	if (lo < hi && r[lo].r.start < a) {
		tmp[tn] = r[lo];
		tmp[tn++].r.end = a;
	}
	if (kind != ICUSE_BACKING_NONE)
		tmp[tn++] = (struct backrun){ { a, b }, addr, kind, fd, pid };
	if (lo < hi && r[hi - 1].r.end > b) {
		tmp[tn] = r[hi - 1];
		tmp[tn].r.start = b;
		tmp[tn++].addr += (b - r[hi - 1].r.start) * PG;
	}
	for (size_t i = hi; i < whi; i++)
		tmp[tn++] = r[i];

	out = 0;
	for (size_t i = 0; i < tn; i++) {
		if (out && back_mergeable(&tmp[out - 1], &tmp[i]))
			tmp[out - 1].r.end = tmp[i].r.end;
		else
			tmp[out++] = tmp[i];
	}
	ret = run_splice(&pg->backs, esz, wlo, whi, tmp, out);
	free(tmp);
	return ret;
}

struct icuse_store *icuse_store_new(void)
{
	struct icuse_store *st = calloc(1, sizeof(*st));
	pthread_rwlockattr_t attr;

	if (!st)
		return NULL;
	st->next_id = 1;
	st->next_pa = PA_START;
	/* Writers first, as for page tables: DMA must not starve pin/unpin. */
	pthread_rwlockattr_init(&attr);
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&st->lock, &attr);
	pthread_rwlockattr_destroy(&attr);
	return st;
}

static void pages_free(struct pages *pg)
{
	free(pg->pins.v);
	free(pg->backs.v);
	free(pg);
}

void icuse_store_free(struct icuse_store *st)
{
	if (!st)
		return;
	for (size_t i = 0; i < st->n; i++)
		pages_free(st->v[i]);
	free(st->v);
	pthread_rwlock_destroy(&st->lock);
	free(st);
}

void icuse_store_rdlock(struct icuse_store *st)
{
	pthread_rwlock_rdlock(&st->lock);
}

void icuse_store_unlock(struct icuse_store *st)
{
	pthread_rwlock_unlock(&st->lock);
}

static size_t find_id(const struct icuse_store *st, int64_t id)
{
	size_t lo = 0, hi = st->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (st->v[mid]->id < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < st->n && st->v[lo]->id == id ? lo : st->n;
}

static struct pages *get_pages(const struct icuse_store *st, int64_t id)
{
	size_t i = find_id(st, id);

	return i < st->n ? st->v[i] : NULL;
}

static struct pages *find_pa(const struct icuse_store *st, uint64_t pa)
{
	size_t lo = 0, hi = st->n;
	struct pages *pg;

	/* Last entry with pa_base <= pa. */
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (st->v[mid]->pa_base <= pa)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (!lo)
		return NULL;
	pg = st->v[lo - 1];
	return pa - pg->pa_base < pg->npages * PG ? pg : NULL;
}

int64_t icuse_pages_new(struct icuse_store *st, uint64_t npages, uint64_t align_offset,
			uint64_t *pa_base)
{
	uint64_t off = align_offset & (GIB - 1) & ~(PG - 1), slot;
	struct pages *pg;
	int64_t id;

	if (!npages || npages > (PA_LIMIT - PA_START) / PG)
		return -EINVAL;
	slot = (off + npages * PG + GIB - 1) & ~(GIB - 1);
	pg = icuse_malloc(sizeof(*pg));
	if (!pg)
		return -ENOMEM;
	memset(pg, 0, sizeof(*pg));
	pg->npages = npages;

	pthread_rwlock_wrlock(&st->lock);
	if (st->next_pa > PA_LIMIT - slot) {
		pthread_rwlock_unlock(&st->lock);
		free(pg);
		return -ENOSPC;
	}
	if (st->n == st->cap) {
		size_t cap = st->cap ? st->cap * 2 : 16;
		struct pages **v = icuse_realloc(st->v, cap * sizeof(*v));

		if (!v) {
			pthread_rwlock_unlock(&st->lock);
			free(pg);
			return -ENOMEM;
		}
		st->v = v;
		st->cap = cap;
	}
	id = st->next_id++;
	pg->id = id;
	pg->pa_base = st->next_pa + off;
	st->next_pa += slot;
	st->v[st->n++] = pg;
	if (pa_base)
		*pa_base = pg->pa_base;
	pthread_rwlock_unlock(&st->lock);
	return id;
}

int icuse_pages_remove(struct icuse_store *st, int64_t id)
{
	struct pages *pg;
	size_t i;

	pthread_rwlock_wrlock(&st->lock);
	i = find_id(st, id);
	if (i == st->n) {
		pthread_rwlock_unlock(&st->lock);
		return -ENOENT;
	}
	pg = st->v[i];
	if (pg->npinned) {
		pthread_rwlock_unlock(&st->lock);
		return -EBUSY;
	}
	memmove(&st->v[i], &st->v[i + 1], (st->n - i - 1) * sizeof(st->v[0]));
	st->n--;
	pthread_rwlock_unlock(&st->lock);
	pages_free(pg);
	return 0;
}

/* [first, first + npages) inside pg; an empty range is fine. */
static int index_range_ok(const struct pages *pg, uint64_t first, uint64_t npages)
{
	return first <= pg->npages && npages <= pg->npages - first;
}

/* The pages entry for a range operation, with the write lock held: 1 and *pg
 * to go on, 0 for an empty range (nothing to do), -ENOENT or -EINVAL. */
static int range_target(struct icuse_store *st, int64_t id, uint64_t first, uint64_t npages,
			struct pages **pg)
{
	*pg = get_pages(st, id);
	if (!*pg)
		return -ENOENT;
	if (!index_range_ok(*pg, first, npages))
		return -EINVAL;
	return npages ? 1 : 0;
}

int icuse_pages_set_backing(struct icuse_store *st, int64_t id, uint64_t first, uint64_t npages,
			    int kind, int fd, uint64_t addr)
{
	struct pages *pg;
	int ret, pid = -1;

	if (kind != ICUSE_BACKING_NONE && kind != ICUSE_BACKING_MEM && kind != ICUSE_BACKING_PROC)
		return -EINVAL;
	if (kind == ICUSE_BACKING_PROC && fd < 0)
		return -EBADF;
	if (kind == ICUSE_BACKING_NONE) {
		fd = -1;
		addr = 0;
	} else if (kind == ICUSE_BACKING_MEM) {
		fd = -1;
	} else {
		pid = mem_fd_pid(fd);
	}
	if (kind != ICUSE_BACKING_NONE && addr + npages * PG < addr)
		return -EINVAL;

	pthread_rwlock_wrlock(&st->lock);
	ret = range_target(st, id, first, npages, &pg);
	if (ret > 0)
		ret = back_set(pg, first, first + npages, kind, fd, pid, addr);
	pthread_rwlock_unlock(&st->lock);
	return ret;
}

static int64_t pin_common(struct icuse_store *st, int64_t id, uint64_t first, uint64_t npages,
			  int pin)
{
	struct pages *pg;
	int64_t ret;

	pthread_rwlock_wrlock(&st->lock);
	ret = range_target(st, id, first, npages, &pg);
	if (ret > 0)
		ret = pin_update(pg, first, first + npages, pin);
	if (ret > 0) {
		if (pin)
			st->pinned += ret;
		else
			st->pinned -= ret;
	}
	pthread_rwlock_unlock(&st->lock);
	return ret;
}

int64_t icuse_pages_pin(struct icuse_store *st, int64_t id, uint64_t first, uint64_t npages)
{
	return pin_common(st, id, first, npages, 1);
}

int64_t icuse_pages_unpin(struct icuse_store *st, int64_t id, uint64_t first, uint64_t npages)
{
	return pin_common(st, id, first, npages, 0);
}

int64_t icuse_pages_pin_count(struct icuse_store *st, int64_t id, uint64_t index)
{
	const size_t esz = sizeof(struct pinrun);
	struct pages *pg;
	int64_t ret;

	pthread_rwlock_rdlock(&st->lock);
	pg = get_pages(st, id);
	if (!pg) {
		ret = -ENOENT;
	} else if (index >= pg->npages) {
		ret = -EINVAL;
	} else {
		size_t i = run_find(&pg->pins, esz, index);

		ret = i < pg->pins.n ? (int64_t)((struct pinrun *)pg->pins.v)[i].count : 0;
	}
	pthread_rwlock_unlock(&st->lock);
	return ret;
}

uint64_t icuse_store_pinned_pages(struct icuse_store *st)
{
	uint64_t n;

	pthread_rwlock_rdlock(&st->lock);
	n = st->pinned;
	pthread_rwlock_unlock(&st->lock);
	return n;
}

int icuse_pa_lookup(struct icuse_store *st, uint64_t pa, int64_t *id, uint64_t *index)
{
	struct pages *pg;

	pthread_rwlock_rdlock(&st->lock);
	pg = find_pa(st, pa);
	if (pg) {
		*id = pg->id;
		*index = (pa - pg->pa_base) / PG;
	}
	pthread_rwlock_unlock(&st->lock);
	return pg ? 0 : -ENOENT;
}

int icuse_store_span_locked(struct icuse_store *st, uint64_t pa, uint64_t len,
			    struct icuse_span *sp)
{
	struct pages *pg = find_pa(st, pa);
	const struct pinrun *pr;
	const struct backrun *br;
	uint64_t idx, off, want_end, pend;
	size_t i, j;

	if (!pg)
		return -EFAULT;
	idx = (pa - pg->pa_base) / PG;
	off = (pa - pg->pa_base) % PG;
	/* A bound on the pages the caller wants (len may run past the entry):
	 * no need to look at pin runs beyond it. */
	want_end = len / PG + 2 >= pg->npages - idx ? pg->npages : idx + len / PG + 2;

	i = run_find(&pg->pins, sizeof(*pr), idx);
	if (i == pg->pins.n)
		return -EFAULT;
	pr = pg->pins.v;
	/* Neighbouring runs differ only in count: all of them are pinned. */
	pend = pr[i].r.end;
	while (pend < want_end && i + 1 < pg->pins.n && pr[i + 1].r.start == pend)
		pend = pr[++i].r.end;

	j = run_find(&pg->backs, sizeof(*br), idx);
	if (j == pg->backs.n)
		return -EFAULT;
	br = (const struct backrun *)pg->backs.v + j;

	sp->kind = br->kind;
	sp->fd = br->fd;
	sp->pid = br->pid;
	sp->addr = br->addr + (idx - br->r.start) * PG + off;
	sp->len = min_u64(len, (min_u64(pend, br->r.end) - idx) * PG - off);
	return 0;
}

/* Bounce buffer for PROC -> PROC copies, one per thread, kept for reuse. */
#define BOUNCE_SIZE (1u << 20)
static pthread_key_t bounce_key;
static pthread_once_t bounce_once = PTHREAD_ONCE_INIT;

static void bounce_key_init(void)
{
	pthread_key_create(&bounce_key, free);
}

static void *bounce_get(void)
{
	void *p;

	pthread_once(&bounce_once, bounce_key_init);
	p = pthread_getspecific(bounce_key);
	if (!p) {
		/* Page aligned: the kernel's copies in and out of it run at
		 * full speed only on aligned addresses (twice as fast here). */
		if (icuse_alloc_fails() || posix_memalign(&p, PG, BOUNCE_SIZE))
			p = NULL;
		if (p && pthread_setspecific(bounce_key, p)) {
			free(p);
			p = NULL;
		}
	}
	return p;
}

/* Memory of another process. The backing's fd is an open /proc/<pid>/mem,
 * bound to that process's mm: a reused pid can never alias it, and once the
 * process is gone every transfer stops short (ESRCH). Bulk transfers use
 * process_vm_readv/writev on the pid (one copy instead of two through the
 * mem file's page-sized bounce), checked against the mem file: a read counts
 * only if the mm is still alive after it, a write is issued only while it is
 * alive. (A pid is only reused after the process has died and the whole pid
 * space has been cycled through; no transfer is that long.) */
static int mm_alive(int fd, uint64_t addr)
{
	char c;

	return pread(fd, &c, 1, (off_t)addr) == 1;
}

/* n bytes between buf and the process of span x at x->addr + off. A write
 * checks first that the mm is alive unless the caller just did (alive). */
static int proc_rw_vm(const struct icuse_span *x, uint64_t off, void *buf, uint64_t n, int write,
		      int alive)
{
	uint64_t addr = x->addr + off;
	struct iovec local = { .iov_base = buf, .iov_len = n };
	struct iovec remote = { .iov_base = (void *)(uintptr_t)addr, .iov_len = n };
	ssize_t r;

	if (x->pid <= 0 || n > SSIZE_MAX)
		return -1;
	if (write && !alive && !mm_alive(x->fd, addr))
		return -ESRCH;
	r = write ? process_vm_writev(x->pid, &local, 1, &remote, 1, 0)
		  : process_vm_readv(x->pid, &local, 1, &remote, 1, 0);
	if (r != (ssize_t)n)
		return -1; /* partly or not reachable this way: let the mem file say */
	if (!write && !mm_alive(x->fd, addr))
		return -ESRCH;
	return 0;
}

static int proc_rw(const struct icuse_span *x, uint64_t off, void *buf, uint64_t n, int write,
		   int alive)
{
	char *p = buf;
	uint64_t addr = x->addr + off;
	int ret = proc_rw_vm(x, off, buf, n, write, alive);

	if (ret >= 0 || ret == -ESRCH)
		return ret;
	while (n) {
		ssize_t r = write ? pwrite(x->fd, p, n, (off_t)addr) : pread(x->fd, p, n, (off_t)addr);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -ESRCH;
		p += r;
		n -= r;
		addr += r;
	}
	return 0;
}

int icuse_span_copy(const struct icuse_span *d, const struct icuse_span *s, uint64_t n,
		    int *dst_failed)
{
	void *dp = (void *)(uintptr_t)d->addr;
	const void *sp = (const void *)(uintptr_t)s->addr;
	char *bounce;
	int ret;

	if (s->kind == ICUSE_BACKING_MEM && d->kind == ICUSE_BACKING_MEM) {
		icuse_dma_memcpy(dp, sp, n);
		return 0;
	}
	*dst_failed = 0;
	if (s->kind == ICUSE_BACKING_PROC && d->kind == ICUSE_BACKING_MEM)
		return proc_rw(s, 0, dp, n, 0, 0);
	*dst_failed = 1;
	if (s->kind == ICUSE_BACKING_MEM && d->kind == ICUSE_BACKING_PROC)
		return proc_rw(d, 0, (void *)sp, n, 1, 0);

	bounce = bounce_get();
	if (!bounce)
		return -ENOMEM;
	for (uint64_t done = 0; done < n;) {
		uint64_t k = min_u64(n - done, BOUNCE_SIZE);

		*dst_failed = 0;
		ret = proc_rw(s, done, bounce, k, 0, 0);
		if (ret)
			return ret;
		/* The read just found the source's mm alive: the same mm needs no
		 * second look before the write. */
		*dst_failed = 1;
		ret = proc_rw(d, done, bounce, k, 1, d->fd == s->fd);
		if (ret)
			return ret;
		done += k;
	}
	return 0;
}

int icuse_pa_rw(struct icuse_store *st, uint64_t pa, void *buf, size_t len, int write)
{
	struct icuse_span mem = { .kind = ICUSE_BACKING_MEM }, sp;
	uint64_t done;
	int ret = 0, dst_failed;

	if (!len)
		return 0;
	if (pa + len - 1 < pa)
		return -EFAULT;
	pthread_rwlock_rdlock(&st->lock);
	/* A read checks everything first so that a fault copies nothing; a
	 * write goes page run by page run and stops at the fault. */
	for (done = 0; !write && done < len; done += sp.len) {
		ret = icuse_store_span_locked(st, pa + done, len - done, &sp);
		if (ret)
			goto out;
	}
	for (done = 0; done < len; done += sp.len) {
		ret = icuse_store_span_locked(st, pa + done, len - done, &sp);
		if (ret)
			break;
		mem.addr = (uintptr_t)buf + done;
		ret = write ? icuse_span_copy(&sp, &mem, sp.len, &dst_failed)
			    : icuse_span_copy(&mem, &sp, sp.len, &dst_failed);
		if (ret)
			break;
	}
out:
	pthread_rwlock_unlock(&st->lock);
	return ret;
}
