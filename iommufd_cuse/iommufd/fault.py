"""The fault object (IOMMUFD_OBJ_FAULT) and its file: IOMMU_FAULT_QUEUE_ALLOC.

Mirrors the fault half of drivers/iommu/iommufd/eventq.c. A HWPT allocated with
IOMMU_HWPT_FAULT_ID_VALID holds a fault object; page requests reported for a
device attached to that HWPT are queued on it as groups (one record each here:
the only reporter is the selftest's TRIGGER_IOPF, always LAST_PAGE). read() on the
fault's file hands out whole groups as iommu_hwpt_pgfault records, each group
getting a cookie; write() takes iommu_hwpt_page_response entries answering them.

The file is a new descriptor in the caller, which a FUSE server cannot create:
with the companion library (tools/iommufd_selftest_preload.c) the ioctl carries
COMPANION_MAGIC in flags, the daemon answers with a token in out_fault_fd, and the
companion opens FAULT_NODE and claims the token (FAULT_CLAIM), putting the new fd
in out_fault_fd (companion.py). Without it: EOPNOTSUPP. See docs/selftest.md.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import uapi
from ..errors import Errno
from .companion import (
    CLAIM,
    COMPANION,
    COMPANION_MAGIC,
    Carrier,
    HandedFile,
    carrier_of,
    hand_back,
    refuse_without_companion,
)
from .object import Context, Object, ObjType, Ucmd

log = logging.getLogger(__name__)

FAULT_NODE = "iommufd-cuse/fault"
FAULT_CLAIM = CLAIM  # on FAULT_NODE, arg: the token

POLLIN = 0x1
POLLOUT = 0x4
POLLRDNORM = 0x40

RECORD_SIZE = uapi.iommu_hwpt_pgfault.SIZE
RESPONSE_SIZE = uapi.iommu_hwpt_page_response.SIZE
PAGE_RESP_SUCCESS = 0
PAGE_RESP_INVALID = 1


@dataclass(eq=False)
class FaultGroup:
    """struct iopf_group: the faults of one page request group of a device."""

    idev: Any  # the device object the faults came from
    hwpt: Any  # the HWPT it was attached to (the attach handle)
    pasid: int  # the PASID of that attachment (0: the RID)
    faults: list[dict[str, int]]  # flags, pasid, grpid, perm, addr of each fault
    cookie: int = 0


class Eventq(Object):
    """struct iommufd_eventq: what a fault and a vEVENT queue (viommu.py) share: the
    records to deliver, the pollers of the file, and the file's users reference
    (taken at alloc, as the kernel's)."""

    file_cls: ClassVar[type[HandedFile]]  # the file the companion claims

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.deliver: deque[Any] = deque()
        self.poll_khs: set[int] = set()
        self.notify: Callable[[int], None] | None = None  # the server's notify_poll
        self.file: EventqFile | None = None
        self.file_ref = False

    def wake(self) -> None:
        khs, self.poll_khs = self.poll_khs, set()
        if self.notify is not None:
            for kh in khs:
                self.notify(kh)

    def readable(self) -> bool:
        return bool(self.deliver)

    def drop_file_ref(self) -> None:
        """The file's reference goes (its close, or its context's close)."""
        if self.file_ref:
            self.file_ref = False
            self.users -= 1

    def context_closing(self) -> None:
        """The context is released while the file may still be open: the file lets go
        of the object (the kernel would keep the context alive until the file closes)."""
        self.drop_file_ref()
        self.file_cls.forget(self.ctx.system, self)


class EventqFile(HandedFile):
    """The file of an event queue (a fault, or a vEVENT queue in viommu.py) once
    claimed: its pollers are woken through the server's notify_poll, and its close
    drops the file's users reference on the queue."""

    def __init__(self, system: Any, notify: Callable[[int], None] | None) -> None:
        super().__init__(system)
        self.notify = notify

    def claimed(self, obj: Any) -> None:
        super().claimed(obj)
        obj.notify = self.notify

    def on_release(self) -> None:
        q, self.obj = self.obj, None
        if q is not None:
            q.poll_khs.clear()
            q.file = None
            q.drop_file_ref()


class FaultFile(EventqFile):
    """An open of FAULT_NODE: the file of one fault object once claimed."""

    kind = "fault"
    node = FAULT_NODE

    def _claimed(self) -> Fault:
        if self.obj is None:
            raise Errno(errno.EBADFD)
        return self.obj

    def read(self, req: Any, offset: int, size: int) -> bytes:
        # The kernel's fault file never moves its position; FUSE advances it on
        # every read of a direct-I/O file, so the offset is not checked (pread is
        # refused by the VFS anyway: the file is nonseekable).
        return self._claimed().read(size)

    def write(self, req: Any, offset: int, data: bytes) -> int:
        return self._claimed().write(data)

    def poll(self, req: Any, events: int, kh: int | None) -> int:
        fault = self.obj
        if fault is None:
            return POLLOUT
        if kh is not None:
            fault.poll_khs.add(kh)
        return POLLOUT | (POLLIN | POLLRDNORM if fault.readable() else 0)


class Fault(Eventq):
    """struct iommufd_fault: groups to deliver, and groups delivered awaiting a response."""

    type = ObjType.FAULT
    file_cls = FaultFile

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.deliver: deque[FaultGroup] = deque()
        self.response: dict[int, FaultGroup] = {}

    # -- the queue ------------------------------------------------------------------
    def report(self, group: FaultGroup) -> None:
        """iommufd_fault_iopf_handler: queue the group and wake the pollers."""
        self.deliver.append(group)
        self.wake()

    def read(self, count: int) -> bytes:
        """iommufd_fault_fops_read: whole groups that fit in count bytes."""
        if count % RECORD_SIZE:
            raise Errno(errno.ESPIPE)
        out = bytearray()
        while self.deliver:
            group = self.deliver[0]
            if len(out) >= count or len(group.faults) * RECORD_SIZE > count - len(out):
                break
            self.deliver.popleft()
            cookie = 1  # xa_alloc from 1: the lowest free index
            while cookie in self.response:
                cookie += 1
            group.cookie = cookie
            self.response[cookie] = group
            for f in group.faults:
                out += uapi.iommu_hwpt_pgfault.pack(
                    uapi.iommu_hwpt_pgfault.new(
                        flags=f["flags"],
                        dev_id=group.idev.id,
                        pasid=f["pasid"],
                        grpid=f["grpid"],
                        perm=f["perm"],
                        reserved=0,
                        addr=f["addr"],
                        length=0,
                        cookie=cookie,
                    )
                )
        return bytes(out)

    def write(self, data: bytes) -> int:
        """iommufd_fault_fops_write: responses, each answering the group of its cookie.
        The first bad entry stops; the entries before it count (EINVAL only if none)."""
        if len(data) % RESPONSE_SIZE:
            raise Errno(errno.ESPIPE)
        done = 0
        err = 0
        while done < len(data):
            resp = uapi.iommu_hwpt_page_response.unpack(data[done : done + RESPONSE_SIZE])
            if resp.code not in (PAGE_RESP_SUCCESS, PAGE_RESP_INVALID):
                err = errno.EINVAL
                break
            group = self.response.pop(resp.cookie, None)
            if group is None:
                err = errno.EINVAL
                break
            log.debug("fault %d: group %d answered %d", self.id, resp.cookie, resp.code)
            done += RESPONSE_SIZE
        if done == 0 and err:
            raise Errno(err)
        return done

    def auto_respond(self, idev: Any = None, hwpt: Any = None) -> None:
        """iommufd_auto_response_faults: drop (answer INVALID) the groups of an
        attachment that went away; all groups when none is named (destroy)."""

        def gone(g: FaultGroup) -> bool:
            return (idev is None or g.idev is idev) and (hwpt is None or g.hwpt is hwpt)

        self.deliver = deque(g for g in self.deliver if not gone(g))
        for cookie in [c for c, g in self.response.items() if gone(g)]:
            del self.response[cookie]

    # -- lifetime -------------------------------------------------------------------
    def destroy(self) -> None:
        self.auto_respond()
        self.wake()


# -- IOMMU_FAULT_QUEUE_ALLOC ---------------------------------------------------------------
async def fault_alloc(ucmd: Ucmd) -> int:
    """IOMMU_FAULT_QUEUE_ALLOC: a fault object, and its file through the companion or
    a notified call (companion.hand_back)."""
    cmd = ucmd.cmd
    carrier = carrier_of(ucmd.caller, cmd.flags == COMPANION_MAGIC)
    if cmd.flags and carrier is not COMPANION:
        raise Errno(errno.EOPNOTSUPP)
    if carrier is None:
        refuse_without_companion(log, "IOMMU_FAULT_QUEUE_ALLOC", "a fault queue")
    ctx = ucmd.ctx
    return await respond_eventq(
        ucmd, ctx.alloc(Fault(ctx)), "out_fault_id", "out_fault_fd", carrier, "IOMMU_FAULT_QUEUE_ALLOC", "a fault queue"
    )


async def respond_eventq(
    ucmd: Ucmd, q: Eventq, out_id: str, out_fd: str, carrier: Carrier, command: str, what: str
) -> int:
    """The end of an event queue's alloc: the file's reference (iommufd_eventq_init),
    the file through carrier in out_fd, the answer (an unclaimed token goes if it fails)."""
    ctx = ucmd.ctx
    cmd = ucmd.cmd
    q.users += 1
    q.file_ref = True
    try:
        fd = await hand_back(q.file_cls, ctx.system, q, ucmd.caller, carrier, log, command, what)
    except BaseException:
        ctx.abort(q)
        raise
    cmd.flags = 0  # the companion restores its own copy; the answer carries none
    setattr(cmd, out_id, q.id)
    setattr(cmd, out_fd, fd)
    try:
        ucmd.respond_and_finalize(q)
    except BaseException:
        q.file_cls.pending(ctx.system).pop(fd, None)
        raise
    ctx.release_hooks.append(q.context_closing)
    return 0


# -- reporting ---------------------------------------------------------------------------
def report_device_fault(idev: Any, pasid: int, grpid: int, perm: int, addr: int, user_pasid_table: bool = True) -> bool:
    """iommu_report_device_fault for one LAST_PAGE page request of idev: find the
    attachment (the PASID's when pasid is not 0; with a driver that keeps the PASID
    table in user space, the RID's nested HWPT when the PASID has none; else the
    RID's) and queue the group on its HWPT's fault. False when it is dropped (no
    attachment, or a HWPT without a fault)."""
    igroup = idev.igroup
    flags = uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE
    hwpt = None
    at = 0
    if pasid:
        flags |= uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID
        hwpt = igroup.pasids.get(pasid)
        at = pasid
        if (
            hwpt is None
            and user_pasid_table
            and idev in igroup.attached
            and igroup.hwpt is not None
            and igroup.hwpt.type is ObjType.HWPT_NESTED
        ):
            hwpt, at = igroup.hwpt, 0
    elif idev in igroup.attached:
        hwpt = igroup.hwpt
    fault = getattr(hwpt, "fault", None)
    if fault is None:
        return False
    fault.report(
        FaultGroup(idev, hwpt, at, [{"flags": flags, "pasid": pasid, "grpid": grpid, "perm": perm, "addr": addr}])
    )
    return True
