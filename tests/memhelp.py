"""Real memory for tests below the daemon: a memfd mapping pinned in a native page
store of its own, and an IOMMU paging domain to map it in (the DMA path of the
daemon's devices, iommu/domain.py). Used by tests/iommu and the device model tests."""

from __future__ import annotations

import mmap
import os

from iommufd_cuse._native import ffi, lib

from iommufd_cuse.iommu.domain import PagingDomain

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
