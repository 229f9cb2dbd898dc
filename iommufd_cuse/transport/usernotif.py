"""Seccomp user notification: a supervisor's way into a caller's system call.

A FUSE server cannot create a file descriptor in its caller. The kernel's way for a
supervisor to do that is seccomp user notification: the caller runs under a filter that
returns SECCOMP_RET_USER_NOTIF for some calls; each such call waits until the holder of
the filter's listener answers it (SECCOMP_IOCTL_NOTIF_SEND), lets it go on to the kernel
unchanged (SECCOMP_USER_NOTIF_FLAG_CONTINUE), or first installs a file in the caller
(SECCOMP_IOCTL_NOTIF_ADDFD, with SECCOMP_ADDFD_FLAG_SEND to answer with it atomically).

Both sides are here: install_filter() (the client side, before exec) and Listener, the
daemon's side. A notification id is valid while its call waits; once the caller died or
was answered it is not, and its pid may name another process. So NotifiedCaller re-checks
the id (NOTIF_ID_VALID) after every read of the caller's memory and before every write:
what was read is known to be the caller's, and nothing is done for a caller that is gone.
Knows nothing of iommufd: which calls are notified is the caller of install_filter's choice.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import select
import struct
from collections.abc import Awaitable, Callable, Iterable

import trio

from ..errors import Errno
from .caller import Caller

_libc = ctypes.CDLL(None, use_errno=True)

PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
# Once the daemon has received a call, only a fatal signal ends the wait: a handled
# signal cannot make the caller give up between a file's installation and the answer.
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SEND = 1 << 1

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06

# (AUDIT_ARCH, __NR_seccomp, __NR_ioctl, __NR_read) of the architectures a filter is made
# for; a call of another ABI (i386 on x86-64, x32) is allowed, so it gets no file back
# (EOPNOTSUPP).
_ARCHES = {
    "x86_64": (0xC000003E, 317, 16, 0),
    "aarch64": (0xC00000B7, 277, 29, 63),
}

_NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif: id pid flags, seccomp_data
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id val error flags
_ADDFD = struct.Struct("=QIIII")  # struct seccomp_notif_addfd: id flags srcfd newfd newfd_flags


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("!") << 8 | nr


NOTIF_RECV = _ioc(3, 0, _NOTIF.size)
NOTIF_SEND = _ioc(3, 1, _RESP.size)
NOTIF_ID_VALID = _ioc(1, 2, 8)
NOTIF_ADDFD = _ioc(1, 3, _ADDFD.size)


def _arch() -> tuple[int, int, int, int]:
    arch = _ARCHES.get(platform.machine())
    if arch is None:
        raise OSError(errno.ENOSYS, f"no seccomp filter for {platform.machine()}")
    return arch


def _assemble(prog: list[tuple]) -> bytes:
    """Classic BPF from ("ld", offset), ("jeq", k, if_label, else_label) (None: the next
    instruction), ("ret", value) and ("label", name) items (jumps go forward only)."""
    at: dict[str, int] = {}
    pc = 0
    for item in prog:
        if item[0] == "label":
            at[item[1]] = pc
        else:
            pc += 1
    out, pc = [], 0
    for item in prog:
        if item[0] == "label":
            continue
        if item[0] == "ld":
            out.append((_BPF_LD_W_ABS, 0, 0, item[1]))
        elif item[0] == "ret":
            out.append((_BPF_RET_K, 0, 0, item[1]))
        else:
            _, k, jt, jf = item
            out.append((_BPF_JEQ_K, 0 if jt is None else at[jt] - pc - 1, 0 if jf is None else at[jf] - pc - 1, k))
        pc += 1
    return b"".join(struct.pack("=HBBI", *ins) for ins in out)


def build_filter(ioctl_cmds: Iterable[int], zero_reads: bool = False) -> bytes:
    """A classic BPF program: USER_NOTIF for ioctl(fd, cmd, ...) with cmd one of
    ioctl_cmds (the kernel takes cmd as unsigned int: the low 32 bits) and, with
    zero_reads, for read(fd, buf, 0) (which FUSE answers 0 without asking its server);
    ALLOW for all else."""
    audit_arch, _, nr_ioctl, nr_read = _arch()
    cmds = sorted(set(c & 0xFFFFFFFF for c in ioctl_cmds))
    if not cmds or len(cmds) > 200:
        raise ValueError("1 to 200 commands")
    prog: list[tuple] = [
        ("ld", 4),  # arch
        ("jeq", audit_arch, None, "allow"),  # another ABI
        ("ld", 0),  # nr
        ("jeq", nr_ioctl, None, "read" if zero_reads else "allow"),
        ("ld", 16 + 8),  # args[1], low word (little endian)
        *(("jeq", cmd, "notify", None) for cmd in cmds),
        ("label", "allow"),
        ("ret", SECCOMP_RET_ALLOW),
    ]
    if zero_reads:
        prog += [
            ("label", "read"),
            ("jeq", nr_read, None, "allow_read"),
            ("ld", 16 + 16),  # args[2], the count: low word, then high word
            ("jeq", 0, None, "allow_read"),
            ("ld", 16 + 16 + 4),
            ("jeq", 0, "notify", None),
            ("label", "allow_read"),
            ("ret", SECCOMP_RET_ALLOW),
        ]
    prog += [("label", "notify"), ("ret", SECCOMP_RET_USER_NOTIF)]
    return _assemble(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter(ioctl_cmds: Iterable[int], zero_reads: bool = False) -> int:
    """In this process (and, as with every seccomp filter, all it execs and forks): set
    no_new_privs, as an unprivileged process must, and install build_filter(ioctl_cmds,
    zero_reads). Returns the filter's listener (close-on-exec)."""
    nr_seccomp = _arch()[1]
    prog = build_filter(ioctl_cmds, zero_reads)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    fd = _libc.syscall(nr_seccomp, SECCOMP_SET_MODE_FILTER, ctypes.c_ulong(flags), ctypes.byref(fprog))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(e)}")
    return fd


def is_listener(fd: int) -> bool:
    """Whether fd (of this process) is a seccomp listener."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify"
    except OSError:
        return False


class Notification:
    """One notified call: ioctl(args[0], args[1], args[2]) of thread pid."""

    __slots__ = ("id", "pid", "nr", "arch", "args")

    def __init__(self, raw: bytes) -> None:
        self.id, self.pid, _flags, self.nr, self.arch, _ip, *args = _NOTIF.unpack(raw)
        self.args = args


class Listener:
    """The daemon's end of one filter: receive, validate, answer."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        _, _, self.nr_ioctl, self.nr_read = _arch()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def recv(self) -> Notification | None:
        """The next notification, or None when none waits (the caller may have died)."""
        buf = bytearray(_NOTIF.size)  # must be zeroed: the kernel checks
        try:
            fcntl.ioctl(self.fd, NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                return None
            raise
        return Notification(bytes(buf))

    def id_valid(self, notif_id: int) -> bool:
        """Whether the call notif_id still waits for an answer (its caller is alive)."""
        try:
            fcntl.ioctl(self.fd, NOTIF_ID_VALID, struct.pack("=Q", notif_id))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def _send(self, notif_id: int, val: int, error: int, flags: int) -> None:
        try:
            fcntl.ioctl(self.fd, NOTIF_SEND, bytearray(_RESP.pack(notif_id, val, error, flags)), True)
        except OSError as e:
            if e.errno != errno.ENOENT:  # the caller is gone: there is no one to answer
                raise

    def answer(self, notif_id: int, val: int) -> None:
        self._send(notif_id, val, 0, 0)

    def fail(self, notif_id: int, err: int) -> None:
        self._send(notif_id, 0, -err, 0)

    def cont(self, notif_id: int) -> None:
        """Let the call go on to the kernel as made."""
        self._send(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def addfd(self, notif_id: int, srcfd: int, send: bool, cloexec: bool = True) -> int:
        """Install (a duplicate of) srcfd in the caller; returns its number there. With
        send, that number is also the call's answer, in the same step. Errno(ENOENT) if
        the caller is gone."""
        flags = SECCOMP_ADDFD_FLAG_SEND if send else 0
        req = _ADDFD.pack(notif_id, flags, srcfd, 0, os.O_CLOEXEC if cloexec else 0)
        try:
            return fcntl.ioctl(self.fd, NOTIF_ADDFD, bytearray(req), True)
        except OSError as e:
            raise Errno(e.errno) from None

    async def serve(self, handle: Callable[[Listener, Notification], Awaitable[None]], nursery: trio.Nursery) -> None:
        """Receive notifications until the filter has no process left (POLLHUP); each is
        handled by its own task in nursery, so a slow one holds up no other and never the
        loop. The listener stays open: its owner closes it once nursery is done."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            events = dict(poller.poll(0)).get(self.fd, 0)
            if events & select.POLLIN:
                notif = self.recv()
                if notif is not None:
                    nursery.start_soon(handle, self, notif)
            elif events & (select.POLLHUP | select.POLLERR):
                return


class NotifiedCaller(Caller):
    """The thread behind a notification, as a request's caller: its memory is read and
    written only while the notification is valid, and carrier says how a new file is
    handed back to it (iommufd/companion.py). Its credentials are read from /proc only
    when asked for (~0.1 ms): most notified calls just continue."""

    __slots__ = ("listener", "notif_id", "carrier")

    def __init__(self, listener: Listener, notif: Notification, carrier: object = None) -> None:
        self.tid = notif.pid
        self._status = None
        self.listener = listener
        self.notif_id = notif.id
        self.carrier = carrier

    # the fsuid and fsgid, as a FUSE request header has them
    uid = property(lambda self: int(self.status()["Uid"].split()[3]))  # type: ignore[assignment]
    gid = property(lambda self: int(self.status()["Gid"].split()[3]))  # type: ignore[assignment]

    def check(self) -> None:
        """Errno(ESRCH) unless the call still waits: its caller is gone (or answered)."""
        if not self.listener.id_valid(self.notif_id):
            raise Errno(errno.ESRCH)

    def read(self, addr: int, length: int) -> bytearray:
        data = super().read(addr, length)
        self.check()
        return data

    def read_into(self, addr: int, buf: bytearray, length: int) -> int:
        rc = super().read_into(addr, buf, length)
        self.check()
        return rc

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.check()
        super().write(addr, data)

    def fetch_fd(self, fd: int) -> int:
        dup = super().fetch_fd(fd)
        try:
            self.check()  # the pid may have been reused between the call and the fetch
        except BaseException:
            os.close(dup)
            raise
        return dup
