"""Property tests of the IOVA allocator and the area bookkeeping of io_pagetable
against a brute-force model over a small address space (hypothesis)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommufd_cuse.errors import Errno
from iommufd_cuse.iommufd.io_pagetable import ULONG_MAX, Area, IoPagetable

SPACE = 1 << 20  # everything happens below 1 MiB; the rest is reserved
UNIT = 1 << 10  # model cells of 1 KiB
PAGE = 4096
HPAGE = 2 << 20


def ranges(max_n: int):  # noqa: ANN201
    """Disjoint sorted [start, last] ranges, multiples of UNIT, inside SPACE."""
    return st.lists(st.tuples(st.integers(0, SPACE // UNIT - 1), st.integers(1, 64)), max_size=max_n).map(
        lambda xs: _disjoint([(a * UNIT, min(SPACE, (a + n) * UNIT) - 1) for a, n in xs])
    )


def _disjoint(rs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(rs):
        if out and s <= out[-1][1] + 1:
            continue
        out.append((s, e))
    return out


def model_alloc(
    used: list[tuple[int, int]], allowed: list[tuple[int, int]], addr: int, length: int, iova_alignment: int
) -> int | None | str:
    """The kernel's rule, computed cell by cell: the first hole (of the reserved and
    mapped ranges, inside the allowed windows or [PAGE, ULONG_MAX - PAGE]) in which
    ALIGN(hole start, align) | page offset fits."""
    align = 1 << (length - 1).bit_length()
    if addr:
        align = min(align, addr & -addr)
    align = min(align, HPAGE)
    if align < iova_alignment:
        return "EINVAL"
    page_offset = addr % PAGE
    busy = bytearray(SPACE // UNIT)
    for s, e in used:
        for c in range(s // UNIT, min(e, SPACE - 1) // UNIT + 1):
            busy[c] = 1
    windows = allowed or [(PAGE, SPACE - 1)]
    for ws, we in windows:
        ws, we = max(ws, PAGE), min(we, SPACE - 1)
        c = ws // UNIT
        while c <= we // UNIT:
            if busy[c]:
                c += 1
                continue
            start = max(c * UNIT, ws)
            while c <= we // UNIT and not busy[c]:
                c += 1
            last = min(c * UNIT - 1, we)
            x = ((start + align - 1) & ~(align - 1)) | page_offset
            if x <= last and last - x >= length - 1:
                return x
    return None


@settings(max_examples=300, deadline=None)
@given(
    reserved=ranges(6),
    mapped=ranges(6),
    allowed=ranges(3),
    addr=st.integers(0, 1 << 22).map(lambda a: a * UNIT),
    length=st.integers(1, 64).map(lambda n: n * UNIT),
    iova_alignment=st.sampled_from([1, PAGE]),
)
def test_alloc_iova_matches_the_model(reserved, mapped, allowed, addr, length, iova_alignment):
    iopt = IoPagetable()
    iopt.iova_alignment = iova_alignment
    for s, e in reserved:
        iopt.reserve(s, e, owner="r")
    iopt.reserve(SPACE, ULONG_MAX, owner="top")
    for s, e in mapped:
        if iopt.reserved_hit(s, e):
            continue
        iopt._insert_area(Area(s, e, pages=None, start_byte=0, prot=3))  # type: ignore[arg-type]
    # allowed ranges may not cover reserved ones
    allowed = [(s, e) for s, e in allowed if not iopt.reserved_hit(s, e)]
    iopt.set_allowed(allowed)
    used = [(r.start, r.last) for r in iopt.reserved if r.start < SPACE] + [(a.start, a.last) for a in iopt.areas]
    want = model_alloc(used, allowed, addr, length, iova_alignment)
    try:
        got: int | str | None = iopt.alloc_iova(addr, length)
    except Errno as e:
        got = {errno.EINVAL: "EINVAL", errno.ENOSPC: None}[e.errno]
    assert got == want
    if isinstance(got, int):  # and what it returns is free, aligned and allowed
        last = got + length - 1
        assert not iopt.reserved_hit(got, last) and iopt.first_area(got, last) is None
        assert not allowed or any(s <= got and last <= e for s, e in allowed)
        assert got % iova_alignment == 0


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 255), st.integers(1, 16)), max_size=40))
def test_areas_and_unmap_ranges_match_a_model(ops):
    """Inserting areas where free and unmapping ranges (whole areas only; one sticking
    out stops the unmap with ENOENT after the ones before it; nothing there is success,
    as iopt_unmap_iova_range) agree with a dict model."""
    iopt = IoPagetable()
    model: dict[int, int] = {}  # start page -> npages
    for is_map, page, n in ops:
        start, last = page * PAGE, (page + n) * PAGE - 1
        if is_map:
            free = iopt.first_area(start, last) is None
            assert free == all(not (s < page + n and page < s + k) for s, k in model.items())
            if free:
                iopt._insert_area(Area(start, last, pages=_NoPages(), start_byte=0, prot=3))  # type: ignore[arg-type]
                model[page] = n
            continue
        rc, unmapped = iopt.unmap_range(start, last)
        hit = sorted(s for s, k in model.items() if s < page + n and page < s + k)
        expect_rc, removed = 0, 0
        for s in hit:  # in IOVA order, until one sticks out
            if s < page or s + model[s] > page + n:
                expect_rc = errno.ENOENT
                break
            removed += model.pop(s)
        assert (rc, unmapped) == (expect_rc, removed * PAGE)
        assert sorted((a.start // PAGE, a.length // PAGE) for a in iopt.areas) == sorted(model.items())


class _NoPages:
    """Pages stand-in for areas never loaded into a domain (no pins to drop)."""

    refs = 1

    def __init__(self) -> None:
        self.areas: dict = {}  # the areas using the pages, as Pages keeps them

    def put(self) -> None:
        pass


def test_alloc_iova_refuses_degenerate_lengths():
    iopt = IoPagetable()
    for length in (0, ULONG_MAX // 2):
        with pytest.raises(Errno) as e:
            iopt.alloc_iova(0, length)
        assert e.value.errno == errno.EOVERFLOW
