/* Device DMA through an I/O page table into the page store.
 *
 * A transfer goes in chunks of at most DMA_CHUNK bytes of iova. For each
 * chunk the page table(s) are read locked, the iova range translated, the
 * store read locked, every page checked to be pinned and backed, and the data
 * moved; then everything is released. So an unmap waits at most one chunk,
 * and once it returns no access through the old translation is in flight.
 *
 * Faults: a read (device <- memory) copies nothing of the chunk that faults;
 * earlier chunks were already delivered to the buffer, whose contents the
 * caller must then treat as undefined. A write (device -> memory) and a
 * device copy move everything before the first faulting address, as hardware
 * would, and nothing after it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>

#include "icuse_internal.h"

#define DMA_CHUNK (2ull << 20)
/* Segments per chunk: the store hands out contiguous pa per pages entry, so
 * real chunks need one or two; a chunk needing more is split. */
#define DMA_SEGS 64

/* One end of a transfer: an iova range through pt, or the daemon's buffer. */
struct xside {
	struct icuse_pt *pt; /* NULL: buf */
	uint64_t iova;
	char *buf;
	uint32_t access;
	int64_t nsegs;
	struct icuse_seg segs[DMA_SEGS];
};

static inline uint64_t min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

/* Take both tables' read locks in address order, so two copies running in
 * opposite directions cannot deadlock against a waiting writer. */
static void lock_pts(struct icuse_pt *a, struct icuse_pt *b)
{
	if (a && b && a != b) {
		if ((uintptr_t)a > (uintptr_t)b) {
			struct icuse_pt *t = a;

			a = b;
			b = t;
		}
		icuse_pt_rdlock(a);
		icuse_pt_rdlock(b);
	} else if (a || b) {
		icuse_pt_rdlock(a ? a : b);
	}
}

static void unlock_pts(struct icuse_pt *a, struct icuse_pt *b)
{
	if (a)
		icuse_pt_unlock(a);
	if (b && b != a)
		icuse_pt_unlock(b);
}

/* Segments for the first n bytes of the side; on a fault, *fault_off is its
 * offset from the side's iova. */
static int64_t side_translate(struct xside *x, uint64_t n, uint64_t *fault_off)
{
	uint64_t f;
	int64_t ret;

	*fault_off = 0;
	if (!x->pt)
		return 0;
	ret = icuse_pt_translate_locked(x->pt, x->iova, n, x->access, x->segs, DMA_SEGS, &f);
	if (ret == -ENOENT || ret == -EACCES)
		*fault_off = f - x->iova;
	x->nsegs = ret;
	return ret;
}

/* Cursor over a side: (segment, offset in it), or an offset in buf. */
struct cursor {
	const struct xside *x;
	size_t i;
	uint64_t off;
};

static int cursor_span(struct icuse_store *st, const struct cursor *c, uint64_t max,
		       struct icuse_span *sp)
{
	const struct icuse_seg *seg;

	if (!c->x->pt) {
		sp->kind = ICUSE_BACKING_MEM;
		sp->fd = -1;
		sp->pid = -1;
		sp->addr = (uintptr_t)(c->x->buf + c->off);
		sp->len = max;
		return 0;
	}
	seg = &c->x->segs[c->i];
	return icuse_store_span_locked(st, seg->pa + c->off, min_u64(seg->len - c->off, max), sp);
}

static void cursor_advance(struct cursor *c, uint64_t n)
{
	c->off += n;
	if (c->x->pt && c->off == c->x->segs[c->i].len) {
		c->i++;
		c->off = 0;
	}
}

/* Are the first n bytes pinned and backed? 0, or the error with *ok the
 * bytes before the first page that is not. */
static int side_check(struct icuse_store *st, const struct xside *x, uint64_t n, uint64_t *ok)
{
	struct cursor c = { .x = x };
	struct icuse_span sp;
	uint64_t done = 0;
	int ret;

	if (!x->pt)
		return 0;
	while (done < n) {
		ret = cursor_span(st, &c, n - done, &sp);
		if (ret) {
			*ok = done;
			return ret;
		}
		cursor_advance(&c, sp.len);
		done += sp.len;
	}
	return 0;
}

/*
 * Move up to *np bytes from s to d. *np may shrink when the chunk needs more
 * than DMA_SEGS segments. Returns 0 when all *np bytes moved; else the fault,
 * its offset in *fault_off and its side in *fault_dst. With all_or_nothing
 * a fault anywhere in the chunk moves nothing (up to the copy itself: an owner
 * that dies during it cannot be helped).
 */
static int do_chunk(struct icuse_store *st, struct xside *s, struct xside *d, uint64_t *np,
		    int all_or_nothing, uint64_t *fault_off, int *fault_dst)
{
	struct xside *sides[2] = { s, d };
	struct cursor sc = { .x = s }, dc = { .x = d };
	uint64_t n = *np, ok, f = 0, done;
	int64_t ret;
	int err, edst, dst_failed, i;

	lock_pts(s->pt, d->pt);
retry:
	/* The source first: the destination then only gets its dirty bits for
	 * what can actually be written. A side that faults is translated again
	 * up to the fault: that part is accessed (and needs its segments),
	 * unless the chunk moves nothing at all. */
	err = 0;
	edst = 0;
	ok = n;
	for (i = 0; i < 2; i++) {
		ret = side_translate(sides[i], ok, &f);
		if (ret == -ENOSPC) {
			n = (n + 1) / 2;
			goto retry;
		}
		if (ret < 0) {
			err = ret;
			ok = f;
			edst = i; /* 1: the destination */
			if (all_or_nothing || !ok)
				goto out_pts;
			/* The prefix fitted in the segments the first time. */
			side_translate(sides[i], ok, &f);
		}
	}

	/* The fault reported is the first one in address order; a page check
	 * failing here is always before a translation fault found above. */
	icuse_store_rdlock(st);
	ret = side_check(st, s, ok, &f);
	if (ret) {
		err = ret;
		ok = f;
		edst = 0;
	}
	ret = side_check(st, d, ok, &f);
	if (ret) {
		err = ret;
		ok = f;
		edst = 1;
	}
	if (err && all_or_nothing)
		goto out_store;

	for (done = 0; done < ok;) {
		struct icuse_span ss, ds;
		uint64_t k;

		/* Both checked above: these cannot fail. */
		cursor_span(st, &sc, ok - done, &ss);
		cursor_span(st, &dc, ss.len, &ds);
		k = min_u64(ss.len, ds.len);
		ret = icuse_span_copy(&ds, &ss, k, &dst_failed);
		if (ret) {
			err = ret;
			ok = done;
			edst = dst_failed;
			break;
		}
		cursor_advance(&sc, k);
		cursor_advance(&dc, k);
		done += k;
	}
out_store:
	icuse_store_unlock(st);
out_pts:
	unlock_pts(s->pt, d->pt);
	*np = n;
	*fault_off = ok;
	*fault_dst = edst;
	return err;
}

int64_t icuse_dma_rw(struct icuse_store *st, struct icuse_pt *pt, uint64_t iova, void *buf,
		     size_t len, int write, uint64_t *fault_iova)
{
	struct xside dev = { .pt = pt, .access = write ? ICUSE_PROT_WRITE : ICUSE_PROT_READ };
	struct xside mem = { .pt = NULL };
	uint64_t done, n, off;
	int ret, is_dst;

	if (!len)
		return 0;
	if (!pt || iova + len - 1 < iova)
		return -EINVAL;
	for (done = 0; done < len; done += n) {
		n = min_u64(len - done, DMA_CHUNK - ((iova + done) & (DMA_CHUNK - 1)));
		dev.iova = iova + done;
		mem.buf = (char *)buf + done;
		if (write)
			ret = do_chunk(st, &mem, &dev, &n, 0, &off, &is_dst);
		else
			ret = do_chunk(st, &dev, &mem, &n, 1, &off, &is_dst);
		if (ret) {
			if (fault_iova)
				*fault_iova = iova + done + off;
			return ret;
		}
	}
	return 0;
}

static int64_t copy_range(struct icuse_store *st, struct icuse_pt *src_pt, uint64_t src_iova,
			  struct icuse_pt *dst_pt, uint64_t dst_iova, size_t len, uint64_t *fault_off,
			  int *fault_is_dst)
{
	struct xside src = { .pt = src_pt, .access = ICUSE_PROT_READ };
	struct xside dst = { .pt = dst_pt, .access = ICUSE_PROT_WRITE };
	uint64_t done, n, off;
	int ret, is_dst;

	for (done = 0; done < len; done += n) {
		n = min_u64(len - done, DMA_CHUNK - ((src_iova + done) & (DMA_CHUNK - 1)));
		src.iova = src_iova + done;
		dst.iova = dst_iova + done;
		ret = do_chunk(st, &src, &dst, &n, 0, &off, &is_dst);
		if (ret) {
			*fault_off = done + off;
			*fault_is_dst = is_dst;
			return ret;
		}
	}
	return 0;
}

/*
 * A long copy whose whole range translates is shared out, PAR_UNIT by
 * PAR_UNIT in address order, between the calling thread and the helper
 * threads of a small pool (one per further CPU, at most POOL_MAX): copies
 * through another process's memory (two kernel copies each) then use every
 * CPU, and a helper that is held up delays the copy by one unit at most.
 * A fault stops the handing out: every unit before it was already taken and
 * completes; units past it that other threads took before the fault was found
 * may still move. That needs the range to change under the copy: it translated
 * when the copy began, and the daemon keeps what its domains translate pinned.
 */
#define PAR_UNIT (512ull << 10)
#define PAR_MIN (4 * PAR_UNIT)
#define POOL_MAX 3

struct par_copy {
	struct icuse_store *st;
	struct icuse_pt *src_pt, *dst_pt;
	uint64_t src_iova, dst_iova, len;
	uint64_t first;  /* length of unit 0: up to the first PAR_UNIT boundary of src */
	uint64_t next;   /* index of the next unit to hand out (atomic) */
	int stop;        /* a fault was met: hand out nothing more (atomic) */
	int helpers;     /* helpers working on it (pool_lock) */
	int64_t err;     /* the fault at the lowest offset (pool_lock) */
	uint64_t fault_off;
	int is_dst;
	struct par_copy *queued_next;
};

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_work = PTHREAD_COND_INITIALIZER; /* a copy was queued */
static pthread_cond_t pool_left = PTHREAD_COND_INITIALIZER; /* a helper left a copy */
static struct par_copy *pool_queue;
static int pool_threads = -1; /* helpers started; -1: not yet tried */

static void par_run(struct par_copy *p)
{
	for (;;) {
		uint64_t k, start, end, off;
		int64_t ret;
		int is_dst;

		if (__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE))
			return;
		k = __atomic_fetch_add(&p->next, 1, __ATOMIC_ACQ_REL);
		start = k ? p->first + (k - 1) * PAR_UNIT : 0;
		if (start >= p->len)
			return;
		end = min_u64(p->len, p->first + k * PAR_UNIT);
		ret = copy_range(p->st, p->src_pt, p->src_iova + start, p->dst_pt, p->dst_iova + start,
				 end - start, &off, &is_dst);
		if (ret) {
			pthread_mutex_lock(&pool_lock);
			if (!p->err || start + off < p->fault_off) {
				p->err = ret;
				p->fault_off = start + off;
				p->is_dst = is_dst;
			}
			pthread_mutex_unlock(&pool_lock);
			__atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
			return;
		}
	}
}

/* Put p at the end of the queue (pool_lock held), for helpers to join. */
static void par_queue(struct par_copy *p)
{
	struct par_copy **pp = &pool_queue;

	while (*pp)
		pp = &(*pp)->queued_next;
	*pp = p;
	pthread_cond_broadcast(&pool_work);
}

/* Take p off the queue (pool_lock held): nothing of it is left to hand out. */
static void par_unqueue(struct par_copy *p)
{
	struct par_copy **pp = &pool_queue;

	while (*pp && *pp != p)
		pp = &(*pp)->queued_next;
	if (*pp)
		*pp = p->queued_next;
}

static void *pool_main(void *arg)
{
	pthread_mutex_lock(&pool_lock);
	for (;;) {
		struct par_copy *p = pool_queue;

		if (!p) {
			pthread_cond_wait(&pool_work, &pool_lock);
			continue;
		}
		p->helpers++;
		pthread_mutex_unlock(&pool_lock);
		par_run(p);
		pthread_mutex_lock(&pool_lock);
		par_unqueue(p);
		if (--p->helpers == 0)
			pthread_cond_broadcast(&pool_left);
	}
	return NULL;
}

/* Start the helpers once (pool_lock held): one per further CPU this process
 * may run on; signals stay with the caller's threads. */
static void pool_start(void)
{
	cpu_set_t cpus;
	int n = sched_getaffinity(0, sizeof(cpus), &cpus) ? 1 : CPU_COUNT(&cpus);
	int want = n > 1 ? (int)min_u64((uint64_t)n - 1, POOL_MAX) : 0;
	sigset_t all, old;
	pthread_attr_t attr;
	pthread_t t;

	pool_threads = 0;
	if (pthread_attr_init(&attr))
		return;
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	while (pool_threads < want && !pthread_create(&t, &attr, pool_main, NULL))
		pool_threads++;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
}

static int range_ok(struct icuse_pt *pt, uint64_t iova, uint64_t len, uint32_t access)
{
	uint64_t fault;

	return icuse_pt_translate(pt, iova, len, access, NULL, 0, &fault) == 0;
}

int64_t icuse_dma_copy(struct icuse_store *st, struct icuse_pt *src_pt, uint64_t src_iova,
		       struct icuse_pt *dst_pt, uint64_t dst_iova, size_t len, uint64_t *fault_iova,
		       int *fault_is_dst)
{
	struct par_copy p = {
		.st = st, .src_pt = src_pt, .dst_pt = dst_pt, .src_iova = src_iova,
		.dst_iova = dst_iova, .len = len,
		.first = PAR_UNIT - (src_iova & (PAR_UNIT - 1)),
	};
	int shared = 0;

	if (!len)
		return 0;
	if (!src_pt || !dst_pt || src_iova + len - 1 < src_iova || dst_iova + len - 1 < dst_iova)
		return -EINVAL;
	/* Only when nothing can fault: a fault must stop the copy at that point. */
	if (len >= PAR_MIN && range_ok(src_pt, src_iova, len, ICUSE_PROT_READ) &&
	    range_ok(dst_pt, dst_iova, len, ICUSE_PROT_WRITE)) {
		pthread_mutex_lock(&pool_lock);
		if (pool_threads < 0)
			pool_start();
		if (pool_threads > 0) {
			par_queue(&p);
			shared = 1;
		}
		pthread_mutex_unlock(&pool_lock);
	}
	if (shared) {
		par_run(&p);
		pthread_mutex_lock(&pool_lock);
		par_unqueue(&p);
		while (p.helpers)
			pthread_cond_wait(&pool_left, &pool_lock);
		pthread_mutex_unlock(&pool_lock);
	} else {
		p.err = copy_range(st, src_pt, src_iova, dst_pt, dst_iova, len, &p.fault_off, &p.is_dst);
	}
	if (p.err) {
		if (fault_iova)
			*fault_iova = (p.is_dst ? dst_iova : src_iova) + p.fault_off;
		if (fault_is_dst)
			*fault_is_dst = p.is_dst;
	}
	return p.err;
}
