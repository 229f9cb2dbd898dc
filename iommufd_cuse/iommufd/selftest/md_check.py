"""Looking inside a mock domain and at pinned pages: MD_CHECK_MAP, MD_CHECK_REFS,
MD_CHECK_IOTLB, DIRTY; and how a page is named (by file and offset, or by process
and address) to compare the caller's pages with the domain's.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
from dataclasses import dataclass
from typing import Any

import trio

from ... import uapi
from ..._native import ffi, lib
from ...errors import Errno
from ...system import PAGE_SIZE
from ...transport.mount import fd_on_our_mount
from ..hw_pagetable import HwptPaging
from ..object import Context, ObjType
from ..pages import FilePages, Pages, UserPages
from .mock import ULONG_MAX, MockDomain, MockNestedDomain
from .stdev import SelftestCall

log = logging.getLogger(__name__)


MAX_DIRTY_BITMAP = 16 << 20  # bytes of DIRTY bitmap at most (SZ_16M, else EOVERFLOW)


# -- domain inspection: MD_CHECK_MAP, MD_CHECK_REFS, MD_CHECK_IOTLB, DIRTY ------------------------
def _get_md_pagetable(ctx: Context, hwpt_id: int) -> HwptPaging:
    """get_md_pagetable: a paging HWPT (else ENOENT) of the mock IOMMU (else EINVAL)."""
    hwpt = ctx.get(hwpt_id, ObjType.HWPT_PAGING)
    if not isinstance(hwpt.domain, MockDomain):
        raise Errno(errno.EINVAL)
    return hwpt


@dataclass
class _Vma:
    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int


class _AddressSpace:
    """The mappings of one process, to name the page behind an address the way the
    kernel's struct page would: a shared file page by (device, inode, offset), a
    private page by (process, address)."""

    def __init__(self, tgid: int, proc_dir: int | None = None) -> None:
        self.tgid = tgid
        self.vmas: list[_Vma] = []
        try:
            if proc_dir is not None:
                fd = os.open("maps", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_dir)
            else:
                fd = os.open(f"/proc/{tgid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # gone: nothing is mapped
        with os.fdopen(fd) as f:
            for line in f:
                parts = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in parts[0].split("-"))
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                self.vmas.append(_Vma(start, end, parts[1], int(parts[2], 16), (major, minor), int(parts[4])))
        self.starts = [v.start for v in self.vmas]

    def vma(self, addr: int) -> _Vma | None:
        i = bisect.bisect_right(getattr(self, "starts", []), addr) - 1
        if i < 0 or self.vmas[i].end <= addr:
            return None
        return self.vmas[i]

    def page(self, addr: int) -> tuple[tuple, int] | None:
        """(key, offset) naming the page at addr (page aligned), or None if no
        readable mapping holds it (what get_user_pages would fail on)."""
        v = self.vma(addr)
        if v is None or v.perms[0] != "r":
            return None
        return self._name(v, addr)

    def _name(self, v: _Vma, addr: int) -> tuple[tuple, int]:
        if v.perms[3] == "s" and v.inode:
            return ("file", v.dev, v.inode), v.offset + (addr - v.start)
        return ("mem", self.tgid), addr

    def segments(self, start: int, end: int) -> list[tuple[tuple, int, int, int]]:
        """[(key, offset of first page, offset past last, address of first page)] over
        the mapped parts of [start, end)."""
        out = []
        i = max(0, bisect.bisect_right(getattr(self, "starts", []), start) - 1)
        while i < len(self.vmas) and self.vmas[i].start < end:
            v = self.vmas[i]
            s, e = max(v.start, start), min(v.end, end)
            if s < e:
                key, off = self._name(v, s)
                out.append((key, off, off + (e - s), s))
            i += 1
        return out


def _file_key(fd: int) -> tuple:
    if fd_on_our_mount(fd):
        raise Errno(errno.EINVAL)  # not memory; and fstat() there would ask ourselves
    st = os.fstat(fd)
    return ("file", (os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)


def _pages_segments(pages: Pages, spaces: dict[Any, Any]) -> list[tuple[tuple, int, int, int]]:
    """[(key, offset, offset end, first index)] naming the pages of a Pages entry."""
    if isinstance(pages, FilePages):
        try:
            key = _file_key(pages.file_fd)
        except OSError:
            return []
        return [(key, pages.start, pages.start + pages.npages * PAGE_SIZE, 0)]
    if isinstance(pages, UserPages):
        space = spaces.get(pages.id)
        if space is None:
            space = spaces[pages.id] = _AddressSpace(pages.source_tgid, pages.proc_dir)
        end = pages.uptr + pages.npages * PAGE_SIZE
        return [(k, o, oe, (a - pages.uptr) // PAGE_SIZE) for k, o, oe, a in space.segments(pages.uptr, end)]
    return []


def _page_of_pa(system: Any, pa: int) -> tuple[int, int]:
    """(pages id, byte offset inside the pages) of an emulated physical address."""
    pid = ffi.new("int64_t *")
    index = ffi.new("uint64_t *")
    if lib.icuse_pa_lookup(system.store, pa, pid, index):
        return -1, 0
    return pid[0], index[0] * PAGE_SIZE + pa % PAGE_SIZE


def op_md_check_map(t: SelftestCall) -> int:
    """MD_CHECK_MAP: every page_size step of [iova, iova + length) must translate, in
    the mock domain, to the page the caller has at uptr (same offset inside it)."""
    hwpt = _get_md_pagetable(t.ctx, t.id)
    domain = hwpt.domain
    iova, length, uptr = t.arg.iova, t.arg.length, t.arg.uptr
    page_size = domain.granule
    if iova % page_size or length % page_size or uptr % page_size or uptr + length > ULONG_MAX:
        raise Errno(errno.EINVAL)
    with t.ctx.hold(hwpt):
        user = _AddressSpace(t.ucmd.caller.tgid)
        pages_by_id = {a.pages.id: a.pages for a in hwpt.ioas.iopt.areas}
        spaces: dict[Any, Any] = {}
        while length:
            mine = user.page(uptr & ~(PAGE_SIZE - 1))
            if mine is None:
                raise Errno(errno.EFAULT)
            walk = domain.walk(iova)
            if walk is None:
                raise Errno(errno.EINVAL)
            pid, off = _page_of_pa(t.system, walk[0])
            pages = pages_by_id.get(pid)
            if pages is None:
                raise Errno(errno.EINVAL)
            theirs = _name_page(pages, off // PAGE_SIZE, spaces)
            if theirs is None or theirs[0] != mine[0] or theirs[1] + off % PAGE_SIZE != mine[1] + uptr % PAGE_SIZE:
                raise Errno(errno.EINVAL)
            iova += page_size
            uptr += page_size
            length -= page_size
    return 0


def _name_page(pages: Pages, index: int, spaces: dict[Any, Any]) -> tuple[tuple, int] | None:
    """(key, offset) naming page index of a pages entry (spaces caches what is read)."""
    segs = spaces.get(("segments", pages.id))
    if segs is None:
        segs = spaces[("segments", pages.id)] = _pages_segments(pages, spaces)
    for key, off, off_end, first in segs:
        o = off + (index - first) * PAGE_SIZE
        if index >= first and o < off_end:
            return key, o
    return None


def _all_pages(system: Any) -> list[Pages]:
    """Every pages entry of the daemon (all contexts, all IOASes)."""
    seen: dict[int, Pages] = {}
    for ctx in list(system.contexts):
        for obj in ctx.live_objects():
            if obj.type is ObjType.IOAS:
                for area in obj.iopt.areas:
                    seen[id(area.pages)] = area.pages
    return list(seen.values())


class _Compound:
    """Whether a process's page is part of a compound (huge) page, from pagemap and
    kpageflags: MD_CHECK_REFS does not count those, as the kernel's check skips them."""

    KPF_COMPOUND_HEAD = 1 << 15
    KPF_COMPOUND_TAIL = 1 << 16

    def __init__(self, tgid: int) -> None:
        try:
            self.pagemap = os.open(f"/proc/{tgid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self.flags = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.pagemap = self.flags = -1

    def __call__(self, addr: int) -> bool:
        if self.flags < 0:
            return False
        try:
            ent = int.from_bytes(os.pread(self.pagemap, 8, addr // PAGE_SIZE * 8), "little")
            pfn = ent & ((1 << 55) - 1)
            if not ent >> 63 or not pfn:
                return False
            kf = int.from_bytes(os.pread(self.flags, 8, pfn * 8), "little")
        except OSError:
            return False
        return bool(kf & (self.KPF_COMPOUND_HEAD | self.KPF_COMPOUND_TAIL))

    def close(self) -> None:
        for fd in (self.pagemap, self.flags):
            if fd >= 0:
                os.close(fd)


def op_md_check_refs(t: SelftestCall) -> int:
    """MD_CHECK_REFS: each page of [uptr, uptr + length) must be pinned `refs` times.
    The kernel reads the page's pin count; here each pages entry that has that page
    pinned holds one pin, whichever context or IOAS it belongs to."""
    length, uptr, refs = t.arg.length, t.arg.uptr, t.arg.refs
    if length % PAGE_SIZE or uptr % PAGE_SIZE or uptr + length > ULONG_MAX:
        raise Errno(errno.EINVAL)
    if not length:
        return 0
    tgid = t.ucmd.caller.tgid
    user = _AddressSpace(tgid)
    end = uptr + length
    # Every page must be reachable, as get_user_pages_fast needs.
    pos = uptr
    while pos < end:
        v = user.vma(pos)
        if v is None or v.perms[0] != "r":
            raise Errno(errno.EFAULT)
        pos = v.end
    mine = user.segments(uptr, end)
    counts: dict[int, int] = {}
    spaces: dict[Any, Any] = {}
    for pages in _all_pages(t.system):
        for key, off, off_end, first in _pages_segments(pages, spaces):
            for ukey, uoff, uoff_end, uaddr in mine:
                if ukey != key:
                    continue
                lo, hi = max(off, uoff), min(off_end, uoff_end)
                for o in range(lo, hi, PAGE_SIZE):
                    if pages.pin_count(first + (o - off) // PAGE_SIZE) > 0:
                        a = uaddr + (o - uoff)
                        counts[a] = counts.get(a, 0) + 1
    compound = _Compound(tgid)
    try:
        for a in range(uptr, end, PAGE_SIZE):
            if counts.get(a, 0) != refs and not compound(a):
                log.debug("MD_CHECK_REFS: page %#x has %d pins, expected %d", a, counts.get(a, 0), refs)
                raise Errno(errno.EIO)
    finally:
        compound.close()
    return 0


def op_md_check_iotlb(t: SelftestCall) -> int:
    """MD_CHECK_IOTLB: entry `id` of the mock IOTLB of the nested HWPT t.id holds
    `iotlb`. Not a nested HWPT: ENOENT; not the mock's, an id past
    MOCK_NESTED_DOMAIN_IOTLB_ID_MAX or another value: EINVAL."""
    hwpt = t.ctx.get(t.id, ObjType.HWPT_NESTED)
    domain = hwpt.domain
    iotlb_id = t.arg.id
    if (
        not isinstance(domain, MockNestedDomain)
        or iotlb_id > uapi.MOCK_NESTED_DOMAIN_IOTLB_ID_MAX
        or domain.iotlb[iotlb_id] != t.arg.iotlb
    ):
        raise Errno(errno.EINVAL)
    return 0


async def op_dirty(t: SelftestCall) -> int:
    """DIRTY: mark dirty, in the mock domain, each page_size page of [iova, iova +
    length) whose bit is set in the caller's bitmap at uptr; out_nr_dirty counts
    the set bits."""
    a = t.arg
    if not a.page_size or not a.length or a.iova % a.page_size or a.length % a.page_size or not a.uptr:
        raise Errno(errno.EINVAL)
    nbits = a.length // a.page_size
    if nbits > MAX_DIRTY_BITMAP * 8:
        raise Errno(errno.EOVERFLOW)  # checked before the lookup, as the kernel does
    hwpt = _get_md_pagetable(t.ctx, t.id)
    domain = hwpt.domain
    if not domain.dirty_tracking:
        raise Errno(errno.EINVAL)
    nbytes = (nbits + 7) // 8
    with t.ctx.hold(hwpt):
        caller = t.ucmd.caller

        def mark() -> int:
            bitmap = bytearray((nbits + 63) // 64 * 8)  # whole words, zero past nbytes
            if caller.read_into(a.uptr, bitmap, nbytes):
                raise Errno(errno.EFAULT)
            return domain.mark_dirty_bitmap(a.iova, a.page_size, bitmap, nbits)

        a.out_nr_dirty = await trio.to_thread.run_sync(mark) if nbytes > 4096 else mark()
        t.respond()
    return 0
