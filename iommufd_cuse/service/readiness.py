"""Readiness: the daemon is ready once its iommufd nodes answer an ioctl, asked by a
child process (a blocking call on our own FUSE node from the trio thread would
deadlock the daemon, and from another thread of ours would make it unkillable,
see probe_node).
"""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from typing import TYPE_CHECKING

import trio

from .. import uapi
from ..daemon import StartupError

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)


READY_TIMEOUT = 30.0  # seconds for the nodes to answer the readiness ioctl


# The iommufd nodes and what IOMMU_OPTION(RLIMIT_MODE, GET) answers on each.
_PROBES = {"iommu": 0, "vfio/vfio": 1}

# The probe runs in a child process, not in a thread of the daemon: a thread
# with a request pending on the daemon's own mount cannot die (the kernel waits
# for an answer only the daemon could give, and keeps /dev/fuse open until every
# thread has exited), so a daemon SIGKILLed during start-up would hang in D
# state for good. A child just gets ENOTCONN when the daemon dies.
_PROBE_CHILD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
buf = bytearray.fromhex(sys.argv[3])
rc = fcntl.ioctl(fd, int(sys.argv[2]), buf, True)
os.close(fd)
print(rc, buf.hex())
"""


async def probe_node(path: str, expect: int | None = None) -> None:
    """Open path and ask IOMMU_OPTION(RLIMIT_MODE, GET) from a child process: it
    must return 0 (and val64 = expect). OSError if not; TooSlowError past READY_TIMEOUT."""
    st = uapi.iommu_option
    arg = st.pack(st.new(size=st.SIZE, option_id=uapi.IOMMU_OPTION_RLIMIT_MODE, op=uapi.IOMMU_OPTION_OP_GET))
    argv = [sys.executable, "-I", "-S", "-c", _PROBE_CHILD, path, str(uapi.IOMMU_OPTION), arg.hex()]
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        with trio.fail_after(READY_TIMEOUT):
            out = await _read_all(proc.stdout)
            err = await _read_all(proc.stderr)
            await proc.wait()
    finally:
        if proc.returncode is None:
            # Not waited for: if it is stuck on our node, it goes with the mount.
            proc.kill()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                await stream.aclose()
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise OSError(errno.EIO, lines[-1] if lines else f"the probe exited {proc.returncode}")
    rc, data = out.decode().split()
    if int(rc) != 0:
        raise OSError(errno.EIO, f"IOMMU_OPTION returned {rc}")
    got = st.unpack(bytes.fromhex(data)).val64
    if expect is not None and got != expect:
        raise OSError(errno.EIO, f"IOMMU_OPTION answered {got}, expected {expect}")


async def _read_all(stream: trio.abc.ReceiveStream | None) -> bytes:
    data = b""
    if stream is not None:
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def wait_ready(daemon: Daemon) -> None:
    """Return once every iommufd node answers an ioctl through its link."""
    files = {n.path() for n in daemon.dev_nodes()}
    for node, expect in _PROBES.items():
        if node not in files:
            continue
        path = daemon.link_path(node)
        try:
            await probe_node(path, expect)
        except trio.TooSlowError:
            raise StartupError(f"{path} does not answer ioctls (no reply in {READY_TIMEOUT:g} s)") from None
        except OSError as e:
            raise StartupError(f"{path} does not answer ioctls: {e.strerror or e}") from None
