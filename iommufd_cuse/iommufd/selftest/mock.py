"""The mock IOMMU and its devices (mock_ops, struct mock_dev and the mock domains
of drivers/iommu/iommufd/selftest.c), and the mock's PASID support.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Any

from ... import uapi
from ..._native import lib
from ...config import DeviceConfig, IommuConfig
from ...errors import Errno
from ...iommu.core import Device, Group, Iommu
from ...iommu.domain import Domain, PagingDomain
from ...system import PAGE_SIZE
from ..hw_pagetable import UserData, UserDataArray
from ..mmap import alloc_mmap, free_mmap
from ..object import copy_struct_from_user

log = logging.getLogger(__name__)


ULONG_MAX = (1 << 64) - 1
MOCK_PAGE_SIZE = uapi.MOCK_PAGE_SIZE
MOCK_HUGE_PAGE_SIZE = uapi.MOCK_HUGE_PAGE_SIZE

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
        (read-only ones included); False when iova is not mapped.

        The mock's amdv1 table holds a PAGE_SIZE mapping of its 2 KiB granule as one
        contiguous entry, whose dirty bit covers both halves; the native table has
        two 2 KiB leaves there, so both are marked when they form such a page (iova
        and pa PAGE_SIZE aligned, pa contiguous)."""
        if lib.icuse_pt_mark_dirty(self.pt, iova):
            return False
        if self.pagetable_type != uapi.MOCK_IOMMUPT_HUGE and MOCK_PAGE_SIZE < PAGE_SIZE:
            first = iova & ~(PAGE_SIZE - 1)
            lo, hi = self.walk(first), self.walk(first + MOCK_PAGE_SIZE)
            if (
                lo is not None
                and hi is not None
                and lo[2] == hi[2] == MOCK_PAGE_SIZE
                and lo[0] % PAGE_SIZE == 0
                and hi[0] == lo[0] + MOCK_PAGE_SIZE
            ):
                lib.icuse_pt_mark_dirty(self.pt, (iova & ~(MOCK_PAGE_SIZE - 1)) ^ MOCK_PAGE_SIZE)  # the other half
        return True

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

    def cache_invalidate_user(self, array: UserDataArray) -> None:
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
        out_data echoes in_data, and a two-page region (its first word in_data, the
        loopback page) is registered for mmap of the iommufd at out_mmap_offset; the
        struct goes back (EFAULT if it cannot)."""
        if user_data is None:
            return
        data = user_data.copy_struct(uapi.IOMMU_VIOMMU_TYPE_SELFTEST, uapi.iommu_viommu_selftest, "out_data")
        length = 2 * PAGE_SIZE
        page = bytearray(length)
        page[:4] = data.in_data.to_bytes(4, "little")
        offset = alloc_mmap(viommu.ctx, viommu, length, page)
        viommu.mmap_offset = offset
        data.out_data = data.in_data
        data.out_mmap_offset = offset
        data.out_mmap_length = length
        out = uapi.iommu_viommu_selftest.pack(data)
        try:
            user_data.caller.write(user_data.uptr, out[: min(user_data.len, len(out))])
        except BaseException:
            free_mmap(viommu.ctx, offset)
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

    def viommu_cache_invalidate(self, viommu: Any, array: UserDataArray) -> None:
        """mock_viommu_cache_invalidate: iommu_viommu_invalidate_selftest entries, all
        copied first (another type EINVAL; an entry that is unreadable EFAULT, or longer
        than the struct with a non-zero tail E2BIG; shorter ones are zero-extended),
        then each: unknown flags EOPNOTSUPP, cache_id past MOCK_DEV_CACHE_ID_MAX EINVAL,
        a vdev_id no vdevice of the vIOMMU has EINVAL; FLAG_ALL clears every cache
        entry of the device, else entry cache_id. entry_num: the entries handled."""
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
                cmds.append(struct.unpack(copy_struct_from_user(array.caller, addr, struct.SIZE, array.entry_len)))
            for cur in cmds:
                check_invalidation(cur.flags, cur.cache_id, uapi.MOCK_DEV_CACHE_ID_MAX)
                dev = viommu.find_dev(cur.vdev_id)
                if not isinstance(dev, MockDev):
                    raise Errno(errno.EINVAL)
                invalidate(dev.cache, cur.flags, cur.cache_id)
                done += 1
        finally:
            array.entry_num = done

    # -- HW queues of the mock vIOMMU (mock_viommu_get_hw_queue_size, mock_hw_queue_*) --------
    def hw_queue_supported(self, viommu: Any, queue_type: int) -> bool:
        return queue_type == uapi.IOMMU_HW_QUEUE_TYPE_SELFTEST

    def hw_queue_init_phys(self, q: Any, index: int, base_pa: int) -> None:
        """mock_hw_queue_init_phys: index past IOMMU_TEST_HW_QUEUE_MAX EINVAL, taken
        EEXIST, index - 1 missing EIO; base_pa must be what the parent translates the
        queue's IOVA to (else EFAULT). Queue index depends on index - 1 (which is
        EBUSY to destroy until it goes)."""
        if index >= uapi.IOMMU_TEST_HW_QUEUE_MAX:
            raise Errno(errno.EINVAL)
        viommu = q.viommu
        queues = viommu.hw_queues
        if index in queues:
            raise Errno(errno.EEXIST)
        prev = queues.get(index - 1) if index else None
        if index and prev is None:
            raise Errno(errno.EIO)
        walk = viommu.hwpt.domain.walk(q.base_addr)
        if walk is None or walk[0] != base_pa:
            raise Errno(errno.EFAULT)
        if prev is not None:
            prev.users += 1  # iommufd_hw_queue_depend

        def destroy(q: Any) -> None:
            del queues[index]
            if prev is not None:
                prev.users -= 1

        queues[index] = q
        q.driver_destroy = destroy

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
    iommu = system.mock_iommu
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
