"""The I/O page table (native/pagetable.c) against a model.

The model keeps the leaves themselves ({start: [size, pa, prot, A, D]}) and
applies the documented policy: map uses the largest leaf that pgsize_bitmap,
the alignment of iova and pa, and the remaining length allow; unmap splits a
straddling leaf into leaves of the next smaller allowed size (same pa, prot,
A/D) until the edge is a boundary, then removes whole leaves; empty tables are
freed. From its leaves the model also knows how many tables the tree needs.
"""

import errno
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nativehelp import PA0, RW, R, W, ffi, lib

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
K2, M1 = 1 << 11, 1 << 20


class Model:
    def __init__(self, gs, bitmap, bits):
        self.gs = gs
        self.gran = 1 << gs
        self.bits = bits
        self.levels = (bits - gs + 8) // 9
        self.max = (1 << bits) - 1
        self.sizes = [1 << (gs + 9 * k) for k in range(self.levels) if bitmap >> (gs + 9 * k) & 1]
        self.leaves = {}

    def find(self, iova):
        for s in self.sizes:
            leaf = self.leaves.get(iova & ~(s - 1))
            if leaf is not None and leaf[0] == s:
                return iova & ~(s - 1), leaf
        return None

    def overlapping(self, iova, end):
        return sorted(s for s, leaf in self.leaves.items() if s < end and s + leaf[0] > iova)

    def map(self, iova, pa, length, prot):
        end = iova + length
        if self.overlapping(iova, end):
            return -errno.EEXIST
        cur = iova
        while cur < end:
            p = pa + cur - iova
            s = max(s for s in self.sizes if cur % s == 0 and p % s == 0 and end - cur >= s)
            self.leaves[cur] = [s, p, prot, False, False]
            cur += s
        return 0

    def split_at(self, a):
        while True:
            found = self.find(a)
            if found is None or found[0] == a:
                return
            start, (s, pa, prot, acc, dirty) = found
            del self.leaves[start]
            c = max(x for x in self.sizes if x < s)
            for off in range(0, s, c):
                self.leaves[start + off] = [c, pa + off, prot, acc, dirty]

    def unmap(self, iova, length):
        end = iova + length
        self.split_at(iova)
        if end <= self.max:
            self.split_at(end)
        gone = self.overlapping(iova, end)
        n = sum(self.leaves[s][0] for s in gone)
        for s in gone:
            del self.leaves[s]
        return n

    def translate(self, iova, length, access):
        """(nsegs, segs) or (-errno, fault_iova)."""
        segs, touched, cur, end = [], [], iova, iova + length
        while cur < end:
            found = self.find(cur) if cur <= self.max else None
            if found is None:
                return -errno.ENOENT, cur
            start, leaf = found
            if access & ~leaf[2]:
                return -errno.EACCES, cur
            n = min(start + leaf[0], end) - cur
            pa = leaf[1] + cur - start
            if segs and segs[-1][0] + segs[-1][1] == pa:
                segs[-1][1] += n
            else:
                segs.append([pa, n])
            touched.append(leaf)
            cur += n
        for leaf in touched:
            leaf[3] = True
            if access & W:
                leaf[4] = True
        return len(segs), segs

    def dirty(self, iova, length, ps, no_clear):
        end, bits = iova + length, set()
        for s, leaf in self.leaves.items():
            if leaf[4] and s < end and s + leaf[0] > iova:
                a, b = max(s, iova), min(s + leaf[0], end) - 1
                bits.update(range((a - iova) // ps, (b - iova) // ps + 1))
                if not no_clear and s >= iova and s + leaf[0] <= end:
                    leaf[4] = False
        return bits

    def tables(self):
        t = {(self.levels - 1, 0)}
        for s, leaf in self.leaves.items():
            k = (leaf[0].bit_length() - 1 - self.gs) // 9
            for j in range(k, self.levels - 1):
                t.add((j, s >> (self.gs + 9 * (j + 1))))
        return len(t)


def stats(pt):
    s = ffi.new("struct icuse_pt_stats *")
    lib.icuse_pt_get_stats(pt, s)
    return s.tables, s.leaves, s.mapped_bytes


def walk(pt, iova):
    info = ffi.new("struct icuse_pte_info *")
    rc = lib.icuse_pt_walk(pt, iova, info)
    if rc:
        return rc
    return info.pa, info.leaf_size, info.prot, info.flags


def translate(pt, iova, length, access, max_segs=64):
    segs = ffi.new("struct icuse_seg[]", max(max_segs, 1))
    fault = ffi.new("uint64_t *", 0xDEAD)
    n = lib.icuse_pt_translate(pt, iova, length, access, segs, max_segs, fault)
    if n == -errno.ENOENT or n == -errno.EACCES:
        return n, fault[0]
    if n < 0:
        return n, None
    return n, [[segs[i].pa, segs[i].len] for i in range(n)]


def dirty(pt, iova, length, ps, no_clear):
    npages = -(-length // ps)
    bm = ffi.new("uint64_t[]", (npages + 63) // 64 + 1)
    rc = lib.icuse_pt_read_and_clear_dirty(pt, iova, length, ps, bm, no_clear)
    bits = {i for i in range(len(bm) * 64) if bm[i // 64] >> (i % 64) & 1}
    return rc, bits


def expect_leaf(pt, m, iova):
    found = m.find(iova) if iova <= m.max else None
    got = walk(pt, iova)
    if found is None:
        assert got == -errno.ENOENT, hex(iova)
        return
    start, (size, pa, prot, acc, dirt) = found
    flags = (lib.ICUSE_PTE_ACCESSED if acc else 0) | (lib.ICUSE_PTE_DIRTY if dirt else 0)
    assert got == (pa + iova - start, size, prot, flags), hex(iova)


def check_stats(pt, m):
    assert stats(pt) == (m.tables(), len(m.leaves), sum(v[0] for v in m.leaves.values()))


def check_all(pt, m):
    check_stats(pt, m)
    for s, leaf in m.leaves.items():
        for probe in (s, s + leaf[0] - m.gran, s + leaf[0], s - m.gran):
            if 0 <= probe <= m.max:
                expect_leaf(pt, m, probe)


@pytest.fixture
def make_pt():
    pts = []

    def make(gs, bitmap, bits):
        pt = lib.icuse_pt_alloc(gs, bitmap, bits)
        assert pt != ffi.NULL
        pts.append(pt)
        return pt

    yield make
    for pt in pts:
        lib.icuse_pt_free(pt)


CONFIGS = [
    (12, K4 | M2 | G1, 39),
    (12, K4 | M2 | G1, 64),
    # (4 KiB | 1 GiB, where a split makes 2^18 leaves, is test_split_without_middle_size.)
    (12, K4, 32),
    (11, K2 | M1, 32),  # the kernel mock's huge pages
    (11, K2, 24),
]


def leaf_estimate(m, iova, pa, length):
    """Upper bound of leaves a map makes (to keep examples small)."""
    d = pa - iova
    big = max((s for s in m.sizes if d % s == 0), default=m.gran)
    if big == m.gran:
        return length // big
    return length // big + 2 * 511 * (len(m.sizes) - 1)


@pytest.mark.parametrize("gs,bitmap,bits", CONFIGS)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_model(gs, bitmap, bits, data):
    pt = lib.icuse_pt_alloc(gs, bitmap, bits)
    m = Model(gs, bitmap, bits)
    gran = m.gran
    units = sorted({gran} | set(m.sizes) | {1 << (gs + 9 * k) for k in range(min(m.levels, 3))})
    region = 8 * max(u for u in units if 8 * u <= 1 << bits)
    base = data.draw(st.sampled_from([0, (1 << bits) - region]), label="base")

    def addr():
        u = data.draw(st.sampled_from(units))
        return base + data.draw(st.integers(0, 7)) * u + data.draw(st.integers(0, 2)) * gran

    def length(at):
        u = data.draw(st.sampled_from(units))
        n = data.draw(st.integers(0, 2)) * u + data.draw(st.integers(0, 2)) * gran
        n = max(n, gran)
        return min(n, base + region - at)

    try:
        for _ in range(data.draw(st.integers(1, 30), label="nops")):
            op = data.draw(st.sampled_from(["map", "map", "unmap", "translate", "translate", "dirty"]))
            iova = addr()
            if iova >= base + region:
                continue
            n = length(iova)
            if op == "map":
                d = data.draw(st.sampled_from([0, gran, -gran, 0] + units))
                pa = PA0 + (iova - base) + d
                if leaf_estimate(m, iova, pa, n) > 3000:
                    pa = PA0 + (iova - base)  # keep examples small: share alignment
                prot = data.draw(st.sampled_from([R, W, RW, 0]))
                assert lib.icuse_pt_map(pt, iova, pa, n, prot) == m.map(iova, pa, n, prot)
            elif op == "unmap":
                assert lib.icuse_pt_unmap(pt, iova, n) == m.unmap(iova, n)
            elif op == "translate":
                off = data.draw(st.integers(0, gran - 1))
                n = max(1, n - data.draw(st.integers(0, gran - 1)))
                n = min(n, base + region - iova - off)
                access = data.draw(st.sampled_from([R, W, RW]))
                want = m.translate(iova + off, n, access)
                if want[0] > 3:
                    # Too many segments: nothing happens, A/D untouched.
                    assert translate(pt, iova + off, n, access, 3) == (-errno.ENOSPC, None)
                    assert translate(pt, iova + off, n, access, 64) == want
                else:
                    assert translate(pt, iova + off, n, access) == want
            else:
                ps = data.draw(st.sampled_from([gran, 2 * gran, 1 << (gs + 9)]))
                no_clear = data.draw(st.booleans())
                want = m.dirty(iova, n, ps, no_clear)
                assert dirty(pt, iova, n, ps, no_clear) == (len(want), want)
            if len(m.leaves) < 300:
                check_all(pt, m)
            else:
                check_stats(pt, m)
                expect_leaf(pt, m, iova)
                expect_leaf(pt, m, max(iova, iova + n - gran) & ~(gran - 1))
        check_all(pt, m)
        # Unmapping everything frees every table but the root.
        assert lib.icuse_pt_unmap(pt, base, region) == m.unmap(base, region)
        assert stats(pt) == (1, 0, 0)
    finally:
        lib.icuse_pt_free(pt)


def test_alloc_rejects_bad_geometry():
    assert lib.icuse_pt_alloc(12, K2 | M2, 48) == ffi.NULL  # no granule in the bitmap
    assert lib.icuse_pt_alloc(8, 1 << 8, 48) == ffi.NULL  # granule too small for flags
    assert lib.icuse_pt_alloc(12, K4, 12) == ffi.NULL
    assert lib.icuse_pt_alloc(12, K4, 65) == ffi.NULL
    for gs, bits in ((12, 13), (12, 64), (11, 64), (11, 20)):
        pt = lib.icuse_pt_alloc(gs, 1 << gs, bits)
        assert pt != ffi.NULL
        lib.icuse_pt_free(pt)


def test_einval(make_pt):
    pt = make_pt(12, K4 | M2, 39)
    E = -errno.EINVAL
    assert lib.icuse_pt_map(pt, 0, PA0, 0, R) == E  # zero length
    assert lib.icuse_pt_map(pt, 0x800, PA0, K4, R) == E  # iova
    assert lib.icuse_pt_map(pt, 0, PA0 + 0x800, K4, R) == E  # pa
    assert lib.icuse_pt_map(pt, 0, PA0, 0x1800, R) == E  # length
    assert lib.icuse_pt_map(pt, 0, PA0, K4, 4) == E  # unknown prot bit
    assert lib.icuse_pt_map(pt, 1 << 39, PA0, K4, R) == E  # beyond iova_bits
    assert lib.icuse_pt_map(pt, (1 << 39) - K4, PA0, 2 * K4, R) == E  # ends beyond
    assert lib.icuse_pt_map(pt, 0, (1 << 64) - K4, 2 * K4, R) == E  # pa wraps
    assert lib.icuse_pt_unmap(pt, 0, 0) == E
    assert lib.icuse_pt_unmap(pt, 0x800, K4) == E
    assert lib.icuse_pt_unmap(pt, (1 << 39) - K4, 2 * K4) == E
    bm = ffi.new("uint64_t[4]")
    assert lib.icuse_pt_read_and_clear_dirty(pt, 0, K4, 0x800, bm, 0) == E  # page < granule
    assert lib.icuse_pt_read_and_clear_dirty(pt, 0, 3 * K4, 3 * K4, bm, 0) == E  # not 2^n
    assert lib.icuse_pt_read_and_clear_dirty(pt, 0, 0, K4, bm, 0) == E
    assert translate(pt, 0, K4, 0) == (E, None)
    assert translate(pt, 0, K4, 4) == (E, None)
    assert translate(pt, (1 << 64) - K4, 2 * K4, R) == (E, None)  # wraps
    assert stats(pt) == (1, 0, 0)


def test_eexist_changes_nothing(make_pt):
    pt = make_pt(12, K4 | M2 | G1, 48)
    assert lib.icuse_pt_map(pt, 4 * M2 + K4, PA0, K4, R) == 0
    before = stats(pt)
    # A big map whose last granule collides: nothing of it may appear.
    assert lib.icuse_pt_map(pt, 0, PA0, 4 * M2 + 2 * K4, RW) == -errno.EEXIST
    assert stats(pt) == before
    assert walk(pt, 0) == -errno.ENOENT
    assert walk(pt, 4 * M2) == -errno.ENOENT
    assert lib.icuse_pt_map(pt, 0, PA0, 4 * M2 + K4, RW) == 0


@pytest.mark.parametrize("bits", [32, 39, 48, 57, 64])
def test_iova_bits_limits(make_pt, bits):
    pt = make_pt(12, K4 | M2 | G1, bits)
    top = (1 << bits) - K4
    big = (1 << bits) - 2 * M2
    assert lib.icuse_pt_map(pt, top, PA0 + 3 * M2 - K4, K4, RW) == 0
    assert walk(pt, top + K4 - 1) == (PA0 + 3 * M2 - 1, K4, RW, 0)
    assert lib.icuse_pt_map(pt, big, PA0 + M2, M2, R) == 0
    assert lib.icuse_pt_map(pt, big + M2, PA0 + 2 * M2, M2 - K4, RW) == 0
    assert walk(pt, big)[1] == M2
    assert stats(pt)[1:] == (1 + 511 + 1, 2 * M2)
    assert translate(pt, big, 2 * M2, R) == (1, [[PA0 + M2, 2 * M2]])
    if bits < 64:
        assert walk(pt, 1 << bits) == -errno.ENOENT
        assert translate(pt, top, 2 * K4, R) == (-errno.ENOENT, 1 << bits)
        assert lib.icuse_pt_map(pt, 1 << bits, PA0, K4, R) == -errno.EINVAL
    assert lib.icuse_pt_unmap(pt, big, 2 * M2) == 2 * M2
    assert stats(pt) == (1, 0, 0)


def test_largest_leaf(make_pt):
    pt = make_pt(12, K4 | M2 | G1, 48)
    assert lib.icuse_pt_map(pt, G1, PA0, G1, R) == 0
    assert stats(pt) == (2, 1, G1)
    # pa only 2 MiB aligned: 2 MiB leaves, whatever the iova.
    assert lib.icuse_pt_map(pt, 2 * G1, PA0 + 2 * G1 + M2, G1, R) == 0
    assert stats(pt)[1] == 1 + 512
    # iova only 4 KiB aligned: 4 KiB leaves up to the first 2 MiB boundary, then
    # 2 MiB leaves, then 4 KiB again for the tail.
    assert lib.icuse_pt_map(pt, 4 * G1 + K4, PA0 + 8 * G1 + K4, 2 * M2, R) == 0
    assert stats(pt)[1] == 1 + 512 + 511 + 1 + 1
    assert walk(pt, 4 * G1 + M2)[1] == M2
    assert walk(pt, 4 * G1 + 2 * M2)[1] == K4
    # Leaf sizes not in the bitmap are never used.
    pt2 = make_pt(12, K4 | G1, 48)
    assert lib.icuse_pt_map(pt2, M2, PA0 + M2, 4 * M2, R) == 0
    assert stats(pt2)[1] == 4 * 512


def test_mock_huge_pages(make_pt):
    """The kernel's mock domain: 2 KiB granule, 1 MiB huge leaves."""
    pt = make_pt(11, K2 | M1, 32)
    assert lib.icuse_pt_map(pt, M1 - K2, PA0 + M1 - K2, M1 + 2 * K2, RW) == 0
    assert [walk(pt, a)[1] for a in (M1 - K2, M1, 2 * M1)] == [K2, M1, K2]
    assert stats(pt) == (4, 3, M1 + 2 * K2)
    assert lib.icuse_pt_unmap(pt, M1 + 5 * K2, K2) == K2  # splits the 1 MiB leaf
    assert stats(pt)[1] == 2 + 511
    assert walk(pt, M1 + 6 * K2) == (PA0 + M1 + 6 * K2, K2, RW, 0)


def test_split_without_middle_size(make_pt):
    """A 1 GiB leaf split where 2 MiB is not allowed: tables of 4 KiB leaves."""
    pt = make_pt(12, K4 | G1, 39)
    assert lib.icuse_pt_map(pt, G1, PA0, G1, R) == 0
    assert translate(pt, G1, K4, W) == (-errno.EACCES, G1)
    assert translate(pt, G1, K4, R)[0] == 1
    assert lib.icuse_pt_unmap(pt, G1 + 5 * K4, K4) == K4
    assert stats(pt) == (1 + 1 + 512, 512 * 512 - 1, G1 - K4)
    # Every piece keeps its pa, prot and the accessed bit.
    acc = lib.ICUSE_PTE_ACCESSED
    assert walk(pt, G1 + 3 * M2 + 7 * K4) == (PA0 + 3 * M2 + 7 * K4, K4, R, acc)
    assert walk(pt, G1 + 5 * K4) == -errno.ENOENT
    assert lib.icuse_pt_unmap(pt, 0, 4 * G1) == G1 - K4
    assert stats(pt) == (1, 0, 0)


def test_unmap_returns_only_mapped_bytes(make_pt):
    pt = make_pt(12, K4 | M2 | G1, 48)
    assert lib.icuse_pt_unmap(pt, 0, G1) == 0
    lib.icuse_pt_map(pt, M2, PA0, M2, R)
    lib.icuse_pt_map(pt, 8 * M2 + K4, PA0 + G1, K4, R)
    assert lib.icuse_pt_unmap(pt, 0, G1) == M2 + K4
    assert stats(pt) == (1, 0, 0)


def test_enomem_rolls_back(make_pt):
    pt = make_pt(12, K4 | M2, 48)
    lib.icuse_pt_map(pt, 0, PA0, K4, R)
    base = stats(pt)
    try:
        # A map needing 3 new tables at different levels; fail each in turn.
        for nth in range(1, 10):
            lib.icuse_test_fail_nth_alloc(nth)
            rc = lib.icuse_pt_map(pt, G1 * 700 + M2 - K4, PA0 + M2 - K4, M2 + 2 * K4, RW)
            lib.icuse_test_fail_nth_alloc(0)
            if rc == 0:
                break
            assert rc == -errno.ENOMEM
            assert stats(pt) == base
            assert walk(pt, G1 * 700 + M2) == -errno.ENOENT
        assert nth == 5 and rc == 0  # tables at levels 2, 1, and two at 0
        # The split of unmap needs a table: on failure nothing is unmapped.
        lib.icuse_pt_unmap(pt, G1 * 700 + M2 - K4, K4)
        before = stats(pt)
        lib.icuse_test_fail_nth_alloc(1)
        assert lib.icuse_pt_unmap(pt, G1 * 700 + M2 + K4, K4) == -errno.ENOMEM
        lib.icuse_test_fail_nth_alloc(0)
        assert stats(pt) == before
        assert walk(pt, G1 * 700 + M2 + K4) == (PA0 + M2 + K4, M2, RW, 0)
    finally:
        lib.icuse_test_fail_nth_alloc(0)


def test_translate_segments_and_bits(make_pt):
    pt = make_pt(12, K4 | M2, 39)
    # Two pieces contiguous in pa (one segment), then a jump, then read-only.
    lib.icuse_pt_map(pt, 0, PA0, M2, RW)
    lib.icuse_pt_map(pt, M2, PA0 + M2, 2 * K4, RW)
    lib.icuse_pt_map(pt, M2 + 2 * K4, PA0 + G1, K4, RW)
    lib.icuse_pt_map(pt, M2 + 3 * K4, PA0 + 2 * G1, K4, R)
    assert translate(pt, 100, M2 + 3 * K4 - 100, W) == (
        2,
        [[PA0 + 100, M2 + 2 * K4 - 100], [PA0 + G1, K4]],
    )
    acc, dirt = lib.ICUSE_PTE_ACCESSED, lib.ICUSE_PTE_DIRTY
    assert walk(pt, 0)[3] == acc | dirt and walk(pt, M2 + K4)[3] == acc | dirt
    # A fault anywhere: no bits set anywhere.
    assert translate(pt, M2 + 2 * K4, 2 * K4, W) == (-errno.EACCES, M2 + 3 * K4)
    assert walk(pt, M2 + 2 * K4)[3] == acc | dirt  # from before
    assert walk(pt, M2 + 3 * K4)[3] == 0
    assert translate(pt, M2 + 3 * K4 + 5, 2 * K4, R) == (-errno.ENOENT, M2 + 4 * K4)
    assert walk(pt, M2 + 3 * K4)[3] == 0
    assert translate(pt, M2 + 3 * K4, K4, R) == (1, [[PA0 + 2 * G1, K4]])
    assert walk(pt, M2 + 3 * K4)[3] == acc
    # Not enough room for the segments: -ENOSPC, nothing marked.
    lib.icuse_pt_map(pt, 4 * M2, PA0 + 5 * G1, K4, RW)
    lib.icuse_pt_map(pt, 4 * M2 + K4, PA0 + 3 * G1, K4, RW)
    assert translate(pt, 4 * M2, 2 * K4, R, 1) == (-errno.ENOSPC, None)
    assert walk(pt, 4 * M2)[3] == 0
    assert translate(pt, 4 * M2, 0, R) == (0, [])


def test_dirty_bitmap(make_pt):
    pt = make_pt(12, K4 | M2, 39)
    lib.icuse_pt_map(pt, 0, PA0, 4 * M2, RW)  # 2 MiB leaves
    lib.icuse_pt_map(pt, 4 * M2, PA0 + G1 + K4, 128 * K4, RW)  # 4 KiB leaves
    translate(pt, M2 + 5, 1, W)  # dirties the whole second 2 MiB leaf
    translate(pt, 4 * M2 + 65 * K4, 2 * K4, W)
    translate(pt, 0, K4, R)  # accessed only
    # 4 KiB pages of [M2 - 8K, M2 + 8K): the leaf covers pages 2, 3.
    assert dirty(pt, M2 - 2 * K4, 4 * K4, K4, 1) == (2, {2, 3})
    # The query covers part of the leaf only: its D stays (not lost).
    assert dirty(pt, M2 - 2 * K4, 4 * K4, K4, 0) == (2, {2, 3})
    assert walk(pt, M2)[3] & lib.ICUSE_PTE_DIRTY
    # Bit n of word n / 64: pages 512..1023 of the range from 0.
    rc, bits = dirty(pt, 0, 4 * M2 + 128 * K4, K4, 1)
    assert rc == 512 + 2 and bits == set(range(512, 1024)) | {2048 + 65, 2048 + 66}
    # Pages larger than leaves: page size 2 MiB, a 4 KiB dirty leaf sets its page.
    assert dirty(pt, 0, 6 * M2, M2, 1) == (2, {1, 4})
    # Clear, then nothing is left.
    assert dirty(pt, 0, 4 * M2 + 128 * K4, K4, 0)[0] == 512 + 2
    assert dirty(pt, 0, 4 * M2 + 128 * K4, K4, 0) == (0, set())
    assert walk(pt, 0)[3] == lib.ICUSE_PTE_ACCESSED


def test_dirty_bitmap_word_layout(make_pt):
    pt = make_pt(12, K4, 32)
    lib.icuse_pt_map(pt, 0, PA0, 200 * K4, RW)
    for page in (0, 63, 64, 130):
        translate(pt, page * K4, 1, W)
    bm = ffi.new("uint64_t[4]")
    bm[3] = 0xFFFF  # a bitmap is ORed into, never cleared
    assert lib.icuse_pt_read_and_clear_dirty(pt, 0, 200 * K4, K4, bm, 0) == 4
    assert list(bm) == [1 | 1 << 63, 1, 1 << 2, 0xFFFF]


def test_concurrent_translate_while_mapping(make_pt):
    """Readers translate while a writer maps and unmaps next to them: every
    translate sees a consistent table (the mapped page, never torn state)."""
    pt = make_pt(12, K4 | M2, 39)
    lib.icuse_pt_map(pt, 0, PA0, M2, RW)
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            got = translate(pt, 0, M2, W)
            if got != (1, [[PA0, M2]]):
                errors.append(got)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(300):
        assert lib.icuse_pt_map(pt, M2 + i % 7 * K4, PA0 + G1, K4, R) == 0
        assert lib.icuse_pt_unmap(pt, M2, 2 * M2) == K4
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert stats(pt) == (2, 1, M2)


def test_mark_dirty_marks_read_only_leaves_too():
    """icuse_pt_mark_dirty (the selftest's DIRTY op) sets D on any present leaf, as the
    kernel's mock does; translate for a write would refuse a read-only one."""
    pt = lib.icuse_pt_alloc(12, 0x1000, 39)
    try:
        assert lib.icuse_pt_map(pt, 0x10000, 0x100000, 0x2000, lib.ICUSE_PROT_READ) == 0
        info = ffi.new("struct icuse_pte_info *")
        assert lib.icuse_pt_mark_dirty(pt, 0x11000) == 0
        assert lib.icuse_pt_walk(pt, 0x11000, info) == 0 and info.flags & lib.ICUSE_PTE_DIRTY
        assert lib.icuse_pt_walk(pt, 0x10000, info) == 0 and not info.flags & lib.ICUSE_PTE_DIRTY
        assert lib.icuse_pt_mark_dirty(pt, 0x20000) == -errno.ENOENT
    finally:
        lib.icuse_pt_free(pt)
