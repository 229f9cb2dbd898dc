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
from .main import Context, Object, ObjType, Ucmd

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


async def hwpt_paging_alloc(ctx: Context, ioas, idev, flags: int, auto: bool = False) -> HwptPaging:  # noqa: ANN001
    """iommufd_hwpt_paging_alloc: a new domain of idev's IOMMU for ioas (not yet finalized)."""
    iommu = idev.device.iommu
    if flags & ~HWPT_ALLOC_FLAGS:
        raise Errno(errno.EOPNOTSUPP)
    if flags & uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING and not iommu.dirty_tracking:
        raise Errno(errno.EOPNOTSUPP)
    if flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT and not iommu.cfg.nest_parent:
        raise Errno(errno.EOPNOTSUPP)
    if flags & (uapi.IOMMU_HWPT_ALLOC_PASID | uapi.IOMMU_HWPT_FAULT_ID_VALID):
        # No PASID support on the emulated IOMMUs, and no fault objects (FAULT_QUEUE_ALLOC).
        raise Errno(errno.EOPNOTSUPP)
    domain = iommu.domain_alloc_paging(dirty_tracking=bool(flags & uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING))
    hwpt = ctx.alloc(HwptPaging(ctx, ioas, domain, auto))
    hwpt.nest_parent = bool(flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT)
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
    pt = ctx.get(cmd.pt_id)
    with ctx.hold(idev), ctx.hold(pt):
        if isinstance(pt, Ioas):
            if cmd.data_type != uapi.IOMMU_HWPT_DATA_NONE:
                raise Errno(errno.EOPNOTSUPP)  # no driver-specific paging data here
            hwpt = await hwpt_paging_alloc(ctx, pt, idev, cmd.flags)
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
