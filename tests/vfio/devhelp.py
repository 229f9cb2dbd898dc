"""Helpers for the device model tests: real memory (a memfd mapping held by
the native page store) reached through an IOMMU paging domain, as the daemon's
DMA port does, and an IrqSink that records what a model
signalled. (A module of its own: tests/conftest.py is also named conftest.)"""

from __future__ import annotations

import mmap
import os

import trio
from iommufd_cuse._native import ffi, lib

from iommufd_cuse.iommu.domain import IoFault, PagingDomain, dma_copy
from iommufd_cuse.vfio.pci.model import DmaFault

PAGE = 4096
R = lib.ICUSE_PROT_READ
W = lib.ICUSE_PROT_WRITE
RW = R | W


class Memory:
    """npages of shared memory pinned in a page store, and an empty paging domain
    (4 KiB granule, 2 MiB/1 GiB leaves, 48-bit iova) to map them in."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        fd = os.memfd_create("icuse-vfio-test")
        try:
            os.ftruncate(fd, npages * PAGE)
            self.mm = mmap.mmap(fd, npages * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.store = lib.icuse_store_new()
        pa = ffi.new("uint64_t *")
        self.id = lib.icuse_pages_new(self.store, npages, 0, pa)
        assert self.id > 0
        self.pa = pa[0]
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.mm)))
        rc = lib.icuse_pages_set_backing(self.store, self.id, 0, npages, lib.ICUSE_BACKING_MEM, -1, addr)
        assert rc == 0
        assert lib.icuse_pages_pin(self.store, self.id, 0, npages) == npages
        self.domain = PagingDomain(0x40201000, iova_bits=48)
        self.pt = self.domain.pt

    def map(self, iova: int, page: int, npages: int = 1, prot: int = RW) -> None:
        """Map iova -> memory pages [page, page + npages)."""
        assert 0 <= page and page + npages <= self.npages
        assert lib.icuse_pt_map(self.pt, iova, self.pa + page * PAGE, npages * PAGE, prot) == 0

    def unmap(self, iova: int, npages: int = 1) -> None:
        assert lib.icuse_pt_unmap(self.pt, iova, npages * PAGE) == npages * PAGE

    def page(self, page: int, npages: int = 1) -> bytes:
        return bytes(self.mm[page * PAGE : (page + npages) * PAGE])

    def put(self, page: int, data: bytes, offset: int = 0) -> None:
        start = page * PAGE + offset
        self.mm[start : start + len(data)] = data

    def get(self, page: int, n: int, offset: int = 0) -> bytes:
        start = page * PAGE + offset
        return bytes(self.mm[start : start + n])

    def close(self) -> None:
        self.domain = self.pt = None  # the table goes with the domain
        assert lib.icuse_pages_unpin(self.store, self.id, 0, self.npages) == self.npages
        assert lib.icuse_pages_remove(self.store, self.id) == 0
        lib.icuse_store_free(self.store)
        self.mm.close()


class Port:
    """A DmaPort through Memory's page table, gated by the model's bus-master bit
    (as the VFIO layer's port is), with a switch to block all DMA."""

    def __init__(self, mem: Memory) -> None:
        self.mem = mem
        self.model = None  # set once the model exists: the port reads its config
        self.blocked = False
        self.copies = 0

    def _check(self, iova: int, write: bool) -> None:
        if self.model is not None and not self.model.config.bus_master:
            raise DmaFault(iova, write, "bus master disabled")
        if self.blocked:
            raise DmaFault(iova, write, "DMA blocked (no paging domain attached)")

    def _rw(self, iova: int, buf: bytearray, write: bool) -> None:
        self._check(iova, write)
        try:
            self.mem.domain.dma_rw(self.mem.store, iova, buf, write)
        except IoFault as f:
            raise DmaFault(f.iova, f.write, f.reason) from None

    def _copy_now(self, src_iova: int, dst_iova: int, length: int) -> None:
        dom = self.mem.domain
        try:
            dma_copy(self.mem.store, dom, src_iova, dom, dst_iova, length)
        except IoFault as f:
            raise DmaFault(f.iova, f.write, f.reason) from None

    def read(self, iova: int, length: int) -> bytes:
        buf = bytearray(length)
        self._rw(iova, buf, False)
        return bytes(buf)

    def write(self, iova: int, data: bytes) -> None:
        self._rw(iova, bytearray(data), True)

    async def copy(self, src_iova: int, dst_iova: int, length: int) -> None:
        self._check(src_iova, False)
        self._check(dst_iova, True)
        self.copies += 1
        await trio.to_thread.run_sync(self._copy_now, src_iova, dst_iova, length)

    def copy_sync(self, src_iova: int, dst_iova: int, length: int) -> None:
        self._check(src_iova, False)
        self._check(dst_iova, True)
        self.copies += 1
        self._copy_now(src_iova, dst_iova, length)


class IrqLog:
    """An IrqSink that records every call: ("intx", bool) and ("msi", vector)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int | bool]] = []
        self.level = False

    def set_intx(self, asserted: bool) -> None:
        self.events.append(("intx", asserted))
        self.level = asserted

    def msi(self, vector: int) -> None:
        self.events.append(("msi", vector))

    def msis(self) -> list[int]:
        return [v for kind, v in self.events if kind == "msi"]

    def clear(self) -> None:
        self.events.clear()
