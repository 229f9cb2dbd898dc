"""struct io_pagetable: the IOVA space of an IOAS (drivers/iommu/iommufd/io_pagetable.c).

Areas map IOVA ranges to pages; reserved ranges (domain apertures, device
reserved regions) may not be mapped; allowed ranges restrict where IOVAs are
allocated. Every paging domain attached gets every area loaded; the pages of
an area are pinned while at least one domain holds them.
"""

from __future__ import annotations

import array
import bisect
import errno
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from .._native import ffi, lib
from ..errors import Errno
from ..iommu.domain import PagingDomain
from ..system import PAGE_SIZE
from .pages import Pages

log = logging.getLogger(__name__)

ULONG_MAX = (1 << 64) - 1
HPAGE_SIZE = 2 << 20  # the largest alignment kept from the user address (THP)
# Loading more than this into the domains runs in a worker thread, in chunks of
# this size, with a cancellation check between chunks.
THREAD_CHUNK = 64 << 20

IOMMU_READ = lib.ICUSE_PROT_READ
IOMMU_WRITE = lib.ICUSE_PROT_WRITE


def _area_start(area: Area) -> int:
    return area.start


@dataclass(eq=False)
class Area:
    """struct iopt_area: [start, last] of IOVA backed by pages from start_byte."""

    start: int
    last: int
    pages: Pages
    start_byte: int  # offset of the area's first byte inside the pages
    prot: int
    filled: bool = False  # loaded into the domains (pages pinned)
    busy: bool = False  # being created or loaded: unmap answers EBUSY
    num_accesses: int = 0

    @property
    def length(self) -> int:
        return self.last - self.start + 1

    @property
    def page_offset(self) -> int:
        return self.start_byte % PAGE_SIZE

    @property
    def first_index(self) -> int:
        return self.start_byte // PAGE_SIZE

    @property
    def num_pages(self) -> int:
        return (self.start_byte + self.length - 1) // PAGE_SIZE - self.first_index + 1

    def pa(self, iova: int) -> int:
        return self.pages.pa_base + self.start_byte + (iova - self.start)


@dataclass
class Reserved:
    start: int
    last: int
    owner: object


@dataclass
class PagesSlice:
    """One element of the kernel's pages list: part of some pages, for COPY."""

    pages: Pages
    start_byte: int
    length: int


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def _check_add(a: int, b: int) -> int:
    s = a + b
    if s > ULONG_MAX:
        raise Errno(errno.EOVERFLOW)
    return s


@dataclass
class IoPagetable:
    areas: list[Area] = field(default_factory=list)  # sorted by start, disjoint
    reserved: list[Reserved] = field(default_factory=list)
    allowed: Allowed = field(default_factory=lambda: Allowed())
    domains: list[PagingDomain] = field(default_factory=list)
    iova_alignment: int = 1
    disable_large_pages: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    # iommufd accesses attached (objects with iova_alignment and notify_unmap(iova, length))
    accesses: list = field(default_factory=list)

    # -- lookups ---------------------------------------------------------------
    def areas_in(self, start: int, last: int) -> Iterator[Area]:
        """Areas intersecting [start, last], in IOVA order."""
        i = bisect.bisect_right(self.areas, start, key=_area_start) - 1
        if i < 0 or self.areas[i].last < start:
            i += 1
        while i < len(self.areas) and self.areas[i].start <= last:
            yield self.areas[i]
            i += 1

    def first_area(self, start: int, last: int) -> Area | None:
        return next(self.areas_in(start, last), None)

    def reserved_hit(self, start: int, last: int) -> Reserved | None:
        for r in self.reserved:
            if r.start <= last and start <= r.last:
                return r
        return None

    def allowed_hit(self, start: int, last: int) -> bool:
        return self.allowed.hit(start, last)

    @staticmethod
    def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for s, e in sorted(ranges):
            if out and s <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((s, e))
        return out

    @staticmethod
    def _holes(used: list[tuple[int, int]], lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Gaps of merged `used` inside [lo, hi]."""
        pos = lo
        for s, e in used:
            if e < pos:
                continue
            if s > hi:
                break
            if s > pos:
                yield pos, s - 1
            pos = e + 1
            if pos > hi or e == ULONG_MAX:
                return
        if pos <= hi:
            yield pos, hi

    def iova_ranges(self) -> list[tuple[int, int]]:
        """The usable IOVA: the holes of the reserved ranges in [0, ULONG_MAX]."""
        used = self._merge([(r.start, r.last) for r in self.reserved])
        return list(self._holes(used, 0, ULONG_MAX))

    # -- IOVA checks and allocation ---------------------------------------------
    def check_iova(self, iova: int, length: int) -> None:
        """iopt_check_iova for FIXED_IOVA."""
        if iova & (self.iova_alignment - 1):
            raise Errno(errno.EINVAL)
        last = _check_add(iova, length - 1)
        if self.reserved_hit(iova, last):
            raise Errno(errno.EINVAL)
        if self.first_area(iova, last):
            raise Errno(errno.EEXIST)

    def alloc_iova(self, addr: int, length: int) -> int:
        """iopt_alloc_iova: the lowest free IOVA keeping addr's alignment (up to 2 MiB)."""
        page_offset = addr % PAGE_SIZE
        if length == 0 or length >= ULONG_MAX // 2:
            raise Errno(errno.EOVERFLOW)
        align = 1 << (length - 1).bit_length()  # roundup_pow_of_two
        if addr:
            align = min(align, addr & -addr)
        align = min(align, HPAGE_SIZE)
        if align < self.iova_alignment:
            raise Errno(errno.EINVAL)

        lo, hi = PAGE_SIZE, ULONG_MAX - PAGE_SIZE
        used = self._merge([(r.start, r.last) for r in self.reserved] + [(a.start, a.last) for a in self.areas])
        used_words = ffi.new("uint64_t[]", [x for r in used for x in r] or [0])
        allowed = self.allowed
        if len(allowed):
            first = allowed.first_from(lo)
            windows = ffi.from_buffer("uint64_t[]", allowed.words) + 2 * first
            nwin = len(allowed) - first
        else:
            windows, nwin = ffi.new("uint64_t[]", [lo, hi]), 1
        out = ffi.new("uint64_t *")
        # One C pass over the windows and the used ranges: linear in both, with
        # no Python object per window (a caller may have set a million).
        rc = lib.icuse_iova_alloc(windows, nwin, used_words, len(used), lo, hi, length, align, page_offset, out)
        if rc:
            raise Errno(-rc)
        return out[0]

    # -- areas ---------------------------------------------------------------------
    def _insert_area(self, area: Area) -> None:
        bisect.insort_left(self.areas, area, key=_area_start)

    def _remove_area(self, area: Area) -> None:
        i = bisect.bisect_left(self.areas, area.start, key=_area_start)  # areas are disjoint
        if i < len(self.areas) and self.areas[i] is area:
            del self.areas[i]
        else:
            self.areas.remove(area)

    def alloc_areas(self, slices: list[PagesSlice], length: int, iova: int | None, prot: int) -> list[Area]:
        """iopt_alloc_area_pages: check or allocate the IOVA and insert the areas
        (busy, not yet loaded). Raises with nothing inserted on failure."""
        for sl in slices:
            if prot & IOMMU_WRITE and not sl.pages.writable:
                raise Errno(errno.EPERM)
        if length & (self.iova_alignment - 1) or not length:
            raise Errno(errno.EINVAL)
        if iova is None:
            first = slices[0]
            iova = self.alloc_iova(first.pages.address + first.start_byte, length)
        else:
            self.check_iova(iova, length)
        areas = []
        pos = iova
        try:
            for sl in slices:
                if sl.start_byte % PAGE_SIZE & (self.iova_alignment - 1):
                    raise Errno(errno.EINVAL)
                last = _check_add(pos, sl.length - 1)
                area = Area(pos, last, sl.pages, sl.start_byte, prot, busy=True)
                self._insert_area(area)
                areas.append(area)
                pos = last + 1
        except BaseException:
            for area in areas:
                self._remove_area(area)
            raise
        for area in areas:
            area.pages.refs += 1
            area.pages.areas[area] = self
        return areas

    def abort_areas(self, areas: list[Area]) -> None:
        for area in areas:
            self._remove_area(area)
            self._put_pages(area)

    @staticmethod
    def _put_pages(area: Area) -> None:
        """The area lets go of its pages (which track their areas, for a dma-buf's revoke)."""
        area.pages.areas.pop(area, None)
        area.pages.put()

    # -- loading into domains ------------------------------------------------------
    async def fill_area(self, area: Area, domains: list[PagingDomain] | None = None) -> None:
        """Pin the area's pages and map them into every domain (all or nothing)."""
        domains = self.domains if domains is None else domains
        if not domains or area.pages.revoked:
            return  # a revoked dma-buf has nothing to load (iopt_area_fill_domains)
        area.pages.pin(area.first_index, area.num_pages)
        done: list[PagingDomain] = []
        try:
            await area.pages.populate()
            for d in domains:
                await self._map_into(area, d)
                done.append(d)
        except BaseException:
            with trio.CancelScope(shield=True):
                for d in done:
                    d.unmap(area.start, area.length)
                area.pages.unpin(area.first_index, area.num_pages)
            raise
        area.filled = True

    def unfill_area(self, area: Area) -> None:
        if not area.filled:
            return
        for d in self.domains:
            d.unmap(area.start, area.length)
        area.pages.unpin(area.first_index, area.num_pages)
        area.filled = False

    async def map_pages(self, slices: list[PagesSlice], length: int, iova: int | None, prot: int) -> int:
        """iopt_map_pages: new areas for the slices, loaded into every domain."""
        areas = self.alloc_areas(slices, length, iova, prot)
        try:
            for area in areas:
                await self.fill_area(area)
        except BaseException:
            for area in areas:
                self.unfill_area(area)
            self.abort_areas(areas)
            raise
        for area in areas:
            area.busy = False
        return areas[0].start

    # -- unmapping -----------------------------------------------------------------
    def unmap_range(self, start: int, last: int) -> tuple[int, int]:
        """iopt_unmap_iova_range: remove the areas wholly inside [start, last].
        Returns (errno or 0, bytes unmapped): an area sticking out is ENOENT;
        nothing mapped there is success (IOAS_UNMAP makes that ENOENT, VFIO's
        UNMAP_DMA does not); areas removed before the error stay removed."""
        unmapped = 0
        for area in list(self.areas_in(start, last)):
            if area.num_accesses and not area.busy and start <= area.start and area.last <= last:
                # iommufd_access_notify_unmap: accesses drop their pins on it first
                for access in list(self.accesses):
                    access.notify_unmap(area.start, area.length)
            if area.busy or area.num_accesses:
                return errno.EBUSY, unmapped
            if area.start < start or area.last > last:
                return errno.ENOENT, unmapped
            self.unfill_area(area)
            self._remove_area(area)
            self._put_pages(area)
            unmapped += area.length
        return 0, unmapped

    def unmap_all(self) -> int:
        rc, unmapped = self.unmap_range(0, ULONG_MAX)
        if rc:
            raise Errno(rc)
        return unmapped

    def cut(self, iovas: list[int]) -> None:
        """iopt_cut_iova: split the areas so that each iova ends one (VFIO type1 v1
        unmaps inside mappings). Only with large pages disabled: every leaf is a page."""
        for iova in iovas:
            area = self.first_area(iova, iova)
            if area is None or area.last == iova:
                continue
            if area.busy or area.num_accesses:
                raise Errno(errno.EBUSY)
            if area.pages.is_dmabuf:
                raise Errno(errno.EOPNOTSUPP)  # iopt_area_split does not split dma-buf areas
            if (iova + 1) & (self.iova_alignment - 1) or (iova + 1) % PAGE_SIZE:
                raise Errno(errno.EINVAL)
            first_len = iova - area.start + 1
            rest = Area(iova + 1, area.last, area.pages, area.start_byte + first_len, area.prot, filled=area.filled)
            if area.filled:
                # Each piece holds its own pins; pin the new ones before dropping the old.
                head = Area(area.start, iova, area.pages, area.start_byte, area.prot)
                area.pages.pin(head.first_index, head.num_pages)
                area.pages.pin(rest.first_index, rest.num_pages)
                area.pages.unpin(area.first_index, area.num_pages)
            area.last = iova
            area.pages.refs += 1
            area.pages.areas[rest] = self
            self._insert_area(rest)

    def get_pages(self, iova: int, length: int) -> list[PagesSlice]:
        """iopt_get_pages: the pages behind a contiguous run of areas (for COPY)."""
        if not length:
            raise Errno(errno.EINVAL)
        last = _check_add(iova, length - 1)
        out: list[PagesSlice] = []
        pos = iova
        for area in self.areas_in(iova, last):
            if area.start > pos or area.busy:
                break
            end = min(last, area.last)
            out.append(PagesSlice(area.pages, area.start_byte + (pos - area.start), end - pos + 1))
            pos = end + 1
            if end == last:
                break
        if pos <= last or not out:
            raise Errno(errno.ENOENT)
        return out

    # -- reserved and allowed ---------------------------------------------------------
    def reserve(self, start: int, last: int, owner: object) -> None:
        """iopt_reserve_iova: EADDRINUSE over an area or an allowed range."""
        if self.first_area(start, last) or self.allowed_hit(start, last):
            raise Errno(errno.EADDRINUSE)
        self.reserved.append(Reserved(start, last, owner))

    def remove_reserved(self, owner: object) -> None:
        self.reserved = [r for r in self.reserved if r.owner is not owner]

    def set_allowed(self, allowed: Allowed) -> None:
        """iopt_set_allow_iova: no new range may cover a reserved one."""
        for r in self.reserved:
            if allowed.hit(r.start, r.last):
                raise Errno(errno.EADDRINUSE)
        self.allowed = allowed

    # -- alignment and domains -------------------------------------------------------
    def _check_alignment(self, align: int) -> None:
        mask = align - 1
        for a in self.areas:
            if a.start & mask or a.length & mask or a.page_offset & mask:
                raise Errno(errno.EADDRINUSE)

    def calculate_iova_alignment(self, extra: list[int] | None = None) -> None:
        align = PAGE_SIZE if self.disable_large_pages else 1
        for d in self.domains:
            align = max(align, d.granule)
        for a in extra or []:
            align = max(align, a)
        for access in self.accesses:
            align = max(align, access.iova_alignment)
        if align > self.iova_alignment:
            self._check_alignment(align)
        self.iova_alignment = align

    def set_large_pages(self, enable: bool) -> None:
        """iopt_enable/disable_large_pages. Disabling is refused (EINVAL) while
        domains hold mappings: their large IOPTEs could no longer be split."""
        if enable:
            self.disable_large_pages = False
            self.calculate_iova_alignment()
            return
        if self.disable_large_pages:
            return
        if self.domains and self.areas:
            raise Errno(errno.EINVAL)
        self.disable_large_pages = True
        try:
            self.calculate_iova_alignment()
        except BaseException:
            self.disable_large_pages = False
            raise

    async def add_domain(self, domain: PagingDomain) -> None:
        """iopt_table_add_domain: reserve outside the aperture, load every area."""
        new_align = max(domain.granule, self.iova_alignment)
        if new_align > PAGE_SIZE:
            raise Errno(errno.EINVAL)
        if new_align != self.iova_alignment:
            self._check_alignment(new_align)
        try:
            if domain.aperture_start:
                self.reserve(0, domain.aperture_start - 1, domain)
            if domain.aperture_end != ULONG_MAX:
                self.reserve(domain.aperture_end + 1, ULONG_MAX, domain)
            filled: list[Area] = []
            try:
                for area in list(self.areas):
                    if area.pages.revoked:
                        continue
                    if self.domains:
                        await self._map_into(area, domain)
                    else:
                        await self.fill_area(area, [domain])
                    filled.append(area)
            except BaseException:
                with trio.CancelScope(shield=True):
                    for area in filled:
                        domain.unmap(area.start, area.length)
                        if not self.domains:
                            area.pages.unpin(area.first_index, area.num_pages)
                            area.filled = False
                raise
        except BaseException:
            self.remove_reserved(domain)
            raise
        self.domains.append(domain)
        self.iova_alignment = new_align

    async def _map_into(self, area: Area, domain: PagingDomain) -> None:
        mapped = 0
        try:
            while mapped < area.length:
                n = min(THREAD_CHUNK, area.length - mapped)
                # With large pages disabled only page-sized leaves are used.
                max_leaf = PAGE_SIZE if self.disable_large_pages else 0
                args = (area.start + mapped, area.pa(area.start + mapped), n, area.prot, max_leaf)
                if area.length > THREAD_CHUNK:
                    await trio.to_thread.run_sync(domain.map, *args)
                else:
                    domain.map(*args)
                mapped += n
        except BaseException:
            if mapped:
                domain.unmap(area.start, mapped)
            raise

    def remove_domain(self, domain: PagingDomain) -> None:
        """iopt_table_remove_domain: unload every area; the last domain unpins."""
        self.domains.remove(domain)
        for area in self.areas:
            if not area.filled:
                continue
            domain.unmap(area.start, area.length)
            if not self.domains:
                area.pages.unpin(area.first_index, area.num_pages)
                area.filled = False
        self.remove_reserved(domain)
        self.calculate_iova_alignment()

    def destroy(self) -> None:
        self.unmap_all()
        for d in list(self.domains):
            self.remove_domain(d)

    # -- CPU access (the kernel's iommufd_access_rw) -------------------------------------
    def access_rw(self, iova: int, buf: bytearray | memoryview, write: bool) -> None:
        """Read or write len(buf) bytes at iova through the areas. The pages are
        held only for the copy: a CPU access, not a DMA mapping."""
        length = len(buf)
        if not length:
            return
        last = _check_add(iova, length - 1)
        pos = iova
        view = memoryview(buf)
        for area in self.areas_in(iova, last):
            if area.start > pos:
                break
            if write and not area.prot & IOMMU_WRITE or not write and not area.prot & IOMMU_READ:
                raise Errno(errno.EPERM)
            if area.pages.is_dmabuf:
                raise Errno(errno.EINVAL)  # iopt_pages_rw_access refuses dma-bufs
            end = min(last, area.last)
            n = end - pos + 1
            off = area.start_byte + (pos - area.start)
            first, npages = off // PAGE_SIZE, (off + n - 1) // PAGE_SIZE - off // PAGE_SIZE + 1
            area.pages.pin(first, npages, charge=False)
            try:
                chunk = view[pos - iova : pos - iova + n]
                rc = lib.icuse_pa_rw(area.pages.system.store, area.pa(pos), ffi.from_buffer(chunk), n, int(write))
            finally:
                area.pages.unpin(first, npages, charge=False)
            if rc:
                raise Errno(-rc)
            pos = end + 1
            if pos > last:
                return
        raise Errno(errno.ENOENT)


class Allowed:
    """The allowed IOVA ranges of an IOAS (IOMMU_IOAS_ALLOW_IOVAS): sorted, disjoint,
    kept as one flat array (start, last, start, last, ...) so that a million of them
    cost neither Python objects nor more than a bisection per lookup. Empty: every
    IOVA is allowed."""

    __slots__ = ("words",)

    def __init__(self, words: array.array | memoryview | None = None) -> None:
        self.words = words if words is not None else array.array("Q")

    @classmethod
    def of(cls, ranges: list[tuple[int, int]]) -> Allowed:
        """From sorted, disjoint (start, last) pairs."""
        return cls(array.array("Q", [x for r in ranges for x in r]))

    def __len__(self) -> int:
        return len(self.words) // 2

    def __iter__(self) -> Iterator[tuple[int, int]]:
        w = self.words
        return ((w[i], w[i + 1]) for i in range(0, len(w), 2))

    def first_from(self, lo: int) -> int:
        """Index of the first range that ends at or after lo."""
        return bisect.bisect_left(_Lasts(self.words), lo)

    def hit(self, start: int, last: int) -> bool:
        """Some allowed range intersects [start, last]."""
        i = self.first_from(start)
        return i < len(self) and self.words[2 * i] <= last


class _Lasts:
    """The last IOVAs of a flat range array, as a sequence bisect can search."""

    __slots__ = ("words",)

    def __init__(self, words: array.array) -> None:
        self.words = words

    def __len__(self) -> int:
        return len(self.words) // 2

    def __getitem__(self, i: int) -> int:
        return self.words[2 * i + 1]
