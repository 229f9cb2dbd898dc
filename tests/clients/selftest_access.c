/*
 * selftest_access PATH: the access ops of IOMMU_TEST_CMD (CREATE_ACCESS,
 * ACCESS_PAGES, ACCESS_RW, DESTROY_ACCESS_PAGES, ACCESS_REPLACE_IOAS), run with
 * the companion library preloaded (tools/iommufd_selftest_preload.c). One STEP
 * line per call; expectations in tests/iommufd/test_selftest.py.
 */
#define _GNU_SOURCE
#include <sys/wait.h>
#include <time.h>

#include "selftest_util.h"

static int fd;

static struct res create_access(__u32 ioas, __u32 flags, int *afd)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_CREATE_ACCESS, ioas);
	struct res r;

	c.create_access.flags = flags;
	r = test_cmd(fd, &c);
	*afd = r.rc == 0 ? (int)c.create_access.out_access_fd : -1;
	return r;
}

static struct res access_pages(int afd, __u64 iova, __u64 len, void *uptr, __u32 flags, __u32 *id)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_ACCESS_PAGES, afd);
	struct res r;

	c.access_pages.iova = iova;
	c.access_pages.length = len;
	c.access_pages.uptr = (uintptr_t)uptr;
	c.access_pages.flags = flags;
	r = test_cmd(fd, &c);
	if (id)
		*id = r.rc == 0 ? c.access_pages.out_access_pages_id : ~0u;
	return r;
}

static struct res access_rw(int afd, __u64 iova, __u64 len, void *uptr, __u32 flags)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_ACCESS_RW, afd);

	c.access_rw.iova = iova;
	c.access_rw.length = len;
	c.access_rw.uptr = (uintptr_t)uptr;
	c.access_rw.flags = flags;
	return test_cmd(fd, &c);
}

static struct res destroy_pages(int afd, __u32 id)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_DESTROY_ACCESS_PAGES, afd);

	c.destroy_access_pages.access_pages_id = id;
	return test_cmd(fd, &c);
}

static struct res replace_ioas(int afd, __u32 ioas)
{
	struct iommu_test_cmd c = tcmd(IOMMU_TEST_OP_ACCESS_REPLACE_IOAS, afd);

	c.access_replace_ioas.ioas_id = ioas;
	return test_cmd(fd, &c);
}

#define HUGE (2 * MIB)

/*
 * `hugetlb`: accesses and mock domains over hugetlb memory, which the daemon can only
 * map whole huge pages of: a MAP_SHARED | MAP_HUGETLB buffer pinned one small page in
 * (the kernel selftest's access_domain_destory), and a hugetlb memfd mapped from a
 * small-page offset with IOAS_MAP_FILE. Prints "nohuge" if no huge page is free.
 */
static int hugetlb(void)
{
	__u64 iova = MOCK_APERTURE_START;
	__u32 ioas, stdev, hwpt, id;
	char out[16];
	int afd, mfd;
	char *buf = mmap(0, 2 * HUGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE,
			 -1, 0);

	mfd = memfd_create("huge", MFD_HUGETLB);
	if (buf == MAP_FAILED || mfd < 0 || ftruncate(mfd, 2 * HUGE)) {
		printf("nohuge\n");
		return 0;
	}
	memcpy(buf + HUGE + 5, "huge", 5);
	ioas_alloc(fd, &ioas);
	step0("huge_map", ioas_map(fd, ioas, buf, 2 * HUGE, iova));
	step0("huge_create", create_access(ioas, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES, &afd));
	stepv("huge_pages", access_pages(afd, iova + PAGE, PAGE, buf + PAGE, MOCK_FLAGS_ACCESS_WRITE, &id), "id=%u",
	      id);
	memset(out, 0, sizeof(out));
	stepv("huge_rw", access_rw(afd, iova + HUGE + 5, 5, out, 0), "same=%d", !memcmp(out, "huge", 5));
	step0("huge_mock_domain", mock_domain(fd, ioas, &stdev, &hwpt, NULL));
	step0("huge_check_map", check_map(fd, hwpt, iova, 2 * HUGE, buf));
	step0("huge_destroy_stdev", destroy(fd, stdev));
	step0("huge_destroy_pages", destroy_pages(afd, id));
	close(afd);

	/* a hugetlb memfd from one small page in: the pages behind are the file's */
	step0("huge_file_mock_domain", mock_domain(fd, ioas, &stdev, &hwpt, NULL));
	step0("huge_map_file", ioas_map_file(fd, ioas, mfd, PAGE, HUGE, iova + 8 * HUGE));
	{
		char *view = mmap(0, 2 * HUGE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);

		if (view == MAP_FAILED)
			die("mmap memfd");
		step0("huge_file_check_map", check_map(fd, hwpt, iova + 8 * HUGE, HUGE, view + PAGE));
		step0("huge_file_check_map_other", check_map(fd, hwpt, iova + 8 * HUGE, PAGE, view));
	}
	return 0;
}

int main(int argc, char **argv)
{
	__u64 len = 16 * PAGE, iova = 0x100000, ro_iova = 0x400000;
	__u32 ioas, ioas2, ioas3, id, id2, id3;
	char out[64], *buf, *ro;
	int afd, afd2, afd3, mfd;

	if (argc != 2 && argc != 3)
		return 2;
	fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open");
	if (argc == 3 && !strcmp(argv[2], "hugetlb"))
		return hugetlb();
	buf = alloc_buf(0, len, PAGE, &mfd);
	ro = alloc_buf(0, len, PAGE, &mfd);

	ioas_alloc(fd, &ioas);
	step0("map", ioas_map(fd, ioas, buf, len, iova));
	{
		struct iommu_ioas_map m = {
			.size = sizeof(m), .ioas_id = ioas, .user_va = (uintptr_t)ro, .length = len, .iova = ro_iova,
			.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE,
		};
		step0("map_ro", xioctl(fd, IOMMU_IOAS_MAP, &m));
	}
	stepv("create", create_access(ioas, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES, &afd), "fd_ok=%d cloexec=%d",
	      afd >= 0 && afd < 4096, afd >= 0 && (fcntl(afd, F_GETFD) & FD_CLOEXEC));
	stepv("ioas2", ioas_alloc(fd, &ioas2), "id=%u", ioas2); /* the access took an id */
	step0("destroy_access_obj", destroy(fd, ioas2 - 1));
	step0("destroy_ioas_with_access", destroy(fd, ioas));
	step0("access_pages_iommufd", access_pages(fd, iova, PAGE, buf, 0, &id));

	/* pins */
	step0("refs_none", check_refs(fd, buf, len, 0));
	stepv("pages", access_pages(afd, iova, 4 * PAGE, buf, MOCK_FLAGS_ACCESS_WRITE, &id), "id=%u", id);
	step0("refs_pinned", check_refs(fd, buf, 4 * PAGE, 1));
	step0("refs_rest", check_refs(fd, buf + 4 * PAGE, len - 4 * PAGE, 0));
	step0("pages_wrong_uptr", access_pages(afd, iova, PAGE, buf + PAGE, 0, &id2));
	stepv("pages_no_uptr", access_pages(afd, iova + PAGE, PAGE, NULL, 0, &id3), "id=%u", id3);
	step0("pages_unaligned", access_pages(afd, iova + 8, PAGE, buf + 8, 0, &id2));
	step0("pages_beyond", access_pages(afd, iova + len - PAGE, 2 * PAGE, buf + len - PAGE, 0, &id2));
	step0("pages_zero", access_pages(afd, iova, 0, buf, 0, &id2));
	step0("pages_ro_write", access_pages(afd, ro_iova, PAGE, ro, MOCK_FLAGS_ACCESS_WRITE, &id2));
	step0("pages_ro_read", access_pages(afd, ro_iova, PAGE, ro, 0, &id2));
	step0("destroy_pages_missing", destroy_pages(afd, 99));
	step0("destroy_pages", destroy_pages(afd, id));
	step0("destroy_pages_again", destroy_pages(afd, id));
	step0("destroy_pages_no_uptr", destroy_pages(afd, id3));
	step0("refs_unpinned", check_refs(fd, buf, 4 * PAGE, 0));

	/* CPU access */
	memcpy(buf + 100, "through the access", 19);
	memset(out, 0, sizeof(out));
	stepv("rw_read", access_rw(afd, iova + 100, 19, out, 0), "same=%d", !memcmp(out, "through the access", 19));
	stepv("rw_write", access_rw(afd, iova + 5000, 6, "hello", MOCK_ACCESS_RW_WRITE), "same=%d",
	      !memcmp(buf + 5000, "hello", 6));
	stepv("rw_slow", access_rw(afd, iova + PAGE - 3, 6, "cross", MOCK_ACCESS_RW_WRITE | MOCK_ACCESS_RW_SLOW_PATH),
	      "same=%d", !memcmp(buf + PAGE - 3, "cross", 6));
	step0("rw_zero", access_rw(afd, iova, 0, out, 0));
	step0("rw_beyond", access_rw(afd, iova + len - 4, 8, out, 0));
	step0("rw_ro_write", access_rw(afd, ro_iova, 4, "nope", MOCK_ACCESS_RW_WRITE));
	step0("rw_ro_read", access_rw(afd, ro_iova, 4, out, 0));
	step0("rw_bad_uptr", access_rw(afd, iova, 4, (void *)8, MOCK_ACCESS_RW_WRITE));

	/* The daemon knows a file of its own seen before at once: by the file, never by the
	 * number. The same number naming another access, then no access, then the first
	 * again; and the same number in a forked child (another descriptor table). */
	{
		__u32 ioas4;
		int other, saved = dup(afd);
		char *buf4 = alloc_buf(0, PAGE, PAGE, &mfd);

		memcpy(buf4 + 100, "another ioas", 13);
		ioas_alloc(fd, &ioas4);
		step0("other_map", ioas_map(fd, ioas4, buf4, PAGE, iova));
		step0("other_create", create_access(ioas4, 0, &other));
		memset(out, 0, sizeof(out));
		step0("other_rw", access_rw(other, iova + 100, 13, out, 0));
		dup2(other, afd);
		memset(out, 0, sizeof(out));
		stepv("number_reused_rw", access_rw(afd, iova + 100, 13, out, 0), "same=%d",
		      !memcmp(out, "another ioas", 13));
		dup2(fd, afd);
		step0("number_reused_iommufd", access_rw(afd, iova + 100, 13, out, 0));
		dup2(saved, afd);
		close(saved);
		close(other);
		memset(out, 0, sizeof(out));
		stepv("number_restored_rw", access_rw(afd, iova + 100, 19, out, 0), "same=%d",
		      !memcmp(out, "through the access", 19));
		pid_t child = fork();

		if (child == 0) {
			memset(out, 0, sizeof(out));
			_exit(access_rw(afd, iova + 100, 19, out, 0).rc == 0 && !memcmp(out, "through the access", 19) ? 0
														     : 1);
		}
		int status = -1;

		waitpid(child, &status, 0);
		step("child_rw", (struct res){ 0, 0 }, "ok=%d", WIFEXITED(status) && WEXITSTATUS(status) == 0);
	}

	/* an unmap drops the pins under it */
	stepv("pages_again", access_pages(afd, iova, 2 * PAGE, buf, 0, &id), "id=%u", id);
	step0("unmap_pinned", ioas_unmap(fd, ioas, iova, len));
	step0("refs_after_unmap", check_refs(fd, buf, len, 0));
	step0("destroy_pages_unmapped", destroy_pages(afd, id));

	/* replace the IOAS */
	step0("replace_missing", replace_ioas(afd, 999));
	step0("replace", replace_ioas(afd, ioas2));
	step0("rw_empty_ioas", access_rw(afd, iova, 4, out, 0));
	step0("map2", ioas_map(fd, ioas2, buf, len, iova));
	memset(out, 0, sizeof(out));
	stepv("rw_ioas2", access_rw(afd, iova + 5000, 6, out, 0), "same=%d", !memcmp(out, "hello", 6));
	step0("destroy_old_ioas", destroy(fd, ioas));
	step0("replace_same", replace_ioas(afd, ioas2));

	/* an access without pin support */
	step0("create_nopin", create_access(ioas2, 0, &afd2));
	step0("pages_nopin", access_pages(afd2, iova, PAGE, buf, 0, &id2));
	step0("rw_nopin", access_rw(afd2, iova, 4, out, 0));

	/* pin support needs PAGE_SIZE alignment of the IOAS */
	ioas_alloc(fd, &ioas3);
	step0("map_2k", ioas_map(fd, ioas3, buf + 2048, 2048, 0x300800));
	step0("create_unaligned_ioas", create_access(ioas3, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES, &afd3));
	step0("create_nopin_unaligned", create_access(ioas3, 0, &afd3));
	step0("map_2k_with_pin_access", ioas_map(fd, ioas2, buf + 2048, 2048, 0x300800));

	/* closing the file ends the access */
	stepv("pages_before_close", access_pages(afd, iova, PAGE, buf, 0, &id), "id=%u", id);
	close(afd);
	close(afd2);
	close(afd3);
	step0("destroy_ioas2_after_close", destroy_eventually(fd, ioas2));
	step0("refs_closed", check_refs(fd, buf, len, 0));
	step0("pages_closed_fd", access_pages(afd, iova, PAGE, buf, 0, &id));
	return 0;
}
