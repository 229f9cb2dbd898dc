"""The kernel's test interface, IOMMU_TEST_CMD, and its mock IOMMU
(drivers/iommu/iommufd/selftest.c, iommufd_test.h), served in test mode only
(`iommufd-cuse serve --selftest`, as a kernel built with CONFIG_IOMMUFD_TEST).

The mock IOMMU is one per daemon and every mock device sits behind it, each in
a group of its own. Its paging domains have the kernel mock's geometry:

  - MOCK_IOMMUPT_DEFAULT: 2 KiB pages only, aperture [MOCK_APERTURE_START,
    MOCK_APERTURE_LAST];
  - MOCK_IOMMUPT_HUGE (HWPT_ALLOC with IOMMU_HWPT_DATA_SELFTEST): pgsize bitmap
    MOCK_HUGE_PAGE_SIZE | PAGE_SIZE, the whole IOVA space. The native table
    keeps a 2 KiB granule underneath (its level sizes are 2 KiB, 1 MiB, ...,
    so 1 MiB leaves exist), while iommufd sees a 4 KiB granule as in mainline.

A file handed back to the caller (CREATE_ACCESS, DMABUF_GET) cannot be created
by a FUSE server: CREATE_ACCESS works with the companion library in the caller
(tools/iommufd_selftest_preload.c, which turns a daemon-issued token into an open
of the daemon's access node) and is EOPNOTSUPP, logged, without it; DMABUF_GET is
EOPNOTSUPP. docs/selftest.md lists every op, what it does here and where it differs.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import uapi
from .._native import ffi, lib
from ..config import DeviceConfig, IommuConfig
from ..iommu.core import Device, Group, Iommu
from ..iommu.domain import Domain, PagingDomain
from ..system import PAGE_SIZE
from ..transport.caller import Errno
from ..transport.mount import fd_on_our_mount
from . import device as device_mod
from .companion import CLAIM, COMPANION_MAGIC, TOKEN_BASE, HandedFile, refuse_without_companion
from .hw_pagetable import HwptNested, HwptPaging, UserData, UserDataArray
from .ioas import get_ioas
from .main import Context, Object, ObjType, Ucmd
from .pages import FilePages, Pages, UserPages

log = logging.getLogger(__name__)

ULONG_MAX = (1 << 64) - 1
MOCK_PAGE_SIZE = uapi.MOCK_PAGE_SIZE
MOCK_HUGE_PAGE_SIZE = uapi.MOCK_HUGE_PAGE_SIZE
# The default limit of the kernel's temporary batch memory (iommufd_test_memory_limit).
DEFAULT_MEMORY_LIMIT = 65536
# SET_TEMP_MEMORY_LIMIT below one batch element (an unsigned long and a u32) is EINVAL.
MIN_MEMORY_LIMIT = 8 + 4
# ACCESS_PAGES / ACCESS_RW refuse more than this (the kernel's guard for its kvzalloc).
ACCESS_MAX_LENGTH = 16 * 1024 * 1024
DMABUF_MAX_LENGTH = PAGE_SIZE * 512
ENTRIES_PER_CHECKPOINT = 64  # invalidation entries handled between checkpoints of the loop
MAX_DIRTY_BITMAP = 64 << 20  # bytes of DIRTY bitmap read from the caller (else ENOMEM)

MOCK_DEVICE_FLAGS = uapi.MOCK_FLAGS_DEVICE_NO_DIRTY | uapi.MOCK_FLAGS_DEVICE_PASID
MOCK_PAGING_FLAGS = (
    uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING | uapi.IOMMU_HWPT_ALLOC_NEST_PARENT | uapi.IOMMU_HWPT_ALLOC_PASID
)


# -- the mock IOMMU ------------------------------------------------------------------------
class MockDomain(PagingDomain):
    """A paging domain of the mock IOMMU."""

    def __init__(self, iommu: MockIommu, pagetable_type: int, dirty_tracking: bool) -> None:
        self.pagetable_type = pagetable_type
        if pagetable_type == uapi.MOCK_IOMMUPT_HUGE:
            # Native 2 KiB granule with 1 MiB leaves; iommufd sees PAGE_SIZE | 1 MiB.
            super().__init__(MOCK_PAGE_SIZE | MOCK_HUGE_PAGE_SIZE, 0, ULONG_MAX, 64, dirty_tracking)
            self.pgsize_bitmap = PAGE_SIZE | MOCK_HUGE_PAGE_SIZE
        else:
            super().__init__(MOCK_PAGE_SIZE, uapi.MOCK_APERTURE_START, uapi.MOCK_APERTURE_LAST, 32, dirty_tracking)
        self.iommu = iommu

    @property
    def granule(self) -> int:
        """The smallest page size iommufd may use (the lowest bit of pgsize_bitmap)."""
        return self.pgsize_bitmap & -self.pgsize_bitmap

    def set_dirty(self, iova: int) -> bool:
        """Mark the leaf holding iova dirty, as the mock does to any present entry
        (read-only ones included); False when iova is not mapped."""
        return lib.icuse_pt_mark_dirty(self.pt, iova) == 0

    def __repr__(self) -> str:
        kind = "huge" if self.pagetable_type == uapi.MOCK_IOMMUPT_HUGE else "default"
        return f"<MockDomain {self.serial} {kind}>"


def check_invalidation(flags: int, index: int, max_index: int) -> None:
    """One selftest invalidation entry: unknown flags EOPNOTSUPP, an index past
    max_index EINVAL (checked even with FLAG_ALL, as the mock does)."""
    if flags & ~uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL:
        raise Errno(errno.EOPNOTSUPP)
    if index > max_index:
        raise Errno(errno.EINVAL)


def invalidate(cache: list[int], flags: int, index: int) -> None:
    """Clear entry index of a mock cache, or every entry with FLAG_ALL."""
    if flags & uapi.IOMMU_TEST_INVALIDATE_FLAG_ALL:
        cache[:] = [0] * len(cache)
    else:
        cache[index] = 0


class MockNestedDomain(Domain):
    """struct mock_iommu_domain_nested: a nested domain of the mock IOMMU. There is
    no stage-1 table: DMA through it would be translated by the parent (stage-2)
    table alone, and a mock device does no DMA. What it has is the mock IOTLB,
    MOCK_NESTED_DOMAIN_IOTLB_NUM entries set from iommu_hwpt_selftest.iotlb."""

    def __init__(self, iommu: MockIommu, parent: MockDomain, iotlb: int, viommu: Any = None) -> None:
        super().__init__()
        self.iommu = iommu
        self.parent = parent
        self.viommu = viommu  # the vIOMMU it was allocated on (mock_nested->mock_viommu)
        self.iotlb = [iotlb] * uapi.MOCK_NESTED_DOMAIN_IOTLB_NUM

    async def cache_invalidate_user(self, array: UserDataArray) -> None:
        """mock_domain_cache_invalidate_user: entries of iommu_hwpt_invalidate_selftest.
        Another data type is EINVAL; per entry, an unknown flag EOPNOTSUPP, an iotlb_id
        past MOCK_NESTED_DOMAIN_IOTLB_ID_MAX EINVAL; IOMMU_TEST_INVALIDATE_FLAG_ALL clears
        every entry, else entry iotlb_id is cleared. The first failure stops the array;
        array.entry_num becomes the number of entries handled."""
        processed = 0
        try:
            if array.type != uapi.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST:
                raise Errno(errno.EINVAL)
            for i in range(array.entry_num):
                inv = array.copy_entry(
                    i, uapi.IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, uapi.iommu_hwpt_invalidate_selftest, "iotlb_id"
                )
                check_invalidation(inv.flags, inv.iotlb_id, uapi.MOCK_NESTED_DOMAIN_IOTLB_ID_MAX)
                invalidate(self.iotlb, inv.flags, inv.iotlb_id)
                processed += 1
                if processed % ENTRIES_PER_CHECKPOINT == 0:
                    await trio.lowlevel.checkpoint()  # entry_num is the caller's: let others run
        finally:
            array.entry_num = processed

    def __repr__(self) -> str:
        return f"<MockNestedDomain {self.serial} on {self.parent.serial}>"


class MockIommu(Iommu):
    """mock_ops: the selftest's IOMMU driver."""

    nesting = True

    def __init__(self) -> None:
        super().__init__(
            IommuConfig(
                name="iommufd_selftest_iommu",
                pgsize_bitmap=MOCK_PAGE_SIZE,
                aperture=(uapi.MOCK_APERTURE_START, uapi.MOCK_APERTURE_LAST),
                reserved=[],
                dirty_tracking=True,
                nest_parent=True,
            )
        )
        self.dev_ids: set[int] = set()  # mock_dev_ida

    def hw_info(self) -> tuple[int, bytes]:
        info = uapi.iommu_test_hw_info.new(flags=0, test_reg=uapi.IOMMU_HW_INFO_SELFTEST_REGVAL)
        return uapi.IOMMU_HW_INFO_TYPE_SELFTEST, uapi.iommu_test_hw_info.pack(info)

    def domain_alloc_paging(self, dirty_tracking: bool = False) -> PagingDomain:
        return MockDomain(self, uapi.MOCK_IOMMUPT_DEFAULT, dirty_tracking)

    def domain_alloc_user(self, device: Device, flags: int, user_data: object | None) -> PagingDomain:
        """mock_domain_alloc_paging_flags."""
        dirty = bool(flags & uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
        fault = flags & uapi.IOMMU_HWPT_FAULT_ID_VALID
        if fault and flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT:
            raise Errno(errno.EOPNOTSUPP)  # the core refuses fault reporting on a parent
        flags &= ~uapi.IOMMU_HWPT_FAULT_ID_VALID  # the core's business, not the driver's
        if flags & ~MOCK_PAGING_FLAGS or (dirty and _dev_flags(device) & uapi.MOCK_FLAGS_DEVICE_NO_DIRTY):
            raise Errno(errno.EOPNOTSUPP)
        pagetable_type = uapi.MOCK_IOMMUPT_DEFAULT
        if isinstance(user_data, UserData):
            if user_data.type not in (uapi.IOMMU_HWPT_DATA_SELFTEST, uapi.IOMMU_HWPT_DATA_NONE):
                raise Errno(errno.EOPNOTSUPP)
            cfg = user_data.copy_struct(uapi.IOMMU_HWPT_DATA_SELFTEST, uapi.iommu_hwpt_selftest, "iotlb")
            pagetable_type = cfg.pagetable_type
        if pagetable_type not in (uapi.MOCK_IOMMUPT_DEFAULT, uapi.MOCK_IOMMUPT_HUGE):
            raise Errno(errno.EOPNOTSUPP)
        return MockDomain(self, pagetable_type, dirty)

    def domain_alloc_nested(self, device: Device, parent: Domain, flags: int, user_data: object) -> Domain:
        """mock_domain_alloc_nested: flags other than PASID EOPNOTSUPP; a parent that
        is not a paging domain EINVAL; data other than IOMMU_HWPT_DATA_SELFTEST
        EOPNOTSUPP; then iommu_hwpt_selftest, at least up to iotlb (EINVAL/EFAULT)."""
        if flags & ~uapi.IOMMU_HWPT_ALLOC_PASID:
            raise Errno(errno.EOPNOTSUPP)
        if not isinstance(parent, MockDomain):
            raise Errno(errno.EINVAL)
        assert isinstance(user_data, UserData)
        if user_data.type != uapi.IOMMU_HWPT_DATA_SELFTEST:
            raise Errno(errno.EOPNOTSUPP)
        cfg = user_data.copy_struct(uapi.IOMMU_HWPT_DATA_SELFTEST, uapi.iommu_hwpt_selftest, "iotlb")
        return MockNestedDomain(self, parent, cfg.iotlb)

    # -- the mock vIOMMU (mock_viommu_ops) --------------------------------------------------
    def viommu_supported(self, viommu_type: int) -> bool:
        """mock_get_viommu_size: only IOMMU_VIOMMU_TYPE_SELFTEST."""
        return viommu_type == uapi.IOMMU_VIOMMU_TYPE_SELFTEST

    def viommu_init(self, viommu: Any, parent_domain: Domain, user_data: UserData | None) -> None:
        """mock_viommu_init: with data, iommu_viommu_selftest (at least up to out_data):
        out_data echoes in_data, and a two-page region is registered for mmap of the
        iommufd at out_mmap_offset (not mappable here, see docs/selftest.md); the
        struct goes back (EFAULT if it cannot)."""
        if user_data is None:
            return
        data = user_data.copy_struct(uapi.IOMMU_VIOMMU_TYPE_SELFTEST, uapi.iommu_viommu_selftest, "out_data")
        length = 2 * PAGE_SIZE
        offset = _mmap_alloc(viommu.ctx, length)
        viommu.mmap = (offset, length)
        data.out_data = data.in_data
        data.out_mmap_offset = offset
        data.out_mmap_length = length
        out = uapi.iommu_viommu_selftest.pack(data)
        try:
            user_data.caller.write(user_data.uptr, out[: min(user_data.len, len(out))])
        except BaseException:
            _mmap_free(viommu.ctx, offset)
            raise

    def viommu_alloc_domain_nested(self, viommu: Any, flags: int, user_data: UserData) -> Domain:
        """mock_viommu_alloc_domain_nested: flags other than PASID EOPNOTSUPP, then the
        data as a nested domain on a parent (__mock_domain_alloc_nested)."""
        if flags & ~uapi.IOMMU_HWPT_ALLOC_PASID:
            raise Errno(errno.EOPNOTSUPP)
        if user_data.type != uapi.IOMMU_HWPT_DATA_SELFTEST:
            raise Errno(errno.EOPNOTSUPP)
        cfg = user_data.copy_struct(uapi.IOMMU_HWPT_DATA_SELFTEST, uapi.iommu_hwpt_selftest, "iotlb")
        return MockNestedDomain(self, viommu.hwpt.domain, cfg.iotlb, viommu)

    async def viommu_cache_invalidate(self, viommu: Any, array: UserDataArray) -> None:
        """mock_viommu_cache_invalidate: iommu_viommu_invalidate_selftest entries, all
        copied first (another type EINVAL; an entry that is unreadable EFAULT, or longer
        than the struct with a non-zero tail E2BIG; shorter ones are zero-extended),
        then each: unknown flags EOPNOTSUPP, cache_id past MOCK_DEV_CACHE_ID_MAX EINVAL,
        a vdev_id no vdevice of the vIOMMU has EINVAL; FLAG_ALL clears every cache
        entry of the device, else entry cache_id. entry_num: the entries handled."""
        from .main import check_zeroed_user, copy_struct_from_user

        if array.entry_num == 0 and array.type == uapi.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST:
            return
        struct = uapi.iommu_viommu_invalidate_selftest
        done = 0
        try:
            if array.entry_num * struct.SIZE > KMALLOC_MAX_SIZE:
                raise Errno(errno.ENOMEM)
            if array.type != uapi.IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST:
                raise Errno(errno.EINVAL)
            cmds = []
            for i in range(array.entry_num):
                addr = (array.uptr + array.entry_len * i) & ULONG_MAX
                if array.entry_len > struct.SIZE:
                    pending = check_zeroed_user(array.caller, addr + struct.SIZE, array.entry_len - struct.SIZE)
                    if pending is not None:
                        await pending
                    cmds.append(struct.unpack(copy_struct_from_user(array.caller, addr, struct.SIZE, struct.SIZE)))
                else:
                    cmds.append(struct.unpack(copy_struct_from_user(array.caller, addr, struct.SIZE, array.entry_len)))
                if (i + 1) % ENTRIES_PER_CHECKPOINT == 0:
                    await trio.lowlevel.checkpoint()
            for cur in cmds:
                check_invalidation(cur.flags, cur.cache_id, uapi.MOCK_DEV_CACHE_ID_MAX)
                dev = viommu.find_dev(cur.vdev_id)
                if not isinstance(dev, MockDev):
                    raise Errno(errno.EINVAL)
                invalidate(dev.cache, cur.flags, cur.cache_id)
                done += 1
        finally:
            array.entry_num = done

    def attach_check(self, device: Device, domain: object) -> None:
        """mock_domain_nop_attach: a nested domain of a vIOMMU needs the device to have
        a vdevice on that vIOMMU (else ENOENT)."""
        viommu = getattr(domain, "viommu", None)
        if isinstance(domain, MockNestedDomain) and viommu is not None and viommu.get_vdev_id(device) is None:
            raise Errno(errno.ENOENT)

    def attached(self, device: Device, domain: object) -> None:
        """mock_domain_nop_attach: the device remembers the vIOMMU of its nested domain
        and its virt_id there (what TRIGGER_VEVENT reports); other domains clear it."""
        if not isinstance(device, MockDev):
            return
        viommu = getattr(domain, "viommu", None) if isinstance(domain, MockNestedDomain) else None
        if viommu is not device.viommu:
            device.viommu = viommu
            device.vdev_id = (viommu.get_vdev_id(device) or 0) if viommu is not None else 0

    def attach_compatible(self, device: Device, domain: object) -> bool:
        """mock_domain_nop_attach: any mock domain, but not a dirty-tracking one
        for a device without dirty tracking (a nested domain has no dirty tracking)."""
        if isinstance(domain, MockNestedDomain):
            return True
        if not isinstance(domain, MockDomain):
            return False
        return not (domain.dirty_tracking_capable and _dev_flags(device) & uapi.MOCK_FLAGS_DEVICE_NO_DIRTY)

    def hw_caps(self, device: Device) -> tuple[int, int]:
        flags = _dev_flags(device)
        caps = 0 if flags & uapi.MOCK_FLAGS_DEVICE_NO_DIRTY else uapi.IOMMU_HW_CAP_DIRTY_TRACKING
        # Not a PCI device: no ATS capability bits.
        return caps, (uapi.MOCK_PASID_WIDTH if flags & uapi.MOCK_FLAGS_DEVICE_PASID else 0)


KMALLOC_MAX_SIZE = 4 << 20  # a bigger kcalloc of invalidation entries is ENOMEM


def _mmap_alloc(ctx: Context, length: int) -> int:
    """iommufd_viommu_alloc_mmap: the lowest free offset from PAGE_SIZE in the
    context's mmap tree."""
    regions = ctx.__dict__.setdefault("mmap_regions", {})
    start = PAGE_SIZE
    for off in sorted(regions):
        if start + length <= off:
            break
        start = max(start, off + regions[off])
    regions[start] = length
    return start


def _mmap_free(ctx: Context, offset: int) -> None:
    ctx.__dict__.get("mmap_regions", {}).pop(offset, None)


def _dev_flags(device: Device) -> int:
    return getattr(device, "mock_flags", 0)


@dataclass(eq=False)
class MockDev(Device):
    """struct mock_dev: a device on the mock bus, in a group of its own."""

    mock_flags: int = 0
    mock_id: int = 0
    pasid_1024_fake_error: bool = False
    cache: list[int] = field(default_factory=lambda: [uapi.IOMMU_TEST_DEV_CACHE_DEFAULT] * uapi.MOCK_DEV_CACHE_NUM)
    viommu: Any = None  # the vIOMMU of the nested domain it is attached to
    vdev_id: int = 0  # its virt_id there, when it attached

    def status(self) -> dict:
        return {"bdf": self.bdf, "model": "mock", "flags": self.mock_flags}


def mock_iommu(system: Any) -> MockIommu:
    iommu = getattr(system, "mock_iommu", None)
    if iommu is None:
        iommu = system.mock_iommu = MockIommu()
    return iommu


def mock_dev_create(system: Any, dev_flags: int) -> MockDev:
    """mock_dev_create: EINVAL for device flags the mock does not know."""
    if dev_flags & ~MOCK_DEVICE_FLAGS:
        raise Errno(errno.EINVAL)
    iommu = mock_iommu(system)
    n = 0
    while n in iommu.dev_ids:
        n += 1
    iommu.dev_ids.add(n)
    name = f"iommufd_mock{n}"
    group = Group(-(n + 1), iommu)  # generic_device_group: one group per device
    # The mock's default domain is its blocking domain.
    group.default_domain = group.domain = group.blocking_domain
    cfg = DeviceConfig(bdf=name, model="mock", iommu=iommu.name, group=group.id, driver="none")
    dev = MockDev(cfg, group, iommu, driver="none", mock_flags=dev_flags, mock_id=n)
    group.devices.append(dev)
    return dev


def mock_dev_destroy(dev: MockDev) -> None:
    dev.iommu.dev_ids.discard(dev.mock_id)  # type: ignore[attr-defined]
    dev.group.devices.remove(dev)


# -- the selftest object ---------------------------------------------------------------------
class SelftestObj(Object):
    """struct selftest_obj (TYPE_IDEV): a mock device bound to the context. Destroying
    it detaches and unbinds the device, then removes the device."""

    type = ObjType.SELFTEST

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.idev: device_mod.Idev | None = None
        self.mdev: MockDev | None = None

    @property
    def device(self) -> MockDev | None:  # for `iommufd-cuse status`
        return self.mdev

    def destroy(self) -> None:
        if self.idev is not None:
            for pasid in list(self.idev.igroup.pasids):
                _pasid_detach(self.idev, pasid)
            _unbind(self.idev)
            self.idev = None
        if self.mdev is not None:
            mock_dev_destroy(self.mdev)
            self.mdev = None

    def abort(self) -> None:
        """Creation failed: the handler has undone what it set up."""


def _unbind(idev: device_mod.Idev) -> None:
    """iommufd_device_unbind without awaiting (from a destroy)."""
    from .viommu import remove_vdev

    remove_vdev(idev)
    device_mod.detach_sync(idev)
    idev.users -= 1
    if idev.ctx.closed or idev.id not in idev.ctx.objects:
        return
    try:
        idev.ctx.remove(idev.id)
    except Errno:
        # Some call in flight still holds it: the context's release takes it.
        log.warning("mock device %r still in use at unbind", idev)


def _get_selftest_obj(ctx: Context, obj_id: int) -> SelftestObj:
    return ctx.get(obj_id, ObjType.SELFTEST)


# -- one test command ----------------------------------------------------------------------------
@dataclass
class SelftestCall:
    """An IOMMU_TEST_CMD in flight: the ucmd and the op's union member (arg)."""

    ucmd: Ucmd
    op: int
    id: int
    arg: Any
    struct: Any

    @property
    def ctx(self) -> Context:
        return self.ucmd.ctx

    @property
    def system(self) -> Any:
        return self.ucmd.ctx.system

    def respond(self) -> None:
        """iommufd_ucmd_respond(ucmd, sizeof(*cmd)): the whole struct goes back."""
        cmd = self.ucmd.cmd
        data = self.struct.pack(self.arg)
        cmd.data = data + bytes(cmd.data[len(data) :])
        self.ucmd.respond()


async def iommufd_test(ucmd: Ucmd) -> int:
    """IOMMU_TEST_CMD: dispatch on op; an unknown op is EOPNOTSUPP."""
    cmd = ucmd.cmd
    handler = _OPS.get(cmd.op)
    struct = uapi.IOMMU_TEST_OP_STRUCTS.get(cmd.op)
    if handler is None or struct is None:
        raise Errno(errno.EOPNOTSUPP)
    t = SelftestCall(ucmd, cmd.op, cmd.id, struct.unpack(cmd.data), struct)
    r = handler(t)
    if isinstance(r, Awaitable):
        r = await r
    return r or 0


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
    hwpt = _get_md_pagetable(t.ctx, t.id)
    domain = hwpt.domain
    if not domain.dirty_tracking:
        raise Errno(errno.EINVAL)
    nbits = a.length // a.page_size
    nbytes = (nbits + 7) // 8
    if nbytes > MAX_DIRTY_BITMAP:
        raise Errno(errno.ENOMEM)
    with t.ctx.hold(hwpt):
        bitmap = int.from_bytes(t.ucmd.caller.read(a.uptr, nbytes), "little") & ((1 << nbits) - 1)
        bits = [i for i in range(nbits) if bitmap >> i & 1] if nbits <= 64 else _set_bits(bitmap)

        def mark() -> None:
            for i in bits:
                domain.set_dirty(a.iova + i * a.page_size)

        if len(bits) > 4096:
            await trio.to_thread.run_sync(mark)
        else:
            mark()
        a.out_nr_dirty = len(bits)
        t.respond()
    return 0


def _set_bits(x: int) -> list[int]:
    out = []
    while x:
        low = x & -x
        out.append(low.bit_length() - 1)
        x ^= low
    return out


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
    from .fault import report_device_fault

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


# -- accesses: CREATE_ACCESS, ACCESS_PAGES, ACCESS_RW, DESTROY_ACCESS_PAGES, ACCESS_REPLACE_IOAS ------
# An access is a new file in the caller, which a FUSE server cannot create. With the
# companion library (tools/iommufd_selftest_preload.c, LD_PRELOAD) in the caller,
# CREATE_ACCESS carries COMPANION_MAGIC in __reserved; the daemon then answers with a
# token in out_access_fd, and the companion opens ACCESS_NODE and claims the token on
# that file (ACCESS_CLAIM), putting the new fd in out_access_fd. Every semantic stays
# here; the companion only turns a token into an open file (companion.py). Without
# it: EOPNOTSUPP.
ACCESS_NODE = "iommufd-selftest/access"
ACCESS_TOKEN_BASE = TOKEN_BASE
ACCESS_CLAIM = CLAIM  # on ACCESS_NODE, arg: the token


@dataclass
class _AccessItem:
    """struct selftest_access_item: pinned pages of one ACCESS_PAGES."""

    id: int
    iova: int
    length: int
    pins: list[tuple[Any, int, int]]  # (area, first page index, pages)


class SelftestAccess(Object):
    """struct iommufd_access with the selftest's ops: CPU access to an IOAS, and
    pins that are dropped whenever the IOAS unmaps under them."""

    type = ObjType.ACCESS

    def __init__(self, ctx: Context, needs_pin_pages: bool) -> None:
        super().__init__()
        self.ctx = ctx
        self.needs_pin_pages = needs_pin_pages
        self.iova_alignment = PAGE_SIZE if needs_pin_pages else 1
        self.ioas: Any = None
        self.items: dict[int, _AccessItem] = {}
        self.next_id = 0
        self.file: AccessFile | None = None
        self.closed = False

    # -- the IOAS -------------------------------------------------------------------
    def attach(self, ioas: Any) -> None:
        """iopt_add_access: the IOAS's alignment must fit (else EADDRINUSE)."""
        iopt = ioas.iopt
        iopt.accesses.append(self)
        try:
            iopt.calculate_iova_alignment()
        except BaseException:
            iopt.accesses.remove(self)
            raise
        ioas.users += 1
        self.ioas = ioas

    def detach(self) -> None:
        ioas, self.ioas = self.ioas, None
        if ioas is None:
            return
        self.notify_unmap(0, ULONG_MAX)
        ioas.iopt.accesses.remove(self)
        try:
            ioas.iopt.calculate_iova_alignment()
        except Errno:
            pass
        ioas.users -= 1

    def notify_unmap(self, iova: int, length: int) -> None:
        """iommufd_test_access_unmap: drop every item overlapping [iova, iova + length)."""
        last = min(iova + length - 1, ULONG_MAX)
        for item in list(self.items.values()):
            if iova > item.iova + item.length - 1 or last < item.iova:
                continue
            del self.items[item.id]
            _access_unpin(item.pins)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """The access's file is closed (or its context is): unpin, detach, destroy."""
        if self.closed:
            return
        self.closed = True
        self.detach()
        if self.file is not None:
            self.file.obj = None
            self.file = None
        self.users -= 1  # the driver's reference (the file's)
        ctx = self.ctx
        if not ctx.closed and ctx.objects.get(self.id) is self:
            try:
                ctx.remove(self.id)
            except Errno:
                log.warning("access %d still in use at close", self.id)
        AccessFile.forget(ctx.system, self)
        if self.close in ctx.release_hooks:
            ctx.release_hooks.remove(self.close)

    def destroy(self) -> None:
        self.detach()


def _access_pin(access: SelftestAccess, iova: int, length: int, write: bool) -> list[tuple[Any, int, int]]:
    """iommufd_access_pin_pages: pin the pages under [iova, iova + length), which must
    be contiguous areas (else ENOENT), page aligned where areas meet (else EINVAL) and
    mapped with the access's permission (else EPERM)."""
    if not length:
        raise Errno(errno.EINVAL)
    last = iova + length - 1
    if last > ULONG_MAX:
        raise Errno(errno.EOVERFLOW)
    if access.ioas is None:
        raise Errno(errno.ENOENT)
    from .io_pagetable import IOMMU_READ, IOMMU_WRITE

    pins: list[tuple[Any, int, int]] = []
    pos = iova
    try:
        for area in access.ioas.iopt.areas_in(iova, last):
            if area.start > pos or area.busy:
                break
            end = min(last, area.last)
            first_byte = area.start_byte + (pos - area.start)
            area_last_byte = area.start_byte + area.length - 1
            if first_byte % PAGE_SIZE or (end != last and area_last_byte % PAGE_SIZE != PAGE_SIZE - 1):
                raise Errno(errno.EINVAL)
            if not area.prot & (IOMMU_WRITE if write else IOMMU_READ):
                raise Errno(errno.EPERM)
            first = first_byte // PAGE_SIZE
            n = (area.start_byte + (end - area.start)) // PAGE_SIZE - first + 1
            area.pages.pin(first, n)
            area.num_accesses += 1
            pins.append((area, first, n))
            pos = end + 1
            if end == last:
                break
        if pos <= last:
            raise Errno(errno.ENOENT)
    except BaseException:
        _access_unpin(pins)
        raise
    return pins


def _access_unpin(pins: list[tuple[Any, int, int]]) -> None:
    for area, first, n in pins:
        area.pages.unpin(first, n)
        area.num_accesses -= 1


class AccessFile(HandedFile):
    """An open of ACCESS_NODE: the file of one access once claimed (its close
    destroys the access, as the kernel's staccess release)."""

    pending_attr = "selftest_pending_accesses"
    seq_attr = "selftest_access_seq"
    ino_attr = "selftest_access_ino"

    def on_release(self) -> None:
        if self.obj is not None:
            self.obj.close()


async def _get_access(t: SelftestCall, fd: int) -> SelftestAccess:
    """iommufd_access_get: the access whose file the caller has as fd; EBADFD for
    no fd or a file that is not an access."""
    return await AccessFile.lookup(t.system, t.ucmd.caller, fd)


def _syz_iova(ioas: Any, iova: int) -> int:
    """iommufd_test_syz_conv_iova: syzkaller's iova is (nth area, offset in it)."""
    if ioas is None:
        return 0
    nth, offset = iova & 0xFFFFFFFF, iova >> 32
    for i, area in enumerate(ioas.iopt.areas):
        if i == nth:
            return area.start + offset
    return 0


async def op_create_access(t: SelftestCall) -> int:
    """CREATE_ACCESS: an access to the IOAS t.id, as a new file in the caller."""
    if t.arg.flags & ~uapi.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES:
        raise Errno(errno.EOPNOTSUPP)
    ctx = t.ctx
    if t.ucmd.cmd.reserved != COMPANION_MAGIC:
        get_ioas(ctx, t.id)
        refuse_without_companion(log, "IOMMU_TEST_OP_CREATE_ACCESS", "an access")
    # iommufd_access_create makes the object visible at once, then attaches it.
    access = ctx.alloc(SelftestAccess(ctx, bool(t.arg.flags & uapi.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)))
    ctx.finalize(access)
    access.users += 1  # the driver's (the file's) reference
    try:
        ioas = get_ioas(ctx, t.id)
        with ctx.hold(ioas):
            async with ioas.iopt.lock:
                access.attach(ioas)
        token = AccessFile.issue(t.system, access, t.ucmd.caller.tgid)
        ctx.release_hooks.append(access.close)
        t.arg.out_access_fd = token
        t.respond()
    except BaseException:
        access.close()
        raise
    return 0


async def op_access_pages(t: SelftestCall) -> int:
    a = t.arg
    if a.length > ACCESS_MAX_LENGTH:
        raise Errno(errno.ENOMEM)
    if a.flags & ~(uapi.MOCK_FLAGS_ACCESS_WRITE | uapi.MOCK_FLAGS_ACCESS_SYZ):
        raise Errno(errno.EOPNOTSUPP)
    access = await _get_access(t, t.id)
    if not access.needs_pin_pages:
        raise Errno(errno.EOPNOTSUPP)
    iova = _syz_iova(access.ioas, a.iova) if a.flags & uapi.MOCK_FLAGS_ACCESS_SYZ else a.iova
    pins = _access_pin(access, iova, a.length, bool(a.flags & uapi.MOCK_FLAGS_ACCESS_WRITE))
    try:
        if a.uptr:  # the pinned pages must be the caller's at uptr (NULL skips, for syzkaller)
            _check_pages(t, a.uptr - iova % PAGE_SIZE, pins)
        item = _AccessItem(access.next_id, iova, a.length, pins)
        access.next_id += 1
        access.items[item.id] = item
        a.out_access_pages_id = item.id
        try:
            t.respond()
        except BaseException:
            del access.items[item.id]
            raise
    except BaseException:
        _access_unpin(pins)
        raise
    return 0


def _check_pages(t: SelftestCall, uptr: int, pins: list[tuple[Any, int, int]]) -> None:
    """iommufd_test_check_pages: EBADE unless each pinned page is the caller's page
    at uptr, uptr + PAGE_SIZE, ...; EFAULT where the caller has none."""
    user = _AddressSpace(t.ucmd.caller.tgid)
    spaces: dict[Any, Any] = {}
    for area, first, n in pins:
        for index in range(first, first + n):
            mine = user.page(uptr & ~(PAGE_SIZE - 1))
            if mine is None:
                raise Errno(errno.EFAULT)
            if _name_page(area.pages, index, spaces) != mine:
                raise Errno(errno.EBADE)
            uptr += PAGE_SIZE


async def op_access_rw(t: SelftestCall) -> int:
    a = t.arg
    if a.length > ACCESS_MAX_LENGTH:
        raise Errno(errno.ENOMEM)
    if a.flags & ~(uapi.MOCK_ACCESS_RW_WRITE | uapi.MOCK_ACCESS_RW_SLOW_PATH | uapi.MOCK_FLAGS_ACCESS_SYZ):
        raise Errno(errno.EOPNOTSUPP)
    access = await _get_access(t, t.id)
    write = bool(a.flags & uapi.MOCK_ACCESS_RW_WRITE)
    caller = t.ucmd.caller
    buf = bytearray(caller.read(a.uptr, a.length)) if write and a.length else bytearray(a.length)
    iova = _syz_iova(access.ioas, a.iova) if a.flags & uapi.MOCK_FLAGS_ACCESS_SYZ else a.iova
    # iommufd_access_rw
    if not a.length:
        raise Errno(errno.EINVAL)
    if iova + a.length - 1 > ULONG_MAX:
        raise Errno(errno.EOVERFLOW)
    if access.ioas is None:
        raise Errno(errno.ENOENT)
    with access.ctx.hold(access):
        if a.length > 1 << 20:
            await trio.to_thread.run_sync(access.ioas.iopt.access_rw, iova, buf, write)
        else:
            access.ioas.iopt.access_rw(iova, buf, write)
    if not write:
        caller.write(a.uptr, buf)
    return 0


async def op_destroy_access_pages(t: SelftestCall) -> int:
    access = await _get_access(t, t.id)
    item = access.items.pop(t.arg.access_pages_id, None)
    if item is None:
        raise Errno(errno.ENOENT)
    _access_unpin(item.pins)
    return 0


async def op_access_replace_ioas(t: SelftestCall) -> int:
    """iommufd_access_replace: attach to the new IOAS first (nothing changes if that
    fails), then drop every pin and leave the old one."""
    access = await _get_access(t, t.id)
    old = access.ioas
    if old is None:
        raise Errno(errno.ENOENT)
    new = get_ioas(access.ctx, t.arg.ioas_id)
    if new is old:
        return 0
    with access.ctx.hold(new):
        async with new.iopt.lock:
            access.attach(new)  # sets access.ioas = new
    access.notify_unmap(0, ULONG_MAX)
    old.iopt.accesses.remove(access)
    try:
        old.iopt.calculate_iova_alignment()
    except Errno:
        pass
    old.users -= 1
    return 0


# -- dma-bufs: files handed back ----------------------------------------------------------------------
def op_dmabuf_get(t: SelftestCall) -> int:
    """DMABUF_GET returns a new dma-buf fd in the caller: EOPNOTSUPP (logged) once the
    length passes the kernel's checks."""
    length = (t.arg.length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if length == 0 or length > DMABUF_MAX_LENGTH:
        raise Errno(errno.EINVAL)
    log.warning(
        "IOMMU_TEST_OP_DMABUF_GET: a dma-buf is a new file descriptor in the caller, "
        "which this daemon cannot create: EOPNOTSUPP"
    )
    raise Errno(errno.EOPNOTSUPP)


def op_dmabuf_revoke(t: SelftestCall) -> int:
    """DMABUF_REVOKE of the caller's fd: no fd is EBADF, not a dma-buf EINVAL, a
    dma-buf that is not the selftest's (none can be) EOPNOTSUPP."""
    fd = t.ucmd.caller.fetch_fd(t.arg.dmabuf_fd)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    if target != "anon_inode:dmabuf":
        raise Errno(errno.EINVAL)
    raise Errno(errno.EOPNOTSUPP)


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
    from .ioas import Ioas

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
    sobj = _get_selftest_obj(ctx, t.id)
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
    sobj = _get_selftest_obj(ctx, t.id)
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
    sobj = _get_selftest_obj(ctx, t.id)
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
    sobj = _get_selftest_obj(ctx, t.id)
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


_OPS: dict[int, Callable[[SelftestCall], int | Awaitable[int]]] = {
    uapi.IOMMU_TEST_OP_ADD_RESERVED: op_add_reserved,
    uapi.IOMMU_TEST_OP_MOCK_DOMAIN: op_mock_domain,
    uapi.IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS: op_mock_domain,
    uapi.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: op_mock_domain_replace,
    uapi.IOMMU_TEST_OP_MD_CHECK_MAP: op_md_check_map,
    uapi.IOMMU_TEST_OP_MD_CHECK_REFS: op_md_check_refs,
    uapi.IOMMU_TEST_OP_MD_CHECK_IOTLB: op_md_check_iotlb,
    uapi.IOMMU_TEST_OP_DEV_CHECK_CACHE: op_dev_check_cache,
    uapi.IOMMU_TEST_OP_CREATE_ACCESS: op_create_access,
    uapi.IOMMU_TEST_OP_ACCESS_REPLACE_IOAS: op_access_replace_ioas,
    uapi.IOMMU_TEST_OP_ACCESS_PAGES: op_access_pages,
    uapi.IOMMU_TEST_OP_ACCESS_RW: op_access_rw,
    uapi.IOMMU_TEST_OP_DESTROY_ACCESS_PAGES: op_destroy_access_pages,
    uapi.IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT: op_set_temp_memory_limit,
    uapi.IOMMU_TEST_OP_DIRTY: op_dirty,
    uapi.IOMMU_TEST_OP_TRIGGER_IOPF: op_trigger_iopf,
    uapi.IOMMU_TEST_OP_TRIGGER_VEVENT: op_trigger_vevent,
    uapi.IOMMU_TEST_OP_DMABUF_GET: op_dmabuf_get,
    uapi.IOMMU_TEST_OP_DMABUF_REVOKE: op_dmabuf_revoke,
    uapi.IOMMU_TEST_OP_PASID_ATTACH: op_pasid_attach,
    uapi.IOMMU_TEST_OP_PASID_REPLACE: op_pasid_replace,
    uapi.IOMMU_TEST_OP_PASID_DETACH: op_pasid_detach,
    uapi.IOMMU_TEST_OP_PASID_CHECK_HWPT: op_pasid_check_hwpt,
}
