"""QEMU's edu device model: registers, interrupts, and DMA through a real I/O
page table into real memory."""

from __future__ import annotations

import pytest
from devhelp import IrqLog, Port
from memhelp import RW, Memory, R

from iommufd_cuse.vfio.pci import config as C
from iommufd_cuse.vfio.pci.edu import BUF_SIZE, BUF_START, Edu, factorial32

IOVA = 0x400000  # where tests map memory page 0 (as the reference probe did)


def make(port: Port, irq: IrqLog, **kw) -> Edu:
    spawned = []
    edu = Edu(port, irq, spawned.append, **kw)
    port.model = edu
    assert not spawned
    return edu


@pytest.fixture
def edu(port: Port, irq: IrqLog) -> Edu:
    e = make(port, irq)
    e.config.enable_device()
    e.config.write(C.PCI_COMMAND, 2, e.config.command | C.PCI_COMMAND_MASTER)
    return e


def rd(edu: Edu, off: int, size: int = 4) -> int:
    return edu.mmio_read(0, off, size)


def wr(edu: Edu, off: int, value: int, size: int = 4) -> None:
    edu.mmio_write(0, off, size, value)


def dma(edu: Edu, src: int, dst: int, count: int, cmd: int) -> None:
    wr(edu, 0x80, src, 8)
    wr(edu, 0x88, dst, 8)
    wr(edu, 0x90, count, 8)
    wr(edu, 0x98, cmd | 1)
    assert rd(edu, 0x98) & 1 == 0  # done when the write returns


def pattern(n: int, seed: int = 3) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def test_identity_and_reference_config(edu: Edu) -> None:
    # shared/reference: vendor 0x1234 device 0x11e8, CONFIG size 0x100, BAR0 0x100000,
    # MSI count 1, ident 0x010000ed, liveness(0x12345678) = 0xedcba987
    cfg = edu.config
    assert cfg.read(0, 2) == 0x1234 and cfg.read(2, 2) == 0x11E8
    assert cfg.size == 0x100
    assert edu.bars[0].size == 0x100000 and not edu.bars[0].is_64 and not edu.bars[0].prefetchable
    msi = cfg.cap_offset(C.PCI_CAP_ID_MSI)
    assert msi == 0x40 and cfg.read(msi + 2, 2) & C.PCI_MSI_FLAGS_QMASK == 0  # one vector
    assert cfg.read(C.PCI_COMMAND, 2) == 0x0107
    assert rd(edu, 0x00) == 0x010000ED
    wr(edu, 0x04, 0x12345678)
    assert rd(edu, 0x04) == 0xEDCBA987
    wr(edu, 0x00, 0)
    assert rd(edu, 0x00) == 0x010000ED


def test_access_sizes(edu: Edu) -> None:
    # below 0x80 only 4-byte accesses; from 0x80 4 or 8
    assert rd(edu, 0x00, 2) == 0xFFFF
    assert rd(edu, 0x00, 8) == (1 << 64) - 1
    wr(edu, 0x04, 0x1, 2)
    wr(edu, 0x04, 0x1, 8)
    assert rd(edu, 0x04) == 0  # power-on value, untouched
    assert rd(edu, 0x0C) == 0xFFFFFFFF  # nothing there
    assert rd(edu, 0x60) == 0xFFFFFFFF  # write-only
    wr(edu, 0x80, 0x1122334455667788, 8)
    assert rd(edu, 0x80, 8) == 0x1122334455667788
    assert rd(edu, 0x80, 4) == 0x55667788
    assert rd(edu, 0x84, 4) == 0xFFFFFFFF  # no register at 0x84
    assert rd(edu, 0x80, 2) == 0xFFFF
    wr(edu, 0x80, 0xAABBCCDD, 4)  # a 4-byte write replaces the whole register
    assert rd(edu, 0x80, 8) == 0xAABBCCDD
    wr(edu, 0x80, 0x1, 2)
    assert rd(edu, 0x80, 8) == 0xAABBCCDD
    assert edu.mmio_read(1, 0, 4) == 0xFFFFFFFF


def test_factorial(edu: Edu, irq: IrqLog) -> None:
    for n, want in ((0, 1), (1, 1), (5, 120), (12, 479001600), (13, 6227020800 % (1 << 32)), (34, 0), (1 << 31, 0)):
        wr(edu, 0x08, n)
        assert rd(edu, 0x20) & 0x01 == 0
        assert rd(edu, 0x08) == want, n
    assert factorial32(20) == 2432902008176640000 % (1 << 32)
    assert irq.events == []
    wr(edu, 0x20, 0x80 | 0x01)  # raise an interrupt after factorial; computing is RO
    assert rd(edu, 0x20) == 0x80
    wr(edu, 0x08, 4)
    assert rd(edu, 0x08) == 24
    assert rd(edu, 0x24) == 0x1
    assert irq.events == [("intx", True)]
    wr(edu, 0x20, 0)
    assert rd(edu, 0x20) == 0


def test_intx_raise_ack(edu: Edu, irq: IrqLog) -> None:
    wr(edu, 0x60, 0x5)
    assert rd(edu, 0x24) == 0x5 and irq.level
    assert edu.config.status & C.PCI_STATUS_INTERRUPT
    wr(edu, 0x64, 0x1)
    assert rd(edu, 0x24) == 0x4 and irq.level  # level stays while status != 0
    wr(edu, 0x60, 0x4)  # already asserted: no new edge
    assert irq.events == [("intx", True)]
    # INTx disable in the command register takes the line down, not the status
    edu.config.write(C.PCI_COMMAND, 2, edu.config.command | C.PCI_COMMAND_INTX_DISABLE)
    assert not irq.level and rd(edu, 0x24) == 0x4
    assert edu.config.status & C.PCI_STATUS_INTERRUPT
    edu.config.write(C.PCI_COMMAND, 2, edu.config.command & ~C.PCI_COMMAND_INTX_DISABLE)
    assert irq.level
    wr(edu, 0x64, 0xFFFFFFFF)
    assert rd(edu, 0x24) == 0 and not irq.level
    assert not edu.config.status & C.PCI_STATUS_INTERRUPT
    assert irq.events == [("intx", True), ("intx", False), ("intx", True), ("intx", False)]


def test_msi(edu: Edu, irq: IrqLog) -> None:
    msi = edu.config.cap_offset(C.PCI_CAP_ID_MSI)
    edu.config.write(msi + 4, 4, 0xFEE00000)
    edu.config.write(msi + 12, 2, 0x4021)
    edu.config.write(msi + 2, 2, 1)
    assert edu.config.msi_enabled
    wr(edu, 0x60, 0x10)
    wr(edu, 0x60, 0x20)  # every raise sends a message, as QEMU's edu does
    assert irq.events == [("msi", 0), ("msi", 0)]
    assert rd(edu, 0x24) == 0x30
    wr(edu, 0x64, 0x30)
    wr(edu, 0x60, 0)  # status 0: nothing
    assert irq.events == [("msi", 0), ("msi", 0)]
    # MSI off again: a pending status shows on INTx
    wr(edu, 0x60, 0x1)
    edu.config.write(msi + 2, 2, 0)
    assert irq.events[-1] == ("intx", True)


def test_dma_ram_to_edu_to_ram(edu: Edu, mem: Memory, irq: IrqLog) -> None:
    mem.map(IOVA, 0, 4)
    data = pattern(2048)
    mem.put(1, data)
    # shared/reference: src=0x401000 dst=0x40000 cnt=2048 cmd=0x0 (cmd now 0x0)
    dma(edu, IOVA + 0x1000, BUF_START, 2048, 0)
    assert rd(edu, 0x98) == 0
    assert bytes(edu.buffer[:2048]) == data
    assert edu.mmio_read(0, BUF_START, 4) == int.from_bytes(data[:4], "little")
    # then edu -> RAM: cmd now 0x2
    dma(edu, BUF_START, IOVA + 0x2000, 2048, 2)
    assert rd(edu, 0x98) == 2
    assert mem.get(2, 2048) == data
    assert mem.get(2, 2048, 2048) == bytes(2048)
    assert irq.events == [] and edu.fault_count == 0 and edu.range_errors == 0
    # interrupt 0x100 when asked
    dma(edu, BUF_START + 16, IOVA + 0x3000, 16, 2 | 4)
    assert mem.get(3, 16) == data[16:32]
    assert rd(edu, 0x24) == 0x100 and irq.events == [("intx", True)]


def test_dma_to_the_end_of_the_buffer_is_valid(edu: Edu, mem: Memory) -> None:
    mem.map(IOVA, 0, 2)
    data = pattern(BUF_SIZE, 9)
    mem.put(0, data)
    dma(edu, IOVA, BUF_START, BUF_SIZE, 0)  # the whole buffer, ending exactly at 0x41000
    assert bytes(edu.buffer) == data
    dma(edu, BUF_START + BUF_SIZE - 0x100, IOVA + 0x1000, 0x100, 2)  # the last 256 bytes
    assert mem.get(1, 0x100) == data[-0x100:]
    assert edu.range_errors == 0 and edu.fault_count == 0


@pytest.mark.parametrize(
    "dev,count",
    [
        (BUF_START + BUF_SIZE - 0xFF, 0x100),
        (BUF_START - 1, 0x10),
        (0, 0x10),
        (BUF_START, BUF_SIZE + 1),
        (BUF_START, 1 << 63),
    ],
)
def test_dma_outside_the_buffer_is_refused(edu: Edu, mem: Memory, irq: IrqLog, dev: int, count: int) -> None:
    mem.map(IOVA, 0, 2)
    mem.put(0, pattern(PAGE := 4096))
    edu.buffer[:] = pattern(BUF_SIZE, 5)
    dma(edu, IOVA, dev, count, 4)  # RAM -> edu
    dma(edu, dev, IOVA + 0x1000, count, 2 | 4)  # edu -> RAM
    assert bytes(edu.buffer) == pattern(BUF_SIZE, 5)
    assert mem.get(1, PAGE) == bytes(PAGE)
    assert edu.range_errors == 2 and edu.fault_count == 0
    assert rd(edu, 0x98) == 0x6  # the command completed (start bit clear), interrupt raised
    assert rd(edu, 0x24) == 0x100


def test_dma_mask(port: Port, mem: Memory, irq: IrqLog) -> None:
    high = 1 << 28  # just above the default 28-bit mask
    mem.map(high, 0, 1)
    mem.map(high - 0x1000, 1, 1)
    mem.put(0, pattern(4096, 1))
    mem.put(1, pattern(4096, 2))
    for kw, ok in (({}, False), ({"dma_mask_bits": 29}, True), ({"dma_mask": (1 << 32) - 1}, True)):
        edu = make(port, irq, **kw)
        edu.config.write(C.PCI_COMMAND, 2, 0x6)
        dma(edu, high, BUF_START, 64, 0)
        assert (bytes(edu.buffer[:64]) == pattern(64, 1)) is ok
        assert edu.range_errors == (0 if ok else 1)
        # a transfer that starts under the mask but ends above it
        dma(edu, high - 32, BUF_START + 0x100, 64, 0)
        assert (bytes(edu.buffer[0x100:0x140]) == pattern(4096, 2)[-32:] + pattern(32, 1)) is ok
        assert edu.range_errors == (0 if ok else 2)
    with pytest.raises(ValueError):
        make(port, irq, dma_mask_bits=0)


def test_dma_fault_unmapped_source_leaves_buffer(edu: Edu, mem: Memory, irq: IrqLog) -> None:
    mem.map(IOVA, 0, 1)  # IOVA+0x1000 is not mapped
    mem.put(0, pattern(4096, 4))
    before = pattern(BUF_SIZE, 6)
    edu.buffer[:] = before
    dma(edu, IOVA + 0x800, BUF_START, 0x1000, 4)  # crosses into the unmapped page
    assert bytes(edu.buffer) == before  # unchanged: not even the mapped half
    assert edu.fault_count == 1
    f = edu.faults[0]
    assert (f.iova, f.write) == (IOVA + 0x1000, False)
    assert "translation" in f.reason
    assert rd(edu, 0x98) == 0x4 and rd(edu, 0x24) == 0x100  # completes as on QEMU


def test_dma_fault_unmapped_destination_touches_nothing(edu: Edu, mem: Memory) -> None:
    mem.map(IOVA, 0, 1)
    snapshot = bytes(mem.mm)
    edu.buffer[:] = pattern(BUF_SIZE, 8)
    # shared/reference: dma to unmapped iova 0x8000000: data must not appear anywhere
    dma(edu, BUF_START, 0x8000000, 256, 2)
    assert bytes(mem.mm) == snapshot
    assert [(f.iova, f.write) for f in edu.faults] == [(0x8000000, True)]
    # after unmap, DMA to the old address faults and does not land
    dma(edu, BUF_START, IOVA, 256, 2)
    assert mem.get(0, 256) == pattern(256, 8)
    mem.unmap(IOVA)
    mem.put(0, bytes(256))
    dma(edu, BUF_START, IOVA, 256, 2)
    assert mem.get(0, 256) == bytes(256)
    assert edu.fault_count == 2 and edu.faults[-1].iova == IOVA


def test_dma_fault_read_only_mapping(edu: Edu, mem: Memory) -> None:
    mem.map(IOVA, 0, 1, R)
    mem.put(0, pattern(64, 2))
    dma(edu, IOVA, BUF_START, 64, 0)  # reading is allowed
    assert bytes(edu.buffer[:64]) == pattern(64, 2)
    edu.buffer[:64] = bytes(64)
    dma(edu, BUF_START, IOVA, 64, 2)
    assert mem.get(0, 64) == pattern(64, 2)
    assert [(f.iova, f.write) for f in edu.faults] == [(IOVA, True)]
    assert "permission" in edu.faults[0].reason


def test_bus_master_gates_dma(port: Port, mem: Memory, irq: IrqLog) -> None:
    edu = make(port, irq)
    edu.config.enable_device()  # 0x0103: no bus master
    mem.map(IOVA, 0, 1, RW)
    mem.put(0, pattern(32))
    dma(edu, IOVA, BUF_START, 32, 0)
    assert bytes(edu.buffer[:32]) == bytes(32)
    assert edu.fault_count == 1 and edu.faults[0].reason == "bus master disabled"
    edu.config.write(C.PCI_COMMAND, 2, 0x0107)
    dma(edu, IOVA, BUF_START, 32, 0)
    assert bytes(edu.buffer[:32]) == pattern(32)


def test_mmio_buffer_window(edu: Edu) -> None:
    edu.mmio_write(0, BUF_START, 8, 0x0807060504030201)
    edu.mmio_write(0, BUF_START + 8, 1, 0x09)
    edu.mmio_write(0, BUF_START + BUF_SIZE - 2, 2, 0xBEEF)
    assert bytes(edu.buffer[:9]) == bytes(range(1, 10))
    assert edu.mmio_read(0, BUF_START + 1, 2) == 0x0302
    assert edu.mmio_read(0, BUF_START + BUF_SIZE - 2, 2) == 0xBEEF
    assert edu.mmio_read(0, BUF_START + BUF_SIZE - 2, 4) == 0xFFFFFFFF  # runs past the window
    assert edu.mmio_read(0, BUF_START + BUF_SIZE, 4) == 0xFFFFFFFF


def test_reset(edu: Edu, mem: Memory, irq: IrqLog) -> None:
    wr(edu, 0x04, 1)
    wr(edu, 0x08, 5)
    wr(edu, 0x20, 0x80)
    wr(edu, 0x60, 0x3)
    wr(edu, 0x80, 0x1234, 8)
    wr(edu, 0x90, 0x10, 8)
    edu.buffer[:4] = b"abcd"
    assert irq.level
    edu.reset()
    assert not irq.level
    for off in (0x04, 0x08, 0x20, 0x24, 0x80, 0x88, 0x90, 0x98):
        assert rd(edu, off) == 0, hex(off)
    assert rd(edu, 0x00) == 0x010000ED
    assert bytes(edu.buffer) == bytes(BUF_SIZE)
    assert edu.config.bus_master  # config space is not the model's reset
    edu.config.reset()
    assert edu.config.command == 0
    edu.stop()
