"""vIOMMU objects (drivers/iommu/iommufd/viommu.c) and vEVENT queues (the veventq
half of eventq.c): IOMMU_VIOMMU_ALLOC, IOMMU_VDEVICE_ALLOC, IOMMU_VEVENTQ_ALLOC.

A vIOMMU sits on a paging HWPT allocated with IOMMU_HWPT_ALLOC_NEST_PARENT and
holds a users reference on it. Vdevices (one per device, virt_ids unique per
vIOMMU), vEVENT queues (one per type) and nested HWPTs allocated with the vIOMMU
as pt_id each hold a users reference on the vIOMMU. Only an IOMMU driver with a
vIOMMU serves these (viommu_init): here, the selftest's mock IOMMU.

A vEVENT queue is a new file descriptor in the caller: as fault objects (fault.py),
through the companion library, which sends flags = COMPANION_MAGIC on a FUSE
iommufd; the daemon answers a token in out_veventq_fd that the companion claims on
VEVENTQ_NODE (companion.py). read() hands out iommufd_vevent_header + data records;
when the queue holds depth events, further reports leave a LOST_EVENTS header at its
tail (one, carrying the newest sequence). See docs/selftest.md.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from typing import Any

from .. import uapi
from ..errors import Errno
from ..system import PAGE_SIZE
from .access import Access, pin_pages, unpin_pages
from .companion import CLAIM, COMPANION_MAGIC, ZERO_READ, carrier_of, refuse_without_companion
from .device import get_idev
from .fault import Eventq, EventqFile, respond_eventq
from .hw_pagetable import UserData
from .io_pagetable import ULONG_MAX
from .mmap import free_mmap
from .object import Context, Object, ObjType, Ucmd

log = logging.getLogger(__name__)

VEVENTQ_NODE = "iommufd-cuse/veventq"
VEVENTQ_CLAIM = CLAIM  # on VEVENTQ_NODE, arg: the token
INT_MAX = (1 << 31) - 1
VEVENTQ_MAX_DEPTH = 1 << 19  # mainline's bound on veventq_depth (eventq.c)

POLLIN = 0x1
POLLRDNORM = 0x40
HEADER_SIZE = uapi.iommufd_vevent_header.SIZE


class Viommu(Object):
    """struct iommufd_viommu."""

    type = ObjType.VIOMMU

    def __init__(self, ctx: Context, hwpt: Any, iommu: Any, viommu_type: int) -> None:
        super().__init__()
        self.ctx = ctx
        self.hwpt = hwpt  # the nesting parent (HwptPaging)
        self.iommu = iommu
        self.viommu_type = viommu_type
        self.vdevs: dict[int, Vdevice] = {}  # virt_id -> vdevice
        self.veventqs: list[Veventq] = []
        self.mmap_offset: int | None = None  # of the region the driver registered (mmap.py)
        self.hw_queues: dict[int, Any] = {}  # index -> HwQueue, kept by the driver
        hwpt.users += 1  # released by destroy

    def status(self) -> dict:
        return {"hwpt": self.hwpt.id if self.hwpt else 0, "vdevs": sorted(self.vdevs)}

    def find_dev(self, virt_id: int) -> Any:
        """iommufd_viommu_find_dev: the device of the vdevice at virt_id, or None."""
        vdev = self.vdevs.get(virt_id)
        return vdev.idev.device if vdev is not None else None

    def get_vdev_id(self, device: Any) -> int | None:
        """iommufd_viommu_get_vdev_id: the virt_id of device's vdevice (None: ENOENT)."""
        for virt_id, vdev in self.vdevs.items():
            if vdev.idev.device is device:
                return virt_id
        return None

    def find_veventq(self, veventq_type: int) -> Veventq | None:
        for q in self.veventqs:
            if q.veventq_type == veventq_type:
                return q
        return None

    def report_event(self, veventq_type: int, data: bytes) -> None:
        """iommufd_viommu_report_event: queue data on the vEVENT queue of that type
        (none: EOPNOTSUPP); a full queue records a lost event instead."""
        q = self.find_veventq(veventq_type)
        if q is None:
            raise Errno(errno.EOPNOTSUPP)
        q.report(data)

    def destroy(self) -> None:
        if self.hwpt is not None:
            self.hwpt.users -= 1
            self.hwpt = None
        if self.mmap_offset is not None:
            free_mmap(self.ctx, self.mmap_offset)
            self.mmap_offset = None
        self.vdevs.clear()


class Vdevice(Object):
    """struct iommufd_vdevice: a device's virtual id on a vIOMMU."""

    type = ObjType.VDEVICE

    def __init__(self, viommu: Viommu, idev: Any, virt_id: int) -> None:
        super().__init__()
        self.viommu = viommu
        self.idev = idev
        self.virt_id = virt_id
        viommu.users += 1

    def status(self) -> dict:
        return {"viommu": self.viommu.id, "dev": self.idev.id, "virt_id": self.virt_id}

    def destroy(self) -> None:
        viommu = self.viommu
        if viommu is None:
            return
        if viommu.vdevs.get(self.virt_id) is self:
            del viommu.vdevs[self.virt_id]
        viommu.users -= 1
        if getattr(self.idev, "vdev", None) is self:
            self.idev.vdev = None
        self.viommu = None  # type: ignore[assignment]


class VeventqFile(EventqFile):
    """An open of VEVENTQ_NODE: the file of one vEVENT queue once claimed."""

    kind = "veventq"
    node = VEVENTQ_NODE

    def read(self, req: Any, offset: int, size: int) -> bytes:
        q = self.obj
        if q is None:
            raise Errno(errno.EBADFD)
        return q.read(size)

    def ioctl(self, req: Any, cmd: int, arg: int) -> int:
        if cmd == ZERO_READ and self.obj is not None:
            self.obj.read(0)  # EINVAL: a read below a header's size
            return 0
        return super().ioctl(req, cmd, arg)

    def write(self, req: Any, offset: int, data: bytes) -> int:
        raise Errno(errno.EINVAL)  # the kernel's file has no write: the VFS says EINVAL

    def poll(self, req: Any, events: int, kh: int | None) -> int:
        q = self.obj
        if q is None:
            return 0
        if kh is not None:
            q.poll_khs.add(kh)
        return POLLIN | POLLRDNORM if q.readable() else 0


class Veventq(Eventq):
    """struct iommufd_veventq: events to deliver, at most depth of them, then a
    lost-events header."""

    type = ObjType.VEVENTQ
    file_cls = VeventqFile

    def __init__(self, ctx: Context, viommu: Viommu, veventq_type: int, depth: int) -> None:
        super().__init__(ctx)
        self.viommu = viommu
        self.veventq_type = veventq_type
        self.depth = depth
        # (flags, sequence, data): data None for the lost-events header
        self.deliver: deque[list[Any]] = deque()
        self.num_events = 0
        self.sequence = 0
        viommu.users += 1
        viommu.veventqs.append(self)

    def status(self) -> dict:
        return {
            "viommu": self.viommu.id if self.viommu else 0,
            "type": self.veventq_type,
            "depth": self.depth,
            "queued": self.num_events,
        }

    def report(self, data: bytes) -> None:
        """iommufd_viommu_report_event + iommufd_vevent_handler: a lost-events header
        at the tail is replaced by what comes next; every report takes a sequence."""
        if self.num_events == self.depth:
            entry = [uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS, 0, None]
        else:
            entry = [0, 0, bytes(data)]
            self.num_events += 1
        if self.deliver and self.deliver[-1][2] is None:
            self.deliver.pop()
        entry[1] = self.sequence
        self.sequence = (self.sequence + 1) & INT_MAX
        self.deliver.append(entry)
        self.wake()

    def read(self, count: int) -> bytes:
        """iommufd_veventq_fops_read: whole records (header, then the event data) that
        fit in count bytes. A count below a header, or a first event that does not
        fit, is EINVAL; a lost-events header needs only its own room."""
        if count < HEADER_SIZE:
            raise Errno(errno.EINVAL)
        out = bytearray()
        while self.deliver:
            flags, seq, data = self.deliver[0]
            room = count - len(out)
            if room < HEADER_SIZE:
                break
            if data is not None and HEADER_SIZE + len(data) > room:
                if not out:
                    raise Errno(errno.EINVAL)
                break
            self.deliver.popleft()
            out += uapi.iommufd_vevent_header.pack(uapi.iommufd_vevent_header.new(flags=flags, sequence=seq))
            if data is not None:
                out += data
                self.num_events -= 1
        return bytes(out)

    def abort(self) -> None:
        self.destroy()

    def destroy(self) -> None:
        viommu = self.viommu
        if viommu is not None:
            if self in viommu.veventqs:
                viommu.veventqs.remove(self)
            viommu.users -= 1
            self.viommu = None  # type: ignore[assignment]
        self.deliver.clear()
        self.num_events = 0
        self.wake()


# -- IOMMU_VIOMMU_ALLOC -----------------------------------------------------------------------
def get_viommu(ctx: Context, viommu_id: int) -> Viommu:
    return ctx.get(viommu_id, ObjType.VIOMMU)


def viommu_alloc(ucmd: Ucmd) -> int:
    """IOMMU_VIOMMU_ALLOC, in mainline's order: flags or the DEFAULT type EOPNOTSUPP;
    no device ENOENT; a driver without a vIOMMU of that type EOPNOTSUPP; hwpt_id not
    a paging HWPT ENOENT; not NEST_PARENT EINVAL; then the driver's data."""
    cmd = ucmd.cmd
    ctx = ucmd.ctx
    if cmd.flags or cmd.type == uapi.IOMMU_VIOMMU_TYPE_DEFAULT:
        raise Errno(errno.EOPNOTSUPP)
    idev = get_idev(ctx, cmd.dev_id)
    iommu = idev.device.iommu
    init = getattr(iommu, "viommu_init", None)
    if init is None or not iommu.viommu_supported(cmd.type):
        log.info("IOMMU_VIOMMU_ALLOC: %s has no vIOMMU of type %#x: EOPNOTSUPP", iommu.name, cmd.type)
        raise Errno(errno.EOPNOTSUPP)
    hwpt = ctx.get(cmd.hwpt_id, ObjType.HWPT_PAGING)
    if not hwpt.nest_parent:
        raise Errno(errno.EINVAL)
    viommu = ctx.alloc(Viommu(ctx, hwpt, iommu, cmd.type))
    try:
        user_data = UserData(ucmd.caller, cmd.type, cmd.data_uptr, cmd.data_len) if cmd.data_len else None
        init(viommu, hwpt.domain, user_data)
    except BaseException:
        ctx.abort(viommu)
        raise
    cmd.out_viommu_id = viommu.id
    ucmd.respond_and_finalize(viommu)
    return 0


# -- IOMMU_HW_QUEUE_ALLOC ---------------------------------------------------------------------
class InternalAccess(Access):
    """An access of the core's own (iommufd_access_create_internal): an object id in
    the context, PAGE_SIZE alignment, never asked to let go of its pins (an unmap
    under them is EBUSY: iommufd_access_notify_unmap skips internal accesses)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, needs_pin_pages=True)
        self.users += 1  # the core's reference, dropped by release()
        self.pins: list = []

    def release(self) -> None:
        """Unpin, detach and destroy (iommufd_hw_queue_destroy_access)."""
        unpin_pages(self.pins)
        self.pins = []
        self.detach()
        self.users -= 1
        if self.ctx.objects.get(self.id) is self:
            self.ctx._destroy(self)


class HwQueue(Object):
    """struct iommufd_hw_queue: a queue the vIOMMU's hardware reads at an IOVA of the
    nesting parent, physically contiguous and kept pinned by an internal access."""

    type = ObjType.HW_QUEUE

    def __init__(self, ctx: Context, viommu: Viommu, queue_type: int, iova: int, length: int) -> None:
        super().__init__()
        self.ctx = ctx
        self.viommu: Viommu | None = None
        self.queue_type = queue_type
        self.base_addr = iova
        self.length = length
        self.access: InternalAccess | None = None
        self.driver_destroy: Any = None  # set by the driver's hw_queue_init_phys

    def status(self) -> dict:
        return {"viommu": self.viommu.id if self.viommu else 0, "iova": self.base_addr, "length": self.length}

    def destroy(self) -> None:
        """iommufd_hw_queue_destroy: the driver's part, the access, the vIOMMU."""
        if self.driver_destroy is not None:
            self.driver_destroy(self)
            self.driver_destroy = None
        if self.access is not None:
            self.access.release()
            self.access = None
        if self.viommu is not None:
            self.viommu.users -= 1
            self.viommu = None


def _hw_queue_alloc_phys(ctx: Context, cmd: Any, viommu: Viommu) -> tuple[InternalAccess, int]:
    """iommufd_hw_queue_alloc_phys: pin the queue's pages (read) through an internal
    access to the parent's IOAS; they must be physically contiguous (else EFAULT).
    Returns the access and the queue's physical address."""
    offset = cmd.nesting_parent_iova % PAGE_SIZE
    aligned_iova = cmd.nesting_parent_iova - offset
    length = offset + cmd.length + PAGE_SIZE - 1
    if length > ULONG_MAX:
        raise Errno(errno.ERANGE)
    length -= length % PAGE_SIZE
    access = ctx.alloc(InternalAccess(ctx))
    ctx.finalize(access)
    try:
        access.attach(viommu.hwpt.ioas)
        access.pins = pin_pages(access, aligned_iova, length, False)
        pa = None
        for area, first, n in access.pins:
            start = area.pages.pa_base + first * PAGE_SIZE
            if pa is not None and start != pa:
                raise Errno(errno.EFAULT)
            pa = start + n * PAGE_SIZE
        area, first, _n = access.pins[0]
        return access, area.pages.pa_base + first * PAGE_SIZE + offset
    except BaseException:
        access.release()
        raise


def hw_queue_alloc(ucmd: Ucmd) -> int:
    """IOMMU_HW_QUEUE_ALLOC, in mainline's order: flags or the DEFAULT type EOPNOTSUPP;
    length 0 EINVAL; an IOVA range that wraps EOVERFLOW; no vIOMMU ENOENT; a driver
    without HW queues of that type EOPNOTSUPP (logged); then the pin (an IOVA not
    mapped ENOENT), then the driver's hw_queue_init_phys."""
    cmd = ucmd.cmd
    ctx = ucmd.ctx
    if cmd.flags or cmd.type == uapi.IOMMU_HW_QUEUE_TYPE_DEFAULT:
        raise Errno(errno.EOPNOTSUPP)
    if not cmd.length:
        raise Errno(errno.EINVAL)
    if cmd.nesting_parent_iova + cmd.length - 1 > ULONG_MAX:
        raise Errno(errno.EOVERFLOW)
    viommu = get_viommu(ctx, cmd.viommu_id)
    iommu = viommu.iommu
    supported = getattr(iommu, "hw_queue_supported", None)
    if supported is None or not supported(viommu, cmd.type):
        log.info("IOMMU_HW_QUEUE_ALLOC: the vIOMMU of %s has no HW queue of type %#x: EOPNOTSUPP", iommu.name, cmd.type)
        raise Errno(errno.EOPNOTSUPP)
    with ctx.hold(viommu):
        q = ctx.alloc(HwQueue(ctx, viommu, cmd.type, cmd.nesting_parent_iova, cmd.length))
        try:
            q.access, base_pa = _hw_queue_alloc_phys(ctx, cmd, viommu)
            q.viommu = viommu
            viommu.users += 1
            iommu.hw_queue_init_phys(q, cmd.index, base_pa)
        except BaseException:
            ctx.abort(q)
            raise
        cmd.out_hw_queue_id = q.id
        ucmd.respond_and_finalize(q)
    return 0


# -- IOMMU_VDEVICE_ALLOC ----------------------------------------------------------------------
def vdevice_alloc(ucmd: Ucmd) -> int:
    """IOMMU_VDEVICE_ALLOC: no vIOMMU or device ENOENT; a device of another IOMMU
    EINVAL; a device that has a vdevice already, or a virt_id taken, EEXIST."""
    cmd = ucmd.cmd
    ctx = ucmd.ctx
    if cmd.virt_id > (1 << 64) - 1:
        raise Errno(errno.EINVAL)
    viommu = get_viommu(ctx, cmd.viommu_id)
    idev = get_idev(ctx, cmd.dev_id)
    if viommu.iommu is not idev.device.iommu:
        raise Errno(errno.EINVAL)
    if getattr(idev, "vdev", None) is not None:
        raise Errno(errno.EEXIST)
    if cmd.virt_id in viommu.vdevs:
        raise Errno(errno.EEXIST)
    vdev = ctx.alloc(Vdevice(viommu, idev, cmd.virt_id))
    viommu.vdevs[cmd.virt_id] = vdev
    idev.vdev = vdev
    cmd.out_vdevice_id = vdev.id
    ucmd.respond_and_finalize(vdev)
    return 0


def remove_vdev(idev: Any) -> None:
    """iommufd_device_remove_vdev: a device going away takes its vdevice with it."""
    vdev = getattr(idev, "vdev", None)
    if vdev is None:
        return
    ctx = vdev.viommu.ctx if vdev.viommu is not None else None
    if ctx is not None and ctx.objects.get(vdev.id) is vdev:
        ctx._destroy(vdev)
    else:
        vdev.destroy()
    idev.vdev = None


# -- IOMMU_VEVENTQ_ALLOC ----------------------------------------------------------------------
async def veventq_alloc(ucmd: Ucmd) -> int:
    """IOMMU_VEVENTQ_ALLOC: flags, __reserved or the DEFAULT type EOPNOTSUPP; depth 0
    or over VEVENTQ_MAX_DEPTH EINVAL; no vIOMMU ENOENT; a queue of that type on the vIOMMU EEXIST. Needs the
    companion (flags = COMPANION_MAGIC); without it EOPNOTSUPP, logged."""
    cmd = ucmd.cmd
    marked = cmd.flags == COMPANION_MAGIC
    carrier = carrier_of(ucmd.caller, marked)
    if (cmd.flags and not marked) or cmd.reserved or cmd.type == uapi.IOMMU_VEVENTQ_TYPE_DEFAULT:
        raise Errno(errno.EOPNOTSUPP)
    if not cmd.veventq_depth or cmd.veventq_depth > VEVENTQ_MAX_DEPTH:
        raise Errno(errno.EINVAL)
    ctx = ucmd.ctx
    viommu = get_viommu(ctx, cmd.viommu_id)
    if viommu.find_veventq(cmd.type) is not None:
        raise Errno(errno.EEXIST)
    if carrier is None:
        refuse_without_companion(log, "IOMMU_VEVENTQ_ALLOC", "a vEVENT queue")
    q = ctx.alloc(Veventq(ctx, viommu, cmd.type, cmd.veventq_depth))
    return await respond_eventq(
        ucmd, q, "out_veventq_id", "out_veventq_fd", carrier, "IOMMU_VEVENTQ_ALLOC", "a vEVENT queue"
    )
