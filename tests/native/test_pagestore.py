"""The page store (native/pagestore.c): emulated pa, pin ranges, backings."""

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nativehelp import PAGE, Child, addr_of, ffi, lib, memfd_map, pattern

G1 = 1 << 30
MEM, PROC, NONE = lib.ICUSE_BACKING_MEM, lib.ICUSE_BACKING_PROC, lib.ICUSE_BACKING_NONE


@pytest.fixture
def store():
    st_ = lib.icuse_store_new()
    assert st_ != ffi.NULL
    yield st_
    lib.icuse_store_free(st_)


def new_pages(store, npages, align_offset=0):
    pa = ffi.new("uint64_t *")
    pid = lib.icuse_pages_new(store, npages, align_offset, pa)
    assert pid > 0
    return pid, pa[0]


def lookup(store, pa):
    pid, idx = ffi.new("int64_t *"), ffi.new("uint64_t *")
    rc = lib.icuse_pa_lookup(store, pa, pid, idx)
    return rc if rc else (pid[0], idx[0])


def pa_read(store, pa, n, fill=0xEE):
    buf = ffi.new("uint8_t[]", [fill] * n)
    rc = lib.icuse_pa_rw(store, pa, buf, n, 0)
    return rc, bytes(ffi.buffer(buf, n))


def pa_write(store, pa, data):
    return lib.icuse_pa_rw(store, pa, ffi.from_buffer(data), len(data), 1)


@pytest.mark.parametrize(
    "npages,align_offset",
    [
        (1, 0),
        (3, PAGE),
        (512, (2 << 20) + 5 * PAGE),
        (10, G1 - PAGE),
        (1 << 18, 7 * G1 + 123),
        (3 << 18, 0),
    ],
)
def test_pa_base_congruent_and_disjoint(store, npages, align_offset):
    a, pa_a = new_pages(store, 5)
    b, pa_b = new_pages(store, npages, align_offset)
    c, pa_c = new_pages(store, 1)
    assert 0 < a < b < c
    assert pa_b % G1 == (align_offset % G1) & ~(PAGE - 1)
    assert pa_a % PAGE == 0 and pa_b % PAGE == 0
    # Entries own disjoint pa ranges; pa resolves to (id, index).
    assert pa_a + 5 * PAGE <= pa_b and pa_b + npages * PAGE <= pa_c
    assert lookup(store, pa_b) == (b, 0)
    assert lookup(store, pa_b + (npages - 1) * PAGE + 4095) == (b, npages - 1)
    assert lookup(store, pa_b - 1) in ((a, 4), -errno.ENOENT)
    assert lookup(store, pa_b + npages * PAGE) in ((c, 0), -errno.ENOENT)
    assert lookup(store, pa_a + 4 * PAGE + 17) == (a, 4)
    assert lookup(store, 0) == -errno.ENOENT
    # Removing one leaves the others resolvable; pa is not handed out again.
    assert lib.icuse_pages_remove(store, b) == 0
    assert lookup(store, pa_b) == -errno.ENOENT
    assert lookup(store, pa_c) == (c, 0)
    d, pa_d = new_pages(store, npages, align_offset)
    assert pa_d > pa_c
    assert lookup(store, pa_d) == (d, 0)


def test_new_rejects(store):
    pa = ffi.new("uint64_t *")
    assert lib.icuse_pages_new(store, 0, 0, pa) == -errno.EINVAL
    assert lib.icuse_pages_new(store, 1 << 62, 0, pa) == -errno.EINVAL
    assert lib.icuse_pages_remove(store, 1) == -errno.ENOENT


def test_bad_ids_and_ranges(store):
    pid, _ = new_pages(store, 8)
    assert lib.icuse_pages_pin(store, pid + 1, 0, 1) == -errno.ENOENT
    assert lib.icuse_pages_pin(store, pid, 7, 2) == -errno.EINVAL
    assert lib.icuse_pages_pin(store, pid, 9, 0) == -errno.EINVAL
    assert lib.icuse_pages_pin(store, pid, 1 << 63, 1 << 63) == -errno.EINVAL
    assert lib.icuse_pages_pin(store, pid, 3, 0) == 0
    assert lib.icuse_pages_unpin(store, pid, 3, 0) == 0
    assert lib.icuse_pages_pin_count(store, pid, 8) == -errno.EINVAL
    assert lib.icuse_pages_pin_count(store, pid + 1, 0) == -errno.ENOENT
    assert lib.icuse_pages_set_backing(store, pid, 0, 1, 7, -1, 0) == -errno.EINVAL
    assert lib.icuse_pages_set_backing(store, pid, 0, 1, PROC, -1, 0) == -errno.EBADF
    assert lib.icuse_pages_set_backing(store, pid, 4, 5, MEM, -1, 0x10000) == -errno.EINVAL
    assert lib.icuse_pages_set_backing(store, pid + 1, 0, 1, MEM, -1, 0x10000) == -errno.ENOENT
    assert lib.icuse_store_pinned_pages(store) == 0


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(0, 1), st.integers(0, 40), st.integers(0, 24)),
        max_size=40,
    )
)
def test_pin_counts_model(ops):
    """Random pins and unpins over two entries against per-page counts."""
    store = lib.icuse_store_new()
    try:
        sizes = [48, 64]
        ids = [new_pages(store, n)[0] for n in sizes]
        model = [[0] * n for n in sizes]
        for pin, which, first, n in ops:
            counts = model[which]
            if first + n > len(counts):
                continue
            pages = counts[first : first + n]
            if pin:
                want = sum(1 for c in pages if c == 0)
                for i in range(first, first + n):
                    counts[i] += 1
                assert lib.icuse_pages_pin(store, ids[which], first, n) == want
            elif all(pages):
                want = sum(1 for c in pages if c == 1)
                for i in range(first, first + n):
                    counts[i] -= 1
                assert lib.icuse_pages_unpin(store, ids[which], first, n) == want
            else:
                # Some page is not pinned: refused, nothing changes.
                assert lib.icuse_pages_unpin(store, ids[which], first, n) == -errno.EINVAL
            for w in range(2):
                got = [lib.icuse_pages_pin_count(store, ids[w], i) for i in range(sizes[w])]
                assert got == model[w]
            assert lib.icuse_store_pinned_pages(store) == sum(c > 0 for m in model for c in m)
            for w in range(2):
                busy = any(model[w])
                # Removal is refused while pinned (and then harmless to try).
                if busy:
                    assert lib.icuse_pages_remove(store, ids[w]) == -errno.EBUSY
    finally:
        lib.icuse_store_free(store)


def test_pin_is_by_range(store):
    """A pages entry of 2^36 pages (256 TiB): pinning it whole and in pieces
    touches runs, not pages (a per-page store would take minutes here)."""
    n = 1 << 36
    pid, _ = new_pages(store, n)
    assert lib.icuse_pages_pin(store, pid, 0, n) == n
    assert lib.icuse_pages_pin(store, pid, 1000, n - 2000) == 0
    assert lib.icuse_pages_pin_count(store, pid, 999) == 1
    assert lib.icuse_pages_pin_count(store, pid, n // 2) == 2
    assert lib.icuse_pages_unpin(store, pid, 0, n) == 2000
    assert lib.icuse_store_pinned_pages(store) == n - 2000
    assert lib.icuse_pages_remove(store, pid) == -errno.EBUSY
    assert lib.icuse_pages_unpin(store, pid, 1000, n - 2000) == n - 2000
    assert lib.icuse_pages_unpin(store, pid, 5, 1) == -errno.EINVAL
    assert lib.icuse_pages_remove(store, pid) == 0
    assert lib.icuse_store_pinned_pages(store) == 0


def test_pin_enomem_changes_nothing(store):
    pid, _ = new_pages(store, 64)
    for i in range(0, 64, 4):
        lib.icuse_pages_pin(store, pid, i, 2)
    before = [lib.icuse_pages_pin_count(store, pid, i) for i in range(64)]
    try:
        for nth in (1, 2):
            lib.icuse_test_fail_nth_alloc(nth)
            rc = lib.icuse_pages_pin(store, pid, 1, 60)
            lib.icuse_test_fail_nth_alloc(0)
            assert rc == -errno.ENOMEM
            assert [lib.icuse_pages_pin_count(store, pid, i) for i in range(64)] == before
            assert lib.icuse_store_pinned_pages(store) == 32
    finally:
        lib.icuse_test_fail_nth_alloc(0)
    assert lib.icuse_pages_pin(store, pid, 1, 60) == 30


def test_remove_while_pinned(store):
    pid, pa = new_pages(store, 4)
    assert lib.icuse_pages_pin(store, pid, 3, 1) == 1
    assert lib.icuse_pages_remove(store, pid) == -errno.EBUSY
    assert lookup(store, pa) == (pid, 0)
    assert lib.icuse_pages_unpin(store, pid, 3, 1) == 1
    assert lib.icuse_pages_remove(store, pid) == 0
    assert lookup(store, pa) == -errno.ENOENT
    assert lib.icuse_pages_pin(store, pid, 0, 1) == -errno.ENOENT


def test_pa_rw_mem(store):
    n = 16
    a, b = memfd_map(8 * PAGE), memfd_map(8 * PAGE)
    pid, pa = new_pages(store, n)
    # Pages 0..7 in a, 8..15 in b; set in pieces that must merge or split right.
    assert lib.icuse_pages_set_backing(store, pid, 0, 4, MEM, -1, addr_of(a)) == 0
    assert lib.icuse_pages_set_backing(store, pid, 4, 12, MEM, -1, addr_of(a) + 4 * PAGE) == 0
    assert lib.icuse_pages_set_backing(store, pid, 8, 8, MEM, -1, addr_of(b)) == 0
    data = pattern(n * PAGE - 100, 1)
    # Nothing pinned yet.
    assert pa_write(store, pa + 50, data) == -errno.EFAULT
    assert a[:] == bytes(8 * PAGE)
    assert lib.icuse_pages_pin(store, pid, 0, n) == n
    assert pa_write(store, pa + 50, data) == 0
    assert (a[:] + b[:])[50 : 50 + len(data)] == data
    assert pa_read(store, pa + 50, len(data)) == (0, data)
    assert pa_read(store, pa + 7 * PAGE + 3, 2 * PAGE) == (
        0,
        (a[:] + b[:])[7 * PAGE + 3 : 9 * PAGE + 3],
    )
    # Beyond the entry: no pages there.
    assert pa_read(store, pa + n * PAGE - 1, 2)[0] == -errno.EFAULT
    # An unpinned page: a read copies nothing, a write stops before it.
    lib.icuse_pages_unpin(store, pid, 10, 1)
    assert pa_read(store, pa + 9 * PAGE, 3 * PAGE) == (-errno.EFAULT, b"\xee" * 3 * PAGE)
    assert pa_write(store, pa + 9 * PAGE, b"\x11" * 3 * PAGE) == -errno.EFAULT
    assert b[PAGE : 2 * PAGE] == b"\x11" * PAGE
    assert b[2 * PAGE : 4 * PAGE] == data[10 * PAGE - 50 : 12 * PAGE - 50]
    # A pinned page without a backing faults too.
    lib.icuse_pages_pin(store, pid, 10, 1)
    lib.icuse_pages_set_backing(store, pid, 12, 1, NONE, -1, 0)
    assert pa_read(store, pa + 12 * PAGE, 1)[0] == -errno.EFAULT
    assert pa_read(store, pa + 11 * PAGE, PAGE) == (0, b[3 * PAGE : 4 * PAGE])
    lib.icuse_pages_unpin(store, pid, 0, n)
    assert lib.icuse_pages_remove(store, pid) == 0
    a.close()
    b.close()


@pytest.fixture
def child():
    c = Child(16 * PAGE)
    yield c
    c.close()


def test_pa_rw_proc(store, child):
    pid, pa = new_pages(store, 16)
    assert lib.icuse_pages_set_backing(store, pid, 0, 16, PROC, child.fd, child.addr) == 0
    lib.icuse_pages_pin(store, pid, 0, 16)
    data = pattern(5 * PAGE + 7, 2)
    assert pa_write(store, pa + PAGE - 3, data) == 0
    assert child.get(PAGE - 3, len(data)) == data
    child.set(9 * PAGE + 1, b"from the child")
    assert pa_read(store, pa + 9 * PAGE + 1, 14) == (0, b"from the child")
    # A range the owner unmapped is out of reach: -ESRCH, not other memory.
    child.unmap(12 * PAGE, PAGE)
    assert pa_read(store, pa + 12 * PAGE, 8)[0] == -errno.ESRCH
    assert pa_write(store, pa + 12 * PAGE, b"x") == -errno.ESRCH
    assert pa_read(store, pa + 11 * PAGE, 8) == (0, bytes(8))
    # Mixed backings in one transfer: page 15 in the daemon's memory.
    m = memfd_map(PAGE)
    m[:4] = b"MEM!"
    lib.icuse_pages_set_backing(store, pid, 15, 1, MEM, -1, addr_of(m))
    child.set(15 * PAGE - 4, b"PRC!")
    assert pa_read(store, pa + 15 * PAGE - 4, 8) == (0, b"PRC!MEM!")
    # The owner dies: its pages fault, the daemon's page still works.
    child.kill()
    assert pa_read(store, pa, 8)[0] == -errno.ESRCH
    assert pa_write(store, pa, b"late") == -errno.ESRCH
    assert pa_read(store, pa + 15 * PAGE, 4) == (0, b"MEM!")
    lib.icuse_pages_unpin(store, pid, 0, 16)
    m.close()


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 31), st.integers(1, 32), st.integers(-1, 32)),
        min_size=1,
        max_size=12,
    )
)
def test_backing_runs_model(ops):
    """Backings set over overlapping page ranges: every page reads the memory
    of the last setting that covered it (runs split, shift and merge right).
    Memory page k of the source holds the byte k + 1 throughout."""
    src = memfd_map(64 * PAGE)
    for k in range(64):
        src[k * PAGE : (k + 1) * PAGE] = bytes([k + 1]) * PAGE
    store = lib.icuse_store_new()
    try:
        pid, pa = new_pages(store, 32)
        lib.icuse_pages_pin(store, pid, 0, 32)
        model = [None] * 32
        for first, n, off in ops:
            n = min(n, 32 - first)
            if off < 0:
                rc = lib.icuse_pages_set_backing(store, pid, first, n, NONE, -1, 0)
            else:
                rc = lib.icuse_pages_set_backing(store, pid, first, n, MEM, -1, addr_of(src) + off * PAGE)
            assert rc == 0
            for i in range(n):
                model[first + i] = None if off < 0 else off + i
        for i, k in enumerate(model):
            rc, data = pa_read(store, pa + i * PAGE, PAGE)
            if k is None:
                assert rc == -errno.EFAULT
            else:
                assert (rc, data) == (0, bytes([k + 1]) * PAGE)
        lib.icuse_pages_unpin(store, pid, 0, 32)
    finally:
        lib.icuse_store_free(store)
        src.close()
