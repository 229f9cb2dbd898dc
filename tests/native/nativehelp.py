"""Helpers shared by the native tests: cffi handles and a child process whose
memory the page store reaches through /proc/<pid>/mem (the PROC backing)."""

import mmap
import os
import subprocess
import sys

from iommufd_cuse._native import ffi, lib

PAGE = 4096
PA0 = 1 << 40
R = lib.ICUSE_PROT_READ
W = lib.ICUSE_PROT_WRITE
RW = R | W


def addr_of(buf) -> int:
    """Daemon (this process) address of a writable buffer such as an mmap."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


def memfd_map(size: int) -> mmap.mmap:
    """A MAP_SHARED memfd mapping, the kind of memory the MEM backing holds."""
    fd = os.memfd_create("icuse-test")
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


_CHILD = r"""
import mmap, sys, ctypes
size = int(sys.argv[1])
m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[:] = bytes(size)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "get":
        off, n = int(args[0]), int(args[1])
        print(m[off:off + n].hex(), flush=True)
    elif cmd == "set":
        off, data = int(args[0]), bytes.fromhex(args[1])
        m[off:off + len(data)] = data
        print("ok", flush=True)
    elif cmd == "unmap":
        off, n = int(args[0]), int(args[1])
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        print(libc.munmap(addr + off, n), flush=True)
"""


class Child:
    """A process holding `size` bytes of private anonymous memory at `addr`,
    reached by the store through `fd` (its /proc/<pid>/mem), and inspected
    through the child itself (get/set over a pipe)."""

    def __init__(self, size: int):
        self.size = size
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addr = int(self.proc.stdout.readline())
        self.fd = os.open(f"/proc/{self.proc.pid}/mem", os.O_RDWR)

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def get(self, off: int, n: int) -> bytes:
        return bytes.fromhex(self._ask(f"get {off} {n}"))

    def set(self, off: int, data: bytes) -> None:
        assert self._ask(f"set {off} {data.hex()}") == "ok"

    def unmap(self, off: int, n: int) -> None:
        assert self._ask(f"unmap {off} {n}") == "0"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pattern(n: int, seed: int) -> bytes:
    """n reproducible, position-dependent bytes."""
    import random

    return random.Random(seed).randbytes(n)
