/* Allocation with fault injection, so tests can reach the -ENOMEM paths;
 * the copy a device's DMA writes with. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

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

/* Below this a copy goes through the caches: what a device writes in small
 * pieces (descriptors, status) the CPU reads next. */
#define STREAM_MIN (256u << 10)

void icuse_dma_memcpy(void *dst, const void *src, size_t n)
{
#ifdef __SSE2__
	/* Large writes stream past the caches, as a device's writes to memory
	 * do: no read-for-ownership of the destination, and the CPU's caches
	 * keep what the CPU itself was using. */
	char *d = dst;
	const char *s = src;
	size_t head = (size_t)(-(uintptr_t)d & 63);

	if (n < STREAM_MIN) {
		memcpy(dst, src, n);
		return;
	}
	memcpy(d, s, head);
	d += head;
	s += head;
	n -= head;
	for (; n >= 64; n -= 64, d += 64, s += 64) {
		__m128i a = _mm_loadu_si128((const __m128i *)s);
		__m128i b = _mm_loadu_si128((const __m128i *)(s + 16));
		__m128i c = _mm_loadu_si128((const __m128i *)(s + 32));
		__m128i e = _mm_loadu_si128((const __m128i *)(s + 48));

		_mm_stream_si128((__m128i *)d, a);
		_mm_stream_si128((__m128i *)(d + 16), b);
		_mm_stream_si128((__m128i *)(d + 32), c);
		_mm_stream_si128((__m128i *)(d + 48), e);
	}
	memcpy(d, s, n);
	/* Streaming stores are weakly ordered: all of them land before whatever
	 * the device does next (a status write, an interrupt). */
	_mm_sfence();
#else
	memcpy(dst, src, n);
#endif
}
