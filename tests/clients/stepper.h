/* Tiny helpers for test clients that report one line per step:
 *
 *   STEP <name> rc=<rc> errno=<errno> [key=value ...]
 *
 * The Python test parses these lines and holds the expectations. */
#ifndef STEPPER_H
#define STEPPER_H

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>

#include <iommufd-cuse/uapi.h>

struct res {
	long rc;
	int err;
};

/* ioctl() with errno captured (0 on success). */
static inline struct res xioctl(int fd, unsigned long cmd, void *arg)
{
	struct res r;
	errno = 0;
	r.rc = ioctl(fd, cmd, arg);
	r.err = r.rc < 0 ? errno : 0;
	return r;
}

/* The two iommufd calls every client makes. */
static inline struct res ioas_alloc(int fd, __u32 *id)
{
	struct iommu_ioas_alloc a = { .size = sizeof(a) };
	struct res r = xioctl(fd, IOMMU_IOAS_ALLOC, &a);

	*id = r.rc == 0 ? a.out_ioas_id : 0;
	return r;
}

static inline struct res destroy(int fd, __u32 id)
{
	struct iommu_destroy d = { .size = sizeof(d), .id = id };

	return xioctl(fd, IOMMU_DESTROY, &d);
}

/* A result from a libc call that returns -1/errno. */
static inline struct res xres(long rc)
{
	struct res r = { rc, rc < 0 ? errno : 0 };
	return r;
}

/* Print one STEP line; fmt adds key=value fields. */
static inline __attribute__((format(printf, 3, 4))) void
step(const char *name, struct res r, const char *fmt, ...)
{
	char extra[512] = "";
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(extra, sizeof(extra), fmt, ap);
	va_end(ap);
	printf("STEP %s rc=%ld errno=%d%s%s\n", name, r.rc, r.err, extra[0] ? " " : "", extra);
	fflush(stdout);
}

/* A STEP line without fields. */
static inline void step0(const char *name, struct res r)
{
	printf("STEP %s rc=%ld errno=%d\n", name, r.rc, r.err);
	fflush(stdout);
}

static inline void die(const char *what)
{
	fprintf(stderr, "%s: errno %d\n", what, errno);
	exit(2);
}

#endif
