/* The victim: N IOMMU_OPTION(GET RLIMIT_MODE) round trips on its own open of the
 * node, each timed; prints "p50_ns=X p99_ns=Y max_ns=Z".
 *
 *   victim NODE N */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

static long long now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000ll + t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	struct iommu_option opt = {
		.size = sizeof(opt), .option_id = IOMMU_OPTION_RLIMIT_MODE, .op = IOMMU_OPTION_OP_GET,
	};
	long n, i;
	long long *t;
	int fd;

	if (argc != 3)
		return fprintf(stderr, "usage: victim NODE N\n"), 2;
	n = atol(argv[2]);
	t = calloc(n, sizeof(*t));
	fd = open(argv[1], O_RDWR);
	if (fd < 0 || !t)
		return perror(argv[1]), 1;
	for (i = 0; i < n; i++) {
		long long t0 = now_ns();

		if (ioctl(fd, IOMMU_OPTION, &opt))
			return perror("IOMMU_OPTION"), 1;
		t[i] = now_ns() - t0;
		usleep(200); /* a client that asks now and then, not a flood */
	}
	qsort(t, n, sizeof(*t), cmp);
	printf("p50_ns=%lld p99_ns=%lld max_ns=%lld\n", t[n / 2], t[n * 99 / 100], t[n - 1]);
	return 0;
}
