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

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

log = logging.getLogger(__name__)


FAULTS_KEPT = 256


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

    def transfer(self, iova: int, buf: memoryview, to_host: bool) -> None:
        """Read host memory into buf (to_host False) or write buf to it, through the IOMMU;
        raises DmaFault. For device-side memory (a disk) without a copy in between."""
        ...

    def prp_batch(self, page_size: int, xfers: list[tuple[int, int, memoryview, bool]]) -> list[int | DmaFault]:
        """NVMe transfers (prp1, prp2, device-side buffer, to_host) through PRPs and PRP
        lists, in C: per transfer 0, -EINVAL (a bad PRP offset) or its DmaFault."""
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
    # vendor-specific capabilities: each one's bytes after its id and next pointer, or (bytes, write mask)
    vendor_caps: list[bytes | tuple[bytes, bytes]] = []

    def __init__(self, dma: DmaPort, irq: IrqSink, spawn: Callable[[Callable[[], Awaitable[None]]], None]) -> None:
        self.dma = dma
        self.irq = irq
        self.spawn = spawn

    faults: list[DmaFault]  # the DMA faults the device met, the newest FAULTS_KEPT (for status and tests)

    def _keep_fault(self, f: DmaFault) -> None:
        # without its traceback: its frames hold what the model was copying (views of its memory, a
        # disk's mmap) for as long as the fault is kept, which could then never be released
        f.__traceback__ = f.__context__ = None
        self.faults.append(f)
        del self.faults[:-FAULTS_KEPT]

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        raise NotImplementedError

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        raise NotImplementedError

    _intx = False  # the INTx level last given to the IrqSink

    def _drive_intx(self, pending: bool) -> None:
        """An interrupt is pending (or not) on the pin: the status register's Interrupt
        Status bit follows it, and the line too unless the command register disables it."""
        self.config.interrupt_status = pending  # type: ignore[attr-defined]
        level = pending and not self.config.intx_disabled and self.intx_pin != 0  # type: ignore[attr-defined]
        if level != self._intx:
            self._intx = level
            self.irq.set_intx(level)

    def reset(self) -> None:
        """Function-level reset: registers back to power-on values, engines stopped."""

    def stop(self) -> None:
        """The device is being closed or unbound: stop any work in progress."""

    def close(self) -> None:
        """The daemon stops: release what the model holds (files, memory)."""


U32 = (1 << 32) - 1


class RegisterFunction(PciFunction):
    """A model whose BARs are 32-bit registers (8-byte accesses split in two halves,
    narrower reads cut from a dword, narrower writes dropped) and whose MSI-X vectors
    are held pending while the function is masked (the PBA). Subclasses give _read32
    and _write32 and keep `self.config`."""

    msix_pending = 0  # vectors signalled while the function was masked

    def _read32(self, bar: int, off: int) -> int:
        raise NotImplementedError

    def _write32(self, bar: int, off: int, value: int) -> None:
        raise NotImplementedError

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        if size == 8 and offset % 8 == 0:
            return self.mmio_read(bar, offset, 4) | self.mmio_read(bar, offset + 4, 4) << 32
        ones = (1 << (8 * size)) - 1
        if size not in (1, 2, 4) or offset % size:
            return ones
        return self._read32(bar, offset & ~3) >> 8 * (offset & 3) & ones

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if size == 8 and offset % 8 == 0:
            self.mmio_write(bar, offset, 4, value & U32)
            self.mmio_write(bar, offset + 4, 4, value >> 32 & U32)
            return
        if size != 4 or offset % 4:
            return  # registers take 4- and 8-byte accesses only
        self._write32(bar, offset, value & U32)

    def _msix_read32(self, off: int) -> int:
        """A dword of the BAR holding the MSI-X table and PBA."""
        t = self.msix_table_offset
        if t <= off < t + self.msix_vectors * 16:
            return U32  # the host owns the vector table (vfio-pci: reads -1)
        if off == self.msix_pba_offset:
            return self.msix_pending & U32
        return 0

    def _msix_signal(self, vector: int) -> None:
        if self.config.msix_function_masked:  # type: ignore[attr-defined]
            self.msix_pending |= 1 << vector
        else:
            self.irq.msi(vector)

    def _msix_config_changed(self, what: str) -> None:
        """Unmasked with MSI-X on: the pending vectors fire; a reset forgets them."""
        config = self.config  # type: ignore[attr-defined]
        if what == "msix" and config.msix_enabled and not config.msix_function_masked:
            pending, self.msix_pending = self.msix_pending, 0
            for v in range(self.msix_vectors):
                if pending >> v & 1:
                    self.irq.msi(v)
        if what == "reset":
            self.msix_pending = 0


class QueuedWork:
    """A model whose work waits in queues in host memory (NVMe queues, virtqueues, a DMA
    ring): one task at a time does it. `_kick()` starts the task when `_has_work()`;
    `_forget_work()` (a reset, a stop) moves the generation on and cancels the task, so
    whatever it was doing touches the device no more; a task that ends looks again, for work
    that came meanwhile or for the next generation. An exception of the model's own code
    fails this device (`_failed()`), never the daemon. Mixed into a PciFunction."""

    spawn: Callable[[Callable[[], Awaitable[None]]], None]
    _gen = 0  # bumped when work in flight must be forgotten
    _active = False  # a task exists
    _active_gen = -1  # the generation it works for
    _scope: trio.CancelScope | None = None

    def _has_work(self) -> bool:
        raise NotImplementedError

    async def _process(self, gen: int) -> None:
        """Work until there is none, or gen is no longer the generation."""
        raise NotImplementedError

    def _failed(self) -> None:
        """The processing raised: the device's fatal state."""
        raise NotImplementedError

    def _kick(self) -> None:
        if self._active or not self._has_work():
            return
        self._active = True
        self._active_gen = self._gen
        self.spawn(self._work)

    def _forget_work(self) -> None:
        self._gen += 1
        if self._scope is not None:
            self._scope.cancel()

    async def _work(self) -> None:
        gen = self._gen
        self._active_gen = gen
        scope = trio.CancelScope()
        self._scope = scope
        try:
            with scope:
                try:
                    await self._process(gen)
                except Exception:  # a bug must fail this device, not the daemon
                    log.exception("%s: processing failed", type(self).__name__)
                    if gen == self._gen:
                        self._failed()
        finally:
            if self._scope is scope:
                self._scope = None
            self._active = False
        self._kick()
