"""The ioctl table, its central validation and the file of /dev/iommu.

Mirrors drivers/iommu/iommufd/main.c. One Context (object.py) per open of
/dev/iommu (or of /dev/vfio/vfio); the objects, the context and the ioctl in
flight are in object.py, the role of iommufd_private.h.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from struct import Struct
from typing import TYPE_CHECKING, Any

from .. import uapi
from .._native import ffi, lib
from ..errors import Errno
from ..transport.caller import Caller
from ..transport.nodes import FileHandle
from ..transport.protocol import FOPEN_DIRECT_IO, FOPEN_NONSEEKABLE
from . import device, fault, hw_pagetable, ioas, mmap, vfio_compat, viommu
from .object import Context, Ucmd, check_zeroed_user, copy_struct_from_user
from .pages import AccountMode
from .selftest import iommufd_test

if TYPE_CHECKING:
    from ..system import System
    from ..transport.server import Request

log = logging.getLogger(__name__)


Handler = Callable[[Ucmd], int | Awaitable[int]]


@dataclass(frozen=True, slots=True)
class IoctlOp:
    number: int
    handler: Handler
    struct: Any
    min_size: int
    buf: bytearray  # the struct's bytes as read from the caller (reused: dispatch runs on the loop only)
    cbuf: Any  # buf as C sees it


IOMMUFD_CMD_BASE = 0x80
_U32 = Struct("<I")  # the size word
_IOC_NRMASK = 0xFF


class IoctlTable:
    """Number -> (handler, struct, min size), with the kernel's central validation."""

    def __init__(self) -> None:
        self.ops: dict[int, IoctlOp] = {}
        self.last_nr = IOMMUFD_CMD_BASE - 1
        self.selftest = False

    def register(self, number: int, handler: Handler) -> None:
        struct, min_size = uapi.IOCTL_STRUCTS[number]
        buf = bytearray(struct.SIZE)
        self.ops[number & _IOC_NRMASK] = IoctlOp(number, handler, struct, min_size, buf, ffi.from_buffer(buf))
        self.last_nr = max(self.last_nr, number & _IOC_NRMASK)

    def in_range(self, cmd: int) -> bool:
        return IOMMUFD_CMD_BASE <= cmd & _IOC_NRMASK <= self.last_nr

    def dispatch(self, ctx: Context, caller: Caller, cmd: int, arg: int) -> int | Awaitable[int]:
        """The path of iommufd_fops_ioctl for a number inside the table's range."""
        op = self.ops.get(cmd & _IOC_NRMASK)
        if op is None or op.number != cmd:
            caller.read(arg, 4)  # the size word is read first: a bad pointer is EFAULT
            raise Errno(errno.ENOTTY)
        ksize = op.struct.SIZE
        # One read of the whole known struct in the common case; exact reads
        # when that fails (a shorter struct may end just before unmapped memory).
        if lib.icuse_vm_read(caller.tid, arg, op.cbuf, ksize) == 0:
            buf = op.buf
            user_size = _U32.unpack_from(buf)[0]
            if user_size < op.min_size:
                raise Errno(errno.EINVAL)
            if user_size < ksize:
                buf[user_size:] = bytes(ksize - user_size)  # what the caller's struct does not have
            elif user_size > ksize:
                pending = check_zeroed_user(caller, arg + ksize, user_size - ksize)
                if pending is not None:
                    return self._dispatch_after(pending, op, ctx, caller, arg, user_size)
        else:
            user_size = int.from_bytes(caller.read(arg, 4), "little")
            if user_size < op.min_size:
                raise Errno(errno.EINVAL)
            if user_size > ksize:
                pending = check_zeroed_user(caller, arg + ksize, user_size - ksize)
                if pending is not None:
                    return self._dispatch_after(pending, op, ctx, caller, arg, user_size)
            buf = copy_struct_from_user(caller, arg, ksize, min(user_size, ksize))
        return op.handler(Ucmd(ctx, caller, arg, user_size, op.struct, op.struct.unpack(buf)))

    async def _dispatch_after(
        self, pending: Awaitable[None], op: IoctlOp, ctx: Context, caller: Caller, arg: int, user_size: int
    ) -> int:
        """The rest of dispatch once a long zero tail has been checked off the loop."""
        await pending
        buf = copy_struct_from_user(caller, arg, op.struct.SIZE, op.struct.SIZE)
        result = op.handler(Ucmd(ctx, caller, arg, user_size, op.struct, op.struct.unpack(buf)))
        if not isinstance(result, int):
            result = await result
        return result


# -- the ioctl table and the file ----------------------------------------------------
def _unsupported(name: str) -> Handler:
    def handler(ucmd: Ucmd) -> int:
        log.info("%s is not supported by this daemon: EOPNOTSUPP", name)
        raise Errno(errno.EOPNOTSUPP)

    return handler


def destroy(ucmd: Ucmd) -> int:
    ucmd.ctx.remove(ucmd.cmd.id)
    return 0


def build_ioctl_table(selftest: bool = False) -> IoctlTable:
    """The ioctl table; IOMMU_TEST_CMD is in it only in test mode (as in a kernel
    built with CONFIG_IOMMUFD_TEST), so without it the number is out of range."""
    table = IoctlTable()
    implemented = {
        uapi.IOMMU_DESTROY: destroy,
        uapi.IOMMU_FAULT_QUEUE_ALLOC: fault.fault_alloc,
        uapi.IOMMU_GET_HW_INFO: device.get_hw_info,
        uapi.IOMMU_HWPT_ALLOC: hw_pagetable.hwpt_alloc,
        uapi.IOMMU_HWPT_SET_DIRTY_TRACKING: hw_pagetable.hwpt_set_dirty_tracking,
        uapi.IOMMU_HWPT_GET_DIRTY_BITMAP: hw_pagetable.hwpt_get_dirty_bitmap,
        uapi.IOMMU_HWPT_INVALIDATE: hw_pagetable.hwpt_invalidate,
        uapi.IOMMU_IOAS_ALLOC: ioas.ioas_alloc,
        uapi.IOMMU_IOAS_ALLOW_IOVAS: ioas.ioas_allow_iovas,
        uapi.IOMMU_IOAS_COPY: ioas.ioas_copy,
        uapi.IOMMU_IOAS_IOVA_RANGES: ioas.ioas_iova_ranges,
        uapi.IOMMU_IOAS_MAP: ioas.ioas_map,
        uapi.IOMMU_IOAS_MAP_FILE: ioas.ioas_map_file,
        uapi.IOMMU_IOAS_UNMAP: ioas.ioas_unmap,
        uapi.IOMMU_IOAS_CHANGE_PROCESS: ioas.ioas_change_process,
        uapi.IOMMU_OPTION: ioas.option,
        uapi.IOMMU_VFIO_IOAS: vfio_compat.vfio_ioas,
        uapi.IOMMU_HW_QUEUE_ALLOC: viommu.hw_queue_alloc,
        uapi.IOMMU_VIOMMU_ALLOC: viommu.viommu_alloc,
        uapi.IOMMU_VDEVICE_ALLOC: viommu.vdevice_alloc,
        uapi.IOMMU_VEVENTQ_ALLOC: viommu.veventq_alloc,
    }
    if selftest:
        implemented[uapi.IOMMU_TEST_CMD] = iommufd_test
    names = {v: k for k, v in vars(uapi).items() if k.startswith("IOMMU_") and isinstance(v, int)}
    for number in uapi.IOCTL_STRUCTS:
        if number == uapi.IOMMU_TEST_CMD and not selftest:
            continue  # only in test mode
        table.register(number, implemented.get(number) or _unsupported(names.get(number, hex(number))))
    return table


def ioctl_table(system: System) -> IoctlTable:
    """The table of system, built once: whether IOMMU_TEST_CMD is in it depends on
    the daemon's test mode (system.selftest)."""
    table = system.ioctl_table
    if table is None or table.selftest != system.selftest:
        table = build_ioctl_table(system.selftest)
        table.selftest = system.selftest
        system.ioctl_table = table
    return table


class IommufdFile(FileHandle):
    """An open of /dev/iommu: struct file -> iommufd_ctx."""

    open_flags = FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE

    def __init__(self, system: System, caller: Caller, account_mode: AccountMode = AccountMode.USER) -> None:
        self.ctx = Context(system, caller, account_mode)
        self.table = ioctl_table(system)
        system.contexts.add(self.ctx)

    def ioctl(self, req: Request, cmd: int, arg: int) -> int | Awaitable[int]:
        table = self.table
        if IOMMUFD_CMD_BASE <= cmd & _IOC_NRMASK <= table.last_nr:  # table.in_range, inline: every call
            return table.dispatch(self.ctx, req.caller, cmd, arg)
        if cmd == mmap.MMAP_REGION:
            return mmap.mmap_region(self.ctx, req.caller, arg)  # the companion's mmap()
        # Outside the table: the VFIO type1 container ioctls.
        return vfio_compat.vfio_ioctl(self.ctx, req.caller, cmd, arg)

    def release(self) -> None:
        self.ctx.release_file()
