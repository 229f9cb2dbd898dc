"""I/O on the daemon's own mount, from child processes.

A thread of the daemon blocked on its own FUSE mount would make the daemon
unkillable (SIGKILL cannot end a process whose thread waits for a reply only
that process can give). So such I/O is done by a forked child holding no
other file, and closing files of our own mount never waits for the daemon:
FLUSH is answered ENOSYS, after which the kernel stops sending it.
"""

from __future__ import annotations

import os
import subprocess
import sys

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
        await trio.run_process([sys.executable, "-I", "-S", "-c", code, path], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
