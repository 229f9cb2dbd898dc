"""The ops with no section of their own: ADD_RESERVED, MOCK_DOMAIN(_FLAGS,
_REPLACE), SET_TEMP_MEMORY_LIMIT, DEV_CHECK_CACHE, TRIGGER_IOPF and TRIGGER_VEVENT
(the dma-buf ops are dmabuf.py's).
"""

from __future__ import annotations

import errno
import logging

import trio

from ... import uapi
from ...errors import Errno
from .. import device as device_mod
from ..fault import report_device_fault
from ..ioas import get_ioas
from ..object import Context, ObjType
from .mock import ULONG_MAX, MockDev, mock_dev_create, mock_dev_destroy
from .stdev import SelftestCall, SelftestObj, _get_selftest_obj, _unbind

log = logging.getLogger(__name__)


# SET_TEMP_MEMORY_LIMIT below one batch element (an unsigned long and a u32) is EINVAL.
MIN_MEMORY_LIMIT = 8 + 4


# -- ADD_RESERVED ----------------------------------------------------------------------------------
async def op_add_reserved(t: SelftestCall) -> int:
    start, length = t.arg.start, t.arg.length
    if not length:
        raise Errno(errno.EINVAL)
    last = start + length - 1
    if last > ULONG_MAX:
        raise Errno(errno.EOVERFLOW)
    ioas = get_ioas(t.ctx, t.id)
    with t.ctx.hold(ioas):
        async with ioas.iopt.lock:
            ioas.iopt.reserve(start, last, None)  # no owner: it stays for the IOAS's life
    return 0


# -- MOCK_DOMAIN, MOCK_DOMAIN_FLAGS, MOCK_DOMAIN_REPLACE -------------------------------------------
async def op_mock_domain(t: SelftestCall) -> int:
    ctx = t.ctx
    dev_flags = t.arg.dev_flags if t.op == uapi.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS else 0
    sobj = ctx.alloc(SelftestObj(ctx))
    try:
        mdev = mock_dev_create(t.system, dev_flags)
    except BaseException:
        ctx.abort(sobj)
        raise
    try:
        idev = device_mod.bind(ctx, mdev)
    except BaseException:
        mock_dev_destroy(mdev)
        ctx.abort(sobj)
        raise
    try:
        with trio.CancelScope(shield=True):
            hwpt_id = await device_mod.attach(idev, t.id)
        # Userspace destroys the stdev id to destroy all of it.
        t.arg.out_hwpt_id = hwpt_id
        t.arg.out_stdev_id = sobj.id
        t.arg.out_idev_id = idev.id
        t.respond()
    except BaseException:
        _unbind(idev)
        mock_dev_destroy(mdev)
        ctx.abort(sobj)
        raise
    sobj.idev, sobj.mdev = idev, mdev
    ctx.finalize(sobj)
    log.debug("mock device %s bound as %d (stdev %d), attached to %d", mdev.bdf, idev.id, sobj.id, hwpt_id)
    return 0


async def op_mock_domain_replace(t: SelftestCall) -> int:
    ctx = t.ctx
    sobj = _get_selftest_obj(ctx, t.id)
    with ctx.hold(sobj):
        idev = sobj.idev
        if idev is None or idev.igroup.hwpt is None:
            raise Errno(errno.EINVAL)  # replace needs an attached device
        with trio.CancelScope(shield=True):
            t.arg.pt_id = await device_mod.attach(idev, t.arg.pt_id)
        t.respond()
    return 0


# -- memory limit, device caches, events -----------------------------------------------------------
def op_set_temp_memory_limit(t: SelftestCall) -> int:
    """SET_TEMP_MEMORY_LIMIT: the kernel's limit for the temporary memory its page
    batches use (global, as iommufd_test_memory_limit). The daemon pins ranges
    without batches, so the value changes nothing a client can see."""
    if t.arg.limit < MIN_MEMORY_LIMIT:
        raise Errno(errno.EINVAL)
    t.system.selftest_memory_limit = t.arg.limit
    return 0


def _get_device(ctx: Context, dev_id: int) -> device_mod.Idev:
    return ctx.get(dev_id, ObjType.DEVICE)


def op_dev_check_cache(t: SelftestCall) -> int:
    """DEV_CHECK_CACHE: a mock device's cache entry holds the value expected. The
    caches start at IOMMU_TEST_DEV_CACHE_DEFAULT; IOMMU_HWPT_INVALIDATE on a vIOMMU
    (mock_viommu_cache_invalidate) zeroes them."""
    idev = _get_device(t.ctx, t.id)
    dev = idev.device
    cache_id, value = t.arg.id, t.arg.cache
    if not isinstance(dev, MockDev) or cache_id > uapi.MOCK_DEV_CACHE_ID_MAX or dev.cache[cache_id] != value:
        raise Errno(errno.EINVAL)
    return 0


def op_trigger_iopf(t: SelftestCall) -> int:
    """TRIGGER_IOPF: report a page request (LAST_PAGE; PASID_VALID for a non-zero
    pasid) for the device. It is queued on the fault object of the HWPT the device is
    attached to (at that PASID; the mock keeps PASID tables in user space, so a PASID
    with no attachment of its own falls back to the RID's nested HWPT); with no such
    HWPT, or one without a fault, the report is dropped. 0 either way, as the kernel."""
    a = t.arg
    idev = _get_device(t.ctx, a.dev_id)
    if not report_device_fault(idev, a.pasid, a.grpid, a.perm, a.addr):
        log.debug("TRIGGER_IOPF on device %d: no fault queue attached, dropped", a.dev_id)
    return 0


def op_trigger_vevent(t: SelftestCall) -> int:
    """TRIGGER_VEVENT: report an iommu_viommu_event_selftest (the device's virt_id)
    to the vEVENT queue of type SELFTEST of the vIOMMU whose nested domain the device
    attached to. Not so attached, or virt_id 0: ENOENT; no such queue: EOPNOTSUPP;
    a full queue records a lost event (0)."""
    idev = _get_device(t.ctx, t.arg.dev_id)
    dev = idev.device
    viommu = getattr(dev, "viommu", None)
    if not isinstance(dev, MockDev) or viommu is None or not dev.vdev_id:
        raise Errno(errno.ENOENT)
    ev = uapi.iommu_viommu_event_selftest.new(virt_id=dev.vdev_id & 0xFFFFFFFF)
    viommu.report_event(uapi.IOMMU_VEVENTQ_TYPE_SELFTEST, uapi.iommu_viommu_event_selftest.pack(ev))
    return 0
