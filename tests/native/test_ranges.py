"""IOVA range lists (native/ranges.c) against direct models: the kernel's
in-order overlap check of ALLOW_IOVAS, and the first-fit IOVA search."""

import ctypes
import errno
import mmap
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from nativehelp import ffi, lib

from iommufd_cuse.iommufd.io_pagetable import IoPagetable

ranges_st = st.lists(st.tuples(st.integers(0, 60), st.integers(-3, 10)), max_size=14).map(
    lambda r: [(s, max(0, s + d)) for s, d in r]
)


def first_bad(ranges):
    """The kernel's loop: each range non-empty and missing every earlier one."""
    accepted = []
    for i, (s, last) in enumerate(ranges):
        if s >= last or any(a <= last and s <= b for a, b in accepted):
            return i
        accepted.append((s, last))
    return len(ranges)


def words(pairs):
    return ffi.new("uint64_t[]", [x for p in pairs for x in p] or [0])


@given(ranges_st)
@settings(max_examples=400, deadline=None)
def test_ranges_check_is_the_kernels_first_failure(ranges):
    out = ffi.new("uint64_t[]", max(1, 2 * len(ranges)))
    got = lib.icuse_ranges_check(words(ranges), len(ranges), out)
    assert got == first_bad(ranges)
    if got == len(ranges):
        assert [(out[2 * i], out[2 * i + 1]) for i in range(len(ranges))] == sorted(ranges)


def test_ranges_check_a_million_disjoint_ranges():
    n = 1 << 20
    buf = ffi.new("uint64_t[]", 2 * n)
    for i in range(n):  # reversed order: the sort does the work
        buf[2 * i], buf[2 * i + 1] = (n - i) * 16, (n - i) * 16 + 8
    assert lib.icuse_ranges_check(buf, n, ffi.NULL) == n
    buf[2 * (n - 1) + 1] = n * 16  # the last one now reaches the first: it is the bad one
    assert lib.icuse_ranges_check(buf, n, ffi.NULL) == n - 1


def first_fit(windows, used, length, align):
    """Every candidate address, lowest first: the slow obvious answer."""
    for ws, we in windows:
        for a in range(ws, we + 1):
            if a % align or a + length - 1 > we:
                continue
            if all(a + length - 1 < s or a > e for s, e in used):
                return a
    return None


@given(
    st.lists(st.integers(0, 150), min_size=0, max_size=8, unique=True),
    st.lists(st.tuples(st.integers(0, 150), st.integers(0, 12)), max_size=6),
    st.integers(1, 20),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 20),
    st.integers(100, 170),
)
@settings(max_examples=400, deadline=None)
def test_iova_alloc_is_first_fit(points, used, length, align, lo, hi):
    points = sorted(points)[: len(points) // 2 * 2]
    windows = [(points[i], points[i + 1]) for i in range(0, len(points), 2)]
    used = IoPagetable._merge([(s, s + d) for s, d in used])  # the input the daemon passes: sorted, merged
    out = ffi.new("uint64_t *")
    rc = lib.icuse_iova_alloc(words(windows), len(windows), words(used), len(used), lo, hi, length, align, 0, out)
    want = first_fit([(max(s, lo), min(e, hi)) for s, e in windows], used, length, align)
    assert (rc, out[0] if rc == 0 else None) == ((0, want) if want is not None else (rc, None))
    if want is None:
        assert rc == -errno.ENOSPC


def test_check_zero_and_clear_stop_at_the_guard_page():
    pid = os.getpid()
    m = mmap.mmap(-1, 3 * 4096)
    base = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
    libc = ctypes.CDLL(None)
    assert libc.mprotect(ctypes.c_void_p(base + 2 * 4096), 4096, 0) == 0  # a PROT_NONE guard page
    m[:8192] = b"\x01" * 8192
    assert lib.icuse_vm_clear(pid, base + 100, 8192 - 100) == 0
    assert m[:100] == b"\x01" * 100 and not any(m[100:8192])
    assert lib.icuse_vm_check_zero(pid, base + 100, 8192 - 100) == 0
    assert lib.icuse_vm_check_zero(pid, base, 8192) == 1
    assert lib.icuse_vm_check_zero(pid, base + 100, 1 << 32) == -errno.EFAULT  # EFAULT at the guard page
    m[5000] = 7
    assert lib.icuse_vm_check_zero(pid, base + 100, 1 << 32) == 1  # the non-zero byte before the fault wins
    assert lib.icuse_vm_clear(pid, base + 4096, 1 << 32) == -errno.EFAULT
    assert not any(m[4096:8192])  # cleared up to the fault
    assert lib.icuse_vm_check_zero(pid, (1 << 64) - 8, 16) == -errno.EFAULT
    libc.mprotect(ctypes.c_void_p(base + 2 * 4096), 4096, 3)
