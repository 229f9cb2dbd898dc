"""What every iommufd object kind shares: the role of drivers/iommu/iommufd/iommufd_private.h.

The object base and its types, the context (struct iommufd_ctx) with its object
table, the ioctl in flight (struct iommufd_ucmd) and the struct copy helpers.
Every object kind's module imports this one and none of each other's for these,
so the kinds form no import cycle.

Objects get ids from 1, lowest free; each has a users count that the table's own
reference starts at 1. Creation is two-phase: an id is reserved by alloc(), and
the object only becomes visible at finalize(); abort() drops it. IOMMU_DESTROY
and context release share each type's destroy().
"""

from __future__ import annotations

import enum
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .._native import lib
from ..errors import Errno
from ..transport.caller import INLINE_SCAN, Caller, scan_off_loop
from .pages import AccountMode

if TYPE_CHECKING:
    from ..system import System

log = logging.getLogger(__name__)


class ObjType(enum.Enum):
    ACCESS = "access"
    DEVICE = "device"
    HWPT_PAGING = "hwpt_paging"
    HWPT_NESTED = "hwpt_nested"
    IOAS = "ioas"
    FAULT = "fault"
    VIOMMU = "viommu"
    VDEVICE = "vdevice"
    VEVENTQ = "veventq"
    HW_QUEUE = "hw_queue"
    SELFTEST = "selftest"


class Object:
    """Base of every iommufd object: id, type, users count."""

    type: ObjType

    def __init__(self) -> None:
        self.id = 0
        self.users = 1  # the object table's reference

    def destroy(self) -> None:
        """Release everything the object holds. Called once, with users at zero."""

    def abort(self) -> None:
        """Undo a creation that did not reach finalize (default: destroy)."""
        self.destroy()

    def status(self) -> dict[str, Any]:
        """What `iommufd-cuse status` shows of the object beyond id, type and users
        (iommufd/debug.py)."""
        return {}

    def __repr__(self) -> str:
        return f"<{self.type.value} {self.id}>"


def _opener_process(opener: Caller) -> tuple[int, str, list[str]]:
    """(tgid, comm, argv) of the process the opening thread belongs to."""
    try:
        pid = opener.tgid
    except OSError:
        return opener.tid, "?", []
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = f.read().decode(errors="replace").rstrip("\n")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read().rstrip(b"\0")
        argv = [a.decode(errors="replace") for a in raw.split(b"\0")] if raw else []
    except OSError:
        return pid, "?", []
    return pid, comm, argv


_RESERVED = object()  # an id allocated but not yet finalized (the kernel's XA_ZERO_ENTRY)

ObjT = TypeVar("ObjT", bound=Object)


class Context:
    """struct iommufd_ctx: one per open file."""

    def __init__(self, system: System, opener: Caller, account_mode: AccountMode = AccountMode.USER) -> None:
        self.system = system
        self.objects: dict[int, Any] = {}
        self.account_mode = account_mode
        self.vfio_ioas = None  # the compat layer's IOAS
        self.maps = self.unmaps = 0  # IOAS map and unmap operations that succeeded (status)
        self.opener_tid = opener.tid
        self.opener_uid = opener.uid
        self.igroups: dict[int, Any] = {}  # group id -> device.Igroup
        self.closed = False
        # Called first at release: holders from outside the context (selftest
        # accesses, files of their own) let go of their objects.
        self.release_hooks: list[Callable[[], None]] = []
        # Regions of objects mappable with mmap() of the iommufd, by offset (mmap.py).
        self.mmap_regions: dict[int, Any] = {}
        # Files handed back for objects of this context (access, fault and vEVENT
        # queue files) keep it alive after its own file is released, as the
        # kernel's iommufd_ctx_get() does: it goes with the last of them.
        self.file_holders = 0
        self.file_released = False
        # Who opened it, for `iommufd-cuse status` (read now: the thread may be gone later).
        self.opener_pid, self.opener_comm, self.opener_cmdline = _opener_process(opener)
        self.opened_at = time.time()

    # -- objects --------------------------------------------------------------
    def alloc(self, obj: ObjT) -> ObjT:
        """Reserve the lowest free id for obj (visible only after finalize)."""
        i = 1
        objects = self.objects
        while i in objects:
            i += 1
        objects[i] = _RESERVED
        obj.id = i
        return obj

    def finalize(self, obj: Object) -> None:
        assert self.objects.get(obj.id) is _RESERVED
        self.objects[obj.id] = obj

    def abort(self, obj: Object) -> None:
        """Drop an object whose creation failed; what it set up is undone."""
        assert self.objects.get(obj.id) is _RESERVED
        del self.objects[obj.id]
        obj.abort()

    def get(self, obj_id: int, type_: ObjType | None = None) -> Any:
        """Typed lookup: a missing id or an object of another type is ENOENT."""
        obj = self.objects.get(obj_id)
        if obj is None or obj is _RESERVED or (type_ is not None and obj.type is not type_):
            raise Errno(errno.ENOENT)
        return obj

    @contextmanager
    def hold(self, obj: ObjT) -> Iterator[ObjT]:
        """Keep obj from being destroyed while a handler that awaits uses it."""
        obj.users += 1
        try:
            yield obj
        finally:
            obj.users -= 1

    def remove(self, obj_id: int) -> None:
        """IOMMU_DESTROY: ENOENT for unknown ids, EBUSY while others use it."""
        obj = self.objects.get(obj_id)
        if obj is None or obj is _RESERVED:
            raise Errno(errno.ENOENT)
        if obj.users != 1:
            raise Errno(errno.EBUSY)
        self._destroy(obj)

    def _destroy(self, obj: Object) -> None:
        del self.objects[obj.id]
        obj.users = 0
        if self.vfio_ioas is obj:
            self.vfio_ioas = None
        obj.destroy()

    def live_objects(self) -> list[Object]:
        return [o for o in self.objects.values() if o is not _RESERVED]

    def hold_file(self) -> None:
        self.file_holders += 1

    def drop_file(self) -> None:
        self.file_holders -= 1
        if self.file_released and self.file_holders == 0:
            self.finish_release()

    def release_file(self) -> None:
        """The context's own file is released; it ends now unless files hold it."""
        self.file_released = True
        if self.file_holders == 0:
            self.finish_release()
        else:
            log.debug("context kept alive by %d handed-back files", self.file_holders)

    def finish_release(self) -> None:
        self.destroy_all()
        self.system.contexts.discard(self)

    def destroy_all(self) -> None:
        """Release: destroy leaves first (users 1) until nothing is left."""
        for hook in list(self.release_hooks):
            try:
                hook()
            except Exception:
                log.exception("release hook %r failed", hook)
        self.release_hooks.clear()
        while self.live_objects():
            leaves = [o for o in self.live_objects() if o.users == 1]
            if not leaves:
                log.error("context objects still in use at release: %s", self.live_objects())
                break
            for obj in leaves:
                if self.objects.get(obj.id) is not obj:
                    continue  # gone with one destroyed before it (a vdevice with its mock device)
                try:
                    self._destroy(obj)
                except Exception:
                    log.exception("destroying %r at release failed", obj)
        self.closed = True


@dataclass(slots=True)
class Ucmd:
    """One iommufd ioctl in flight: the context, the caller, the copied-in struct."""

    ctx: Context
    caller: Caller
    arg: int  # the user's pointer
    user_size: int
    struct: Any  # uapi.CStruct
    cmd: Any  # the struct's unpacked fields

    def respond(self) -> None:
        """Copy the struct back: min(user size, struct size) bytes (iommufd_ucmd_respond)."""
        data = self.struct.pack(self.cmd)
        self.caller.write(self.arg, data[: min(self.user_size, len(data))])

    def respond_and_finalize(self, obj: Object) -> None:
        """The end of every creating handler: copy the answer out, then make the
        object visible; if the copy faults the object is aborted, never seen."""
        try:
            self.respond()
        except BaseException:
            self.ctx.abort(obj)
            raise
        self.ctx.finalize(obj)

    def respond_field(self, name: str) -> None:
        """Copy back a single field, as handlers that write one member do."""
        off, size = self.struct.FIELDS[name]
        value = getattr(self.cmd, name)
        if type(value) is int and size <= 8:  # a scalar: its bytes alone
            self.caller.write(self.arg + off, value.to_bytes(size, "little", signed=value < 0))
            return
        data = self.struct.pack(self.cmd)
        self.caller.write(self.arg + off, data[off : off + size])


def check_zeroed_user(caller: Caller, addr: int, size: int) -> Awaitable[None] | None:
    """The tail check of copy_struct_from_user: E2BIG at a non-zero byte, EFAULT at
    an unreadable one. A short tail is scanned now (None); a long one is scanned
    off the loop by the awaitable returned."""
    if addr >= 1 << 64:
        raise Errno(errno.EFAULT)
    if size <= INLINE_SCAN:
        _zero_result(lib.icuse_vm_check_zero(caller.tid, addr, size))
        return None
    return check_zeroed_user_async(caller, addr, size)


async def check_zeroed_user_async(caller: Caller, addr: int, size: int) -> None:
    _zero_result(await scan_off_loop(lib.icuse_vm_check_zero, caller, addr, size))


def _zero_result(rc: int) -> None:
    if rc == 1:
        raise Errno(errno.E2BIG)
    if rc:
        raise Errno(errno.EFAULT)


def copy_struct_from_user(caller: Caller, addr: int, ksize: int, usize: int) -> bytes:
    """The kernel's copy_struct_from_user for tails short enough to check on the
    loop (at most INLINE_SCAN bytes past ksize; longer: check_zeroed_user first):
    a shorter user struct is zero-extended, a longer one must have only zero bytes
    past ksize (else E2BIG)."""
    if usize <= ksize:
        data = caller.read(addr, usize)
        return bytes(data) + bytes(ksize - usize)
    if usize - ksize > INLINE_SCAN:
        raise ValueError("a long tail is checked off the loop (check_zeroed_user)")
    check_zeroed_user(caller, addr + ksize, usize - ksize)
    return bytes(caller.read(addr, ksize))
