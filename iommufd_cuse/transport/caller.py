"""The process behind a request: its memory, its file descriptors, its credentials.

Everything is addressed by the thread id the kernel put in the FUSE request
header, never by a pid or pointer taken from a payload. The daemon runs as
root, so privilege checks use the caller's capabilities and rlimits, read from
/proc, not the daemon's.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import resource
import threading
from collections.abc import Awaitable, Callable

import trio

from .._native import ffi, lib
from ..errors import Errno

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_pidfd_getfd = 438
_PIDFD_THREAD = os.O_EXCL  # pidfd of a thread rather than a process (Linux 6.9)

_OWN_USERNS = os.readlink("/proc/self/ns/user")

CAP_IPC_LOCK = 14
CAP_SYS_RAWIO = 17
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24


# Scans and fills of caller memory (zero tails, clear_user) up to this many bytes
# are done on the loop: tens of microseconds. Longer ones go to a worker thread
# SCAN_CHUNK bytes at a time, with a cancellation point between chunks, so that
# FUSE_INTERRUPT and shutdown stop them within one chunk's time.
INLINE_SCAN = 64 * 1024
_ADDR_END = 1 << 64
SCAN_CHUNK = 32 << 20

# One worker thread per process at a time for such scans: a client that starts
# many of them waits for its own, and leaves trio's thread pool to everyone else.
_scan_limiters: dict[int, trio.CapacityLimiter] = {}


def in_background(fn: Callable[..., int], *args: object) -> int:
    """fn(*args) in a worker thread at a lower CPU priority (nice + 10) than the loop's,
    so that one caller's long scan yields the CPU to every caller's requests. Only
    where the thread can be given its priority back afterwards (CAP_SYS_NICE or an
    RLIMIT_NICE that allows it): trio reuses its threads for other work."""
    if not _can_renice():
        return fn(*args)
    nice = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's (Linux: per thread)
    os.setpriority(os.PRIO_PROCESS, 0, min(19, nice + 10))
    try:
        return fn(*args)
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


@functools.cache
def _can_renice() -> bool:
    """Whether a thread may lower its priority and raise it back (tried on a thread of its own)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            nice = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, 0, min(19, nice + 1))
            os.setpriority(os.PRIO_PROCESS, 0, nice)
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, name="renice-probe")
    t.start()
    t.join()
    return ok == [True]


async def scan_off_loop(fn: Callable[[int, int, int], int], caller: Caller, addr: int, length: int) -> int:
    """fn(tid, addr, n) over [addr, addr + length) in chunks in a worker thread;
    the first non-zero result is returned (0: every chunk returned 0)."""
    if addr >= _ADDR_END:
        return -errno.EFAULT
    try:
        key = caller.tgid
    except Errno:
        key = caller.tid
    limiter = _scan_limiters.get(key)
    if limiter is None:
        limiter = _scan_limiters[key] = trio.CapacityLimiter(1)
    try:
        done = 0
        while done < length:
            n = min(SCAN_CHUNK, length - done)
            # Not abandoned on cancel: the chunk ends in milliseconds, and then
            # nothing of the request is left running.
            rc = await trio.to_thread.run_sync(in_background, fn, caller.tid, addr + done, n, limiter=limiter)
            if rc:
                return rc
            done += n
            await trio.lowlevel.checkpoint()
        return 0
    finally:
        if not limiter.borrowed_tokens and not limiter.statistics().tasks_waiting:
            _scan_limiters.pop(key, None)


class Caller:
    """The thread that issued one request."""

    __slots__ = ("tid", "uid", "gid", "_status")

    def __init__(self, tid: int, uid: int, gid: int) -> None:
        self.tid = tid
        self.uid = uid
        self.gid = gid
        self._status: dict[str, str] | None = None

    # -- memory -------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytearray:
        """length bytes at addr in the caller; Errno(EFAULT) if not all readable."""
        if addr + length > _ADDR_END:
            raise Errno(errno.EFAULT)  # past the end of the address space (not an int for C)
        buf = bytearray(length)
        rc = lib.icuse_vm_read(self.tid, addr, ffi.from_buffer(buf), length)
        if rc:
            raise Errno(-rc)
        return buf

    def read_into(self, addr: int, buf: bytearray, length: int) -> int:
        """Read into buf; returns 0 or a negative errno (no exception: used for probing)."""
        if addr + length > _ADDR_END:
            return -errno.EFAULT
        return lib.icuse_vm_read(self.tid, addr, ffi.from_buffer(buf), length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        n = len(data)
        if addr + n > _ADDR_END:
            raise Errno(errno.EFAULT)
        # cffi passes bytes as they are; other buffers need a cdata view.
        rc = lib.icuse_vm_write(self.tid, addr, data if type(data) is bytes else ffi.from_buffer(data), n)
        if rc:
            raise Errno(-rc)

    def clear(self, addr: int, length: int) -> Awaitable[None] | None:
        """clear_user: length zero bytes at addr, EFAULT at the first page that
        cannot be written (the ones before it are cleared). Short fills are done
        now (None); a long one by the awaitable returned, off the loop."""
        if addr >= _ADDR_END:
            raise Errno(errno.EFAULT)
        if length <= INLINE_SCAN:
            rc = lib.icuse_vm_clear(self.tid, addr, length)
            if rc:
                raise Errno(-rc)
            return None
        return self._clear_async(addr, length)

    async def _clear_async(self, addr: int, length: int) -> None:
        rc = await scan_off_loop(lib.icuse_vm_clear, self, addr, length)
        if rc:
            raise Errno(-rc)

    # -- identity and credentials ------------------------------------------
    def status(self) -> dict[str, str]:
        if self._status is None:
            try:
                with open(f"/proc/{self.tid}/status") as f:
                    self._status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            except FileNotFoundError:
                raise Errno(errno.ESRCH) from None
        return self._status

    @property
    def tgid(self) -> int:
        return int(self.status()["Tgid"])

    def ppid(self) -> int:
        try:
            return int(self.status()["PPid"])
        except (Errno, KeyError, ValueError):
            return -1

    def capable(self, cap: int) -> bool:
        """The kernel's capable(cap): the calling thread's effective set, which only
        counts in the daemon's own user namespace (capable() asks the initial one;
        capabilities held inside a child user namespace do not count)."""
        if not int(self.status()["CapEff"], 16) >> cap & 1:
            return False
        try:
            return os.readlink(f"/proc/{self.tid}/ns/user") == _OWN_USERNS
        except OSError:
            return False

    def memlock_limit(self) -> int:
        """The caller's soft RLIMIT_MEMLOCK (resource.RLIM_INFINITY when unlimited)."""
        limit = memlock_limit_of(f"/proc/{self.tgid}")
        if limit is None:
            raise Errno(errno.ESRCH)
        return limit

    # -- file descriptors ---------------------------------------------------
    def fetch_fd(self, fd: int) -> int:
        """A duplicate, in the daemon, of the caller's fd; EBADF if it has none."""
        if fd < 0:
            raise Errno(errno.EBADF)
        try:
            pidfd = os.pidfd_open(self.tid, _PIDFD_THREAD)
        except OSError:
            pidfd = os.pidfd_open(self.tgid)
        try:
            got = _libc.syscall(_SYS_pidfd_getfd, pidfd, fd, 0)
            if got < 0:
                e = ctypes.get_errno()
                raise Errno(errno.EBADF if e == errno.EBADF else e)
            return got
        finally:
            os.close(pidfd)

    def __repr__(self) -> str:
        return f"Caller(tid={self.tid}, uid={self.uid})"


def memlock_limit_of(proc_dir: str | int) -> int | None:
    """Soft RLIMIT_MEMLOCK of a process from its /proc directory (a path, or an
    O_PATH fd of it): /proc/<pid>/limits needs no privilege, unlike prlimit()
    on another user's process. None when the process is gone."""
    try:
        if isinstance(proc_dir, int):
            fd = os.open("limits", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_dir)
        else:
            fd = os.open(f"{proc_dir}/limits", os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            for line in f:
                if line.startswith("Max locked memory"):
                    soft = line[26:].split()[0]
                    return resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
    except OSError:
        return None
    return None
