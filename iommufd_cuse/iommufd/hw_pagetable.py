"""HWPT objects: IOMMU domains as iommufd objects (drivers/iommu/iommufd/hw_pagetable.c).

A paging HWPT wraps a domain of the device's IOMMU loaded with every area of
its IOAS; it holds a users reference on the IOAS. Automatic HWPTs are made by
attaching a device to an IOAS and go away with their last device.
"""

from __future__ import annotations

import errno
import logging

import trio

from .. import uapi
from ..iommu.domain import PagingDomain
from ..transport.caller import Errno
from .main import Context, Object, ObjType, Ucmd, copy_struct_from_user

log = logging.getLogger(__name__)

HWPT_ALLOC_FLAGS = (
    uapi.IOMMU_HWPT_ALLOC_NEST_PARENT
    | uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    | uapi.IOMMU_HWPT_FAULT_ID_VALID
    | uapi.IOMMU_HWPT_ALLOC_PASID
)


class HwptPaging(Object):
    type = ObjType.HWPT_PAGING

    def __init__(self, ctx: Context, ioas, domain: PagingDomain, auto: bool = False) -> None:  # noqa: ANN001
        super().__init__()
        self.ctx = ctx
        self.ioas = ioas
        self.domain = domain
        self.auto_domain = auto
        self.nest_parent = False
        self.pasid_compat = False  # allocated with IOMMU_HWPT_ALLOC_PASID
        self.in_iopt = False

    async def load(self) -> None:
        """Add the domain to the IOAS: every area is mapped (and pinned) into it."""
        iopt = self.ioas.iopt
        async with iopt.lock:
            await iopt.add_domain(self.domain)
        self.in_iopt = True
        self.ioas.users += 1
        self.ioas.hwpts.append(self)

    def destroy(self) -> None:
        if self.in_iopt:
            iopt = self.ioas.iopt
            if iopt.lock.locked():
                log.warning("destroying %r while its IOAS is busy", self)
            iopt.remove_domain(self.domain)
            self.ioas.hwpts.remove(self)
            self.ioas.users -= 1
            self.in_iopt = False


class UserData:
    """struct iommu_user_data: driver-specific data a HWPT_ALLOC carries, read by
    the driver when it wants it (iommu_copy_struct_from_user)."""

    def __init__(self, caller, data_type: int, uptr: int, length: int) -> None:  # noqa: ANN001
        self.caller = caller
        self.type = data_type
        self.uptr = uptr
        self.len = length

    def copy_struct(self, data_type: int, struct, last: str):  # noqa: ANN001, ANN201
        """The struct of data_type, at least up to its member last: another type,
        a null pointer or a shorter length is EINVAL; non-zero bytes past the
        known struct are E2BIG."""
        if self.type != data_type or not self.uptr:
            raise Errno(errno.EINVAL)
        if self.len < uapi.offsetofend(struct, last):
            raise Errno(errno.EINVAL)
        return struct.unpack(copy_struct_from_user(self.caller, self.uptr, struct.SIZE, self.len))


async def hwpt_paging_alloc(ctx: Context, ioas, idev, flags: int, auto: bool = False,  # noqa: ANN001
                            user_data: UserData | None = None) -> HwptPaging:
    """iommufd_hwpt_paging_alloc: a new domain of idev's IOMMU for ioas (not yet finalized)."""
    iommu = idev.device.iommu
    if flags & ~HWPT_ALLOC_FLAGS:
        raise Errno(errno.EOPNOTSUPP)
    domain = iommu.domain_alloc_user(idev.device, flags, user_data)
    hwpt = ctx.alloc(HwptPaging(ctx, ioas, domain, auto))
    hwpt.nest_parent = bool(flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
    hwpt.pasid_compat = bool(flags & uapi.IOMMU_HWPT_ALLOC_PASID)
    try:
        await hwpt.load()
    except BaseException:
        with trio.CancelScope(shield=True):
            ctx.abort(hwpt)
        raise
    return hwpt


async def hwpt_alloc(ucmd: Ucmd) -> int:
    """IOMMU_HWPT_ALLOC."""
    from .device import get_idev
    from .ioas import Ioas

    cmd = ucmd.cmd
    ctx = ucmd.ctx
    if cmd.reserved or cmd.reserved2:
        raise Errno(errno.EOPNOTSUPP)
    if (cmd.data_type == uapi.IOMMU_HWPT_DATA_NONE and cmd.data_len) or (
        cmd.data_type != uapi.IOMMU_HWPT_DATA_NONE and (not cmd.data_len or not cmd.data_uptr)
    ):
        raise Errno(errno.EINVAL)
    idev = get_idev(ctx, cmd.dev_id)
    try:
        pt = ctx.get(cmd.pt_id)
    except Errno:
        raise Errno(errno.EINVAL) from None  # mainline: an unknown pt_id is EINVAL, not ENOENT
    with ctx.hold(idev), ctx.hold(pt):
        if isinstance(pt, Ioas):
            user_data = None
            if cmd.data_type != uapi.IOMMU_HWPT_DATA_NONE:
                user_data = UserData(ucmd.caller, cmd.data_type, cmd.data_uptr, cmd.data_len)
            hwpt = await hwpt_paging_alloc(ctx, pt, idev, cmd.flags, user_data=user_data)
        elif isinstance(pt, HwptPaging):
            # A nested (stage-1) domain on a parent: needs a driver with nesting.
            log.info("HWPT_ALLOC of a nested domain: the emulated IOMMU has no nesting")
            raise Errno(errno.EOPNOTSUPP)
        else:
            raise Errno(errno.EINVAL)
    cmd.out_hwpt_id = hwpt.id
    try:
        ucmd.respond()
    except BaseException:
        ctx.abort(hwpt)
        raise
    ctx.finalize(hwpt)
    return 0


# -- dirty tracking ---------------------------------------------------------------------
def _get_hwpt_paging(ctx: Context, hwpt_id: int) -> HwptPaging:
    return ctx.get(hwpt_id, ObjType.HWPT_PAGING)


def hwpt_set_dirty_tracking(ucmd: Ucmd) -> int:
    """IOMMU_HWPT_SET_DIRTY_TRACKING: enabling first clears what was recorded before."""
    cmd = ucmd.cmd
    if cmd.flags & ~uapi.IOMMU_HWPT_DIRTY_TRACKING_ENABLE:
        raise Errno(errno.EOPNOTSUPP)
    hwpt = _get_hwpt_paging(ucmd.ctx, cmd.hwpt_id)
    domain = hwpt.domain
    if not domain.dirty_tracking_capable:
        raise Errno(errno.EOPNOTSUPP)  # allocated without IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    enable = bool(cmd.flags & uapi.IOMMU_HWPT_DIRTY_TRACKING_ENABLE)
    if enable and not domain.dirty_tracking:
        domain.clear_dirty()
    domain.dirty_tracking = enable
    return 0


async def hwpt_get_dirty_bitmap(ucmd: Ucmd) -> int:
    """IOMMU_HWPT_GET_DIRTY_BITMAP: OR the dirty pages of [iova, iova+length) into the
    user's bitmap (one bit per page_size), clearing them unless NO_CLEAR."""
    cmd = ucmd.cmd
    if cmd.flags & ~uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR or cmd.reserved:
        raise Errno(errno.EOPNOTSUPP)
    ctx = ucmd.ctx
    hwpt = _get_hwpt_paging(ctx, cmd.hwpt_id)
    iopt = hwpt.ioas.iopt
    last = cmd.iova + cmd.length - 1
    if cmd.length == 0 or last > (1 << 64) - 1:
        raise Errno(errno.EOVERFLOW)
    align = iopt.iova_alignment
    if cmd.iova & (align - 1) or (last + 1) & (align - 1) or not cmd.page_size:
        raise Errno(errno.EINVAL)
    if cmd.iova % cmd.page_size or (last + 1) % cmd.page_size:
        raise Errno(errno.EINVAL)
    domain = hwpt.domain
    if not domain.dirty_tracking_capable:
        raise Errno(errno.EOPNOTSUPP)
    if not domain.dirty_tracking:
        raise Errno(errno.EINVAL)  # the drivers refuse a bitmap while tracking is off
    nbits = cmd.length // cmd.page_size
    nbytes = (nbits + 63) // 64 * 8
    if nbytes > 64 << 20:
        raise Errno(errno.ENOMEM)
    with ctx.hold(hwpt):
        bitmap = bytearray(ucmd.caller.read(cmd.data, nbytes))
        no_clear = bool(cmd.flags & uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR)
        # Only the areas are walked, as the kernel does (holes are never dirty).
        for area in iopt.areas_in(cmd.iova, last):
            s, e = max(area.start, cmd.iova), min(area.last, last)
            await trio.to_thread.run_sync(domain.read_dirty, s, e - s + 1, cmd.page_size, cmd.iova, bitmap, no_clear)
        ucmd.caller.write(cmd.data, bitmap)
    return 0
