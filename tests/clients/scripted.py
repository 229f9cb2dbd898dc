"""A client process driven by the test over stdin/stdout, one JSON object a line.

It lets a test put iommufd calls in a separate process with its own
credentials, limits, memory and lifetime (e.g. to exit while its memory is
mapped). Each request {"op": ..., args} gets {"ok": true, ...} or {"errno": N}.
"""

import ctypes
import json
import mmap
import os
import resource
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from iommufd_cuse import uapi  # noqa: E402
from iommufd_cuse.client import Iommufd, VfioDevice, address_of  # noqa: E402

fds: dict[str, Iommufd] = {}
bufs: dict[str, mmap.mmap] = {}
memfds: dict[str, int] = {}


def op_open(path: str, name: str = "fd") -> dict:
    fds[name] = Iommufd.open(path)
    return {"fdnum": fds[name].fd}


def op_open_device(path: str, name: str = "dev") -> dict:
    """Open a VFIO device cdev; call its VfioDevice methods with fd=name."""
    fds[name] = VfioDevice.open(path)
    return {"fdnum": fds[name].fd}


def op_grab(pid: int, fdnum: int, name: str = "fd") -> dict:
    """Take a duplicate of another process's descriptor (pidfd_getfd; needs privilege)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    fd = libc.syscall(438, pidfd, fdnum, 0)
    os.close(pidfd)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd")
    fds[name] = Iommufd(fd)
    return {"fdnum": fd}


def op_mmap(name: str, size: int, kind: str = "anon") -> dict:
    if kind == "anon":
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    elif kind == "shared_anon":
        m = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    elif kind == "memfd":
        fd = os.memfd_create(name)
        os.ftruncate(fd, size)
        memfds[name] = fd
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    else:
        raise ValueError(kind)
    m[:] = bytes(size)  # populate
    bufs[name] = m
    return {"addr": address_of(m), "fd": memfds.get(name, -1)}


def op_fill(name: str, data: str, offset: int = 0) -> dict:
    b = bytes.fromhex(data)
    bufs[name][offset : offset + len(b)] = b
    return {}


def op_peek(name: str, offset: int, length: int) -> dict:
    return {"data": bufs[name][offset : offset + length].hex()}


def op_munmap(name: str) -> dict:
    m = bufs.pop(name)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap(ctypes.c_void_p(address_of(m)), ctypes.c_size_t(len(m)))
    return {}


def op_memlock(limit: int) -> dict:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    return {}


def op_call(method: str, fd: str = "fd", **kw) -> dict:
    if "buf" in kw:  # a named buffer -> its address
        kw["buf"] = address_of(bufs[kw["buf"]])
    if "memfd" in kw:
        kw["fd"] = memfds[kw.pop("memfd")]
    if "struct_name" in kw:
        kw["struct_"] = uapi.STRUCTS[kw.pop("struct_name")]
    result = getattr(fds[fd], method)(**kw)
    if hasattr(result, "rc"):  # a raw Result: rc and errno, whatever they are
        return {"result": {"rc": result.rc, "errno_": result.errno}}
    return {"result": result}


def op_catch_sigusr1() -> dict:
    """A handler (without SA_RESTART): a blocked ioctl returns EINTR when signalled."""
    import signal

    signal.signal(signal.SIGUSR1, lambda *_: None)
    return {}


def op_close(name: str = "fd") -> dict:
    fds.pop(name).close()
    return {}


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        op = globals()["op_" + req.pop("_op")]
        try:
            out = {"ok": True, **op(**req)}
        except OSError as e:  # an ioctl's errno, or another call's
            out = {"errno": e.errno}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
