"""Device objects: a device bound to a context, attached to an IO page table
(drivers/iommu/iommufd/device.c).

Binding claims DMA ownership of the device's group for the context; the
devices of one group bound to one context share an igroup and are always
attached together to the same HWPT. Attaching puts the device's reserved
regions into the IOAS; detaching removes them and returns the group to the
blocking domain.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

import trio

from .. import uapi
from ..iommu.core import Device, Group
from ..transport.caller import Errno
from .hw_pagetable import HwptPaging, hwpt_paging_alloc
from .ioas import Ioas
from .main import Context, Object, ObjType, Ucmd

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Igroup:
    """struct iommufd_group: one group's devices in one context."""

    group: Group
    devices: list[Idev] = field(default_factory=list)
    hwpt: HwptPaging | None = None
    pasids: dict[int, HwptPaging] = field(default_factory=dict)  # PASID attachments (mock devices)


class Idev(Object):
    type = ObjType.DEVICE

    def __init__(self, ctx: Context, device: Device, igroup: Igroup) -> None:
        super().__init__()
        self.ctx = ctx
        self.device = device
        self.igroup = igroup

    def destroy(self) -> None:
        self.igroup.devices.remove(self)
        if not self.igroup.devices:
            self.ctx.igroups.pop(self.igroup.group.id, None)
        self.device.group.release_dma_owner()


def get_idev(ctx: Context, dev_id: int) -> Idev:
    return ctx.get(dev_id, ObjType.DEVICE)


def bind(ctx: Context, device: Device) -> Idev:
    """iommufd_device_bind: claim the group for ctx; the caller (vfio) keeps a users ref."""
    group = device.group
    group.claim_dma_owner(ctx)
    igroup = ctx.igroups.get(group.id)
    if igroup is None:
        igroup = ctx.igroups[group.id] = Igroup(group)
    idev = ctx.alloc(Idev(ctx, device, igroup))
    igroup.devices.append(idev)
    ctx.finalize(idev)
    idev.users += 1  # held by the vfio device file until unbind
    return idev


async def unbind(idev: Idev) -> None:
    """iommufd_device_unbind: detach, then destroy the device object."""
    with trio.CancelScope(shield=True):
        await detach(idev)
        idev.users -= 1
        if not idev.ctx.closed:
            idev.ctx.remove(idev.id)


def _reserve_regions(idev: Idev, ioas: Ioas) -> None:
    """iopt_table_enforce_dev_resv_regions: the device's reserved IOVA (e.g. the MSI window)."""
    iopt = ioas.iopt
    try:
        for start, last in idev.device.iommu.cfg.reserved:
            iopt.reserve(start, last, idev)
    except BaseException:
        iopt.remove_reserved(idev)
        raise


async def attach(idev: Idev, pt_id: int) -> int:
    """Attach (or replace) idev's igroup to pt_id: a HWPT, or an IOAS (automatic domain)."""
    ctx = idev.ctx
    pt = ctx.get(pt_id)
    if isinstance(pt, HwptPaging):
        with ctx.hold(pt):
            await _attach_hwpt(idev, pt)
        return pt.id
    if isinstance(pt, Ioas):
        with ctx.hold(pt):
            return await _attach_auto(idev, pt)
    raise Errno(errno.EINVAL)


async def _attach_auto(idev: Idev, ioas: Ioas) -> int:
    """iommufd_device_auto_get_domain: reuse a compatible automatic HWPT or make one."""
    for hwpt in list(ioas.hwpts):
        if not hwpt.auto_domain:
            continue
        try:
            await _attach_hwpt(idev, hwpt)
        except Errno as e:
            if e.errno == errno.EINVAL:
                continue  # incompatible domain: try the next
            raise
        return hwpt.id
    ctx = idev.ctx
    hwpt = await hwpt_paging_alloc(ctx, ioas, idev, 0, auto=True)
    try:
        await _attach_hwpt(idev, hwpt)
    except BaseException:
        with trio.CancelScope(shield=True):
            ctx.abort(hwpt)
        raise
    ctx.finalize(hwpt)  # it goes away with its last device (_put_hwpt)
    return hwpt.id


def _compatible(idev: Idev, hwpt: HwptPaging) -> bool:
    return idev.device.iommu.attach_compatible(idev.device, hwpt.domain)


async def _attach_hwpt(idev: Idev, hwpt: HwptPaging) -> None:
    igroup = idev.igroup
    old = igroup.hwpt
    if old is hwpt:
        return
    if not _compatible(idev, hwpt):
        raise Errno(errno.EINVAL)
    if igroup.pasids and not hwpt.pasid_compat:
        raise Errno(errno.EINVAL)  # PASIDs are attached: the RID domain must allow them
    ioas = hwpt.ioas
    async with ioas.iopt.lock:
        _reserve_regions(idev, ioas)
    if old is not None and old.ioas is not ioas:
        old.ioas.iopt.remove_reserved(idev)
    # The new domain is fully loaded before the switch: no window without translations.
    igroup.group.set_domain(hwpt.domain)
    igroup.hwpt = hwpt
    hwpt.users += 1
    if old is not None:
        _put_hwpt(idev.ctx, old)
    log.debug("%s attached to %r", idev.device.bdf, hwpt)


def _put_hwpt(ctx: Context, hwpt: HwptPaging) -> None:
    hwpt.users -= 1
    if hwpt.auto_domain and hwpt.users == 1 and hwpt.id in ctx.objects:
        ctx.remove(hwpt.id)


async def detach(idev: Idev) -> None:
    """iommufd_device_detach: back to the blocking domain; a no-op when not attached."""
    detach_sync(idev)


def detach_sync(idev: Idev) -> None:
    """detach() for callers that cannot await (an object's destroy)."""
    igroup = idev.igroup
    hwpt = igroup.hwpt
    if hwpt is None:
        return
    hwpt.ioas.iopt.remove_reserved(idev)
    # Devices of the group share the attachment: it ends with the last of them.
    if any(d is not idev and d.id in idev.ctx.objects for d in igroup.devices):
        return
    igroup.group.set_domain(igroup.group.blocking_domain)
    igroup.hwpt = None
    _put_hwpt(idev.ctx, hwpt)


def get_hw_info(ucmd: Ucmd) -> int:
    """IOMMU_GET_HW_INFO."""
    cmd = ucmd.cmd
    if cmd.flags & ~uapi.IOMMU_HW_INFO_FLAG_INPUT_TYPE or any(cmd.reserved):
        raise Errno(errno.EOPNOTSUPP)
    in_type = cmd.in_data_type if cmd.flags & uapi.IOMMU_HW_INFO_FLAG_INPUT_TYPE else uapi.IOMMU_HW_INFO_TYPE_DEFAULT
    idev = get_idev(ucmd.ctx, cmd.dev_id)
    iommu = idev.device.iommu
    out_type, data = iommu.hw_info()
    if in_type not in (uapi.IOMMU_HW_INFO_TYPE_DEFAULT, out_type):
        raise Errno(errno.EOPNOTSUPP)
    n = min(cmd.data_len, len(data))
    if cmd.data_len:
        ucmd.caller.write(cmd.data_uptr, data[:n] + bytes(cmd.data_len - n))
    cmd.data_len = len(data)
    cmd.out_data_type = out_type
    cmd.out_capabilities, cmd.out_max_pasid_log2 = iommu.hw_caps(idev.device)
    ucmd.respond()
    return 0
