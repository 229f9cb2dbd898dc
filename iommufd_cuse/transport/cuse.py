"""The CUSE carrier (fs/fuse/cuse.c): one /dev/cuse channel per node, each a real character device.

The same requests as FUSE reach the same handlers; what differs is what CUSE does with them:
- The channel starts with CUSE_INIT, answered with the device's name (devtmpfs makes /dev/NAME, with `/`
  in NAME making directories) and its major:minor (0:0 asks the kernel for a free major).
- OPEN comes with node id 0: the channel has one node. There is no LOOKUP, GETATTR or FLUSH, and RELEASE is
  synchronous (a daemon thread closing a file of ours must not be the loop that answers it).
- ioctls are unrestricted: the argument is the caller's pointer, read and written through the caller-memory
  layer as on FUSE, so the kernel never needs FUSE_IOCTL_RETRY.
- READ and WRITE carry no file offset: cuse_read_iter/cuse_write_iter start every transfer at 0 (the file is
  not seekable), and split long ones into requests whose offsets count from there. VFIO's regions live at
  offsets (pread/pwrite at index << 40), so the caller's own offset is taken from its blocked system call
  (/proc/TID/syscall: pread64, pwrite64, preadv, pwritev and their v2 forms) and the request's is added to it.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time

import trio

from ..errors import Errno
from . import protocol as P
from .nodes import Node, Tree
from .server import BUFSIZE, MAX_WRITE, FuseServer, Request

log = logging.getLogger(__name__)

CUSE_DEVICE = "/dev/cuse"
CUSE_UNRESTRICTED_IOCTL = 1 << 0
CUSE_INIT_IN = struct.Struct("<IIII")  # major minor unused flags
CUSE_INIT_OUT = struct.Struct("<IIIIIIII40x")  # major minor unused flags max_read max_write dev_major dev_minor
SYSFS_CLASS = "/sys/class/cuse"
SYSCALL_TRIES = 600  # bounded: at most ~50 ms for a caller that never sleeps

# x86-64 system calls that carry a file offset, and where: (argument index of the low half, of the high half)
_SYS_PREAD64, _SYS_PWRITE64, _SYS_PREADV, _SYS_PWRITEV, _SYS_PREADV2, _SYS_PWRITEV2 = 17, 18, 295, 296, 327, 328
_OFFSET_ARGS = {
    _SYS_PREAD64: (3, None),
    _SYS_PWRITE64: (3, None),
    _SYS_PREADV: (3, 4),
    _SYS_PWRITEV: (3, 4),
    _SYS_PREADV2: (3, 4),
    _SYS_PWRITEV2: (3, 4),
}


def available() -> str | None:
    """None when /dev/cuse can be opened, else why not (one line)."""
    try:
        os.close(os.open(CUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return f"{CUSE_DEVICE}: {e.strerror} (no CUSE in this kernel: load cuse.ko, or use --backend fuse)"
    return None


def sysfs_name(devname: str) -> str:
    """The device's name in sysfs: the driver core turns `/` into `!` (devtmpfs turns it back)."""
    return devname.replace("/", "!")


def devt_of(devname: str) -> tuple[int, int] | None:
    """The major:minor the kernel gave a CUSE device (its sysfs `dev` file), None if there is none."""
    try:
        with open(f"{SYSFS_CLASS}/{sysfs_name(devname)}/dev") as f:
            major, minor = f.read().strip().split(":")
    except (OSError, ValueError):
        return None
    return int(major), int(minor)


def caller_offset(tid: int) -> int:
    """The file offset of the read or write the calling thread is blocked in (0 for read/write/readv/writev:
    CUSE files have no position; also 0, logged, for a thread whose call cannot be read, e.g. io_uring's)."""
    fields: list[str] = []
    for attempt in range(SYSCALL_TRIES):
        try:
            with open(f"/proc/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            break
        # "running": the request reached us before the caller went to sleep waiting for it (it is on its way
        # there, and the kernel only shows the call of a sleeping thread)
        if fields[:1] != ["running"]:
            break
        os.sched_yield() if attempt < 100 else time.sleep(0.0001)
    try:
        nr = int(fields[0])
    except (ValueError, IndexError):
        log.warning("cuse: the system call of thread %d cannot be read (%s): offset 0", tid, " ".join(fields[:1]))
        return 0
    where = _OFFSET_ARGS.get(nr)
    if where is None:
        return 0
    lo = int(fields[1 + where[0]], 16)
    hi = int(fields[1 + where[1]], 16) if where[1] is not None else 0
    if nr in (_SYS_PREADV2, _SYS_PWRITEV2) and lo == 0xFFFFFFFFFFFFFFFF:
        return 0  # offset -1: the file position, always 0 here
    return (lo | (hi << 32)) & 0xFFFFFFFFFFFFFFFF


class CuseServer(FuseServer):
    """One CUSE channel: the node's requests, through FuseServer's loop, replies and handlers."""

    def __init__(self, tree: Tree, node: Node, devname: str, devt: tuple[int, int]) -> None:
        super().__init__(tree)
        self.node = node
        self.devname = devname
        self.requested_devt = devt
        self._ops = {
            P.CUSE_INIT: self._cuse_init,
            P.OPEN: self._open,
            P.READ: self._read,
            P.WRITE: self._write,
            P.IOCTL: self._ioctl,
            P.POLL: self._poll,
            P.FSYNC: self._ok,
            P.RELEASE: self._release,
            P.INTERRUPT: self._interrupt,
            P.DESTROY: self._ok,
        }

    async def handshake(self, fd: int) -> None:
        """Answer the channel's CUSE_INIT (the kernel's first request), before serving: the device then
        exists, or the kernel refused it (`devt_of` tells)."""
        self.fd = fd
        buf = bytearray(BUFSIZE)  # the kernel refuses reads into less than a whole request could need
        while True:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            break
        opcode = P.IN_HEADER.unpack_from(buf)[1]
        if opcode != P.CUSE_INIT:
            raise OSError(errno.EPROTO, f"CUSE channel began with opcode {opcode}")
        self._dispatch(memoryview(buf)[:n])

    def _cuse_init(self, req: Request, body: memoryview) -> None:
        major, minor, _unused, _flags = CUSE_INIT_IN.unpack_from(body)
        if major != P.KERNEL_VERSION:
            log.error("kernel speaks FUSE %d.%d; need %d", major, minor, P.KERNEL_VERSION)
            raise Errno(errno.EPROTO)
        out = CUSE_INIT_OUT.pack(
            P.KERNEL_VERSION,
            min(minor, P.KERNEL_MINOR_VERSION),
            0,
            CUSE_UNRESTRICTED_IOCTL,
            MAX_WRITE,
            MAX_WRITE,
            *self.requested_devt,
        )
        # The kernel makes the device while it takes this reply: it exists once the write returns.
        self.reply(req.unique, out + f"DEVNAME={self.devname}\0".encode())
        self.initialized.set()

    def _node(self, nodeid: int) -> Node:
        return self.node  # the channel's only node (OPEN says 0)

    def _read(self, req: Request, body: memoryview) -> None:
        fh, offset, size, *_ = P.READ_IN.unpack_from(body)
        req.fh = fh
        offset += caller_offset(req.caller.tid)
        self._answer(req, self._handle(fh).read(req, offset, size), bytes)

    def _write(self, req: Request, body: memoryview) -> None:
        fh, offset, size, *_ = P.WRITE_IN.unpack_from(body)
        req.fh = fh
        data = bytes(body[P.WRITE_IN.size : P.WRITE_IN.size + size])
        offset += caller_offset(req.caller.tid)
        self._answer(req, self._handle(fh).write(req, offset, data), lambda n: P.WRITE_OUT.pack(n, 0))


def open_channel() -> int:
    """A new /dev/cuse channel (non-blocking, as the FUSE device)."""
    return os.open(CUSE_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
