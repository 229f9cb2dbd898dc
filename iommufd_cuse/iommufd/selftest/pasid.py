"""PASID attachments of MOCK_FLAGS_DEVICE_PASID devices and the PASID ops."""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

import trio

from ... import uapi
from ...errors import Errno
from ...iommu.core import Device
from .. import device as device_mod
from ..hw_pagetable import HwptNested, HwptPaging
from ..ioas import Ioas
from ..object import Context, ObjType
from .mock import MockDev, MockDomain, MockNestedDomain, _dev_flags

if TYPE_CHECKING:
    from .stdev import SelftestCall

log = logging.getLogger(__name__)


# -- PASID attachments (MOCK_FLAGS_DEVICE_PASID devices) --------------------------------------------
def _max_pasids(dev: Device) -> int:
    return 1 << uapi.MOCK_PASID_WIDTH if _dev_flags(dev) & uapi.MOCK_FLAGS_DEVICE_PASID else 0


def _mock_set_dev_pasid(dev: MockDev, pasid: int, blocked: bool) -> None:
    """mock_domain_set_dev_pasid_nop: PASID IOMMU_TEST_PASID_RESERVED fails every
    second change after an attach (ENOMEM), so that a failing replace can be tested;
    a detach clears that."""
    if pasid != uapi.IOMMU_TEST_PASID_RESERVED:
        return
    if blocked:
        dev.pasid_1024_fake_error = False
    elif dev.pasid_1024_fake_error:
        dev.pasid_1024_fake_error = False
        raise Errno(errno.ENOMEM)
    else:
        dev.pasid_1024_fake_error = True


def _pasid_compat(idev: device_mod.Idev, hwpt: device_mod.Hwpt) -> None:
    """iommufd_hwpt_pasid_compat for a PASID: the HWPT was allocated with
    IOMMU_HWPT_ALLOC_PASID, and so was the one the RID is attached to."""
    rid = idev.igroup.hwpt
    if not hwpt.pasid_compat or (rid is not None and not rid.pasid_compat):
        raise Errno(errno.EINVAL)


def _pasid_target(ctx: Context, pt_id: int, idev: device_mod.Idev, pasid: int) -> device_mod.Hwpt:
    """The HWPT a PASID goes to (iommufd_device_change_pt): another kind of object is
    EINVAL; a PASID already attached is EBUSY; an IOAS would get an automatic HWPT,
    and those are never allocated with IOMMU_HWPT_ALLOC_PASID: EINVAL too."""
    pt = ctx.get(pt_id)
    if not isinstance(pt, (HwptPaging, HwptNested, Ioas)):
        raise Errno(errno.EINVAL)
    if pasid in idev.igroup.pasids:
        raise Errno(errno.EBUSY)
    if isinstance(pt, Ioas):
        raise Errno(errno.EINVAL)
    return pt


def _mock_pasid_domain(domain: object) -> bool:
    """Domains with set_dev_pasid: the mock's paging and nested domains."""
    return isinstance(domain, (MockDomain, MockNestedDomain))


def _pasid_attach(idev: device_mod.Idev, pasid: int, hwpt: device_mod.Hwpt) -> None:
    dev = idev.device
    igroup = idev.igroup
    if pasid in igroup.pasids:
        raise Errno(errno.EBUSY)  # already attached (the device is in the attach's array)
    _pasid_compat(idev, hwpt)
    # iommu_attach_device_pasid
    if not _mock_pasid_domain(hwpt.domain) or pasid >= _max_pasids(dev):
        raise Errno(errno.EINVAL)
    _mock_set_dev_pasid(dev, pasid, blocked=False)
    igroup.pasids[pasid] = hwpt
    hwpt.users += 1
    idev.users += 1


def _pasid_detach(idev: device_mod.Idev, pasid: int) -> bool:
    hwpt = idev.igroup.pasids.pop(pasid, None)
    if hwpt is None:
        return False
    _mock_set_dev_pasid(idev.device, pasid, blocked=True)
    idev.users -= 1
    device_mod._put_hwpt(idev.ctx, hwpt)
    return True


async def op_pasid_attach(t: SelftestCall) -> int:
    """PASID_ATTACH: attach a PASID of the mock device (id: its stdev) to a HWPT."""
    ctx = t.ctx
    sobj = ctx.get(t.id, ObjType.SELFTEST)
    pasid = t.arg.pasid
    with ctx.hold(sobj):
        idev = sobj.idev
        if pasid == 0:  # IOMMU_NO_PASID: the RID, attached since MOCK_DOMAIN
            if idev.igroup.hwpt is not None:
                raise Errno(errno.EBUSY)
            with trio.CancelScope(shield=True):
                t.arg.pt_id = await device_mod.attach(idev, t.arg.pt_id)
            t.respond()
            return 0
        hwpt = _pasid_target(ctx, t.arg.pt_id, idev, pasid)
        _pasid_attach(idev, pasid, hwpt)
        t.arg.pt_id = hwpt.id
        try:
            t.respond()
        except BaseException:
            _pasid_detach(idev, pasid)
            raise
    return 0


def op_pasid_replace(t: SelftestCall) -> int:
    """PASID_REPLACE: move an attached PASID to another HWPT; on failure (the mock's
    fake error on PASID 1024 included) nothing changes."""
    ctx = t.ctx
    sobj = ctx.get(t.id, ObjType.SELFTEST)
    pasid = t.arg.pasid
    with ctx.hold(sobj):
        idev = sobj.idev
        pt = ctx.get(t.arg.pt_id)
        old = idev.igroup.pasids.get(pasid)
        if old is None:
            raise Errno(errno.EINVAL)  # replace needs an attached PASID
        if not isinstance(pt, (HwptPaging, HwptNested)):
            raise Errno(errno.EINVAL)
        if pt is not old:
            _pasid_compat(idev, pt)
            if not _mock_pasid_domain(pt.domain):
                raise Errno(errno.EINVAL)
            _mock_set_dev_pasid(idev.device, pasid, blocked=False)
            idev.igroup.pasids[pasid] = pt
            pt.users += 1
            device_mod._put_hwpt(ctx, old)
        t.arg.pt_id = pt.id
        t.respond()
    return 0


def op_pasid_detach(t: SelftestCall) -> int:
    """PASID_DETACH: a PASID that is not attached is a no-op (0)."""
    ctx = t.ctx
    sobj = ctx.get(t.id, ObjType.SELFTEST)
    with ctx.hold(sobj):
        if t.arg.pasid == 0:
            device_mod.detach_sync(sobj.idev)
        else:
            _pasid_detach(sobj.idev, t.arg.pasid)
    return 0


def op_pasid_check_hwpt(t: SelftestCall) -> int:
    """PASID_CHECK_HWPT: the PASID is attached to hwpt_id's domain, or with hwpt_id 0,
    to nothing; otherwise EINVAL."""
    ctx = t.ctx
    sobj = ctx.get(t.id, ObjType.SELFTEST)
    ig = sobj.idev.igroup
    pasid = t.arg.pasid
    attached = ig.hwpt if pasid == 0 else ig.pasids.get(pasid)
    if not t.arg.hwpt_id:
        if attached is not None:
            raise Errno(errno.EINVAL)
        return 0
    pt = ctx.get(t.arg.hwpt_id)
    if pt.type not in (ObjType.HWPT_PAGING, ObjType.HWPT_NESTED):
        raise Errno(errno.EINVAL)
    if attached is None or attached.domain is not pt.domain:
        raise Errno(errno.EINVAL)
    return 0
