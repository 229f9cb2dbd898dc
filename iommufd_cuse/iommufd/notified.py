"""Calls notified by the seccomp filter of `iommufd-cuse run` (the second way a file
is handed back; companion.py has the first and the one path behind both).

`run` installs, before exec, a filter that notifies only the ioctl commands whose answer
may be a new file (NOTIFIED_CMDS) and reads of 0 bytes (which FUSE answers without asking
the daemon, where a vEVENT queue's file answers EINVAL); every other call runs at the
kernel's cost. It hands
the listener to the daemon with REGISTER_LISTENER on LISTENER_NODE (the daemon fetches
it with pidfd_getfd, as any descriptor a caller passes). For each notified call the
daemon decides, as the companion would, whether it needs a file handed back at all (the
selftest's CREATE_ACCESS and DMABUF_GET among IOMMU_TEST_CMD's ops; FAULT_QUEUE_ALLOC and VEVENTQ_ALLOC
with flags 0) and whether the descriptor is a file of its mount in that process; if not,
the call continues to the kernel unchanged (SECCOMP_USER_NOTIF_FLAG_CONTINUE), so a file
that is not ours gets the kernel's own answer. Otherwise the daemon serves the call
itself, through the file's ioctl handler with a NotifiedCaller whose carrier is a
SeccompCarrier. Memory of the caller is only read or written while its notification is
valid (transport/usernotif.py).
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
from typing import Any

import trio

from .. import uapi
from ..errors import Errno
from ..transport import protocol as P
from ..transport.loopback import identify_callers_fd
from ..transport.mount import fd_on_our_mount
from ..transport.nodes import FileHandle
from ..transport.server import Request
from ..transport.usernotif import Listener, Notification, NotifiedCaller, is_listener
from .companion import ZERO_READ, SeccompCarrier
from .viommu import VeventqFile

log = logging.getLogger(__name__)

LISTENER_NODE = "iommufd-cuse/seccomp"  # where `run` registers its filter's listener
REGISTER_LISTENER = uapi._IO(uapi.IOMMUFD_TYPE, 0xE4)  # arg: the listener's descriptor (0xE0-0xE3: the companion's)

# Commands whose answer may be a new file in the caller.
NOTIFIED_CMDS = (
    uapi.IOMMU_TEST_CMD,
    uapi.IOMMU_FAULT_QUEUE_ALLOC,
    uapi.IOMMU_VEVENTQ_ALLOC,
    uapi.VFIO_GROUP_GET_DEVICE_FD,
)

_TEST_CMD_MIN = uapi.offsetofend(uapi.iommu_test_cmd, "last")
_CREATE_ACCESS_FD = uapi.offsetof(uapi.iommu_test_cmd, "data")  # create_access.out_access_fd


def _out_fd_field(caller: NotifiedCaller, cmd: int, arg: int) -> int | None:
    """Where in the caller's struct the call answers a new descriptor: its offset, -1
    when the answer is the return value, None when the call hands back no file (then
    the kernel path serves it, with its errnos for a bad pointer, size or flags)."""
    if cmd == uapi.VFIO_GROUP_GET_DEVICE_FD:
        return -1
    buf = bytearray(8)
    if caller.read_into(arg, buf, 8):
        return None
    size = int.from_bytes(buf[:4], "little")
    second = int.from_bytes(buf[4:], "little")
    if cmd == uapi.IOMMU_TEST_CMD:
        if size < _TEST_CMD_MIN:
            return None
        if second == uapi.IOMMU_TEST_OP_CREATE_ACCESS:
            return _CREATE_ACCESS_FD
        return -1 if second == uapi.IOMMU_TEST_OP_DMABUF_GET else None  # the dma-buf is the return value
    s = uapi.iommu_fault_alloc if cmd == uapi.IOMMU_FAULT_QUEUE_ALLOC else uapi.iommu_veventq_alloc
    if size < s.SIZE or second:  # flags 0 only: others are the handler's EOPNOTSUPP
        return None
    return uapi.offsetof(s, "out_fault_fd" if s is uapi.iommu_fault_alloc else "out_veventq_fd")


async def handle_notification(listener: Listener, notif: Notification) -> None:
    """Serve one notified call, or let it continue; never raises (it runs in the
    daemon's nursery)."""
    carrier = SeccompCarrier()
    try:
        await _serve(listener, notif, carrier)
        return
    except Errno as e:
        err = e.errno
    except Exception:
        log.exception("notified call of %d failed", notif.pid)
        err = errno.EIO
    if not carrier.replied:
        try:
            listener.fail(notif.id, err)
        except OSError as e:
            log.warning("notified call of %d: no answer: %s", notif.pid, e.strerror)


async def _serve(listener: Listener, notif: Notification, carrier: SeccompCarrier) -> None:
    fd, cmd, arg = notif.args[0] & 0xFFFFFFFF, notif.args[1] & 0xFFFFFFFF, notif.args[2]
    if notif.nr == listener.nr_read and notif.args[2] == 0:
        await _zero_read(listener, notif, fd)
        return
    if notif.nr != listener.nr_ioctl or cmd not in NOTIFIED_CMDS:
        listener.cont(notif.id)
        return
    caller = NotifiedCaller(listener, notif, carrier)
    out = _out_fd_field(caller, cmd, arg)
    handle: Any = None
    if out is not None and fd < 0x80000000:
        try:
            handle = await identify_callers_fd(caller, fd, fd_on_our_mount)
        except Errno:
            handle = None  # no such descriptor: the kernel's EBADF
    if out is None or not isinstance(handle, FileHandle):
        listener.cont(notif.id)  # not a file of ours (or no file, or no file to hand back): the kernel answers
        return
    if out >= 0:
        # The number goes there after the file is installed: a struct that cannot
        # be written is refused before anything is made (the kernel's EFAULT).
        caller.write(arg + out, caller.read(arg + out, 4))
    result = handle.ioctl(Request(0, P.IOCTL, 0, caller), cmd, arg)
    if inspect.isawaitable(result):
        result = await result
    if not carrier.replied:
        listener.answer(notif.id, result)


async def _zero_read(listener: Listener, notif: Notification, fd: int) -> None:
    """read(fd, buf, 0): FUSE answers 0 itself, where the kernel's vEVENT queue file
    answers EINVAL; on such a file of ours the answer is its handler's (ZERO_READ, as
    the companion asks), on any other file the kernel's."""
    caller = NotifiedCaller(listener, notif)
    handle = None
    if fd < 0x80000000:
        try:
            handle = await identify_callers_fd(caller, fd, fd_on_our_mount)
        except Errno:
            handle = None
    if not isinstance(handle, VeventqFile):
        listener.cont(notif.id)
        return
    listener.answer(notif.id, handle.ioctl(Request(0, P.IOCTL, 0, caller), ZERO_READ, 0))


async def serve_listener(listener: Listener, registrar: int) -> None:
    """Serve a listener until no process is left under its filter (or the daemon stops)."""
    try:
        async with trio.open_nursery() as nursery:
            await listener.serve(handle_notification, nursery)
        log.info("seccomp listener of %d: no process left under its filter", registrar)
    except OSError as e:
        log.error("seccomp listener of %d: %s; its calls get ENOSYS from now on", registrar, e.strerror)
    finally:
        trio.lowlevel.notify_closing(listener.fd)
        listener.close()


class ListenerFile(FileHandle):
    """An open of LISTENER_NODE: REGISTER_LISTENER hands the daemon a seccomp listener
    (any caller that may open the node may hand one: it only ever brings the daemon
    calls of processes under that caller's own filter)."""

    def __init__(self, spawn: Any) -> None:
        self.spawn = spawn

    def ioctl(self, req: Request, cmd: int, arg: int) -> int:
        if cmd != REGISTER_LISTENER:
            raise Errno(errno.ENOTTY)
        dup = req.caller.fetch_fd(arg)  # EBADF for no such descriptor
        if not is_listener(dup):
            os.close(dup)
            raise Errno(errno.EINVAL)
        listener = Listener(dup)
        log.info("seccomp listener registered by %d", req.caller.tid)
        self.spawn(functools.partial(serve_listener, listener, req.caller.tid))
        return 0
