"""Accesses: CPU access to an IOAS for a driver inside the daemon, with pins that the
IOAS revokes whenever it unmaps under them (the kernel's iommufd_access_* of
drivers/iommu/iommufd/device.c). The selftest's accesses are its one user; the
driver's unmap op is notify_unmap, which a subclass implements.
"""

from __future__ import annotations

import errno
from typing import Any

from ..errors import Errno
from ..system import PAGE_SIZE
from .io_pagetable import IOMMU_READ, IOMMU_WRITE, ULONG_MAX
from .ioas import Ioas
from .object import Context, Object, ObjType

Pins = list[tuple[Any, int, int]]  # (area, first page index, pages)


class Access(Object):
    """struct iommufd_access."""

    type = ObjType.ACCESS

    def __init__(self, ctx: Context, needs_pin_pages: bool) -> None:
        super().__init__()
        self.ctx = ctx
        self.needs_pin_pages = needs_pin_pages
        self.iova_alignment = PAGE_SIZE if needs_pin_pages else 1
        self.ioas: Any = None

    # -- the IOAS -------------------------------------------------------------------
    def attach(self, ioas: Ioas) -> None:
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
        self._leave(ioas)

    async def replace(self, new: Ioas) -> None:
        """iommufd_access_replace: attach to the new IOAS first (nothing changes if that
        fails), then drop every pin and leave the old one."""
        old = self.ioas
        with self.ctx.hold(new):
            async with new.iopt.lock:
                self.attach(new)  # sets self.ioas = new
        self._leave(old)

    def _leave(self, ioas: Ioas) -> None:
        """iopt_remove_access, after the driver dropped every pin it has there."""
        self.notify_unmap(0, ULONG_MAX)
        ioas.iopt.accesses.remove(self)
        try:
            ioas.iopt.calculate_iova_alignment()
        except Errno:
            pass
        ioas.users -= 1

    def notify_unmap(self, iova: int, length: int) -> None:
        """The driver's unmap op: unpin whatever it holds in [iova, iova + length)."""

    def destroy(self) -> None:
        self.detach()


def pin_pages(access: Access, iova: int, length: int, write: bool) -> Pins:
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
    pins: Pins = []
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
            if area.pages.is_dmabuf:
                raise Errno(errno.EINVAL)  # no struct pages to hand out
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
        unpin_pages(pins)
        raise
    return pins


def unpin_pages(pins: Pins) -> None:
    """iommufd_access_unpin_pages."""
    for area, first, n in pins:
        area.pages.unpin(first, n)
        area.num_accesses -= 1
