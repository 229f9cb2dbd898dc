"""Device objects: a device bound to a context, attached to an IO page table
(drivers/iommu/iommufd/device.c).

Binding claims DMA ownership of the device's group for the context; the
devices of one group bound to one context share an igroup, whose domain is
one HWPT for all of them: the first device attached sets it, the others must
attach to the same HWPT (else EINVAL), a replace moves the whole group, and
the group returns to the blocking domain when its last attached device
detaches. Attaching puts the device's reserved regions into the IOAS;
detaching removes them. A HWPT here is a paging one or a nested one; the
IOAS of a nested HWPT is its parent's.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field

import trio

from .. import uapi
from ..errors import Errno
from ..iommu.core import Device, Group
from .hw_pagetable import HwptNested, HwptPaging, hwpt_paging_alloc
from .io_pagetable import ULONG_MAX
from .ioas import Ioas
from .object import Context, Object, ObjType, Ucmd

log = logging.getLogger(__name__)

Hwpt = HwptPaging | HwptNested


@dataclass(eq=False)
class Igroup:
    """struct iommufd_group: one group's devices in one context."""

    group: Group
    devices: list[Idev] = field(default_factory=list)
    hwpt: Hwpt | None = None
    attached: list[Idev] = field(default_factory=list)  # the kernel's igroup->device_list
    pasids: dict[int, Hwpt] = field(default_factory=dict)  # PASID attachments (mock devices)


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
    """VFIO_DEVICE_ATTACH_IOMMUFD_PT: attach idev to pt_id (a HWPT, or an IOAS through an
    automatic domain), or replace its attachment when it is attached already
    (vfio_iommufd_physical_attach_ioas). Returns the HWPT id."""
    replace = idev in idev.igroup.attached
    do = _do_replace if replace else _do_attach
    ctx = idev.ctx
    pt = ctx.get(pt_id)
    if isinstance(pt, (HwptPaging, HwptNested)):
        with ctx.hold(pt):
            await do(idev, pt)
        return pt.id
    if isinstance(pt, Ioas):
        with ctx.hold(pt):
            return await _attach_auto(idev, pt, do)
    raise Errno(errno.EINVAL)


async def _attach_auto(idev: Idev, ioas: Ioas, do) -> int:  # noqa: ANN001
    """iommufd_device_auto_get_domain: reuse a compatible automatic HWPT or make one."""
    for hwpt in list(ioas.hwpts):
        if not hwpt.auto_domain:
            continue
        try:
            await do(idev, hwpt)
        except Errno as e:
            if e.errno == errno.EINVAL:
                continue  # incompatible domain: try the next
            raise
        return hwpt.id
    ctx = idev.ctx
    hwpt = await hwpt_paging_alloc(ctx, ioas, idev, 0, auto=True)
    try:
        await do(idev, hwpt)
    except BaseException:
        with trio.CancelScope(shield=True):
            ctx.abort(hwpt)
        raise
    ctx.finalize(hwpt)  # it goes away with its last device (_put_hwpt)
    return hwpt.id


def _compatible(idev: Idev, hwpt: Hwpt) -> bool:
    return idev.device.iommu.attach_compatible(idev.device, hwpt.domain)


def _check_target(idev: Idev, hwpt: Hwpt) -> None:
    if not _compatible(idev, hwpt):
        raise Errno(errno.EINVAL)
    check = getattr(idev.device.iommu, "attach_check", None)
    if check is not None:
        check(idev.device, hwpt.domain)  # the driver's own refusals (the mock's vIOMMU: ENOENT)
    if idev.igroup.pasids and not hwpt.pasid_compat:
        raise Errno(errno.EINVAL)  # PASIDs are attached: the RID domain must allow them


async def _do_attach(idev: Idev, hwpt: Hwpt) -> None:
    """iommufd_hw_pagetable_attach: the first device of the group attaches the group;
    another device of it may only join the same HWPT."""
    igroup = idev.igroup
    if igroup.hwpt is not None and igroup.hwpt is not hwpt:
        raise Errno(errno.EINVAL)
    _check_target(idev, hwpt)
    async with hwpt.ioas.iopt.lock:
        _reserve_regions(idev, hwpt.ioas)
    if not igroup.attached:
        igroup.group.set_domain(hwpt.domain)
        igroup.hwpt = hwpt
        _attached(igroup, hwpt.domain)
    hwpt.users += 1
    igroup.attached.append(idev)
    log.debug("%s attached to %r", idev.device.bdf, hwpt)


async def _do_replace(idev: Idev, hwpt: Hwpt) -> None:
    """iommufd_device_do_replace: move the whole group to hwpt; the new domain is
    fully loaded before the switch, so there is no window without translations."""
    igroup = idev.igroup
    old = igroup.hwpt
    if old is None or idev not in igroup.attached:
        raise Errno(errno.EINVAL)
    if hwpt is old:
        return
    _check_target(idev, hwpt)
    moved = old.ioas is not hwpt.ioas
    if moved:
        async with hwpt.ioas.iopt.lock:
            done = []
            try:
                for d in igroup.attached:
                    _reserve_regions(d, hwpt.ioas)
                    done.append(d)
            except BaseException:
                for d in done:
                    hwpt.ioas.iopt.remove_reserved(d)
                raise
    igroup.group.set_domain(hwpt.domain)
    igroup.hwpt = hwpt
    _attached(igroup, hwpt.domain)
    if moved:
        for d in igroup.attached:
            old.ioas.iopt.remove_reserved(d)
    for d in igroup.attached:
        _drop_faults(d, old)
    n = len(igroup.attached)
    hwpt.users += n
    old.users -= n - 1
    _put_hwpt(idev.ctx, old)
    log.debug("%s: group %d replaced %r by %r", idev.device.bdf, igroup.group.id, old, hwpt)


def _attached(igroup: Igroup, domain: object) -> None:
    """Tell the driver the group's devices are now on domain (None: blocked)."""
    for d in igroup.group.devices:
        hook = getattr(d.iommu, "attached", None)
        if hook is not None:
            hook(d, domain)


def _put_hwpt(ctx: Context, hwpt: Hwpt) -> None:
    hwpt.users -= 1
    if hwpt.auto_domain and hwpt.users == 1 and hwpt.id in ctx.objects:
        ctx.remove(hwpt.id)


async def detach(idev: Idev) -> None:
    """VFIO_DEVICE_DETACH_IOMMUFD_PT: a no-op when idev is not attached; the group goes
    back to the blocking domain when its last attached device leaves."""
    detach_sync(idev)


def detach_sync(idev: Idev) -> None:
    """detach() for callers that cannot await (an object's destroy)."""
    igroup = idev.igroup
    if idev not in igroup.attached:
        return
    hwpt = igroup.hwpt
    igroup.attached.remove(idev)
    if not igroup.attached:
        igroup.group.set_domain(igroup.group.blocking_domain)
        igroup.hwpt = None
        _attached(igroup, None)
    hwpt.ioas.iopt.remove_reserved(idev)
    _drop_faults(idev, hwpt)
    _put_hwpt(idev.ctx, hwpt)


def _drop_faults(idev: Idev, hwpt: Hwpt) -> None:
    """iommufd_auto_response_faults: the groups idev queued through hwpt are
    answered (dropped) when that attachment ends."""
    fault = getattr(hwpt, "fault", None)
    if fault is not None:
        fault.auto_respond(idev=idev, hwpt=hwpt)


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
    ucmd.caller.write(cmd.data_uptr, data[:n])
    cmd.out_data_type = out_type
    cmd.out_capabilities, cmd.out_max_pasid_log2 = iommu.hw_caps(idev.device)
    # The rest of the caller's buffer is cleared (clear_user): a long one off the loop.
    pending = ucmd.caller.clear((cmd.data_uptr + n) & ULONG_MAX, cmd.data_len - n) if n < cmd.data_len else None
    if pending is not None:
        return _hw_info_finish(ucmd, len(data), pending)
    cmd.data_len = len(data)
    ucmd.respond()
    return 0


async def _hw_info_finish(ucmd: Ucmd, data_len: int, pending: Awaitable[None]) -> int:
    await pending
    ucmd.cmd.data_len = data_len
    ucmd.respond()
    return 0
