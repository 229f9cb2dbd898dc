"""In-process inspection for tests and the status command: translations, pin
counts and CPU access to IOAS memory, without any extra ioctl on /dev/iommu."""

from __future__ import annotations

from ..system import PAGE_SIZE
from .io_pagetable import Area, IoPagetable


def area_at(iopt: IoPagetable, iova: int) -> Area | None:
    return iopt.first_area(iova, iova)


def translate(iopt: IoPagetable, iova: int) -> int | None:
    """The emulated physical address iova maps to in the IOAS (None: unmapped)."""
    area = area_at(iopt, iova)
    return None if area is None else area.pa(iova)


def pin_count(iopt: IoPagetable, iova: int) -> int:
    """Pins held on the page behind iova (0 when unmapped or not pinned)."""
    area = area_at(iopt, iova)
    if area is None:
        return 0
    return area.pages.pin_count((area.start_byte + iova - area.start) // PAGE_SIZE)


def read(iopt: IoPagetable, iova: int, length: int) -> bytes:
    buf = bytearray(length)
    iopt.access_rw(iova, buf, write=False)
    return bytes(buf)


def write(iopt: IoPagetable, iova: int, data: bytes) -> None:
    iopt.access_rw(iova, bytearray(data), write=True)
