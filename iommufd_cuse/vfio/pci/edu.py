"""QEMU's educational PCI device ("edu", 1234:11e8), register for register.

The register facts are those of QEMU's docs/specs/edu.rst and hw/misc/edu.c,
so a client written for edu under QEMU + a real kernel runs unchanged here.
Where this model differs from QEMU, on purpose:

- Factorial and DMA run synchronously in the MMIO write (QEMU uses a thread
  and a 100 ms timer): the "computing" and "start" bits are already clear when
  the write returns, which a correct driver's polling loop accepts.
- A DMA whose buffer range leaves [0x40000, 0x41000), or whose RAM range does
  not fit under the DMA mask, is refused: logged, counted in `range_errors`,
  and nothing is transferred (QEMU logs and then goes ahead, clamping the RAM
  address to the mask; older QEMU aborted, and wrongly so for a transfer that
  ends exactly at 0x41000, which is valid here).
- An IOMMU fault (DmaFault from the DmaPort) is recorded in `faults` and
  `fault_count`. As on QEMU, the command still completes: the start bit clears
  and the DMA interrupt is raised if it was asked for. A RAM -> edu transfer
  that faults leaves the buffer unchanged.
- The 4 KiB DMA buffer is also reachable by MMIO at 0x40000..0x40fff, with
  accesses of 1, 2, 4 or 8 bytes.
- reset() returns every register and the buffer to power-on values (QEMU's
  edu has no reset handler).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from .config import ConfigSpace
from .model import Bar, DmaFault, DmaPort, IrqSink, PciFunction

log = logging.getLogger(__name__)

IDENT = 0x010000ED  # version 1.0
REG_IDENT = 0x00
REG_LIVENESS = 0x04
REG_FACTORIAL = 0x08
REG_STATUS = 0x20
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80

DMA_CMD_START = 0x01
DMA_CMD_TO_RAM = 0x02  # direction: 0 = RAM -> edu, 1 = edu -> RAM
DMA_CMD_IRQ = 0x04

FACT_IRQ = 0x00000001
DMA_IRQ = 0x00000100

BUF_START = 0x40000
BUF_SIZE = 0x1000

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


def factorial32(n: int) -> int:
    """n! modulo 2**32, as edu's 32-bit register holds it (0 from 34! on)."""
    r = 1
    for k in range(2, min(n, 34) + 1):
        r = r * k & U32
    return r


class Edu(PciFunction):
    vendor_id = 0x1234
    device_id = 0x11E8
    revision = 0x10
    class_code = 0x00FF00  # PCI_CLASS_OTHERS
    subsystem_vendor_id = 0x1AF4  # what QEMU gives its devices
    subsystem_id = 0x1100
    bars = [Bar(1 << 20), None, None, None, None, None]
    express = False
    msi_vectors = 1
    msix_vectors = 0
    intx_pin = 1
    dma_mask_bits = 28
    flr = False  # no reset method: VFIO_DEVICE_GET_INFO does not offer VFIO_DEVICE_FLAGS_RESET

    def __init__(
        self,
        dma: DmaPort,
        irq: IrqSink,
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        *,
        dma_mask_bits: int | None = None,
        dma_mask: int | None = None,
    ) -> None:
        super().__init__(dma, irq, spawn)
        if dma_mask_bits is not None and dma_mask is not None:
            raise ValueError("give dma_mask_bits or dma_mask, not both")
        if dma_mask is not None:
            self.dma_mask = int(dma_mask) & U64
        else:
            bits = self.dma_mask_bits if dma_mask_bits is None else int(dma_mask_bits)
            if not 1 <= bits <= 64:
                raise ValueError(f"dma_mask_bits {bits}")
            self.dma_mask_bits = bits
            self.dma_mask = (1 << bits) - 1
        self.faults: list[DmaFault] = []
        self.fault_count = 0
        self.range_errors = 0
        self.config = ConfigSpace(self)
        self._power_on()

    def _power_on(self) -> None:
        self.liveness = 0  # what 0x04 reads
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = 0
        self.dma_dst = 0
        self.dma_count = 0
        self.dma_cmd = 0
        self.buffer = bytearray(BUF_SIZE)

    # -- interrupts -----------------------------------------------------------------
    def _update_intx(self) -> None:
        self._drive_intx(self.irq_status != 0 and not self.config.msi_enabled)

    def _raise(self, bits: int) -> None:
        self.irq_status |= bits & U32
        if not self.irq_status:
            return
        if self.config.msi_enabled:
            self.irq.msi(0)
        self._update_intx()

    def _lower(self, bits: int) -> None:
        self.irq_status &= ~bits & U32
        self._update_intx()

    def config_changed(self, what: str) -> None:
        """From the config space: INTx follows the command register and MSI enable."""
        if what in ("command", "msi", "reset"):
            self._update_intx()

    # -- MMIO -------------------------------------------------------------------------
    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if bar != 0:
            return ones
        if BUF_START <= offset and offset + size <= BUF_START + BUF_SIZE and size in (1, 2, 4, 8):
            i = offset - BUF_START
            return int.from_bytes(self.buffer[i : i + size], "little")
        if size != 4 and (offset < 0x80 or size != 8):
            return ones
        if offset == REG_IDENT:
            val = IDENT
        elif offset == REG_LIVENESS:
            val = self.liveness
        elif offset == REG_FACTORIAL:
            val = self.fact
        elif offset == REG_STATUS:
            val = self.status
        elif offset == REG_IRQ_STATUS:
            val = self.irq_status
        elif offset == REG_DMA_SRC:
            val = self.dma_src
        elif offset == REG_DMA_DST:
            val = self.dma_dst
        elif offset == REG_DMA_COUNT:
            val = self.dma_count
        elif offset == REG_DMA_CMD:
            val = self.dma_cmd
        else:
            return ones
        return val & ones

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0:
            return
        value &= (1 << (8 * size)) - 1
        if BUF_START <= offset and offset + size <= BUF_START + BUF_SIZE and size in (1, 2, 4, 8):
            i = offset - BUF_START
            self.buffer[i : i + size] = value.to_bytes(size, "little")
            return
        if size != 4 and (offset < 0x80 or size != 8):
            return
        if offset == REG_LIVENESS:
            self.liveness = ~value & U32
        elif offset == REG_FACTORIAL:
            if self.status & STATUS_COMPUTING:
                return
            self.status |= STATUS_COMPUTING
            self.fact = factorial32(value)
            self.status &= ~STATUS_COMPUTING
            if self.status & STATUS_IRQFACT:
                self._raise(FACT_IRQ)
        elif offset == REG_STATUS:
            if value & STATUS_IRQFACT:
                self.status |= STATUS_IRQFACT
            else:
                self.status &= ~STATUS_IRQFACT
        elif offset == REG_IRQ_RAISE:
            self._raise(value)
        elif offset == REG_IRQ_ACK:
            self._lower(value)
        elif offset in (REG_DMA_SRC, REG_DMA_DST, REG_DMA_COUNT, REG_DMA_CMD):
            if self.dma_cmd & DMA_CMD_START:
                return  # registers are frozen while a transfer runs
            if offset == REG_DMA_SRC:
                self.dma_src = value
            elif offset == REG_DMA_DST:
                self.dma_dst = value
            elif offset == REG_DMA_COUNT:
                self.dma_count = value
            elif value & DMA_CMD_START:  # a command without the start bit is ignored
                self.dma_cmd = value
                self._run_dma()

    # -- DMA ----------------------------------------------------------------------------
    def _in_buffer(self, addr: int, count: int) -> bool:
        return BUF_START <= addr and addr + count <= BUF_START + BUF_SIZE

    def _in_mask(self, addr: int, count: int) -> bool:
        last = addr + count - 1 if count else addr
        return last <= U64 and (addr & ~self.dma_mask) == 0 and (last & ~self.dma_mask) == 0

    def _run_dma(self) -> None:
        to_ram = bool(self.dma_cmd & DMA_CMD_TO_RAM)
        count = self.dma_count
        if to_ram:
            dev, ram = self.dma_src, self.dma_dst
        else:
            dev, ram = self.dma_dst, self.dma_src
        if not self._in_buffer(dev, count):
            self.range_errors += 1
            log.warning(
                "edu: DMA range %#x-%#x out of bounds (%#x-%#x): refused",
                dev,
                dev + count - 1,
                BUF_START,
                BUF_START + BUF_SIZE - 1,
            )
        elif not self._in_mask(ram, count):
            self.range_errors += 1
            log.warning("edu: DMA address %#x+%#x beyond the DMA mask %#x: refused", ram, count, self.dma_mask)
        elif count:
            i = dev - BUF_START
            try:
                if to_ram:
                    self.dma.write(ram, bytes(self.buffer[i : i + count]))
                else:
                    data = self.dma.read(ram, count)
                    self.buffer[i : i + count] = data
            except DmaFault as f:
                self.fault_count += 1
                self._keep_fault(f)
                log.warning("edu: %s", f)
        self.dma_cmd &= ~DMA_CMD_START
        if self.dma_cmd & DMA_CMD_IRQ:
            self._raise(DMA_IRQ)

    # -- lifecycle ---------------------------------------------------------------------
    def reset(self) -> None:
        self._power_on()
        self._update_intx()

    def stop(self) -> None:
        """Nothing runs in the background: factorial and DMA complete in the MMIO write."""
