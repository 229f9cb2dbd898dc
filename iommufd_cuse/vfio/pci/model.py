"""What an emulated PCI function is to the rest of the daemon.

A model owns its config space and BAR registers. It reaches memory only
through its DmaPort (which translates through the IOMMU domain its group is
attached to, and is gated by the command register's bus-master bit), and it
signals interrupts only through its IrqSink (INTx level, MSI/MSI-X vectors,
which the VFIO layer turns into eventfd writes). Long work (a DMA engine) runs
in tasks the model starts with `spawn`, so an MMIO write answers at once as on
hardware.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


class DmaFault(Exception):
    """A device access the IOMMU refused: recorded by the device, never silent."""

    def __init__(self, iova: int, write: bool, reason: str) -> None:
        super().__init__(f"DMA {'write' if write else 'read'} fault at iova {iova:#x}: {reason}")
        self.iova = iova
        self.write = write
        self.reason = reason


class DmaPort(Protocol):
    def read(self, iova: int, length: int) -> bytes:
        """Read through the IOMMU; raises DmaFault (bus mastering off, blocked, unmapped, no permission)."""
        ...

    def write(self, iova: int, data: bytes) -> None:
        """Write through the IOMMU; on a fault, bytes before the faulting page may have landed."""
        ...

    async def copy(self, src_iova: int, dst_iova: int, length: int) -> None:
        """Device-internal copy of a long range, off the event loop; raises DmaFault."""
        ...

    def copy_sync(self, src_iova: int, dst_iova: int, length: int) -> None:
        """copy() for a model already off the event loop (in a worker thread of its own)."""
        ...


class IrqSink(Protocol):
    def set_intx(self, asserted: bool) -> None: ...

    def msi(self, vector: int) -> None:
        """Signal MSI vector (MSI or MSI-X, whichever is enabled in config space)."""
        ...


@dataclass
class Bar:
    size: int  # power of two
    is_64: bool = False
    prefetchable: bool = False
    is_io: bool = False


class PciFunction:
    """Base of device models. Subclasses set identity, bars and capabilities."""

    vendor_id = 0
    device_id = 0
    revision = 0
    class_code = 0  # 24 bits: class, subclass, prog-if
    subsystem_vendor_id = 0
    subsystem_id = 0
    bars: list[Bar | None] = []  # six entries (None: unused; the upper half of a 64-bit BAR is None)
    express = False  # PCI Express: 4 KiB config space and a PCIe capability
    msi_vectors = 0  # 0: no MSI capability
    msix_vectors = 0  # 0: no MSI-X capability
    msix_bar = 0  # BAR holding the MSI-X table and PBA (with msix_vectors)
    msix_table_offset = 0  # in that BAR, 8-byte aligned; 16 bytes per vector
    msix_pba_offset = 0x800  # in that BAR, 8-byte aligned; one bit per vector
    intx_pin = 1  # INTA#; 0 for none

    def __init__(self, dma: DmaPort, irq: IrqSink, spawn: Callable[[Callable[[], Awaitable[None]]], None]) -> None:
        self.dma = dma
        self.irq = irq
        self.spawn = spawn

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        raise NotImplementedError

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Function-level reset: registers back to power-on values, engines stopped."""

    def stop(self) -> None:
        """The device is being closed or unbound: stop any work in progress."""
