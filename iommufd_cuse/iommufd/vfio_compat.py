"""The VFIO type1 container API served on an iommufd (drivers/iommu/iommufd/vfio_compat.c).

The container ioctls act on the context's compat IOAS, chosen with
IOMMU_VFIO_IOAS (or made when a legacy group attaches). Type1 (v1) may unmap
inside a mapping: the compat IOAS then has large pages disabled so areas can
be cut at any page.
"""

from __future__ import annotations

import errno
import logging
import struct

from .. import uapi
from ..errors import Errno
from ..system import PAGE_SIZE
from ..transport.caller import Caller
from .io_pagetable import IOMMU_READ, IOMMU_WRITE, ULONG_MAX
from .ioas import Ioas, count_map, get_ioas, ioas_map_user
from .object import Context, Ucmd

log = logging.getLogger(__name__)

u = uapi
VFIO_TYPE1v2_IOMMU = 3  # (absent from the 7.3 tables' constant list; value from vfio.h)
U32_MAX = (1 << 32) - 1
CAP_HEADER = struct.Struct("<HHI")  # struct vfio_info_cap_header
IOVA_RANGE = struct.Struct("<QQ")  # struct vfio_iova_range


def get_compat_ioas(ctx: Context) -> Ioas:
    if ctx.vfio_ioas is None:
        raise Errno(errno.ENODEV)
    return ctx.vfio_ioas


# -- IOMMU_VFIO_IOAS ------------------------------------------------------------------
def vfio_ioas(ucmd: Ucmd) -> int:
    cmd = ucmd.cmd
    ctx = ucmd.ctx
    if cmd.reserved:
        raise Errno(errno.EOPNOTSUPP)
    if cmd.op == u.IOMMU_VFIO_IOAS_GET:
        cmd.ioas_id = get_compat_ioas(ctx).id
        ucmd.respond()
        return 0
    if cmd.op == u.IOMMU_VFIO_IOAS_SET:
        ctx.vfio_ioas = get_ioas(ctx, cmd.ioas_id)
        return 0
    if cmd.op == u.IOMMU_VFIO_IOAS_CLEAR:
        ctx.vfio_ioas = None
        return 0
    raise Errno(errno.EOPNOTSUPP)


# -- the container ioctls --------------------------------------------------------------
def vfio_ioctl(ctx: Context, caller: Caller, cmd: int, arg: int):  # noqa: ANN201
    """iommufd_vfio_ioctl: the numbers outside the iommufd table."""
    if cmd == u.VFIO_GET_API_VERSION:
        return u.VFIO_API_VERSION
    if cmd == u.VFIO_SET_IOMMU:
        return _set_iommu(ctx, arg)
    if cmd == u.VFIO_CHECK_EXTENSION:
        return _check_extension(ctx, arg)
    if cmd == u.VFIO_IOMMU_GET_INFO:
        return _get_info(ctx, caller, arg)
    if cmd == u.VFIO_IOMMU_MAP_DMA:
        return _map_dma(ctx, caller, arg)
    if cmd == u.VFIO_IOMMU_UNMAP_DMA:
        return _unmap_dma(ctx, caller, arg)
    raise Errno(errno.ENOTTY)  # VFIO_IOMMU_DIRTY_PAGES included: obsolete


def _check_extension(ctx: Context, ext: int) -> int:
    if ext in (u.VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU, u.VFIO_UNMAP_ALL):
        return 1
    if ext == u.VFIO_DMA_CC_IOMMU:
        get_compat_ioas(ctx)  # ENODEV without one
        return 1  # the emulated IOMMUs always enforce cache coherency
    # VFIO_UPDATE_VADDR (cannot be made safe), nesting, no-IOMMU, SPAPR, unknown: 0.
    return 0


def _set_iommu(ctx: Context, type_: int):  # noqa: ANN202
    if type_ not in (u.VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU):
        raise Errno(errno.EINVAL)
    ioas = get_compat_ioas(ctx)  # VFIO fails SET_IOMMU when no group is attached
    if type_ != u.VFIO_TYPE1_IOMMU:
        return 0

    async def disable_large_pages() -> int:
        # v1 may unmap inside a mapping: only page-sized IOPTEs can be split.
        async with ioas.iopt.lock:
            ioas.iopt.set_large_pages(False)
        return 0

    return disable_large_pages()


def _pagesizes(ioas: Ioas) -> int:
    iopt = ioas.iopt
    bitmap = ULONG_MAX
    for d in iopt.domains:
        bitmap &= d.pgsize_bitmap
    if bitmap & (PAGE_SIZE - 1):  # as vfio_update_pgsize_bitmap(): nothing below PAGE_SIZE
        bitmap &= ~(PAGE_SIZE - 1)
        bitmap |= PAGE_SIZE
    return max(bitmap, iopt.iova_alignment)


def _get_info(ctx: Context, caller: Caller, arg: int) -> int:
    s = u.vfio_iommu_type1_info
    minsz = uapi.offsetofend(s, "iova_pgsizes")
    info = s.unpack(caller.read(arg, minsz) + bytes(s.SIZE - minsz))
    if info.argsz < minsz:
        raise Errno(errno.EINVAL)
    copy = min(info.argsz, s.SIZE)
    ioas = get_compat_ioas(ctx)
    info.flags = u.VFIO_IOMMU_INFO_PGSIZES
    info.iova_pgsizes = _pagesizes(ioas)
    info.cap_offset = 0
    # The capability chain, in mainline's order: DMA_AVAIL, then IOVA_RANGE.
    ranges = ioas.iopt.iova_ranges()
    caps = [
        CAP_HEADER.pack(u.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 0) + struct.pack("<I", U32_MAX),
        CAP_HEADER.pack(u.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0)
        + struct.pack("<II", len(ranges), 0)
        + b"".join(IOVA_RANGE.pack(a, b) for a, b in ranges),
    ]
    total = s.SIZE
    prev = None
    for cap in caps:
        avail = info.argsz - total if info.argsz > total else 0
        if avail >= len(cap):
            caller.write(arg + total, cap)
        elif avail > 16 and cap[0] == u.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            # As much of the range array as fits (the header only when all fit).
            caller.write(arg + total + 16, cap[16 : 16 + (avail - 16) // 16 * 16])
        if prev is not None and info.argsz >= total:
            caller.write(arg + prev + 4, struct.pack("<I", total))  # the previous cap's next
        prev = total
        total += len(cap)
    if info.argsz >= total:
        info.cap_offset = s.SIZE
    info.argsz = total
    info.flags |= u.VFIO_IOMMU_INFO_CAPS
    caller.write(arg, s.pack(info)[:copy])
    return 0


async def _map_dma_async(ctx: Context, caller: Caller, m) -> int:  # noqa: ANN001
    ioas = get_compat_ioas(ctx)
    prot = (IOMMU_READ if m.flags & u.VFIO_DMA_MAP_FLAG_READ else 0) | (
        IOMMU_WRITE if m.flags & u.VFIO_DMA_MAP_FLAG_WRITE else 0
    )
    with ctx.hold(ioas):
        await ioas_map_user(ctx, caller, ioas, m.vaddr, m.size, m.iova, prot)
    return 0


def _map_dma(ctx: Context, caller: Caller, arg: int):  # noqa: ANN202
    s = u.vfio_iommu_type1_dma_map
    m = s.unpack(caller.read(arg, s.SIZE))
    if m.argsz < s.SIZE or m.flags & ~(u.VFIO_DMA_MAP_FLAG_READ | u.VFIO_DMA_MAP_FLAG_WRITE):
        raise Errno(errno.EINVAL)
    get_compat_ioas(ctx)
    return _map_dma_async(ctx, caller, m)


def _unmap_dma(ctx: Context, caller: Caller, arg: int):  # noqa: ANN202
    s = u.vfio_iommu_type1_dma_unmap
    minsz = uapi.offsetofend(s, "size")
    um = s.unpack(caller.read(arg, minsz))
    if um.argsz < minsz or um.flags & ~u.VFIO_DMA_UNMAP_FLAG_ALL:
        raise Errno(errno.EINVAL)
    ioas = get_compat_ioas(ctx)

    async def unmap() -> int:
        with ctx.hold(ioas):
            iopt = ioas.iopt
            async with iopt.lock:
                if um.flags & u.VFIO_DMA_UNMAP_FLAG_ALL:
                    if um.iova or um.size:
                        raise Errno(errno.EINVAL)
                    rc, unmapped = 0, iopt.unmap_all()
                else:
                    if not um.size:
                        raise Errno(errno.EINVAL)
                    last = um.iova + um.size - 1
                    if last > ULONG_MAX:
                        raise Errno(errno.EOVERFLOW)
                    if iopt.disable_large_pages:
                        # Type1 v1: cut the areas at both ends of the range first.
                        iopt.cut([last] + ([um.iova - 1] if um.iova else []))
                    rc, unmapped = iopt.unmap_range(um.iova, last)
            um.size = unmapped
            caller.write(arg, s.pack(um)[:minsz])  # the size is reported even on failure
            if rc:
                raise Errno(rc)
            count_map(ctx, unmap=True)
        return 0

    return unmap()
