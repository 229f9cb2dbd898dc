/*
 * iommufd_rules PATH SCENARIO: exercises the rules of /dev/iommu that every
 * ioctl shares (central validation, ids, options, contexts) and prints one
 * STEP line per call. The expectations (the kernel's answers) live in
 * tests/iommufd/test_main.py.
 *
 * Scenarios: validation, copyout, options, nonroot, ids, procs, thread,
 * leader_gone, loop, open_rdwr, open_rdonly, open_wronly, rlimit_get, fileops.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <iommufd-cuse/uapi.h>

#include "stepper.h"

#define offsetofend(T, m) (offsetof(T, m) + sizeof(((T *)0)->m))
#define PAGE 4096

static const char *path;

static int open_node(int flags)
{
	int fd = open(path, flags | O_CLOEXEC);
	if (fd < 0)
		die("open");
	return fd;
}

/* ---- small wrappers: each returns the result, the caller prints ---------- */

static struct res option(int fd, __u32 option_id, __u16 op, __u32 object_id, __u64 *val)
{
	struct iommu_option o = {
		.size = sizeof(o), .option_id = option_id, .op = op, .object_id = object_id, .val64 = *val,
	};
	struct res r = xioctl(fd, IOMMU_OPTION, &o);
	*val = o.val64;
	return r;
}

static void step_alloc(int fd, const char *name)
{
	__u32 id;
	struct res r = ioas_alloc(fd, &id);
	step(name, r, "id=%u", id);
}

static void step_destroy(int fd, const char *name, __u32 id)
{
	step(name, destroy(fd, id), "id=%u", id);
}

static void step_option(int fd, const char *name, __u32 option_id, __u16 op, __u32 object_id, __u64 val)
{
	struct res r = option(fd, option_id, op, object_id, &val);
	step(name, r, "val64=%llu", (unsigned long long)val);
}

/* ---- central validation --------------------------------------------------- */

struct op {
	const char *name;
	unsigned long nr;
	__u32 min, size;
};

#define OP(n, s, last) { #n, n, offsetofend(struct s, last), sizeof(struct s) }
static const struct op ops[] = {
	OP(IOMMU_DESTROY, iommu_destroy, id),
	OP(IOMMU_IOAS_ALLOC, iommu_ioas_alloc, out_ioas_id),
	OP(IOMMU_IOAS_ALLOW_IOVAS, iommu_ioas_allow_iovas, allowed_iovas),
	OP(IOMMU_IOAS_COPY, iommu_ioas_copy, src_iova),
	OP(IOMMU_IOAS_IOVA_RANGES, iommu_ioas_iova_ranges, out_iova_alignment),
	OP(IOMMU_IOAS_MAP, iommu_ioas_map, iova),
	OP(IOMMU_IOAS_UNMAP, iommu_ioas_unmap, length),
	OP(IOMMU_OPTION, iommu_option, val64),
	OP(IOMMU_VFIO_IOAS, iommu_vfio_ioas, __reserved),
	OP(IOMMU_HWPT_ALLOC, iommu_hwpt_alloc, __reserved),
	OP(IOMMU_GET_HW_INFO, iommu_hw_info, __reserved),
	OP(IOMMU_HWPT_SET_DIRTY_TRACKING, iommu_hwpt_set_dirty_tracking, __reserved),
	OP(IOMMU_HWPT_GET_DIRTY_BITMAP, iommu_hwpt_get_dirty_bitmap, data),
	OP(IOMMU_HWPT_INVALIDATE, iommu_hwpt_invalidate, __reserved),
	OP(IOMMU_FAULT_QUEUE_ALLOC, iommu_fault_alloc, out_fault_fd),
	OP(IOMMU_IOAS_MAP_FILE, iommu_ioas_map_file, iova),
	OP(IOMMU_VIOMMU_ALLOC, iommu_viommu_alloc, out_viommu_id),
	OP(IOMMU_VDEVICE_ALLOC, iommu_vdevice_alloc, virt_id),
	OP(IOMMU_IOAS_CHANGE_PROCESS, iommu_ioas_change_process, __reserved),
	OP(IOMMU_VEVENTQ_ALLOC, iommu_veventq_alloc, out_veventq_fd),
	OP(IOMMU_HW_QUEUE_ALLOC, iommu_hw_queue_alloc, length),
	OP(IOMMU_IOAS_NOIOMMU_GET_PA, iommu_ioas_noiommu_get_pa, out_phys),
};

static unsigned char buf[4 * PAGE] __attribute__((aligned(PAGE)));

/* buf zeroed, with the size word set */
static void *sized(__u32 size)
{
	memset(buf, 0, sizeof(buf));
	memcpy(buf, &size, sizeof(size));
	return buf;
}

/* Two pages, the second inaccessible: returns the end of the first. */
static unsigned char *edge_of_mapping(void)
{
	unsigned char *p = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	if (mprotect(p + PAGE, PAGE, PROT_NONE))
		die("mprotect");
	memset(p, 0, PAGE);
	return p + PAGE;
}

static void validation(void)
{
	int fd = open_node(O_RDWR);
	char name[96];

	for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
		const struct op *o = &ops[i];
		snprintf(name, sizeof(name), "size0:%s", o->name);
		step(name, xioctl(fd, o->nr, sized(0)), "nr=0x%lx min=%u sizeof=%u", o->nr, o->min, o->size);
		snprintf(name, sizeof(name), "below_min:%s", o->name);
		step(name, xioctl(fd, o->nr, sized(o->min - 1)), "size=%u", o->min - 1);
		snprintf(name, sizeof(name), "tail_nonzero:%s", o->name);
		sized(o->size + 8);
		buf[o->size + 7] = 1;
		step(name, xioctl(fd, o->nr, buf), "size=%u", o->size + 8);
	}

	/* a size above the struct with a zero tail is accepted */
	__u32 *w = sized(sizeof(struct iommu_ioas_alloc) + 4);
	struct res r = xioctl(fd, IOMMU_IOAS_ALLOC, w);
	step("zero_tail:IOMMU_IOAS_ALLOC", r, "id=%u", ((struct iommu_ioas_alloc *)w)->out_ioas_id);
	__u32 id = ((struct iommu_ioas_alloc *)w)->out_ioas_id;

	struct iommu_option *opt = sized(3 * PAGE); /* a tail of almost three pages, all zero */
	opt->option_id = IOMMU_OPTION_HUGE_PAGES;
	opt->op = IOMMU_OPTION_OP_GET;
	opt->object_id = id;
	opt->val64 = 7;
	r = xioctl(fd, IOMMU_OPTION, opt);
	step("zero_tail_pages:IOMMU_OPTION", r, "val64=%llu", (unsigned long long)opt->val64);

	/* a non-zero byte far into the tail */
	opt = sized(3 * PAGE);
	opt->option_id = IOMMU_OPTION_HUGE_PAGES;
	opt->op = IOMMU_OPTION_OP_GET;
	opt->object_id = id;
	buf[3 * PAGE - 1] = 0x80;
	step0("tail_nonzero_far:IOMMU_OPTION", xioctl(fd, IOMMU_OPTION, opt));

	/* E2BIG is decided before the handler runs: the object survives */
	struct iommu_destroy *d = sized(sizeof(*d) + 4);
	d->id = id;
	buf[sizeof(*d)] = 1;
	step("tail_nonzero:destroy_existing", xioctl(fd, IOMMU_DESTROY, d), "id=%u", id);

	/* a tail that runs into an unmapped page */
	unsigned char *end = edge_of_mapping();
	struct iommu_destroy *de = (void *)(end - 64);
	de->size = 4096;
	de->id = id;
	step0("tail_unmapped:IOMMU_DESTROY", xioctl(fd, IOMMU_DESTROY, de));
	/* the size word is readable, the struct is not */
	__u32 *sw = (void *)(end - 4);
	*sw = sizeof(struct iommu_ioas_alloc);
	step0("struct_unmapped:IOMMU_IOAS_ALLOC", xioctl(fd, IOMMU_IOAS_ALLOC, sw));

	step_destroy(fd, "destroy_after_e2big", id);

	/* unknown numbers */
	w = sized(16);
	step0("unknown:_IO(';',0x7f)", xioctl(fd, _IO(IOMMUFD_TYPE, 0x7f), w));
	step0("unknown:_IO(';',0xa1)", xioctl(fd, _IO(IOMMUFD_TYPE, 0xa1), w));
	step0("unknown:_IO(';',0xff)", xioctl(fd, _IO(IOMMUFD_TYPE, 0xff), w));
	step0("unknown:_IO('Z',1)", xioctl(fd, _IO('Z', 1), w));
	step0("unknown:_IO('Z',0x81)", xioctl(fd, _IO('Z', 0x81), w));
	step0("unknown:_IOW(';',0x80,u32)", xioctl(fd, _IOW(IOMMUFD_TYPE, 0x80, __u32), w));
	/* IOMMU_TEST_CMD exists only in test mode */
	sized(sizeof(struct iommu_test_cmd));
	step0("unknown:IOMMU_TEST_CMD", xioctl(fd, IOMMU_TEST_CMD, buf));

	/* bad pointers */
	step0("efault:IOMMU_IOAS_ALLOC(NULL)", xioctl(fd, IOMMU_IOAS_ALLOC, NULL));
	step0("efault:IOMMU_IOAS_ALLOC(1)", xioctl(fd, IOMMU_IOAS_ALLOC, (void *)1));
	step0("efault:IOMMU_DESTROY(unmapped)", xioctl(fd, IOMMU_DESTROY, end));
	step0("efault:IOMMU_OPTION(kernel)", xioctl(fd, IOMMU_OPTION, (void *)0xffffffff81000000UL));
	/* a number inside the table's range: the size word is read before the number is checked */
	step0("efault:_IO('Z',0x81)(NULL)", xioctl(fd, _IO('Z', 0x81), NULL));
	/* numbers outside the table: ENOTTY without touching memory */
	step0("enotty:_IO(';',0x7f)(NULL)", xioctl(fd, _IO(IOMMUFD_TYPE, 0x7f), NULL));
	step0("enotty:_IO(';',0xff)(NULL)", xioctl(fd, _IO(IOMMUFD_TYPE, 0xff), NULL));
	step0("enotty:_IO('Z',1)(NULL)", xioctl(fd, _IO('Z', 1), NULL));
	step0("enotty:_IO(';',0x7f)(unmapped)", xioctl(fd, _IO(IOMMUFD_TYPE, 0x7f), end));

	/* flags */
	struct iommu_ioas_alloc a = { .size = sizeof(a), .flags = 1, .out_ioas_id = 0xdead };
	struct res rf = xioctl(fd, IOMMU_IOAS_ALLOC, &a);
	step("flags:IOMMU_IOAS_ALLOC(1)", rf, "out_ioas_id=0x%x", a.out_ioas_id);
	a.flags = 1u << 31;
	rf = xioctl(fd, IOMMU_IOAS_ALLOC, &a);
	step("flags:IOMMU_IOAS_ALLOC(1<<31)", rf, "out_ioas_id=0x%x", a.out_ioas_id);

	/* a failed call created nothing: the next id is still 1 */
	step_alloc(fd, "alloc_after_failures");
	close(fd);
}

/* ---- what is copied back --------------------------------------------------- */

static void copyout(void)
{
	int fd = open_node(O_RDWR);
	/* IOAS_ALLOC with size 16 in a larger buffer: 12 bytes are the struct,
	 * 12..15 are the (zero) tail, 16.. must not be written */
	unsigned char *b = sized(16);
	memset(b + 16, 0xaa, 48);
	struct res r = xioctl(fd, IOMMU_IOAS_ALLOC, b);
	int intact = 1, tail_zero = 1;
	for (int i = 16; i < 64; i++)
		intact &= b[i] == 0xaa;
	for (int i = 12; i < 16; i++)
		tail_zero &= b[i] == 0;
	__u32 id = ((struct iommu_ioas_alloc *)b)->out_ioas_id;
	step("alloc_size16", r, "id=%u size=%u canary_intact=%d tail_zero=%d", id, *(__u32 *)b, intact, tail_zero);

	/* IOVA_RANGES: no room -> EMSGSIZE, nothing written to the array */
	struct iommu_iova_range ranges[4];
	memset(ranges, 0xaa, sizeof(ranges));
	struct iommu_ioas_iova_ranges q = {
		.size = sizeof(q), .ioas_id = id, .num_iovas = 0, .allowed_iovas = (uintptr_t)ranges,
	};
	r = xioctl(fd, IOMMU_IOAS_IOVA_RANGES, &q);
	intact = 1;
	for (size_t i = 0; i < sizeof(ranges); i++)
		intact &= ((unsigned char *)ranges)[i] == 0xaa;
	step("ranges_none", r, "num_iovas=%u alignment=0x%llx array_intact=%d", q.num_iovas,
	     (unsigned long long)q.out_iova_alignment, intact);

	/* room for 3: one written, the rest untouched */
	q.num_iovas = 3;
	q.out_iova_alignment = 0;
	r = xioctl(fd, IOMMU_IOAS_IOVA_RANGES, &q);
	intact = 1;
	for (size_t i = sizeof(ranges[0]); i < sizeof(ranges); i++)
		intact &= ((unsigned char *)ranges)[i] == 0xaa;
	step("ranges_room", r, "num_iovas=%u start=0x%llx last=0x%llx rest_intact=%d", q.num_iovas,
	     (unsigned long long)ranges[0].start, (unsigned long long)ranges[0].last, intact);

	/* non-zero __reserved */
	q.__reserved = 1;
	step0("ranges_reserved", xioctl(fd, IOMMU_IOAS_IOVA_RANGES, &q));
	q.__reserved = 0;
	q.ioas_id = 99;
	step0("ranges_unknown_id", xioctl(fd, IOMMU_IOAS_IOVA_RANGES, &q));

	/* a failed call writes nothing back */
	struct iommu_ioas_alloc a = { .size = sizeof(a), .flags = 2, .out_ioas_id = 0x5a5a5a5a };
	r = xioctl(fd, IOMMU_IOAS_ALLOC, &a);
	step("alloc_failed_no_copyout", r, "out_ioas_id=0x%x", a.out_ioas_id);
	__u64 v = 0x1234;
	r = option(fd, 99, IOMMU_OPTION_OP_GET, 0, &v);
	step("option_failed_no_copyout", r, "val64=0x%llx",
	     (unsigned long long)v);
	close(fd);
}

/* ---- IOMMU_OPTION ------------------------------------------------------------ */

static void options(void)
{
	int fd = open_node(O_RDWR);
	step_option(fd, "rlimit_get", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 99);
	step_option(fd, "rlimit_get_object_id", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 1, 0);
	step_option(fd, "rlimit_set_1", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1);
	step_option(fd, "rlimit_get_after_set_1", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 0);
	step_option(fd, "rlimit_set_0", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 0);
	step_option(fd, "rlimit_get_after_set_0", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 5);
	step_option(fd, "rlimit_set_2", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 2);
	step_option(fd, "rlimit_bad_op", IOMMU_OPTION_RLIMIT_MODE, 2, 0, 0);
	step_option(fd, "unknown_option_2", 2, IOMMU_OPTION_OP_GET, 0, 0);
	step_option(fd, "unknown_option_99", 99, IOMMU_OPTION_OP_SET, 0, 0);

	struct iommu_option o = {
		.size = sizeof(o), .option_id = IOMMU_OPTION_RLIMIT_MODE, .op = IOMMU_OPTION_OP_GET, .__reserved = 1,
	};
	step0("rlimit_reserved", xioctl(fd, IOMMU_OPTION, &o));

	step_alloc(fd, "alloc");
	step_option(fd, "rlimit_set_1_with_object", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1);
	step_option(fd, "rlimit_set_0_with_object", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 0);
	step_option(fd, "rlimit_set_2_with_object", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 2);
	step_option(fd, "rlimit_get_with_object", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 9);

	step_option(fd, "huge_get", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 1, 9);
	step_option(fd, "huge_set_0", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, 1, 0);
	step_option(fd, "huge_get_after_0", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 1, 9);
	step_option(fd, "huge_set_1", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, 1, 1);
	step_option(fd, "huge_get_after_1", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 1, 9);
	step_option(fd, "huge_set_2", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, 1, 2);
	step_option(fd, "huge_bad_op", IOMMU_OPTION_HUGE_PAGES, 7, 1, 0);
	step_option(fd, "huge_get_unknown_id", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 77, 9);
	step_option(fd, "huge_set_unknown_id", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, 77, 1);
	step_option(fd, "huge_get_id_0", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 0, 9);
	/* __reserved is checked before the object is looked up */
	o = (struct iommu_option){
		.size = sizeof(o), .option_id = IOMMU_OPTION_HUGE_PAGES, .op = IOMMU_OPTION_OP_GET,
		.__reserved = 0x100, .object_id = 77,
	};
	step0("huge_reserved_unknown_id", xioctl(fd, IOMMU_OPTION, &o));

	step_destroy(fd, "destroy", 1);
	step_option(fd, "rlimit_set_1_after_destroy", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1);
	step_option(fd, "rlimit_get_final", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 0);
	close(fd);
}

/* run by a caller without CAP_SYS_RESOURCE */
static void nonroot(void)
{
	int fd = open_node(O_RDWR);
	step("uid", xres(0), "uid=%u euid=%u", getuid(), geteuid());
	step_option(fd, "rlimit_get", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 9);
	step_option(fd, "rlimit_set_1", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1);
	step_option(fd, "rlimit_set_0", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 0);
	step_option(fd, "rlimit_set_2", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 2);
	step_alloc(fd, "alloc");
	/* the capability is checked before anything else of SET */
	step_option(fd, "rlimit_set_1_with_object", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1);
	step_option(fd, "huge_get", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 1, 9);
	step_option(fd, "huge_set_0", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, 1, 0);
	step_destroy(fd, "destroy", 1);
	close(fd);
}

static void rlimit_get(void)
{
	int fd = open_node(O_RDWR);
	step_option(fd, "rlimit_get", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 9);
	close(fd);
}

/* ---- object ids ---------------------------------------------------------------- */

static void ids(void)
{
	int fd = open_node(O_RDWR);
	step_alloc(fd, "alloc_a");
	step_alloc(fd, "alloc_b");
	step_alloc(fd, "alloc_c");
	step_destroy(fd, "destroy_b", 2);
	step_alloc(fd, "alloc_reuses_2");
	step_alloc(fd, "alloc_next_4");
	step_destroy(fd, "destroy_0", 0);
	step_destroy(fd, "destroy_99", 99);
	step_destroy(fd, "destroy_max", 0xffffffff);
	step_destroy(fd, "destroy_4", 4);
	step_destroy(fd, "destroy_4_again", 4);
	step_destroy(fd, "destroy_1", 1);
	step_alloc(fd, "alloc_reuses_1");
	step_destroy(fd, "destroy_1b", 1);
	step_destroy(fd, "destroy_2", 2);
	step_destroy(fd, "destroy_3", 3);
	step_destroy(fd, "destroy_3_again", 3);
	step_alloc(fd, "alloc_empty_again");
	close(fd);
}

/* ---- processes and threads --------------------------------------------------- */

static void xwrite(int fd)
{
	if (write(fd, "x", 1) != 1)
		die("write");
}

static void xread(int fd)
{
	char c;
	if (read(fd, &c, 1) != 1)
		die("read");
}

static void procs(void)
{
	int to_parent[2], to_child[2], status;
	int fd = open_node(O_RDWR);
	step_alloc(fd, "P_alloc_1");
	step_alloc(fd, "P_alloc_2");
	if (pipe(to_parent) || pipe(to_child))
		die("pipe");

	pid_t a = fork();
	if (a < 0)
		die("fork");
	if (a == 0) {
		int fa = open_node(O_RDWR);
		step_alloc(fa, "A_alloc_1");
		step_destroy(fa, "A_destroy_other_2", 2);
		step_option(fa, "A_get_other_2", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 2, 9);
		xwrite(to_parent[1]);
		xread(to_child[0]); /* the parent destroys its id 1 meanwhile */
		step_option(fa, "A_own_1_survives", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 1, 9);
		step_alloc(fa, "A_alloc_2");
		close(fa);
		_exit(0);
	}
	xread(to_parent[0]);
	step_destroy(fd, "P_destroy_1", 1);
	xwrite(to_child[1]);
	if (waitpid(a, &status, 0) != a || !WIFEXITED(status) || WEXITSTATUS(status))
		die("child A");
	step_option(fd, "P_own_2_survives", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 2, 9);
	step_alloc(fd, "P_alloc_reuses_1");

	/* a child using the inherited fd works in the same context */
	pid_t b = fork();
	if (b < 0)
		die("fork");
	if (b == 0) {
		step_destroy(fd, "B_destroy_shared_1", 1);
		step_alloc(fd, "B_alloc_shared");
		_exit(0);
	}
	if (waitpid(b, &status, 0) != b || !WIFEXITED(status) || WEXITSTATUS(status))
		die("child B");
	step_option(fd, "P_sees_B_object_1", IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 1, 9);
	step_destroy(fd, "P_destroy_1_end", 1);
	step_destroy(fd, "P_destroy_2_end", 2);
	step_destroy(fd, "P_destroy_2_again", 2);
	close(fd);
}

static int thread_fd;

static void *one_thread(void *arg)
{
	(void)arg;
	char name[64];
	pid_t tid = (pid_t)syscall(SYS_gettid);
	step("T_tid", xres(0), "is_main=%d", tid == getpid());
	step_option(thread_fd, "T_rlimit_get", IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 9);
	/* the struct lives on this thread's stack */
	struct iommu_ioas_alloc a = { .size = sizeof(a) };
	struct res r = xioctl(thread_fd, IOMMU_IOAS_ALLOC, &a);
	step("T_alloc", r, "id=%u", a.out_ioas_id);
	struct iommu_iova_range rg[2];
	struct iommu_ioas_iova_ranges q = {
		.size = sizeof(q), .ioas_id = a.out_ioas_id, .num_iovas = 2, .allowed_iovas = (uintptr_t)rg,
	};
	r = xioctl(thread_fd, IOMMU_IOAS_IOVA_RANGES, &q);
	step("T_ranges", r, "num_iovas=%u last=0x%llx",
	     q.num_iovas, (unsigned long long)rg[0].last);
	snprintf(name, sizeof(name), "T_destroy");
	step_destroy(thread_fd, name, a.out_ioas_id);
	return NULL;
}

#define NTHREADS 4
#define ROUNDS 200

static void *busy_thread(void *arg)
{
	long failures = 0;
	for (int i = 0; i < ROUNDS; i++) {
		__u32 id;
		if (ioas_alloc(thread_fd, &id).rc || id == 0)
			failures++;
		__u64 v = 9;
		if (option(thread_fd, IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, id, &v).rc || v != 1)
			failures++;
		if (destroy(thread_fd, id).rc)
			failures++;
	}
	return (void *)failures;
}

static void thread(void)
{
	pthread_t t[NTHREADS];
	thread_fd = open_node(O_RDWR);
	if (pthread_create(&t[0], NULL, one_thread, NULL) || pthread_join(t[0], NULL))
		die("pthread");
	for (int i = 0; i < NTHREADS; i++)
		if (pthread_create(&t[i], NULL, busy_thread, NULL))
			die("pthread_create");
	long failures = 0;
	for (int i = 0; i < NTHREADS; i++) {
		void *f;
		pthread_join(t[i], &f);
		failures += (long)f;
	}
	step("threads_concurrent", xres(0), "threads=%d rounds=%d failures=%ld", NTHREADS, ROUNDS, failures);
	step_alloc(thread_fd, "alloc_after_threads");
	close(thread_fd);
}

/* The thread-group leader exits first; a remaining thread keeps using the fd. */
static void *orphan_thread(void *arg)
{
	(void)arg;
	usleep(50 * 1000);
	one_thread(NULL);
	step_alloc(thread_fd, "O_alloc");
	exit(0);
}

static void leader_gone(void)
{
	pthread_t t;
	thread_fd = open_node(O_RDWR);
	if (pthread_create(&t, NULL, orphan_thread, NULL))
		die("pthread_create");
	pthread_exit(NULL);
}

/* ---- a client that never stops (the test kills it) --------------------------- */

static void loop(void)
{
	int fd = open_node(O_RDWR);
	__u32 held1, held2, id;
	ioas_alloc(fd, &held1);
	ioas_alloc(fd, &held2);
	step("ready", xres(0), "held=%u,%u", held1, held2);
	for (unsigned long n = 0;; n++) {
		__u64 v = 0;
		struct res r = ioas_alloc(fd, &id);
		if (r.rc) { /* the daemon went away */
			step("lost", r, "after=%lu", n);
			exit(3);
		}
		option(fd, IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, id, &v);
		destroy(fd, id);
		if (n == 100)
			step0("looping", xres(0));
	}
}

/* ---- open modes and file operations ------------------------------------------- */

static void open_mode(int flags)
{
	int fd = open(path, flags | O_CLOEXEC);
	step0("open", xres(fd));
	if (fd < 0)
		return;
	step_alloc(fd, "alloc");
	close(fd);
}

static void fileops(void)
{
	int fd = open_node(O_RDWR);
	char b[64] = { 0 };
	step0("read", xres(read(fd, b, sizeof(b))));
	step0("write", xres(write(fd, b, sizeof(b))));
	step0("read_0", xres(read(fd, b, 0)));
	step0("pread", xres(pread(fd, b, sizeof(b), 0)));
	step0("pwrite", xres(pwrite(fd, b, sizeof(b), 0)));
	step0("lseek", xres(lseek(fd, 0, SEEK_SET)));
	struct pollfd p = { .fd = fd, .events = POLLIN | POLLOUT };
	long n = poll(&p, 1, 0);
	step("poll", xres(n), "revents=0x%x", n > 0 ? p.revents : 0);
	void *m = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, 0);
	step0("mmap_shared", xres(m == MAP_FAILED ? -1 : 0));
	if (m != MAP_FAILED)
		munmap(m, PAGE);
	m = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE, fd, 0);
	step0("mmap_private", xres(m == MAP_FAILED ? -1 : 0));
	if (m != MAP_FAILED)
		munmap(m, PAGE);
	/* the fd still works */
	step_alloc(fd, "alloc_after_fileops");
	close(fd);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s PATH SCENARIO\n", argv[0]);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	path = argv[1];
	const char *s = argv[2];
	if (!strcmp(s, "validation"))
		validation();
	else if (!strcmp(s, "copyout"))
		copyout();
	else if (!strcmp(s, "options"))
		options();
	else if (!strcmp(s, "nonroot"))
		nonroot();
	else if (!strcmp(s, "rlimit_get"))
		rlimit_get();
	else if (!strcmp(s, "ids"))
		ids();
	else if (!strcmp(s, "procs"))
		procs();
	else if (!strcmp(s, "thread"))
		thread();
	else if (!strcmp(s, "leader_gone"))
		leader_gone();
	else if (!strcmp(s, "loop"))
		loop();
	else if (!strcmp(s, "open_rdwr"))
		open_mode(O_RDWR);
	else if (!strcmp(s, "open_rdonly"))
		open_mode(O_RDONLY);
	else if (!strcmp(s, "open_wronly"))
		open_mode(O_WRONLY);
	else if (!strcmp(s, "fileops"))
		fileops();
	else {
		fprintf(stderr, "unknown scenario %s\n", s);
		return 2;
	}
	return 0;
}
