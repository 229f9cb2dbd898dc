"""I/O on the daemon's own mount, from child processes.

A thread of the daemon blocked on its own FUSE mount would make the daemon
unkillable (SIGKILL cannot end a process whose thread waits for a reply only
that process can give). So such I/O is done by a forked child holding no
other file, and closing files of our own mount never waits for the daemon:
FLUSH is answered ENOSYS, after which the kernel stops sending it.
"""

from __future__ import annotations

import errno
import os
import resource
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable

import trio

from .._native import ffi, lib
from ..errors import Errno


async def loopback_ioctl(fd: int, cmd: int, arg: int) -> bool:
    """ioctl(fd, cmd, arg) from a child process; True when it returned 0."""
    pid = lib.icuse_loopback_ioctl(fd, cmd, arg)
    if pid < 0:
        raise OSError(-pid, os.strerror(-pid))
    _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


async def prime_no_flush(path: str) -> None:
    """Open and close a node from a child, so the kernel learns that this file
    system has no FLUSH before the daemon itself ever closes one of its files."""
    code = "import os,sys; os.close(os.open(sys.argv[1], os.O_RDONLY))"
    with trio.move_on_after(10):
        await trio.run_process(
            [sys.executable, "-I", "-S", "-c", code, path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


class Opener:
    """A child of the daemon that opens nodes of its mount for it (native
    icuse_opener_start), started at first use and again if it died: a file the daemon
    hands to a caller is opened by it, the daemon gets the open file back over a
    socket. One request at a time; each answer is the daemon's to wait for on the loop."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pid = 0
        self.lock = trio.Lock()

    def child_pid(self) -> int:
        """The child's pid (it is started now if need be): what it opens and asks is
        done by that process."""
        if self.sock is None:
            ours, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                pid = lib.icuse_opener_start(child.fileno())
            finally:
                child.close()
            if pid < 0:
                ours.close()
                raise Errno(-pid)
            ours.setblocking(False)
            self.sock, self.pid = ours, pid
        return self.pid

    def _stop(self) -> None:
        """End the child (it may be waiting on our mount: SIGKILL ends that wait too);
        reaped by a thread, as the end of such a wait needs this loop."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            os.kill(self.pid, signal.SIGKILL)
            threading.Thread(target=os.waitpid, args=(self.pid, 0), daemon=True).start()

    async def open_ioctl(self, path: str, cmd: int, arg: int) -> int:
        """path opened by the child, ioctl(cmd, arg) issued on it, the file returned as
        a descriptor of the daemon; Errno of the step that failed."""
        async with self.lock:
            self.child_pid()
            assert self.sock is not None
            req = ffi.new("struct icuse_open_request *")
            req.cmd, req.arg = cmd, arg
            encoded = os.fsencode(path)
            if len(encoded) >= len(req.path):
                raise Errno(errno.ENAMETOOLONG)
            req.path = encoded
            try:
                self.sock.send(bytes(ffi.buffer(req)))
                while True:
                    await trio.lowlevel.wait_readable(self.sock)
                    try:
                        data, fds, _flags, _addr = socket.recv_fds(self.sock, 4, 1)
                        break
                    except BlockingIOError:
                        continue
            except OSError:
                self._stop()  # the child is gone: another is started next time
                raise Errno(errno.EIO) from None
            except BaseException:
                self._stop()  # cancelled: its answer would be taken for the next one's
                raise
            if len(data) != 4:
                for fd in fds:
                    os.close(fd)
                self._stop()
                raise Errno(errno.EIO)
            (err,) = struct.unpack("=i", data)
            if err or not fds:
                for fd in fds:
                    os.close(fd)
                raise Errno(err or errno.EIO)
            return fds[0]


opener = Opener()


# "Which open of ours is this file?" A client hands the daemon a descriptor of a
# file of our mount (the iommufd in VFIO_DEVICE_BIND_IOMMUFD, an access file in
# the selftest ops); only a request on that very file reaches its FileHandle. So
# a child of the daemon issues this ioctl on it with a one-time random nonce, and
# the server records which handle received it. Anyone else sending the number
# gets the handle's own answer for an unknown ioctl.
IDENTIFY = (ord(";") << 8) | 0xEF
_identify_waiting: dict[int, object | None] = {}


async def identify(fd: int, register: tuple[int, int] | None = None) -> object | None:
    """The FileHandle behind fd, a file of our own mount (None if none answers).
    With register (epfd, slot), the child also registers the file there once it
    has answered (see _Known); raises _NotRegistered if that part failed."""
    nonce = secrets.randbits(63)
    _identify_waiting[nonce] = None
    try:
        epfd, slot = register or (-1, -1)
        pid = lib.icuse_loopback_ioctl_register(fd, IDENTIFY, nonce, epfd, slot)
        if pid < 0:
            raise OSError(-pid, os.strerror(-pid))
        _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
        handle = _identify_waiting[nonce]
        if register is not None and handle is not None and os.waitstatus_to_exitcode(status) != 0:
            raise _NotRegistered(handle)
        return handle
    finally:
        _identify_waiting.pop(nonce, None)


class _NotRegistered(Exception):
    def __init__(self, handle: object) -> None:
        self.handle = handle


class _Known:
    """Files of our mount that callers hold and that were identified once.

    Identifying a file costs a child process and a request to ourselves (above),
    milliseconds; some commands name a file of ours on every call (the selftest's
    access ops). So the child that identifies a caller's file also registers it in
    an epoll set of the daemon under a target number of its own (a slot): an epoll
    set refers to a file without holding it (the item goes with the file's last
    close), and kcmp(KCMP_EPOLL_TFD) answers in one syscall whether a caller's
    descriptor is that very file. (tid, fd) -> slot is only a guess of which
    slot to ask; the kernel's answer is what counts. A slot is reused only after the
    handle it was registered for is released (its item is gone by then: epoll lets
    go of a file before the file system's release)."""

    MAX_SLOTS = 4096

    def __init__(self) -> None:
        self.epoll: select.epoll | None = None
        self.epfd = -1
        self.slots: dict[int, tuple[object, tuple[int, int]]] = {}  # slot -> (handle, (tid, fd) it was for)
        self.owned: dict[int, list[int]] = {}  # id(handle) -> its slots
        self.by_caller: dict[tuple[int, int], int] = {}  # (tid, fd) -> slot
        self.free: list[int] = []
        self.next_slot = 0
        self.top = 0

    def _take_slot(self) -> int | None:
        if self.epoll is None:
            self.epoll = select.epoll()  # close-on-exec; forked children share it
            self.epfd = self.epoll.fileno()
            # Descriptor numbers the forked child may use (its RLIMIT_NOFILE is ours).
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self.top = min(soft if soft != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
        if self.free:
            return self.free.pop()
        if self.next_slot >= min(self.MAX_SLOTS, self.top // 2):
            return None
        self.next_slot += 1
        return self.top - self.next_slot  # from the top: far from the child's own descriptors

    def lookup(self, tid: int, fd: int) -> object | None:
        slot = self.by_caller.get((tid, fd))
        if slot is None:
            return None
        if lib.icuse_same_file_as_slot(tid, fd, self.epfd, slot) == 1 and slot in self.slots:
            return self.slots[slot][0]
        del self.by_caller[(tid, fd)]
        return None

    async def identify(self, tid: int, fd: int, dup: int) -> object | None:
        slot = self._take_slot()
        if slot is None:
            return await identify(dup)
        try:
            handle = await identify(dup, (self.epfd, slot))
        except _NotRegistered as e:
            self.free.append(slot)
            return e.handle
        except BaseException:
            self.free.append(slot)  # nothing registered: the child failed before, or never ran
            raise
        if handle is None:
            self.free.append(slot)
            return None
        self.slots[slot] = (handle, (tid, fd))
        self.owned.setdefault(id(handle), []).append(slot)
        self.by_caller[(tid, fd)] = slot
        return handle

    def released(self, handle: object) -> None:
        """handle's file is gone: its slots are free again."""
        for slot in self.owned.pop(id(handle), ()):
            _, key = self.slots.pop(slot)
            if self.by_caller.get(key) == slot:
                del self.by_caller[key]
            self.free.append(slot)


_known = _Known()


def known_callers_fd(caller: object, fd: int) -> object | None:
    """The FileHandle behind the caller's descriptor fd if that file was identified
    before (one syscall), else None."""
    return _known.lookup(caller.tid, fd)  # type: ignore[attr-defined]


async def identify_callers_fd(caller: object, fd: int, check: Callable[[int], bool]) -> object | None:
    """The FileHandle behind the caller's descriptor fd: EBADF-style None for no
    descriptor, for one that check(dup) (given a duplicate in the daemon) refuses,
    or one no handle answers for. A file seen before answers in one syscall."""
    # The calling thread's descriptor table (a thread may have its own): the request's
    # tid, which needs no /proc lookup, unlike the tgid.
    tid = caller.tid  # type: ignore[attr-defined]
    handle = _known.lookup(tid, fd)
    if handle is not None:
        return handle
    dup = caller.fetch_fd(fd)  # type: ignore[attr-defined]
    try:
        if not check(dup):
            return None
        return await _known.identify(tid, fd, dup)
    finally:
        os.close(dup)  # closing a file of our own mount never waits for us (no FLUSH)


def released(handle: object) -> None:
    """Called by the server when an open of ours is released."""
    if _known.owned:
        _known.released(handle)


def answer_identify(cmd: int, arg: int, caller_ppid: Callable[[], int], handle: object) -> bool:
    """Called by the server for each ioctl: True if it was our own question."""
    if cmd != IDENTIFY or arg not in _identify_waiting:
        return False
    if caller_ppid() != os.getpid():
        return False
    _identify_waiting[arg] = handle
    return True
