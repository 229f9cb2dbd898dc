"""Device DMA through a page table into the page store (native/dma.c)."""

import errno
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from nativehelp import PAGE, RW, Child, R, W, addr_of, ffi, lib, memfd_map, pattern

M2, G1 = 1 << 21, 1 << 30
MEM, PROC = lib.ICUSE_BACKING_MEM, lib.ICUSE_BACKING_PROC


class World:
    """A store, page tables, and memory mapped through them."""

    def __init__(self):
        self.st = lib.icuse_store_new()
        self.pts = []
        self.maps = []
        self.children = []

    def pt(self, bitmap=PAGE | M2 | G1):
        pt = lib.icuse_pt_alloc(12, bitmap, 48)
        self.pts.append(pt)
        return pt

    def pages(self, npages, iova=0, kind=MEM, pin=True):
        """A pages entry backed by fresh memory; returns (id, pa, memory)
        where memory is an mmap (MEM) or a Child (PROC)."""
        pa = ffi.new("uint64_t *")
        pid = lib.icuse_pages_new(self.st, npages, iova, pa)
        assert pid > 0
        if kind == MEM:
            mem = memfd_map(npages * PAGE)
            self.maps.append(mem)
            rc = lib.icuse_pages_set_backing(self.st, pid, 0, npages, MEM, -1, addr_of(mem))
        else:
            mem = Child(npages * PAGE)
            self.children.append(mem)
            rc = lib.icuse_pages_set_backing(self.st, pid, 0, npages, PROC, mem.fd, mem.addr)
        assert rc == 0
        if pin:
            assert lib.icuse_pages_pin(self.st, pid, 0, npages) == npages
        return pid, pa[0], mem

    def mapped(self, pt, iova, npages, kind=MEM, prot=RW):
        pid, pa, mem = self.pages(npages, iova, kind)
        assert lib.icuse_pt_map(pt, iova, pa, npages * PAGE, prot) == 0
        return pid, pa, mem

    def rw(self, pt, iova, data_or_len, write):
        fault = ffi.new("uint64_t *", 0xDEAD)
        if write:
            buf = ffi.from_buffer(data_or_len)
            n = len(data_or_len)
        else:
            n = data_or_len
            buf = ffi.new("uint8_t[]", [0xEE] * n)
        rc = lib.icuse_dma_rw(self.st, pt, iova, buf, n, write, fault)
        out = None if write else bytes(ffi.buffer(buf, n))
        return rc, (fault[0] if rc else None), out

    def write(self, pt, iova, data):
        return self.rw(pt, iova, data, 1)[:2]

    def read(self, pt, iova, n):
        rc, fault, out = self.rw(pt, iova, n, 0)
        return rc, fault, out

    def copy(self, src_pt, src, dst_pt, dst, n):
        fault = ffi.new("uint64_t *", 0xDEAD)
        is_dst = ffi.new("int *", -1)
        rc = lib.icuse_dma_copy(self.st, src_pt, src, dst_pt, dst, n, fault, is_dst)
        return (rc, fault[0], is_dst[0]) if rc else (0, None, None)

    def close(self):
        for c in self.children:
            c.close()
        for pt in self.pts:
            lib.icuse_pt_free(pt)
        lib.icuse_store_free(self.st)
        for m in self.maps:
            m.close()


@pytest.fixture
def w():
    world = World()
    yield world
    world.close()


def test_rw_across_entries_and_backings(w):
    pt = w.pt()
    base = 0x100000
    _, _, mem = w.mapped(pt, base, 8, MEM)
    _, _, child = w.mapped(pt, base + 8 * PAGE, 8, PROC)
    data = pattern(14 * PAGE + 5, 3)
    start = base + PAGE + 11
    assert w.write(pt, start, data) == (0, None)
    split = 7 * PAGE - 11
    assert mem[PAGE + 11 :] == data[:split]
    assert child.get(0, len(data) - split) == data[split:]
    assert w.read(pt, start, len(data)) == (0, None, data)
    child.set(3, b"child")
    assert w.read(pt, base + 8 * PAGE + 3, 5)[2] == b"child"


def test_multi_chunk_transfer_with_large_leaves(w):
    pt = w.pt()
    iova = 3 * M2 - PAGE  # straddles 2 MiB boundaries
    npages = 5 * 512 + 2
    _, pa, mem = w.mapped(pt, iova, npages)
    info = ffi.new("struct icuse_pte_info *")
    assert lib.icuse_pt_walk(pt, 4 * M2, info) == 0 and info.leaf_size == M2
    data = pattern(5 * M2 + 123, 4)
    assert w.write(pt, iova + 77, data) == (0, None)
    assert mem[77 : 77 + len(data)] == data
    assert w.read(pt, iova + 77, len(data))[2] == data


def test_scattered_pages_many_segments(w):
    """300 pages mapped each to a pa of its own: a chunk needs more segments
    than one translate call holds, and must still arrive in order."""
    pt = w.pt()
    n = 300
    _, pa, mem = w.pages(n)
    perm = list(range(n))
    random.Random(5).shuffle(perm)
    for i, p in enumerate(perm):
        assert lib.icuse_pt_map(pt, 0x40000000 + i * PAGE, pa + p * PAGE, PAGE, RW) == 0
    data = pattern(n * PAGE, 6)
    assert w.write(pt, 0x40000000, data) == (0, None)
    for i, p in enumerate(perm):
        assert mem[p * PAGE : (p + 1) * PAGE] == data[i * PAGE : (i + 1) * PAGE]
    assert w.read(pt, 0x40000000, len(data))[2] == data


def dirty_pages(pt, iova, npages):
    bm = ffi.new("uint64_t[]", (npages + 63) // 64)
    lib.icuse_pt_read_and_clear_dirty(pt, iova, npages * PAGE, PAGE, bm, 0)
    return [i for i in range(npages) if bm[i // 64] >> (i % 64) & 1]


def test_faults_unmapped(w):
    pt = w.pt(PAGE)  # 4 KiB leaves only, to see dirty bits per page
    base = 0x200000
    _, _, mem = w.mapped(pt, base, 8)
    lib.icuse_pt_unmap(pt, base + 3 * PAGE, PAGE)
    # A read copies nothing and reports the first unmapped byte.
    rc, fault, out = w.read(pt, base + 100, 5 * PAGE)
    assert (rc, fault) == (-errno.ENOENT, base + 3 * PAGE)
    assert out == b"\xee" * 5 * PAGE
    assert w.read(pt, base + 3 * PAGE + 9, 1)[:2] == (-errno.ENOENT, base + 3 * PAGE + 9)
    # A write stores everything before the faulting page and nothing after.
    rc, fault = w.write(pt, base + 100, b"\x5a" * 6 * PAGE)
    assert (rc, fault) == (-errno.ENOENT, base + 3 * PAGE)
    assert mem[100 : 3 * PAGE] == b"\x5a" * (3 * PAGE - 100)
    assert mem[:100] == bytes(100) and mem[4 * PAGE :] == bytes(4 * PAGE)
    # ... and only those pages are dirty.
    assert dirty_pages(pt, base, 8) == [0, 1, 2]
    # Nothing mapped at all.
    assert w.write(pt, 0x7000, b"x") == (-errno.ENOENT, 0x7000)
    assert dirty_pages(pt, base, 8) == []


def test_faults_permission(w):
    pt = w.pt(PAGE)
    base = 0x300000
    _, _, mem = w.mapped(pt, base, 2, prot=R)
    _, _, wo = w.mapped(pt, base + 2 * PAGE, 2, prot=W)
    mem[:4] = b"read"
    assert w.read(pt, base, 4) == (0, None, b"read")
    assert w.write(pt, base + 1, b"no") == (-errno.EACCES, base + 1)
    assert mem[:4] == b"read"
    assert w.read(pt, base + PAGE, 2 * PAGE)[:2] == (-errno.EACCES, base + 2 * PAGE)
    assert w.write(pt, base + 2 * PAGE, b"ok") == (0, None)
    assert wo[:2] == b"ok"


def test_faults_unpinned(w):
    pt = w.pt()
    base = 0x400000
    pid, _, mem = w.mapped(pt, base, 8)
    lib.icuse_pages_unpin(w.st, pid, 5, 1)
    rc, fault, out = w.read(pt, base, 8 * PAGE)
    assert (rc, fault) == (-errno.EFAULT, base + 5 * PAGE)
    assert out == b"\xee" * 8 * PAGE
    assert w.write(pt, base + PAGE, b"\x33" * 6 * PAGE) == (-errno.EFAULT, base + 5 * PAGE)
    assert mem[PAGE : 5 * PAGE] == b"\x33" * 4 * PAGE
    assert mem[5 * PAGE :] == bytes(3 * PAGE)
    assert w.read(pt, base + 5 * PAGE + 1, 1)[:2] == (-errno.EFAULT, base + 5 * PAGE + 1)
    lib.icuse_pages_pin(w.st, pid, 5, 1)
    assert w.read(pt, base, 8 * PAGE)[0] == 0


def test_write_fault_in_a_later_chunk(w):
    pt = w.pt()
    base = 0x40000000
    _, _, mem = w.mapped(pt, base, 2048)  # 8 MiB
    lib.icuse_pt_unmap(pt, base + 3 * M2, PAGE)
    rc, fault = w.write(pt, base + PAGE, b"\x77" * 4 * M2)
    assert (rc, fault) == (-errno.ENOENT, base + 3 * M2)
    assert mem[PAGE : 3 * M2] == b"\x77" * (3 * M2 - PAGE)
    assert mem[3 * M2 :] == bytes(M2)


def test_owner_gone(w):
    pt = w.pt()
    base = 0x500000
    _, _, child = w.mapped(pt, base, 4, PROC)
    assert w.write(pt, base, b"alive") == (0, None)
    assert child.get(0, 5) == b"alive"
    child.kill()
    assert w.read(pt, base + 10, 4)[:2] == (-errno.ESRCH, base + 10)
    assert w.write(pt, base + PAGE, b"dead")[0] == -errno.ESRCH


@pytest.mark.parametrize("src_kind", [MEM, PROC])
@pytest.mark.parametrize("dst_kind", [MEM, PROC])
@pytest.mark.parametrize("same_pt", [True, False])
def test_copy_backings(w, src_kind, dst_kind, same_pt):
    spt = w.pt()
    dpt = spt if same_pt else w.pt()
    n = 80
    _, _, src = w.mapped(spt, 0x1000000, n, src_kind)
    _, _, dst = w.mapped(dpt, 0x2000000 + 3 * PAGE, n, dst_kind)
    data = pattern(n * PAGE, 7)
    if src_kind == MEM:
        src[:] = data
    else:
        src.set(0, data)
    # Offsets that differ between source and destination.
    length = (n - 2) * PAGE + 1000
    assert w.copy(spt, 0x1000000 + 5, dpt, 0x2000000 + 3 * PAGE + 2000, length) == (0, None, None)
    got = dst[2000 : 2000 + length] if dst_kind == MEM else dst.get(2000, length)
    assert got == data[5 : 5 + length]


def test_copy_large_crosses_chunks(w):
    spt, dpt = w.pt(), w.pt()
    n = 1536  # 6 MiB
    _, _, src = w.mapped(spt, G1, n)
    _, _, dst = w.mapped(dpt, 2 * G1 + M2 // 2, n)
    src[:] = pattern(n * PAGE, 8)
    length = n * PAGE - 3 * PAGE
    assert w.copy(spt, G1 + 3 * PAGE, dpt, 2 * G1 + M2 // 2, length) == (0, None, None)
    assert dst[:length] == src[3 * PAGE :]


@pytest.mark.parametrize("src_kind,dst_kind", [(MEM, MEM), (PROC, MEM), (MEM, PROC), (PROC, PROC)])
def test_copy_shared_out_between_threads(w, src_kind, dst_kind):
    """A long copy is handed out unit by unit to the pool's helpers: every
    byte arrives where it belongs, whatever the backings and offsets."""
    spt, dpt = w.pt(), w.pt()
    n = 2560  # 10 MiB: several chunks, more than the copy shared out needs
    _, _, src = w.mapped(spt, G1, n, src_kind)
    _, _, dst = w.mapped(dpt, 2 * G1 + M2 // 2, n, dst_kind)
    data = pattern(n * PAGE, 11)
    if src_kind == MEM:
        src[:] = data
    else:
        src.set(0, data)
    length = n * PAGE - 3 * PAGE - 77
    assert w.copy(spt, G1 + 3 * PAGE + 7, dpt, 2 * G1 + M2 // 2 + 70, length) == (0, None, None)
    got = dst[70 : 70 + length] if dst_kind == MEM else dst.get(70, length)
    assert got == data[3 * PAGE + 7 : 3 * PAGE + 7 + length]


def test_copy_shared_out_stops_at_the_first_fault(w):
    """Two unpinned pages far apart inside a copy that is shared out: the
    lower one is reported, and everything before it has arrived."""
    spt, dpt = w.pt(), w.pt()
    n = 3072  # 12 MiB
    _, _, src = w.mapped(spt, G1, n)
    dpid, _, dst = w.mapped(dpt, 2 * G1, n)
    src[:] = pattern(n * PAGE, 12)
    lib.icuse_pages_unpin(w.st, dpid, 2900, 1)
    lib.icuse_pages_unpin(w.st, dpid, 1500, 1)
    assert w.copy(spt, G1, dpt, 2 * G1, n * PAGE) == (-errno.EFAULT, 2 * G1 + 1500 * PAGE, 1)
    assert dst[: 1500 * PAGE] == src[: 1500 * PAGE]
    assert dst[2900 * PAGE : 2901 * PAGE] == bytes(PAGE)  # never written: unpinned


@pytest.mark.parametrize("length", [(256 << 10) - 1, 256 << 10, (256 << 10) + 63, (1 << 20) + 1])
@pytest.mark.parametrize("src_off,dst_off", [(0, 0), (1, 0), (0, 1), (13, 61), (64, 3)])
def test_copy_streaming_edges(w, length, src_off, dst_off):
    """Large copies into memory the daemon maps stream past the caches: the
    unaligned head and tail around the streamed middle arrive exactly, and
    the bytes around the destination stay as they were."""
    pt = w.pt()
    _, _, src = w.mapped(pt, G1, 260)
    _, _, dst = w.mapped(pt, 2 * G1, 260)
    src[:] = pattern(260 * PAGE, 13)
    dst[:] = b"\xcc" * (260 * PAGE)
    assert w.copy(pt, G1 + src_off, pt, 2 * G1 + dst_off, length) == (0, None, None)
    assert dst[dst_off : dst_off + length] == src[src_off : src_off + length]
    assert dst[:dst_off] == b"\xcc" * dst_off
    assert dst[dst_off + length : dst_off + length + 4096] == b"\xcc" * 4096


def test_concurrent_long_copies():
    """Several threads with copies long enough to be shared out at once: the
    pool serves them all, each arrives whole."""
    w = World()
    try:
        spt, dpt = w.pt(), w.pt()
        n = 1280  # 5 MiB each
        jobs = []
        for i in range(4):
            _, _, src = w.mapped(spt, (i + 1) * G1, n)
            _, _, dst = w.mapped(dpt, (i + 1) * G1, n)
            src[:] = pattern(n * PAGE, 20 + i)
            jobs.append((i, src, dst))
        bad = []

        def copier(i, src, dst):
            for _ in range(5):
                dst[:] = bytes(n * PAGE)
                r = w.copy(spt, (i + 1) * G1, dpt, (i + 1) * G1, n * PAGE)
                if r != (0, None, None) or dst[:] != src[:]:
                    bad.append((i, r))

        threads = [threading.Thread(target=copier, args=j) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), "deadlock"
        assert not bad
    finally:
        w.close()


_SPAN = 1600  # pages of each region in the model test: 6.25 MiB
_MODEL_SRC = pattern(_SPAN * PAGE, 30)


@pytest.fixture(scope="module")
def model_world():
    w = World()
    spt, dpt = w.pt(), w.pt()
    _, spa, src = w.mapped(spt, G1, _SPAN)
    _, dpa, dst = w.mapped(dpt, 2 * G1, _SPAN)
    src[:] = _MODEL_SRC
    yield w, (spt, spa, src), (dpt, dpa, dst)
    w.close()


@settings(max_examples=40, deadline=None)
@given(
    length=hs.integers(1, (_SPAN - 3) * PAGE),
    src_off=hs.integers(0, 2 * PAGE),
    dst_off=hs.integers(0, 2 * PAGE),
    hole=hs.none() | hs.tuples(hs.sampled_from(["src", "dst"]), hs.integers(0, _SPAN - 1)),
)
def test_copy_matches_a_model(model_world, length, src_off, dst_off, hole):
    """Any copy, short or long enough to be shared out, with at most one unmapped
    page on either side: the bytes before the first faulting address arrive, none
    after it, and the fault names that address and its side (the source when
    both fault at the same offset)."""
    w, (spt, spa, src), (dpt, dpa, dst) = model_world
    dst[:] = bytes(_SPAN * PAGE)
    sides = {"src": (spt, G1, spa, src_off), "dst": (dpt, 2 * G1, dpa, dst_off)}
    end, expect = length, (0, None, None)
    if hole is not None:
        pt, base, pa, off = sides[hole[0]]
        assert lib.icuse_pt_unmap(pt, base + hole[1] * PAGE, PAGE) == PAGE
        first = max(0, hole[1] * PAGE - off)
        if (hole[1] + 1) * PAGE > off and first < length:
            end = first
            expect = (-errno.ENOENT, base + off + first, int(hole[0] == "dst"))
    try:
        got = w.copy(spt, G1 + src_off, dpt, 2 * G1 + dst_off, length)
    finally:
        if hole is not None:
            assert lib.icuse_pt_map(pt, base + hole[1] * PAGE, pa + hole[1] * PAGE, PAGE, RW) == 0
    assert got == expect
    assert dst[dst_off : dst_off + end] == _MODEL_SRC[src_off : src_off + end]
    assert dst[dst_off + end : dst_off + length] == bytes(length - end)


def test_copy_faults(w):
    spt, dpt = w.pt(PAGE), w.pt(PAGE)
    s, d = 0x100000, 0x900000
    _, _, src = w.mapped(spt, s, 8)
    dpid, _, dst = w.mapped(dpt, d, 8)
    src[:] = pattern(8 * PAGE, 9)
    # Source unmapped at page 4: pages 0..3 arrive, reported on the source side.
    lib.icuse_pt_unmap(spt, s + 4 * PAGE, PAGE)
    assert w.copy(spt, s, dpt, d, 8 * PAGE) == (-errno.ENOENT, s + 4 * PAGE, 0)
    assert dst[: 4 * PAGE] == src[: 4 * PAGE] and dst[4 * PAGE :] == bytes(4 * PAGE)
    assert dirty_pages(dpt, d, 8) == [0, 1, 2, 3]
    # The destination fault comes first (page 2 unpinned): reported there.
    dst[:] = bytes(8 * PAGE)
    lib.icuse_pages_unpin(w.st, dpid, 2, 1)
    assert w.copy(spt, s, dpt, d, 8 * PAGE) == (-errno.EFAULT, d + 2 * PAGE, 1)
    assert dst[: 2 * PAGE] == src[: 2 * PAGE] and dst[2 * PAGE :] == bytes(6 * PAGE)
    lib.icuse_pages_pin(w.st, dpid, 2, 1)
    # A read-only destination.
    _, _, ro = w.mapped(dpt, 0x2000000, 2, prot=R)
    assert w.copy(spt, s, dpt, 0x2000000 + 10, 100) == (-errno.EACCES, 0x2000000 + 10, 1)
    assert ro[:] == bytes(2 * PAGE)
    assert w.copy(spt, s, dpt, 0x2000000, 0) == (0, None, None)


def test_concurrent_copies_and_unmaps():
    """Copies in both directions between two tables while their mappings
    come and go and pins change: no deadlock, and every copy either
    completes or faults with a fault reason."""
    w = World()
    try:
        a, b = w.pt(), w.pt()
        _, pa_a, _ = w.mapped(a, 0, 512)
        pid_b, pa_b, _ = w.mapped(b, 0, 512)
        stop = threading.Event()
        bad = []

        def copier(src, dst):
            while not stop.is_set():
                r = w.copy(src, 0, dst, 0, 512 * PAGE)
                if r[0] not in (0, -errno.ENOENT, -errno.EFAULT):
                    bad.append(r)

        threads = [threading.Thread(target=copier, args=p) for p in ((a, b), (b, a), (a, b))]
        for t in threads:
            t.start()
        for _ in range(200):
            assert lib.icuse_pt_unmap(b, 100 * PAGE, PAGE) == PAGE
            lib.icuse_pages_unpin(w.st, pid_b, 7, 1)
            assert lib.icuse_pt_map(b, 100 * PAGE, pa_b + 100 * PAGE, PAGE, RW) == 0
            lib.icuse_pages_pin(w.st, pid_b, 7, 1)
        stop.set()
        for t in threads:
            t.join(timeout=20)
            assert not t.is_alive(), "deadlock"
        assert not bad
        assert w.copy(a, 0, b, 0, 512 * PAGE) == (0, None, None)
    finally:
        stop.set()
        w.close()
