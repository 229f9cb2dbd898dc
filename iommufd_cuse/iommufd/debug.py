"""In-process inspection for tests and the status command: translations, pin
counts and CPU access to IOAS memory, without any extra ioctl on /dev/iommu; and
what `iommufd-cuse status` shows of a context and each of its objects."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..system import PAGE_SIZE
from .io_pagetable import IOMMU_READ, IOMMU_WRITE, Area, IoPagetable
from .object import Context, Object, ObjType
from .pages import FilePages, Pages, UserPages

log = logging.getLogger(__name__)


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


# -- descriptions for `iommufd-cuse status` ---------------------------------------------
def _prot(prot: int) -> str:
    return ("r" if prot & IOMMU_READ else "-") + ("w" if prot & IOMMU_WRITE else "-")


def _backing(pages: Pages) -> dict[str, Any]:
    if isinstance(pages, UserPages):
        # Shared file mappings are mapped by the daemon, private memory is reached
        # in place in the process (see iommufd/pages.py).
        return {"kind": "user", "pid": pages.source_tgid, "uptr": pages.uptr + pages.start_byte}
    if isinstance(pages, FilePages):
        return {"kind": "file", "offset": pages.start + pages.start_byte}
    return {"kind": type(pages).__name__}


def describe_area(area: Area) -> dict[str, Any]:
    return {
        "iova": area.start,
        "length": area.length,
        "last": area.last,
        "prot": _prot(area.prot),
        "backing": _backing(area.pages),
        "pages": area.num_pages,
        # Loaded into the attached domains means every page of the area is pinned.
        "pinned_pages": area.num_pages if area.filled else 0,
        "accesses": area.num_accesses,
    }


# The kinds that refer to an IOAS (an attribute ioas) and to a device (an attribute device).
_HAS_IOAS = (ObjType.HWPT_PAGING, ObjType.HWPT_NESTED, ObjType.ACCESS)
_HAS_DEVICE = (ObjType.DEVICE, ObjType.SELFTEST)


def describe_object(obj: Object) -> dict[str, Any]:
    """id, type and users of any object; the areas of an IOAS; the IOAS or device an
    object refers to; then what the object's own status() adds."""
    d: dict[str, Any] = {"id": obj.id, "type": obj.type.value, "users": obj.users}
    if obj.type is ObjType.IOAS:
        iopt = obj.iopt
        d["areas"] = [describe_area(a) for a in iopt.areas]
        d["domains"] = len(iopt.domains)
        d["iova_alignment"] = iopt.iova_alignment
        d["pinned_pages"] = sum(a["pinned_pages"] for a in d["areas"])
    if obj.type in _HAS_IOAS and obj.ioas is not None:
        d["ioas"] = obj.ioas.id
    if obj.type in _HAS_DEVICE and obj.device is not None:
        d["device"] = obj.device.bdf
    d.update(call_status(obj))
    return d


def describe_context(ctx: Context, index: int, now: float) -> dict[str, Any]:
    """Who opened the context, how it accounts, its objects and the pages they pin."""
    objects = [describe_object(o) for o in sorted(ctx.live_objects(), key=lambda o: o.id)]
    kinds: dict[str, int] = {}
    for o in objects:
        kinds[o["type"]] = kinds.get(o["type"], 0) + 1
    pages = {}
    for obj in ctx.live_objects():
        if obj.type is ObjType.IOAS:
            for a in obj.iopt.areas:
                pages[id(a.pages)] = a.pages
    return {
        "index": index,
        "pid": ctx.opener_pid,
        "tid": ctx.opener_tid,
        "uid": ctx.opener_uid,
        "comm": ctx.opener_comm,
        "cmdline": ctx.opener_cmdline,
        "age_s": round(now - ctx.opened_at, 1),
        # with pid and tid, tells one context from another across two snapshots
        "opened_at": ctx.opened_at,
        "accounting": ctx.account_mode.name.lower(),
        "objects_by_kind": kinds,
        "objects": objects,
        "pinned_pages": sum(p.npinned for p in pages.values()),
        "maps": ctx.maps,
        "unmaps": ctx.unmaps,
    }


def call_status(thing: Any) -> dict[str, Any]:
    """thing.status() as a dict; a failure is logged and reported, never raised."""
    try:
        d = thing.status()
        return dict(d) if isinstance(d, Mapping) else {"status": d}
    except Exception as e:  # a status report never takes the daemon down
        log.exception("status() of %r failed", thing)
        return {"error": f"status failed: {e}"}
