/* IOVA range lists a caller hands in (IOMMU_IOAS_ALLOW_IOVAS) and the search
 * for a free IOVA inside them: O(n log n) and O(n) in C, so that a list of a
 * million ranges costs milliseconds, not the loop's time. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>

#include "icuse_internal.h"

static int by_start(const void *a, const void *b, void *ctx)
{
	const uint64_t *r = ctx;
	uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;

	if (r[2 * i] != r[2 * j])
		return r[2 * i] < r[2 * j] ? -1 : 1;
	return i < j ? -1 : i > j; /* equal starts: the earlier range first */
}

int64_t icuse_ranges_check(const uint64_t *ranges, uint64_t n, uint64_t *sorted)
{
	uint32_t *order, *pos, *prev, *next;
	const uint32_t none = UINT32_MAX;
	uint64_t first_bad = n, k;

	if (n >= UINT32_MAX)
		return -ENOMEM;
	if (n == 0)
		return 0;
	order = icuse_malloc(n * sizeof(*order));
	pos = icuse_malloc(n * sizeof(*pos));
	prev = icuse_malloc(n * sizeof(*prev));
	next = icuse_malloc(n * sizeof(*next));
	if (!order || !pos || !prev || !next) {
		free(order);
		free(pos);
		free(prev);
		free(next);
		return -ENOMEM;
	}
	for (k = 0; k < n; k++)
		order[k] = (uint32_t)k;
	qsort_r(order, n, sizeof(*order), by_start, (void *)ranges);
	for (k = 0; k < n; k++) {
		pos[order[k]] = (uint32_t)k;
		prev[k] = k ? (uint32_t)(k - 1) : none;
		next[k] = k + 1 < n ? (uint32_t)(k + 1) : none;
	}
	/* Ranges are inserted in order and each must miss all earlier ones.
	 * Taking them out of the sorted list from the last one back, the list
	 * neighbours of range i are its neighbours among ranges 0..i-1; while
	 * those are disjoint, i overlaps one of them iff it overlaps a
	 * neighbour. The first i that fails is the kernel's answer. */
	for (k = n; k-- > 0;) {
		uint64_t s = ranges[2 * k], l = ranges[2 * k + 1];
		uint32_t p = prev[pos[k]], q = next[pos[k]];

		if (s >= l || (p != none && ranges[2 * order[p] + 1] >= s) ||
		    (q != none && ranges[2 * order[q]] <= l))
			first_bad = k;
		if (p != none)
			next[p] = q;
		if (q != none)
			prev[q] = p;
	}
	if (first_bad == n && sorted)
		for (k = 0; k < n; k++) {
			sorted[2 * k] = ranges[2 * order[k]];
			sorted[2 * k + 1] = ranges[2 * order[k] + 1];
		}
	free(order);
	free(pos);
	free(prev);
	free(next);
	return (int64_t)first_bad;
}

static uint64_t align_up(uint64_t x, uint64_t a, int *wrapped)
{
	uint64_t r = (x + a - 1) & ~(a - 1);

	*wrapped = r < x;
	return r;
}

/* The lowest iova in [start, last] that is align aligned (plus page_offset)
 * with room for length bytes; 0 and *ok = 0 when none. */
static uint64_t fit(uint64_t start, uint64_t last, uint64_t length, uint64_t align, uint64_t page_offset,
		    int *ok)
{
	int wrapped;
	uint64_t s;

	*ok = 0;
	if (last - start < length - 1)
		return 0;
	s = align_up(start, align, &wrapped) | page_offset;
	if (wrapped || s > last || last - s < length - 1)
		return 0;
	*ok = 1;
	return s;
}

int icuse_iova_alloc(const uint64_t *windows, uint64_t nwin, const uint64_t *used, uint64_t nused,
		     uint64_t lo, uint64_t hi, uint64_t length, uint64_t align, uint64_t page_offset,
		     uint64_t *out)
{
	uint64_t w, u = 0;
	int ok;

	if (length == 0 || align == 0 || (align & (align - 1)))
		return -EINVAL;
	for (w = 0; w < nwin; w++) {
		uint64_t ws = windows[2 * w], we = windows[2 * w + 1], pos, v, s;

		ws = ws < lo ? lo : ws;
		we = we > hi ? hi : we;
		if (we < ws)
			continue;
		pos = ws;
		fit(ws, we, length, align, page_offset, &ok);
		if (!ok)
			continue;
		/* Windows are sorted: used ranges ending before this one never
		 * matter again. */
		while (u < nused && used[2 * u + 1] < ws)
			u++;
		ok = 0;
		for (v = u;; v++) {
			if (v == nused || used[2 * v] > we) {
				s = fit(pos, we, length, align, page_offset, &ok);
				break;
			}
			if (used[2 * v] > pos) {
				s = fit(pos, used[2 * v] - 1, length, align, page_offset, &ok);
				if (ok)
					break;
			}
			if (used[2 * v + 1] >= we)
				break;
			if (used[2 * v + 1] >= pos)
				pos = used[2 * v + 1] + 1;
		}
		if (ok) {
			*out = s;
			return 0;
		}
	}
	return -ENOSPC;
}
