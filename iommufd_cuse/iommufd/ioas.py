"""IOAS objects and their ioctls (drivers/iommu/iommufd/ioas.c)."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct

import trio

from .. import uapi
from .._native import ffi, lib
from ..errors import Errno
from ..transport.caller import CAP_SYS_RESOURCE, in_background
from .io_pagetable import IOMMU_READ, IOMMU_WRITE, ULONG_MAX, Allowed, IoPagetable, PagesSlice
from .object import Context, Object, ObjType, Ucmd
from .pages import AccountMode, DmabufPages, FilePages, UserPages, dmabuf_get

log = logging.getLogger(__name__)

RANGE = struct.Struct("<QQ")  # struct iommu_iova_range
MAP_FLAGS = uapi.IOMMU_IOAS_MAP_FIXED_IOVA | uapi.IOMMU_IOAS_MAP_WRITEABLE | uapi.IOMMU_IOAS_MAP_READABLE
MAX_IOVA_RANGES = 1 << 20  # bounds what ALLOW_IOVAS reads from the caller
IOVA_CHUNK = 1 << 16  # ranges read from the caller at a time
INLINE_RANGES = 4096  # longer lists are checked in a worker thread


class Ioas(Object):
    type = ObjType.IOAS

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.iopt = IoPagetable()
        self.hwpts: list[object] = []  # automatic domains made for attached devices

    def destroy(self) -> None:
        self.iopt.destroy()


def get_ioas(ctx: Context, ioas_id: int) -> Ioas:
    return ctx.get(ioas_id, ObjType.IOAS)


def conv_prot(flags: int) -> int:
    prot = 0
    if flags & uapi.IOMMU_IOAS_MAP_WRITEABLE:
        prot |= IOMMU_WRITE
    if flags & uapi.IOMMU_IOAS_MAP_READABLE:
        prot |= IOMMU_READ
    return prot


def _check_map_flags(flags: int, *sizes: int) -> None:
    if flags & ~MAP_FLAGS:
        raise Errno(errno.EOPNOTSUPP)
    if any(s >= ULONG_MAX for s in sizes):
        raise Errno(errno.EOVERFLOW)
    if not flags & (uapi.IOMMU_IOAS_MAP_WRITEABLE | uapi.IOMMU_IOAS_MAP_READABLE):
        raise Errno(errno.EINVAL)


# -- handlers -------------------------------------------------------------------------
def ioas_alloc(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.flags:
        raise Errno(errno.EOPNOTSUPP)
    ctx = ucmd.ctx
    ioas = ctx.alloc(Ioas(ctx))
    cmd.out_ioas_id = ioas.id
    ucmd.respond_and_finalize(ioas)
    return 0


def ioas_iova_ranges(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.reserved:
        raise Errno(errno.EOPNOTSUPP)
    ioas = get_ioas(ucmd.ctx, cmd.ioas_id)
    ranges = ioas.iopt.iova_ranges()
    max_iovas = cmd.num_iovas
    out = b"".join(RANGE.pack(s, e) for s, e in ranges[:max_iovas])
    ucmd.caller.write(cmd.allowed_iovas, out)
    cmd.num_iovas = len(ranges)
    cmd.out_iova_alignment = ioas.iopt.iova_alignment
    ucmd.respond()
    if len(ranges) > max_iovas:
        raise Errno(errno.EMSGSIZE)
    return 0


async def _load_iovas(ucmd: Ucmd, addr: int, num: int) -> Allowed:
    """iommufd_ioas_load_iovas: the ranges in order, each non-empty and missing every
    earlier one (EINVAL), an unreadable one EFAULT; whichever comes first. Read and
    checked in C, in a worker thread when long. More than MAX_IOVA_RANGES valid
    ranges is ENOMEM (the kernel's allocations would fail about there)."""
    want = min(num, MAX_IOVA_RANGES)
    if want > INLINE_RANGES:
        words = await trio.to_thread.run_sync(in_background, _read_and_check, ucmd.caller, addr, want)
    else:
        words = _read_and_check(ucmd.caller, addr, want)
    if num > want:
        raise Errno(errno.ENOMEM)
    return Allowed(words)


def _read_and_check(caller, addr: int, want: int) -> memoryview:  # noqa: ANN001
    """The sorted ranges, or Errno at the first bad one (EINVAL) or unreadable one (EFAULT)."""
    # Anonymous mappings: zero pages the kernel provides as they are touched, where an
    # array or bytearray would be filled under the GIL, stalling the loop for milliseconds.
    raw = _zeroed_words(2 * want)
    view = raw.cast("B")
    got = 0  # ranges read
    fault = False
    while got < want:
        n = min(want - got, IOVA_CHUNK)
        if caller.read_into(addr + got * RANGE.size, view[got * RANGE.size :], n * RANGE.size):
            # Some range of this chunk cannot be read: the ones before it count.
            lo, hi = 0, n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if caller.read_into(addr + got * RANGE.size, view[got * RANGE.size :], mid * RANGE.size):
                    hi = mid
                else:
                    lo = mid
            got += lo
            fault = True
            break
        got += n
    words = _zeroed_words(2 * got)
    bad = lib.icuse_ranges_check(ffi.from_buffer("uint64_t[]", raw), got, ffi.from_buffer("uint64_t[]", words))
    if bad < 0:
        raise Errno(-bad)
    if bad < got:
        raise Errno(errno.EINVAL)
    if fault:
        raise Errno(errno.EFAULT)
    return words


def _zeroed_words(n: int) -> memoryview:
    """n zero uint64s, writable."""
    return memoryview(mmap.mmap(-1, 8 * n) if n else bytearray()).cast("Q")


async def ioas_allow_iovas(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.reserved:
        raise Errno(errno.EOPNOTSUPP)
    ioas = get_ioas(ucmd.ctx, cmd.ioas_id)
    with ucmd.ctx.hold(ioas):
        allowed = await _load_iovas(ucmd, cmd.allowed_iovas, cmd.num_iovas)
        async with ioas.iopt.lock:
            ioas.iopt.set_allowed(allowed)
    return 0


async def ioas_map(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.reserved:
        raise Errno(errno.EOPNOTSUPP)
    _check_map_flags(cmd.flags, cmd.iova, cmd.length)
    ctx = ucmd.ctx
    ioas = get_ioas(ctx, cmd.ioas_id)
    with ctx.hold(ioas):
        fixed = cmd.flags & uapi.IOMMU_IOAS_MAP_FIXED_IOVA
        cmd.iova = await ioas_map_user(
            ctx, ucmd.caller, ioas, cmd.user_va, cmd.length, cmd.iova if fixed else None, conv_prot(cmd.flags)
        )
        ucmd.respond()  # a faulting copy-out leaves the mapping, as in the kernel
    return 0


async def ioas_map_user(
    ctx: Context,
    caller,
    ioas: Ioas,
    user_va: int,
    length: int,  # noqa: ANN001
    iova: int | None,
    prot: int,
) -> int:
    """iopt_map_user_pages: the caller's memory at user_va, at iova (None: allocate)."""
    if user_va + length > ULONG_MAX:
        raise Errno(errno.EOVERFLOW)
    if length == 0 or length > ULONG_MAX - 4096:
        raise Errno(errno.EINVAL)
    pages = UserPages(ctx.system, caller, ctx.account_mode, user_va, length, bool(prot & IOMMU_WRITE))
    try:
        async with ioas.iopt.lock:
            iova = await ioas.iopt.map_pages([PagesSlice(pages, pages.start_byte, length)], length, iova, prot)
    finally:
        pages.put()
    count_map(ctx)
    return iova


def count_map(ctx: Context, unmap: bool = False) -> None:
    """One more map (or unmap) that succeeded, for status: a guest's DMA API shows here."""
    if unmap:
        ctx.unmaps += 1
        ctx.system.unmaps += 1
    else:
        ctx.maps += 1
        ctx.system.maps += 1


async def ioas_map_file(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    _check_map_flags(cmd.flags, cmd.iova, cmd.length)
    ctx = ucmd.ctx
    ioas = get_ioas(ctx, cmd.ioas_id)
    with ctx.hold(ioas):
        fd = ucmd.caller.fetch_fd(cmd.fd)
        try:
            if cmd.length and cmd.start + cmd.length - 1 > ULONG_MAX:
                raise Errno(errno.EOVERFLOW)
            if cmd.length == 0:
                raise Errno(errno.EINVAL)
            writable = bool(cmd.flags & uapi.IOMMU_IOAS_MAP_WRITEABLE)
            dmabuf = await dmabuf_get(fd)
            if dmabuf is None:
                pages: FilePages = FilePages(
                    ctx.system, ucmd.caller, ctx.account_mode, fd, cmd.start, cmd.length, writable
                )
        except BaseException:
            os.close(fd)
            raise
        if dmabuf is not None:
            os.close(fd)  # the pages hold the dma-buf's memory, not the caller's file
            pages = DmabufPages(ctx.system, ucmd.caller, dmabuf, cmd.start, cmd.length, writable)
        try:
            cmd.iova = await _map(ioas, [PagesSlice(pages, pages.start_byte, cmd.length)], cmd)
        finally:
            pages.put()
        count_map(ctx)
        ucmd.respond()  # a faulting copy-out leaves the mapping, as in the kernel
    return 0


async def _map(ioas: Ioas, slices: list[PagesSlice], cmd) -> int:  # noqa: ANN001
    fixed = cmd.flags & uapi.IOMMU_IOAS_MAP_FIXED_IOVA
    async with ioas.iopt.lock:
        return await ioas.iopt.map_pages(slices, cmd.length, cmd.iova if fixed else None, conv_prot(cmd.flags))


async def ioas_copy(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    _check_map_flags(cmd.flags, cmd.length, cmd.src_iova, cmd.dst_iova)
    ctx = ucmd.ctx
    src = get_ioas(ctx, cmd.src_ioas_id)
    slices = src.iopt.get_pages(cmd.src_iova, cmd.length)
    for sl in slices:
        sl.pages.refs += 1
    try:
        dst = get_ioas(ctx, cmd.dst_ioas_id)
        with ctx.hold(dst):
            fixed = cmd.flags & uapi.IOMMU_IOAS_MAP_FIXED_IOVA
            async with dst.iopt.lock:
                cmd.dst_iova = await dst.iopt.map_pages(
                    slices, cmd.length, cmd.dst_iova if fixed else None, conv_prot(cmd.flags)
                )
            ucmd.respond()
    finally:
        for sl in slices:
            sl.pages.put()
    return 0


async def ioas_unmap(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    ioas = get_ioas(ucmd.ctx, cmd.ioas_id)
    with ucmd.ctx.hold(ioas):
        async with ioas.iopt.lock:
            if cmd.iova == 0 and cmd.length == ULONG_MAX:
                unmapped = ioas.iopt.unmap_all()
            else:
                if cmd.iova >= ULONG_MAX or cmd.length >= ULONG_MAX:
                    raise Errno(errno.EOVERFLOW)
                if not cmd.length:
                    raise Errno(errno.EINVAL)
                if cmd.iova + cmd.length - 1 > ULONG_MAX:
                    raise Errno(errno.EOVERFLOW)
                rc, unmapped = ioas.iopt.unmap_range(cmd.iova, cmd.iova + cmd.length - 1)
                if rc:
                    raise Errno(rc)
                if not unmapped:
                    raise Errno(errno.ENOENT)
        count_map(ucmd.ctx, unmap=True)
        cmd.length = unmapped
        ucmd.respond()
    return 0


def option_huge_pages(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    if cmd.reserved:
        raise Errno(errno.EOPNOTSUPP)
    ioas = get_ioas(ucmd.ctx, cmd.object_id)
    iopt = ioas.iopt
    if cmd.op == uapi.IOMMU_OPTION_OP_GET:
        cmd.val64 = int(not iopt.disable_large_pages)
        return 0
    if cmd.op == uapi.IOMMU_OPTION_OP_SET:
        if iopt.lock.locked():
            raise Errno(errno.EBUSY)
        if cmd.val64 not in (0, 1):
            raise Errno(errno.EINVAL)
        iopt.set_large_pages(bool(cmd.val64))
        return 0
    raise Errno(errno.EOPNOTSUPP)


def option_rlimit_mode(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    ctx = ucmd.ctx
    if cmd.object_id:
        raise Errno(errno.EOPNOTSUPP)
    if cmd.op == uapi.IOMMU_OPTION_OP_GET:
        cmd.val64 = int(ctx.account_mode is AccountMode.MM)
        return 0
    if cmd.op == uapi.IOMMU_OPTION_OP_SET:
        if not ucmd.caller.capable(CAP_SYS_RESOURCE):
            raise Errno(errno.EPERM)
        if ctx.objects:
            raise Errno(errno.EBUSY)
        if cmd.val64 == 0:
            ctx.account_mode = AccountMode.USER
        elif cmd.val64 == 1:
            ctx.account_mode = AccountMode.MM
        else:
            raise Errno(errno.EINVAL)
        return 0
    raise Errno(errno.EOPNOTSUPP)


def option(ucmd: Ucmd) -> int:
    """IOMMU_OPTION: on success only val64 is copied back."""
    cmd = ucmd.cmd
    if cmd.reserved:
        raise Errno(errno.EOPNOTSUPP)
    if cmd.option_id == uapi.IOMMU_OPTION_RLIMIT_MODE:
        option_rlimit_mode(ucmd)
    elif cmd.option_id == uapi.IOMMU_OPTION_HUGE_PAGES:
        option_huge_pages(ucmd)
    else:
        raise Errno(errno.EOPNOTSUPP)
    ucmd.respond_field("val64")
    return 0


async def ioas_change_process(ucmd: Ucmd) -> int:
    """IOMMU_IOAS_CHANGE_PROCESS: move the accounting of every pinned page of the
    context to the calling process (e.g. a VMM handing over to its successor).
    Only file-backed areas can move: memory of a process's address space stays
    tied to it (EINVAL)."""
    cmd = ucmd.cmd
    if cmd.reserved:
        raise Errno(errno.EOPNOTSUPP)
    ctx = ucmd.ctx
    caller = ucmd.caller
    ioases = sorted((o for o in ctx.live_objects() if o.type is ObjType.IOAS), key=lambda o: o.id)
    locked = []
    try:
        for ioas in ioases:  # the kernel takes every IOAS's iova lock, in id order
            await ioas.iopt.lock.acquire()
            locked.append(ioas)
        all_pages: dict[int, FilePages] = {}
        for ioas in ioases:
            for area in ioas.iopt.areas:
                if not isinstance(area.pages, FilePages):
                    raise Errno(errno.EINVAL)
                all_pages[id(area.pages)] = area.pages
        tgid = caller.tgid
        moving = [p for p in all_pages.values() if p.source_tgid != tgid]
        charged = []
        try:
            for p in moving:  # charge the new owner first: on ENOMEM nothing has changed
                p.charge_to(caller, p.npinned)
                charged.append(p)
        except BaseException:
            for p in charged:
                p.uncharge_from(caller, p.npinned)
            raise
        for p in moving:
            p.move_source(caller)
    finally:
        for ioas in locked:
            ioas.iopt.lock.release()
    return 0
