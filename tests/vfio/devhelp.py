"""Helpers for the device model tests: a DmaPort through real memory
(tests/memhelp.py) and its paging domain, as the daemon's DMA port does, and an
IrqSink that records what a model signalled. (A module of its own:
tests/conftest.py is also named conftest.)"""

from __future__ import annotations

import trio
from memhelp import Memory

from iommufd_cuse.iommu.domain import IoFault, dma_copy
from iommufd_cuse.vfio.pci.model import DmaFault


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
