"""I/O on the daemon's own mount, from child processes.

A thread of the daemon blocked on its own FUSE mount would make the daemon
unkillable (SIGKILL cannot end a process whose thread waits for a reply only
that process can give). So such I/O is done by a forked child holding no
other file, and closing files of our own mount never waits for the daemon:
FLUSH is answered ENOSYS, after which the kernel stops sending it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable

import trio

from .._native import lib


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


# "Which open of ours is this file?" A client hands the daemon a descriptor of a
# file of our mount (the iommufd in VFIO_DEVICE_BIND_IOMMUFD, an access file in
# the selftest ops); only a request on that very file reaches its FileHandle. So
# a child of the daemon issues this ioctl on it with a one-time random nonce, and
# the server records which handle received it. Anyone else sending the number
# gets the handle's own answer for an unknown ioctl.
IDENTIFY = (ord(";") << 8) | 0xEF
_identify_waiting: dict[int, object | None] = {}


async def identify(fd: int) -> object | None:
    """The FileHandle behind fd, a file of our own mount (None if none answers)."""
    nonce = secrets.randbits(63)
    _identify_waiting[nonce] = None
    try:
        await loopback_ioctl(fd, IDENTIFY, nonce)
        return _identify_waiting[nonce]
    finally:
        _identify_waiting.pop(nonce, None)


def answer_identify(cmd: int, arg: int, caller_ppid: Callable[[], int], handle: object) -> bool:
    """Called by the server for each ioctl: True if it was our own question."""
    if cmd != IDENTIFY or arg not in _identify_waiting:
        return False
    if caller_ppid() != os.getpid():
        return False
    _identify_waiting[arg] = handle
    return True
