/* Allocation with fault injection, so tests can reach the -ENOMEM paths. */
#include <stdlib.h>

#include "icuse_internal.h"

/* Allocations left before the injected failure; 0: no failure armed. */
static uint64_t fail_countdown;

void icuse_test_fail_nth_alloc(uint64_t nth)
{
	__atomic_store_n(&fail_countdown, nth, __ATOMIC_SEQ_CST);
}

int icuse_alloc_fails(void)
{
	uint64_t n = __atomic_load_n(&fail_countdown, __ATOMIC_RELAXED);

	/* Fast path when disarmed; otherwise count down, failing once at 1. */
	while (n) {
		if (__atomic_compare_exchange_n(&fail_countdown, &n, n - 1, 0, __ATOMIC_SEQ_CST,
						__ATOMIC_RELAXED))
			return n == 1;
	}
	return 0;
}

void *icuse_malloc(size_t size)
{
	return icuse_alloc_fails() ? NULL : malloc(size);
}

void *icuse_realloc(void *p, size_t size)
{
	return icuse_alloc_fails() ? NULL : realloc(p, size);
}
