"""The medium behind the emulated block devices (NVMe namespaces, virtio-blk disks): bytes
in sparse anonymous memory, or a file mapped shared, addressed in 512-byte blocks. Device
models copy between it and the host through their DmaPort with views of `view`."""

from __future__ import annotations

import logging
import mmap
import os

log = logging.getLogger(__name__)

LBA = 512
DEFAULT_SIZE = 1 << 30
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python 3.11's mmap does not name it (Linux: 0x4000)
PAGE = 4096


class BlockStore:
    """A block device's medium: sparse anonymous memory, or a file mapped shared."""

    def __init__(self, size: int | None, backing: str | None) -> None:
        """size: bytes (default: the file's size, else 1 GiB); backing: a file, created if missing."""
        self.fd = -1
        if backing is not None:
            self.fd = os.open(backing, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            have = os.fstat(self.fd).st_size
            if size is None:
                size = have or DEFAULT_SIZE
            if have < size:
                os.ftruncate(self.fd, size)  # sparse: the file system allocates on write
        elif size is None:
            size = DEFAULT_SIZE
        if size <= 0 or size % LBA:
            if self.fd >= 0:
                os.close(self.fd)
            raise ValueError(f"size {size}: a positive multiple of {LBA} bytes")
        self.size = size
        if self.fd >= 0:
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        else:
            self.mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | MAP_NORESERVE)
        self.view = memoryview(self.mm)
        self.blocks = size // LBA

    def zero(self, start: int, n: int) -> None:
        """Zeroes [start, start + n): anonymous pages are given back, file bytes written."""
        end = start + n
        if self.fd < 0:
            a, b = -(-start // PAGE) * PAGE, end // PAGE * PAGE
            if b > a:
                self.mm.madvise(mmap.MADV_DONTNEED, a, b - a)  # private anonymous: reads back zero
                self.view[start:a] = bytes(a - start)
                self.view[b:end] = bytes(end - b)
                return
        zeros = bytes(min(n, 1 << 20))
        for pos in range(start, end, len(zeros)):
            k = min(len(zeros), end - pos)
            self.view[pos : pos + k] = zeros[:k]

    def flush(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)

    def close(self) -> None:
        try:
            self.view.release()
            self.mm.close()
        except BufferError:  # a transfer still running in a worker thread: the process exit frees it
            log.warning("block store: memory still in use at close")
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
