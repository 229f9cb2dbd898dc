"""NVMe PRP transfers (native/prp.c) against a model: the data pointers a command's PRP1, PRP2
and PRP lists name, laid out the way the specification does (and a driver does), in host memory
reached through a page table; the bytes must land where the model says, and the walk must stop at
the first bad entry with the status the controller reports."""

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from nativehelp import PAGE, RW, addr_of, ffi, lib, memfd_map, pattern

IOVA = 1 << 32
NPAGES = 96  # host memory: data pages and list pages
UNMAPPED = IOVA + (1 << 30)


class Host:
    """NPAGES of memory mapped at IOVA through one table, and a device-side buffer."""

    def __init__(self) -> None:
        self.st = lib.icuse_store_new()
        pa = ffi.new("uint64_t *")
        self.id = lib.icuse_pages_new(self.st, NPAGES, 0, pa)
        self.mem = memfd_map(NPAGES * PAGE)
        assert (
            lib.icuse_pages_set_backing(self.st, self.id, 0, NPAGES, lib.ICUSE_BACKING_MEM, -1, addr_of(self.mem)) == 0
        )
        assert lib.icuse_pages_pin(self.st, self.id, 0, NPAGES) == NPAGES
        self.pt = lib.icuse_pt_alloc(12, PAGE, 48)
        assert lib.icuse_pt_map(self.pt, IOVA, pa[0], NPAGES * PAGE, RW) == 0

    def run(self, prp1: int, prp2: int, buf: bytearray, to_host: bool) -> tuple[int, int]:
        io = ffi.new("struct icuse_prp_io[]", 1)
        cbuf = ffi.from_buffer(buf)
        io[0].prp1, io[0].prp2, io[0].len, io[0].to_host = prp1, prp2, len(buf), int(to_host)
        io[0].buf = int(ffi.cast("uintptr_t", cbuf))
        assert lib.icuse_dma_prp_batch(self.st, self.pt, PAGE, io, 1) == (1 if io[0].result else 0)
        return io[0].result, io[0].fault_iova

    def close(self) -> None:
        lib.icuse_pt_free(self.pt)
        lib.icuse_pages_unpin(self.st, self.id, 0, NPAGES)
        lib.icuse_pages_remove(self.st, self.id)
        lib.icuse_store_free(self.st)
        self.mem.close()


@pytest.fixture(scope="module")
def host():
    h = Host()
    yield h
    h.close()


def layout(host: Host, pages: list[int], offset: int, length: int, list_at: int, list_off: int) -> tuple[int, int]:
    """PRP1/PRP2 for length bytes: the first at `offset` in data page pages[0], then pages[1:]
    whole; a list (when needed) from list page list_at at list_off, continued on the next
    list pages (list_at + 1, ...) through their last entries."""
    prp1 = IOVA + pages[0] * PAGE + offset
    rest = length - min(length, PAGE - offset)
    if rest == 0:
        return prp1, 0
    if rest <= PAGE:
        return prp1, IOVA + pages[1] * PAGE
    entries = [IOVA + p * PAGE for p in pages[1 : 1 + -(-rest // PAGE)]]
    page, pos = list_at, list_off
    while entries:
        room = (PAGE - pos) // 8
        if len(entries) <= room:
            chunk, entries, nxt = entries, [], None
        else:
            chunk, entries, nxt = entries[: room - 1], entries[room - 1 :], IOVA + (page + 1) * PAGE
        data = b"".join(struct.pack("<Q", e) for e in chunk + ([nxt] if nxt else []))
        host.mem[page * PAGE + pos : page * PAGE + pos + len(data)] = data
        page, pos = page + 1, 0
    return prp1, IOVA + list_at * PAGE + list_off


def expected_places(pages: list[int], offset: int, length: int) -> list[tuple[int, int]]:
    """(memory offset, bytes) of each piece of the transfer, in order."""
    out, left = [], length
    for i, p in enumerate(pages):
        start = offset if i == 0 else 0
        n = min(left, PAGE - start)
        out.append((p * PAGE + start, n))
        left -= n
        if not left:
            return out
    raise AssertionError("not enough pages")


@settings(max_examples=60, deadline=None)
@given(
    data_pages=hs.lists(hs.integers(0, 63), min_size=1, max_size=20, unique=True),
    offset=hs.integers(0, PAGE // 4 - 1).map(lambda d: d * 4),
    length_frac=hs.floats(0.01, 1.0),
    list_off=hs.integers(0, PAGE // 8 - 1).map(lambda q: q * 8),
    to_host=hs.booleans(),
)
def test_prp_transfers_match_the_model(host, data_pages, offset, length_frac, list_off, to_host) -> None:
    cap = PAGE - offset + (len(data_pages) - 1) * PAGE
    length = max(1, int(cap * length_frac))
    prp1, prp2 = layout(host, data_pages, offset, length, 64, list_off)
    places = expected_places(data_pages, offset, length)
    if to_host:
        buf = bytearray(pattern(length, len(data_pages)))
        for o, n in places:
            host.mem[o : o + n] = bytes(n)
        assert host.run(prp1, prp2, buf, True) == (0, 0)
        assert b"".join(host.mem[o : o + n] for o, n in places) == bytes(buf)
    else:
        src = pattern(length, offset)
        pos = 0
        for o, n in places:
            host.mem[o : o + n] = src[pos : pos + n]
            pos += n
        buf = bytearray(length)
        assert host.run(prp1, prp2, buf, False) == (0, 0)
        assert bytes(buf) == src


def test_prp_errors(host) -> None:
    buf = bytearray(8 * PAGE)
    # PRP1 not dword aligned; PRP2 as a data pointer with an offset
    assert host.run(IOVA + 2, 0, bytearray(16), True)[0] == -errno.EINVAL
    assert host.run(IOVA, IOVA + PAGE + 8, bytearray(2 * PAGE), True)[0] == -errno.EINVAL
    # a list pointer not qword aligned; a list entry with an offset
    assert host.run(IOVA, IOVA + 70 * PAGE + 4, buf, True)[0] == -errno.EINVAL
    host.mem[70 * PAGE : 70 * PAGE + 16] = struct.pack("<QQ", IOVA + PAGE, IOVA + 2 * PAGE + 512)
    assert host.run(IOVA, IOVA + 70 * PAGE, bytearray(3 * PAGE), True)[0] == -errno.EINVAL
    # an unmapped data pointer in the list: the fault at it, the pages before it moved (to host)
    host.mem[: 3 * PAGE] = bytes(3 * PAGE)
    host.mem[70 * PAGE : 70 * PAGE + 16] = struct.pack("<QQ", IOVA + PAGE, UNMAPPED)
    data = pattern(3 * PAGE, 9)
    assert host.run(IOVA, IOVA + 70 * PAGE, bytearray(data), True) == (-errno.ENOENT, UNMAPPED)
    assert host.mem[: 2 * PAGE] == data[: 2 * PAGE]
    # an unmapped list page; a next-list pointer with an offset
    assert host.run(IOVA, UNMAPPED, buf, False) == (-errno.ENOENT, UNMAPPED)
    host.mem[71 * PAGE - 8 : 71 * PAGE] = struct.pack("<Q", IOVA + 72 * PAGE + 8)
    host.mem[71 * PAGE - 16 : 71 * PAGE - 8] = struct.pack("<Q", IOVA + PAGE)
    assert host.run(IOVA, IOVA + 71 * PAGE - 16, buf, False)[0] == -errno.EINVAL
