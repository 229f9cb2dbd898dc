/* NVMe PRP transfers: the controller's walk of PRP1, PRP2 and PRP lists.
 *
 * The rules (NVMe 1.4, "Physical Region Page Entry and List"): PRP1 points to
 * the first data, at any dword-aligned offset in its memory page; the data
 * runs to the end of that page. If the rest fits in one page, PRP2 points to
 * it (page aligned); otherwise PRP2 points to a PRP list (qword aligned): an
 * array of page-aligned data pointers filling the rest of that list page,
 * whose last entry, when more are needed, points to the next list page.
 *
 * List entries are fetched by DMA (reads of host memory through the same
 * table) at most LIST_BATCH at a time; data pointers that continue each other
 * are moved as one access, so a buffer contiguous in IOVA costs one copy
 * whatever its page count.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>

#include "icuse_internal.h"

#define LIST_BATCH 512 /* entries fetched per read of a list (4 KiB) */
#define RUN_MAX (8ull << 20) /* a run of data pointers is moved at most this much at a time */

struct prp_walk {
	struct icuse_store *st;
	struct icuse_pt *pt;
	struct icuse_prp_io *io;
	uint64_t run_iova, run_len; /* the data pointers gathered, not yet moved */
	uint64_t pos;               /* bytes of buf moved */
};

static int fail(struct prp_walk *w, int err, uint64_t iova, int write)
{
	w->io->result = err;
	w->io->fault_iova = iova;
	w->io->fault_write = write;
	return err;
}

static int flush(struct prp_walk *w)
{
	uint64_t f = 0;
	int64_t ret;

	if (!w->run_len)
		return 0;
	ret = icuse_dma_rw(w->st, w->pt, w->run_iova, (char *)(uintptr_t)w->io->buf + w->pos, w->run_len,
			   w->io->to_host, &f);
	if (ret < 0)
		return fail(w, (int)ret, f, w->io->to_host);
	w->pos += w->run_len;
	w->run_len = 0;
	return 0;
}

static int add(struct prp_walk *w, uint64_t iova, uint64_t len)
{
	int ret;

	if (w->run_len && iova == w->run_iova + w->run_len && w->run_len + len <= RUN_MAX) {
		w->run_len += len;
		return 0;
	}
	ret = flush(w);
	if (ret)
		return ret;
	w->run_iova = iova;
	w->run_len = len;
	return 0;
}

static int read_list(struct prp_walk *w, uint64_t iova, uint64_t *ents, uint64_t n)
{
	uint64_t f = 0;
	int64_t ret = icuse_dma_rw(w->st, w->pt, iova, ents, n * 8, 0, &f);

	if (ret < 0)
		return fail(w, (int)ret, f, 0);
	for (uint64_t i = 0; i < n; i++)
		ents[i] = le64toh(ents[i]);
	return 0;
}

static int prp_one(struct icuse_store *st, struct icuse_pt *pt, uint64_t psz, struct icuse_prp_io *io)
{
	struct prp_walk w = { .st = st, .pt = pt, .io = io };
	uint64_t ents[LIST_BATCH];
	uint64_t first, rest, list, left;
	int ret;

	if (io->prp1 & 3)
		return fail(&w, -EINVAL, io->prp1, 0);
	first = psz - (io->prp1 & (psz - 1));
	if (first > io->len)
		first = io->len;
	ret = add(&w, io->prp1, first);
	if (ret)
		return ret;
	rest = io->len - first;
	if (rest && rest <= psz) {
		if (io->prp2 & (psz - 1))
			return fail(&w, -EINVAL, io->prp2, 0);
		ret = add(&w, io->prp2, rest);
		if (ret)
			return ret;
	} else if (rest) {
		list = io->prp2;
		if (list & 7)
			return fail(&w, -EINVAL, list, 0);
		left = (rest + psz - 1) / psz; /* data pointers still needed */
		while (left) {
			/* Entries to the end of this list page; when more are needed
			 * than fit, its last entry points to the next list page. */
			uint64_t room = (psz - (list & (psz - 1))) / 8;
			uint64_t take = left <= room ? left : room - 1;

			for (uint64_t k = 0; k < take;) {
				uint64_t m = take - k < LIST_BATCH ? take - k : LIST_BATCH;

				ret = read_list(&w, list + k * 8, ents, m);
				if (ret)
					return ret;
				for (uint64_t i = 0; i < m; i++) {
					uint64_t n = rest < psz ? rest : psz;

					if (ents[i] & (psz - 1))
						return fail(&w, -EINVAL, ents[i], 0);
					ret = add(&w, ents[i], n);
					if (ret)
						return ret;
					rest -= n;
				}
				k += m;
			}
			left -= take;
			if (!left)
				break;
			ret = read_list(&w, list + take * 8, ents, 1);
			if (ret)
				return ret;
			/* The next list page is a whole page: the walk always advances. */
			list = ents[0];
			if (list & (psz - 1))
				return fail(&w, -EINVAL, list, 0);
		}
	}
	ret = flush(&w);
	if (ret)
		return ret;
	io->result = 0;
	return 0;
}

int64_t icuse_dma_prp_batch(struct icuse_store *st, struct icuse_pt *pt, uint64_t page_size,
			    struct icuse_prp_io *ios, size_t n)
{
	int64_t failed = 0;

	if (!pt || page_size < 4096 || page_size & (page_size - 1))
		return -EINVAL;
	for (size_t i = 0; i < n; i++) {
		ios[i].result = 0;
		ios[i].fault_iova = 0;
		ios[i].fault_write = 0;
		if (!ios[i].len || ios[i].buf + ios[i].len < ios[i].buf) {
			ios[i].result = -EINVAL;
			failed++;
			continue;
		}
		if (prp_one(st, pt, page_size, &ios[i]))
			failed++;
	}
	return failed;
}
