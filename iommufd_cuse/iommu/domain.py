"""IOMMU domains: what a device's DMA is translated through.

A paging domain owns a native I/O page table; the blocking domain translates
nothing. The properties come from the emulated IOMMU that made the domain.
Devices do DMA through a paging domain with dma_rw() and dma_copy(), which
translate and reach memory (the page store) in C; a refused access is an
IoFault.
"""

from __future__ import annotations

import errno
import itertools
import os

from .._native import ffi, lib
from ..errors import Errno

ULONG_MAX = (1 << 64) - 1
_ids = itertools.count(1)

# What the native DMA calls' errnos mean for the device that faulted.
_REASONS = {
    errno.ENOENT: "no translation",
    errno.EACCES: "no permission",
    errno.EFAULT: "page not pinned",
    errno.ESRCH: "the memory's owner process is gone",
}


class IoFault(Exception):
    """A DMA the domain refused: the faulting iova, the direction and why."""

    def __init__(self, iova: int, write: bool, rc: int) -> None:
        self.iova = iova
        self.write = write
        self.reason = _REASONS.get(rc, os.strerror(rc))
        super().__init__(f"DMA {'write' if write else 'read'} fault at iova {iova:#x}: {self.reason}")


class Domain:
    paging = False

    def __init__(self) -> None:
        self.serial = next(_ids)


class BlockingDomain(Domain):
    """DMA blocked: every access faults."""


class PagingDomain(Domain):
    paging = True

    def __init__(
        self,
        pgsize_bitmap: int,
        aperture_start: int = 0,
        aperture_end: int = ULONG_MAX,
        iova_bits: int = 64,
        dirty_tracking: bool = False,
    ) -> None:
        super().__init__()
        granule = pgsize_bitmap & -pgsize_bitmap
        self.granule_shift = granule.bit_length() - 1
        self.pgsize_bitmap = pgsize_bitmap
        self.aperture_start = aperture_start
        self.aperture_end = aperture_end
        self.dirty_tracking_capable = dirty_tracking
        self.dirty_tracking = False
        self.iova_bits = iova_bits
        self.iommu: object | None = None  # the IOMMU instance that made it
        pt = lib.icuse_pt_alloc(self.granule_shift, pgsize_bitmap, iova_bits)
        if pt == ffi.NULL:
            raise Errno(errno.ENOMEM)
        self.pt = ffi.gc(pt, lib.icuse_pt_free)

    @property
    def granule(self) -> int:
        return 1 << self.granule_shift

    def map(self, iova: int, pa: int, length: int, prot: int, max_leaf: int = 0) -> None:
        """Map with the largest leaves alignment allows, none above max_leaf (0: any)."""
        rc = lib.icuse_pt_map_max(self.pt, iova, pa, length, prot, max_leaf)
        if rc:
            raise Errno(-rc)

    def unmap(self, iova: int, length: int) -> int:
        n = lib.icuse_pt_unmap(self.pt, iova, length)
        if n < 0:
            raise Errno(-n)
        return n

    def walk(self, iova: int) -> tuple[int, int, int] | None:
        """(pa, prot, leaf size) of iova, or None if unmapped."""
        info = ffi.new("struct icuse_pte_info *")
        if lib.icuse_pt_walk(self.pt, iova, info):
            return None
        return info.pa, info.prot, info.leaf_size

    def read_dirty(self, iova: int, length: int, page_size: int, base: int, bitmap: bytearray, no_clear: bool) -> None:
        """OR the dirty pages of [iova, iova+length) into bitmap, whose bit 0 is
        the page at base (page_size granular), clearing them unless no_clear."""
        first_bit = (iova - base) // page_size
        nbits = (length + page_size - 1) // page_size
        words = ffi.new("uint64_t[]", (nbits + 63) // 64 + 1)
        rc = lib.icuse_pt_read_and_clear_dirty(self.pt, iova, length, page_size, words, int(no_clear))
        if rc < 0:
            raise Errno(-rc)
        found = int.from_bytes(ffi.buffer(words), "little") & ((1 << nbits) - 1)
        if found:
            merged = int.from_bytes(bitmap, "little") | found << first_bit
            bitmap[:] = merged.to_bytes(len(bitmap), "little")

    def clear_dirty(self) -> None:
        """Forget every dirty bit (tracking is being switched on)."""
        half = 1 << (self.iova_bits - 1)
        words = ffi.new("uint64_t[]", 2)
        for start in (0, half):  # two halves: the whole space may be 2^64 bytes
            rc = lib.icuse_pt_read_and_clear_dirty(self.pt, start, half, half, words, 0)
            if rc < 0:
                raise Errno(-rc)

    def dma_rw(self, store: object, iova: int, buf: bytearray | memoryview, write: bool) -> None:
        """A device's read into buf (or write of buf) at iova, through this domain to
        the memory of store; IoFault at the first page refused (bytes before it may
        have landed)."""
        fault = ffi.new("uint64_t *")
        rc = lib.icuse_dma_rw(store, self.pt, iova, ffi.from_buffer(buf), len(buf), int(write), fault)
        if rc < 0:
            raise IoFault(fault[0], write, -rc)

    def dma_prp_batch(
        self, store: object, page_size: int, xfers: list[tuple[int, int, memoryview, bool]]
    ) -> list[int | IoFault]:
        """NVMe transfers (prp1, prp2, device-side buffer, to_host) through this domain:
        PRP lists walked and data moved in C, one call for the batch. Per transfer 0,
        -EINVAL (a PRP offset the rules forbid) or the IoFault. Safe from a worker thread."""
        ios = ffi.new("struct icuse_prp_io[]", len(xfers))
        bufs = []
        try:
            for io, (prp1, prp2, view, to_host) in zip(ios, xfers, strict=True):
                buf = ffi.from_buffer(view, require_writable=True)
                bufs.append(buf)
                io.prp1, io.prp2, io.len, io.to_host = prp1, prp2, len(view), int(to_host)
                io.buf = int(ffi.cast("uintptr_t", buf))
            lib.icuse_dma_prp_batch(store, self.pt, page_size, ios, len(xfers))
        finally:
            for buf in bufs:
                ffi.release(buf)  # the namespace's mapping must stay closable
        return [
            io.result if io.result in (0, -errno.EINVAL) else IoFault(io.fault_iova, bool(io.fault_write), -io.result)
            for io in ios
        ]

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct icuse_pt_stats *")
        lib.icuse_pt_get_stats(self.pt, s)
        return {"tables": s.tables, "leaves": s.leaves, "mapped_bytes": s.mapped_bytes}

    def __repr__(self) -> str:
        return f"<PagingDomain {self.serial} granule={self.granule:#x}>"


def dma_copy(store: object, src: PagingDomain, src_iova: int, dst: PagingDomain, dst_iova: int, length: int) -> None:
    """A device-internal copy of length bytes, read through src and written through
    dst (the same domain or two); IoFault at the first page refused on either side."""
    fault = ffi.new("uint64_t *")
    is_dst = ffi.new("int *")
    rc = lib.icuse_dma_copy(store, src.pt, src_iova, dst.pt, dst_iova, length, fault, is_dst)
    if rc < 0:
        raise IoFault(fault[0], bool(is_dst[0]), -rc)
