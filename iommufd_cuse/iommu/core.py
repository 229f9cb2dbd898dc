"""The emulated IOMMU core: IOMMU instances, groups and DMA ownership
(drivers/iommu/iommu.c as the DMA-ownership series left it in mainline).

A group is the unit of isolation. Its DMA is owned either by the kernel (every
member's DMA-capable driver counts as a user of the default domain) or by one
iommufd context (the owner cookie). Claiming a group owned by anyone else is
EPERM; a DMA driver binding while the group is user-owned is EBUSY. While
user-owned the group sits in the blocking domain unless a paging domain is
attached; releasing the last claim returns it to its default domain.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass, field

from .. import uapi
from ..config import DeviceConfig, IommuConfig
from ..errors import Errno
from .domain import BlockingDomain, Domain, PagingDomain

log = logging.getLogger(__name__)

# Drivers that never use the DMA API for the device (driver_managed_dma, or no driver).
NON_DMA_DRIVERS = {"vfio-pci", "pci-stub", "none"}
VFIO_DRIVER = "vfio-pci"


class Iommu:
    """One emulated IOMMU instance and what its driver reports."""

    # Whether the driver allocates nested domains (iommu_ops.domain_alloc_nested):
    # only the selftest's mock IOMMU does.
    nesting = False

    def __init__(self, cfg: IommuConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name

    @property
    def dirty_tracking(self) -> bool:
        return self.cfg.dirty_tracking

    def hw_info(self) -> tuple[int, bytes]:
        """(IOMMU_HW_INFO_TYPE_*, driver data) as the driver's hw_info op answers."""
        c = self.cfg
        if c.hw_info_type == uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD:
            return c.hw_info_type, struct.pack("<IIQQ", c.vtd_flags, 0, c.cap_reg, c.ecap_reg)
        return uapi.IOMMU_HW_INFO_TYPE_NONE, b""

    def domain_alloc_paging(self, dirty_tracking: bool = False) -> PagingDomain:
        c = self.cfg
        dom = PagingDomain(c.pgsize_bitmap, c.aperture[0], c.aperture[1], _iova_bits(c.aperture[1]), dirty_tracking)
        dom.iommu = self
        return dom

    # -- what the driver answers for one device (iommu_ops) ------------------------
    def domain_alloc_user(self, device: Device, flags: int, user_data: object | None) -> PagingDomain:
        """domain_alloc_paging_flags: a paging domain for HWPT_ALLOC or an automatic
        HWPT, for device; user_data is driver-specific data (hw_pagetable.UserData)."""
        if user_data is not None:
            raise Errno(errno.EOPNOTSUPP)  # no driver-specific paging data here
        if flags & uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING and not self.dirty_tracking:
            raise Errno(errno.EOPNOTSUPP)
        if flags & uapi.IOMMU_HWPT_ALLOC_NEST_PARENT and not self.cfg.nest_parent:
            raise Errno(errno.EOPNOTSUPP)
        if flags & (uapi.IOMMU_HWPT_ALLOC_PASID | uapi.IOMMU_HWPT_FAULT_ID_VALID):
            # No PASID support on the emulated IOMMUs, and no fault objects (FAULT_QUEUE_ALLOC).
            raise Errno(errno.EOPNOTSUPP)
        return self.domain_alloc_paging(dirty_tracking=bool(flags & uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING))

    def domain_alloc_nested(self, device: Device, parent: Domain, flags: int, user_data: object) -> Domain:
        """domain_alloc_nested: a stage-1 domain on parent from user_data (drivers with
        nesting override it)."""
        raise Errno(errno.EOPNOTSUPP)

    def attach_compatible(self, device: Device, domain: Domain) -> bool:
        """Whether device can attach to domain (else the attach is EINVAL)."""
        return getattr(domain, "iommu", None) is self

    def hw_caps(self, device: Device) -> tuple[int, int]:
        """(IOMMU_HW_CAP_* of device, out_max_pasid_log2) for IOMMU_GET_HW_INFO."""
        caps = 0
        if self.dirty_tracking:
            caps |= uapi.IOMMU_HW_CAP_DIRTY_TRACKING
        if not getattr(device.vfio, "ats", False):
            caps |= uapi.IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED
        return caps, 0


def _iova_bits(aperture_end: int) -> int:
    return max(32, (aperture_end).bit_length())


@dataclass(eq=False)
class Group:
    id: int
    iommu: Iommu
    devices: list[Device] = field(default_factory=list)
    owner: object | None = None  # the iommufd context that claimed it
    owner_cnt: int = 0  # kernel DMA drivers using the default domain, or user claims
    domain: Domain | None = None
    default_domain: Domain | None = None
    blocking_domain: Domain = field(default_factory=BlockingDomain)
    vfio: object | None = None  # the VFIO group (vfio/group.py) once created

    def __post_init__(self) -> None:
        # The kernel's default domain serves DMA API users; the daemon emulates no
        # kernel driver's DMA, so it translates nothing anyone can see.
        self.default_domain = self.iommu.domain_alloc_paging()
        self.domain = self.default_domain

    @property
    def viable(self) -> bool:
        return not any(d.driver not in NON_DMA_DRIVERS for d in self.devices)

    def claim_dma_owner(self, owner: object) -> None:
        """iommu_device_claim_dma_owner."""
        if self.owner_cnt:
            if self.owner is not owner:
                raise Errno(
                    errno.EPERM,
                    f"group {self.id} is owned by {'the kernel' if self.owner is None else 'another context'}",
                )
            self.owner_cnt += 1
            return
        if self.domain is not self.default_domain:
            raise Errno(errno.EBUSY)
        self.domain = self.blocking_domain
        self.owner = owner
        self.owner_cnt = 1

    def release_dma_owner(self) -> None:
        """iommu_device_release_dma_owner: the last release returns to the default domain."""
        if self.owner_cnt > 1:
            self.owner_cnt -= 1
            return
        self.owner_cnt = 0
        self.owner = None
        self.domain = self.default_domain

    def use_default_domain(self) -> None:
        """A DMA-capable kernel driver binds to a member (iommu_device_use_default_domain)."""
        if self.owner_cnt and (self.domain is not self.default_domain or self.owner is not None):
            raise Errno(errno.EBUSY, f"group {self.id} is owned by userspace")
        self.owner_cnt += 1

    def unuse_default_domain(self) -> None:
        if self.owner_cnt:
            self.owner_cnt -= 1

    def set_domain(self, domain: Domain) -> None:
        self.domain = domain

    def status(self) -> dict:
        d = {
            "group": self.id,
            "iommu": self.iommu.name,
            "devices": [d.bdf for d in self.devices],
            "owner": "kernel" if self.owner is None else f"context {getattr(self.owner, 'opener_tid', '?')}",
            "domain": _domain_name(self.domain, self),
        }
        if self.vfio is not None and hasattr(self.vfio, "status"):
            d["vfio"] = self.vfio.status()
        return d


def _domain_name(d: Domain | None, g: Group) -> str:
    if d is g.default_domain:
        return "default"
    if d is g.blocking_domain:
        return "blocking"
    return repr(d)


@dataclass(eq=False)
class Device:
    """A PCI function of the topology: its group, its IOMMU and its driver."""

    cfg: DeviceConfig
    group: Group
    iommu: Iommu
    driver: str = VFIO_DRIVER
    vfio: object | None = None  # the vfio-pci device (regions, irqs, model) once created

    @property
    def bdf(self) -> str:
        return self.cfg.bdf

    def bind_driver(self, driver: str, *, quiet: bool = False) -> None:
        """Driver change (unbind the current one, bind the new one); quiet for the
        drivers of the configuration at start-up."""
        if driver == self.driver:
            return
        if self.driver == VFIO_DRIVER and self.vfio is not None and getattr(self.vfio, "in_use", False):
            raise Errno(errno.EBUSY, f"{self.bdf} is open through vfio")
        if driver not in NON_DMA_DRIVERS:
            self.group.use_default_domain()
        if self.driver not in NON_DMA_DRIVERS:
            self.group.unuse_default_domain()
        (log.debug if quiet else log.info)("%s: driver %s -> %s", self.bdf, self.driver, driver)
        self.driver = driver

    def status(self) -> dict:
        d = {"bdf": self.bdf, "model": self.cfg.model, "group": self.group.id, "driver": self.driver}
        if self.vfio is not None and hasattr(self.vfio, "status"):
            d.update(self.vfio.status())
        return d
