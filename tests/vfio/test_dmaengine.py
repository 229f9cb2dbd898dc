"""The dma-engine model: a descriptor ring fetched by DMA through a real I/O page
table, copies into real memory, completion and fault interrupts, the fault
log, and the engine task's lifetime (reset/stop while a copy is in flight)."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing
from devhelp import IrqLog, Port
from iommufd_cuse._native import ffi, lib
from memhelp import PAGE, Memory, R

from iommufd_cuse.vfio.pci import config as C
from iommufd_cuse.vfio.pci import dmaengine as D
from iommufd_cuse.vfio.pci.dmaengine import DmaEngine
from iommufd_cuse.vfio.pci.model import DmaFault

RING = 0x100000  # iova of the ring: memory page 0
SRC = 0x200000  # source buffers: memory pages 8..23
DST = 0x300000  # destination buffers: memory pages 24..39
SRC_PAGE, DST_PAGE, NPAGES = 8, 24, 16


def desc(src: int, dst: int, length: int, flags: int = 0, status: int = 0, cookie: int = 0) -> bytes:
    return D.DESC.pack(src, dst, length, flags, status, cookie)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 13 + seed * 101 + (i >> 8)) & 0xFF for i in range(n))


class Spawner:
    """spawn() for the model: starts tasks in a nursery, counting them."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.started = 0
        self.running = 0
        self.max_running = 0

    def __call__(self, fn) -> None:
        self.started += 1

        async def run() -> None:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            try:
                await fn()
            finally:
                self.running -= 1

        self.nursery.start_soon(run)


class GatedPort(Port):
    """A port whose copies can be held in the worker thread (uncancellable, like
    a real copy in flight) until the test lets them go."""

    def __init__(self, mem: Memory) -> None:
        super().__init__(mem)
        self.gate: threading.Event | None = None
        self.in_copy = 0

    async def copy(self, src_iova: int, dst_iova: int, length: int) -> None:
        gate = self.gate
        if gate is None:
            return await super().copy(src_iova, dst_iova, length)
        self._check(src_iova, False)
        self._check(dst_iova, True)
        self.copies += 1
        self.in_copy += 1
        fault = ffi.new("uint64_t *")
        is_dst = ffi.new("int *")
        mem = self.mem

        def held_copy() -> int:
            gate.wait()
            return lib.icuse_dma_copy(mem.store, mem.pt, src_iova, mem.pt, dst_iova, length, fault, is_dst)

        try:
            # one uncancellable thread call that returns straight to the engine
            rc = await trio.to_thread.run_sync(held_copy)
        finally:
            self.in_copy -= 1
        if rc < 0:
            raise DmaFault(fault[0], bool(is_dst[0]), f"error {-rc}")


class Rig:
    def __init__(self, mem: Memory, port: GatedPort, irq: IrqLog, spawner: Spawner) -> None:
        self.mem, self.port, self.irq, self.spawner = mem, port, irq, spawner
        self.eng = DmaEngine(port, irq, spawner)
        port.model = self.eng
        cfg = self.eng.config
        cfg.enable_device()
        cfg.write(C.PCI_COMMAND, 2, cfg.command | C.PCI_COMMAND_MASTER)
        mem.map(RING, 0, 1)
        mem.map(SRC, SRC_PAGE, NPAGES)
        mem.map(DST, DST_PAGE, NPAGES)

    def rd(self, off: int, size: int = 4, bar: int = 0) -> int:
        return self.eng.mmio_read(bar, off, size)

    def wr(self, off: int, value: int, size: int = 4, bar: int = 0) -> None:
        self.eng.mmio_write(bar, off, size, value)

    def msix(self, enable: bool = True, masked: bool = False) -> None:
        x = self.eng.config.cap_offset(C.PCI_CAP_ID_MSIX)
        self.eng.config.write(x + 2, 2, (0x8000 if enable else 0) | (0x4000 if masked else 0))

    def setup(self, size: int = 16, base: int = RING, control: int = D.CTL_DONE_IRQ | D.CTL_FAULT_IRQ) -> None:
        self.wr(D.REG_RING_BASE_LO, base, 8)
        self.wr(D.REG_RING_SIZE, size)
        self.wr(D.REG_CONTROL, D.CTL_ENABLE | control)

    def put_desc(self, index: int, d: bytes) -> None:
        self.mem.put(0, d, index * D.DESC_SIZE)

    def desc_status(self, index: int) -> int:
        return int.from_bytes(self.mem.get(0, 4, index * D.DESC_SIZE + D.DESC_STATUS_OFFSET), "little")

    def fault_record(self, slot: int) -> tuple[int, int, int, int]:
        base = D.FAULT_LOG_BASE + slot * D.FAULT_RECORD_SIZE
        return (self.rd(base, 8), self.rd(base + 8), self.rd(base + 12), self.rd(base + 16))

    async def settle(self) -> None:
        with trio.fail_after(10):
            while self.eng.status & D.ST_BUSY or self.spawner.running:
                await trio.sleep(0.001)


@pytest.fixture
async def rig(mem: Memory, irq: IrqLog, nursery: trio.Nursery) -> Rig:
    return Rig(mem, GatedPort(mem), irq, Spawner(nursery))


async def test_identity_and_config(rig: Rig) -> None:
    assert rig.rd(D.REG_MAGIC) == 0x45414D44
    assert rig.rd(D.REG_MAGIC, 8) == D.VERSION << 32 | 0x45414D44
    assert rig.rd(D.REG_MAGIC, 1) == ord("D") and rig.rd(D.REG_MAGIC + 1, 1) == ord("M")
    assert rig.rd(D.REG_CAPS) == 16 | 32 << 8 | 16 << 16 | 2 << 24
    cfg = rig.eng.config
    assert (cfg.read(0, 2), cfg.read(2, 2)) == (0x1DE5, 0x0001)
    assert cfg.size == 4096 and cfg.cap_offset(C.PCI_CAP_ID_EXP) is not None
    x = cfg.cap_offset(C.PCI_CAP_ID_MSIX)
    assert cfg.read(x + 2, 2) == 1  # two vectors
    assert cfg.read(x + 4, 4) == 0x000 | 2 and cfg.read(x + 8, 4) == 0x800 | 2
    assert cfg.read(C.PCI_BASE_ADDRESS_0, 4) == 0x4 and cfg.read(C.PCI_BASE_ADDRESS_0 + 8, 4) == 0x4
    assert rig.rd(0x0, bar=2) == 0xFFFFFFFF  # the vector table is the host's
    assert rig.rd(0x800, bar=2) == 0  # PBA
    assert rig.rd(D.REG_STATUS) == 0 and rig.rd(D.REG_HEAD) == 0


async def test_single_copy(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.msix()
    data = pattern(3000)
    mem.put(SRC_PAGE, data)
    rig.put_desc(0, desc(SRC, DST + 100, len(data), D.DESC_IRQ, cookie=0xC0FFEE))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert mem.get(DST_PAGE, len(data), 100) == data
    assert mem.get(DST_PAGE, 100) == bytes(100)
    assert mem.get(DST_PAGE, 100, 100 + len(data)) == bytes(100)
    assert rig.desc_status(0) == D.DESC_ST_DONE
    assert D.DESC.unpack(mem.get(0, 32))[5] == 0xC0FFEE  # the cookie is the driver's
    assert (rig.rd(D.REG_HEAD), rig.rd(D.REG_TAIL), rig.rd(D.REG_COMPLETED)) == (1, 1, 1)
    assert rig.rd(D.REG_STATUS) == 0
    assert rig.rd(D.REG_INT_STATUS) == D.INT_DONE
    assert irq.events == [("msi", 0)]
    rig.wr(D.REG_INT_STATUS, D.INT_DONE)
    assert rig.rd(D.REG_INT_STATUS) == 0


async def test_scatter_gather_chain(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    """Four pieces of a source gathered into scattered, non-contiguous memory."""
    rig.msix()
    # destination iova range DST2 maps memory pages in reverse order
    dst2 = 0x800000
    for i in range(4):
        mem.map(dst2 + i * PAGE, 43 - i, 1)
    data = pattern(4 * PAGE, 7)
    mem.put(SRC_PAGE, data)
    pieces = [(0, 5000), (5000, 123), (5123, 9000), (14123, 4 * PAGE - 14123)]
    for i, (off, n) in enumerate(pieces):
        last = i == len(pieces) - 1
        rig.put_desc(i, desc(SRC + off, dst2 + off, n, D.DESC_IRQ if last else D.DESC_CHAIN))
    rig.setup()
    rig.wr(D.REG_TAIL, 4)
    await rig.settle()
    got = b"".join(mem.get(43 - i, PAGE) for i in range(4))
    assert got == data
    assert [rig.desc_status(i) for i in range(4)] == [0, 0, 0, D.DESC_ST_DONE]
    assert rig.rd(D.REG_COMPLETED) == 1 and rig.rd(D.REG_HEAD) == 4
    assert irq.events == [("msi", 0)]


async def test_ring_wraps(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.msix()
    mem.put(SRC_PAGE, pattern(PAGE, 3))
    rig.setup(size=4)
    for n, batch in enumerate(([0, 1, 2], [3, 0, 1])):
        for i in batch:
            k = n * 3 + batch.index(i)
            rig.put_desc(i, desc(SRC + 16 * k, DST + 16 * k, 16, D.DESC_IRQ if k % 2 else 0))
        rig.wr(D.REG_TAIL, (batch[-1] + 1) % 4)
        await rig.settle()
    assert mem.get(DST_PAGE, 96) == pattern(PAGE, 3)[:96]
    assert (rig.rd(D.REG_HEAD), rig.rd(D.REG_TAIL), rig.rd(D.REG_COMPLETED)) == (2, 2, 6)
    assert irq.msis() == [0, 0, 0]
    rig.wr(D.REG_TAIL, 6)  # beyond the ring: taken modulo its size
    assert rig.rd(D.REG_TAIL) == 2


async def test_interrupt_enables(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.msix()
    rig.put_desc(0, desc(SRC, DST, 8, 0))  # no IRQ flag
    rig.put_desc(1, desc(SRC, DST, 8, D.DESC_IRQ))
    rig.put_desc(2, desc(SRC, DST, 0, D.DESC_IRQ))  # zero length completes too
    rig.setup(control=0)  # completion interrupts off
    rig.wr(D.REG_TAIL, 2)
    await rig.settle()
    assert rig.rd(D.REG_COMPLETED) == 2 and irq.events == [] and rig.rd(D.REG_INT_STATUS) == 0
    rig.wr(D.REG_CONTROL, D.CTL_ENABLE | D.CTL_DONE_IRQ)
    rig.wr(D.REG_TAIL, 3)
    await rig.settle()
    assert rig.desc_status(2) == D.DESC_ST_DONE and irq.events == [("msi", 0)]


async def test_fault_on_descriptor_fetch(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.msix()
    snapshot = bytes(mem.mm)
    ring = 0x5000000  # not mapped
    rig.setup(base=ring)
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert rig.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_NO_TRANSLATION << 8
    assert rig.rd(D.REG_HEAD) == 0 and rig.rd(D.REG_COMPLETED) == 0
    assert rig.rd(D.REG_FAULT_COUNT) == 1
    assert rig.fault_record(0) == (ring, 0, D.SRC_FETCH << 4 | D.ERR_NO_TRANSLATION << 8, 1)
    assert rig.fault_record(1) == (0, 0, 0, 0)
    assert rig.rd(D.REG_INT_STATUS) == D.INT_FAULT
    assert irq.events == [("msi", 1)]
    assert bytes(mem.mm) == snapshot
    assert [(f.iova, f.write) for f in rig.eng.faults] == [(ring, False)]


async def test_fault_on_source_then_retry(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.msix()
    src = 0x6000000  # not mapped yet
    mem.put(44, pattern(PAGE, 5))
    rig.put_desc(0, desc(src, DST, PAGE, D.DESC_IRQ))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert mem.page(DST_PAGE) == bytes(PAGE)  # nothing landed
    assert rig.desc_status(0) == D.DESC_ST_ERROR | D.ERR_NO_TRANSLATION << 8 | D.SRC_READ << 16
    assert rig.fault_record(0) == (src, 0, D.SRC_READ << 4 | D.ERR_NO_TRANSLATION << 8, 1)
    assert irq.msis() == [1]
    # the driver maps the buffer and clears the halt: the same descriptor runs again
    mem.map(src, 44, 1)
    rig.wr(D.REG_STATUS, D.ST_HALTED)
    await rig.settle()
    assert mem.page(DST_PAGE) == pattern(PAGE, 5)
    assert rig.desc_status(0) == D.DESC_ST_DONE
    assert rig.rd(D.REG_STATUS) == 0 and rig.rd(D.REG_HEAD) == 1
    assert irq.msis() == [1, 0]


async def test_fault_part_way_through_the_source(rig: Rig, mem: Memory) -> None:
    # source: one mapped page, then an unmapped one; the copy stops at the fault
    src = 0x7000000
    mem.map(src, 45, 1)
    mem.put(45, pattern(PAGE, 6))
    rig.put_desc(0, desc(src + PAGE - 256, DST, 1024))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert rig.rd(D.REG_STATUS) >> 8 == D.ERR_NO_TRANSLATION
    assert rig.fault_record(0)[0] == src + PAGE  # the first faulting address
    # what the device copied before the fault landed, nothing after it
    assert mem.get(DST_PAGE, 256) == pattern(PAGE, 6)[-256:]
    assert mem.get(DST_PAGE, PAGE - 256, 256) == bytes(PAGE - 256)


async def test_fault_on_read_only_destination(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    dst = 0x9000000
    mem.map(dst, 46, 2, R)
    mem.put(SRC_PAGE, pattern(2 * PAGE, 8))
    rig.put_desc(0, desc(SRC, dst, 2 * PAGE))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert mem.page(46, 2) == bytes(2 * PAGE)
    info = D.SRC_WRITE << 4 | D.ERR_PERMISSION << 8 | 1  # a write
    assert rig.fault_record(0) == (dst, 0, info, 1)
    assert rig.desc_status(0) == D.DESC_ST_ERROR | D.ERR_PERMISSION << 8 | D.SRC_WRITE << 16
    assert rig.eng.faults[0].write
    # MSI-X off and INTx enabled: the fault shows on INTx
    assert irq.events == [("intx", True)]


async def test_fault_on_status_write_back(rig: Rig, mem: Memory) -> None:
    ring = 0xA000000
    mem.map(ring, 47, 1, R)  # the device can read descriptors but not write status
    mem.put(47, desc(SRC, DST, 64, D.DESC_IRQ))
    mem.put(SRC_PAGE, pattern(64, 9))
    rig.setup(base=ring)
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert rig.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_PERMISSION << 8
    assert rig.fault_record(0) == (ring + D.DESC_STATUS_OFFSET, 0, D.SRC_WRITEBACK << 4 | D.ERR_PERMISSION << 8 | 1, 1)
    assert rig.rd(D.REG_HEAD) == 0 and rig.rd(D.REG_COMPLETED) == 0
    assert mem.get(47, 32) == desc(SRC, DST, 64, D.DESC_IRQ)


async def test_bus_master_off_faults(rig: Rig, mem: Memory) -> None:
    cfg = rig.eng.config
    cfg.write(C.PCI_COMMAND, 2, cfg.command & ~C.PCI_COMMAND_MASTER)
    rig.put_desc(0, desc(SRC, DST, 64))
    mem.put(SRC_PAGE, pattern(64))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert rig.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_BUS_MASTER << 8
    assert rig.eng.faults[0].reason == "bus master disabled"
    assert mem.page(DST_PAGE) == bytes(PAGE)
    cfg.write(C.PCI_COMMAND, 2, cfg.command | C.PCI_COMMAND_MASTER)
    rig.wr(D.REG_STATUS, D.ST_HALTED)
    await rig.settle()
    assert mem.get(DST_PAGE, 64) == pattern(64)


async def test_blocked_dma_faults(rig: Rig) -> None:
    rig.port.blocked = True
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert rig.rd(D.REG_STATUS) >> 8 == D.ERR_BLOCKED


async def test_fault_log_wraps_and_clears(rig: Rig) -> None:
    rig.setup(base=0x5000000, control=0)  # unmapped ring
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    for _ in range(17):
        rig.wr(D.REG_STATUS, D.ST_HALTED)  # retry: faults again
        await rig.settle()
    assert rig.rd(D.REG_FAULT_COUNT) == 18
    assert [rig.fault_record(s)[3] for s in range(16)] == [17, 18] + list(range(3, 17))
    assert rig.eng.fault_total == 18
    rig.wr(D.REG_FAULT_CTRL, D.FAULT_CTRL_CLEAR)
    assert rig.rd(D.REG_FAULT_COUNT) == 0
    assert all(rig.fault_record(s) == (0, 0, 0, 0) for s in range(16))
    assert rig.rd(D.REG_STATUS) & D.ST_HALTED  # clearing the log does not clear the halt


async def test_intx_when_msix_is_off(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.put_desc(0, desc(SRC, DST, 8, D.DESC_IRQ))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert irq.events == [("intx", True)]
    assert rig.eng.config.status & C.PCI_STATUS_INTERRUPT
    rig.wr(D.REG_INT_STATUS, D.INT_DONE)
    assert irq.events == [("intx", True), ("intx", False)]
    assert not rig.eng.config.status & C.PCI_STATUS_INTERRUPT


async def test_msix_function_mask_holds_messages(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.msix(masked=True)
    rig.put_desc(0, desc(SRC, DST, 8, D.DESC_IRQ))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert irq.events == []
    assert rig.rd(0x800, bar=2) == 1  # pending bit of vector 0
    rig.msix()  # unmask: the pending message goes out
    assert irq.events == [("msi", 0)]
    assert rig.rd(0x800, bar=2) == 0


async def test_reset_during_a_copy(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.msix()
    rig.port.gate = threading.Event()
    mem.put(SRC_PAGE, pattern(NPAGES * PAGE, 2))
    rig.put_desc(0, desc(SRC, DST, NPAGES * PAGE, D.DESC_IRQ))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    with trio.fail_after(5):
        while not rig.port.in_copy:
            await trio.sleep(0.001)
    assert rig.rd(D.REG_STATUS) & D.ST_BUSY
    rig.eng.reset()
    # power-on registers at once, though the copy is still in flight
    for off in (D.REG_CONTROL, D.REG_RING_BASE_LO, D.REG_RING_SIZE, D.REG_HEAD, D.REG_TAIL, D.REG_COMPLETED):
        assert rig.rd(off) == 0
    # the device is usable again while the old task is still held
    rig.put_desc(1, desc(SRC, DST + NPAGES * PAGE - 64, 64, D.DESC_IRQ))
    rig.wr(D.REG_RING_BASE_LO, RING + 32, 8)
    rig.wr(D.REG_RING_SIZE, 16)
    rig.wr(D.REG_CONTROL, D.CTL_ENABLE | D.CTL_DONE_IRQ)
    rig.wr(D.REG_TAIL, 1)
    await trio.sleep(0.01)
    assert rig.spawner.started == 1  # never two engine tasks at once
    rig.port.gate.set()
    await rig.settle()
    assert rig.spawner.started == 2 and rig.spawner.max_running == 1
    # the old descriptor was forgotten: no status, no completion, no interrupt for it
    assert rig.desc_status(0) == 0
    assert rig.desc_status(1) == D.DESC_ST_DONE
    assert rig.rd(D.REG_COMPLETED) == 1 and rig.rd(D.REG_HEAD) == 1
    assert irq.events == [("msi", 0)]


async def test_reset_cancels_a_waiting_engine(rig: Rig, mem: Memory, nursery: trio.Nursery) -> None:
    """A task cancelled before its copy started moves no data at all."""
    release = trio.Event()
    copies = []

    async def slow_copy(src: int, dst: int, n: int) -> None:
        await release.wait()  # cancellable
        copies.append((src, dst, n))

    rig.port.copy = slow_copy  # type: ignore[method-assign]
    rig.put_desc(0, desc(SRC, DST, 64))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.spawner.running == 1
    rig.eng.reset()
    await rig.settle()
    release.set()
    await trio.testing.wait_all_tasks_blocked()
    assert copies == [] and rig.desc_status(0) == 0 and rig.spawner.running == 0


async def test_stop(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.port.gate = threading.Event()
    rig.put_desc(0, desc(SRC, DST, 64, D.DESC_IRQ))
    rig.put_desc(1, desc(SRC, DST, 64, D.DESC_IRQ))
    rig.setup()
    rig.wr(D.REG_RING_SIZE, 99)  # ignored: the ring is fixed while enabled
    assert rig.rd(D.REG_RING_SIZE) == 16
    rig.wr(D.REG_TAIL, 2)
    with trio.fail_after(5):
        while not rig.port.in_copy:
            await trio.sleep(0.001)
    rig.eng.stop()
    rig.port.gate.set()
    await rig.settle()
    assert not rig.rd(D.REG_CONTROL) & D.CTL_ENABLE
    assert rig.rd(D.REG_COMPLETED) == 0 and rig.desc_status(0) == 0 and rig.desc_status(1) == 0
    assert irq.events == []


async def test_disable_finishes_the_current_descriptor(rig: Rig, mem: Memory) -> None:
    rig.port.gate = threading.Event()
    for i in range(3):
        rig.put_desc(i, desc(SRC, DST, 64))
    rig.setup()
    rig.wr(D.REG_TAIL, 3)
    with trio.fail_after(5):
        while not rig.port.in_copy:
            await trio.sleep(0.001)
    rig.wr(D.REG_CONTROL, 0)
    rig.port.gate.set()
    await rig.settle()
    assert rig.rd(D.REG_HEAD) == 1 and rig.desc_status(0) == D.DESC_ST_DONE and rig.desc_status(1) == 0
    rig.port.gate = None
    rig.wr(D.REG_CONTROL, D.CTL_ENABLE)  # enabling again carries on
    await rig.settle()
    assert rig.rd(D.REG_HEAD) == 3 and rig.rd(D.REG_COMPLETED) == 3


@pytest.mark.parametrize(
    "d",
    [
        desc(SRC, DST, 8, 1 << 5),  # unknown flag
        desc((1 << 64) - 4, DST, 8),  # source wraps
        desc(SRC, (1 << 64) - 4, 8),  # destination wraps
    ],
)
async def test_bad_descriptor(rig: Rig, irq: IrqLog, d: bytes) -> None:
    rig.msix()
    rig.put_desc(0, d)
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert rig.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_BAD_DESCRIPTOR << 8
    assert rig.desc_status(0) == D.DESC_ST_ERROR | D.ERR_BAD_DESCRIPTOR << 8 | D.SRC_FETCH << 16
    assert rig.fault_record(0) == (RING, 0, D.ERR_BAD_DESCRIPTOR << 8, 1)
    assert irq.events == [("msi", 1)] and rig.port.copies == 0


@pytest.mark.parametrize("size", [0, 1, 3, 100, 1 << 17])
async def test_bad_ring_size(rig: Rig, irq: IrqLog, size: int) -> None:
    rig.msix()
    rig.setup(size=size)
    assert rig.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_BAD_RING << 8
    assert irq.events == [("msi", 1)]
    rig.wr(D.REG_TAIL, 1)
    rig.wr(D.REG_STATUS, D.ST_HALTED)  # clearing the halt does not make the ring usable
    await rig.settle()
    assert rig.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_BAD_RING << 8
    assert irq.events == [("msi", 1), ("msi", 1)] and rig.spawner.started == 0
    assert rig.rd(D.REG_FAULT_COUNT) == 2 and rig.fault_record(1)[2] == D.SRC_CONFIG << 4 | D.ERR_BAD_RING << 8
    rig.wr(D.REG_CONTROL, 0)  # disabling clears the halt
    assert rig.rd(D.REG_STATUS) == 0
    rig.wr(D.REG_RING_SIZE, 2)
    rig.wr(D.REG_CONTROL, D.CTL_ENABLE)
    assert rig.rd(D.REG_STATUS) == 0


async def test_flr_through_config_space(rig: Rig) -> None:
    rig.setup()
    rig.wr(D.REG_TAIL, 0)
    e = rig.eng.config.cap_offset(C.PCI_CAP_ID_EXP)
    ctl = rig.eng.config.read(e + C.PCI_EXP_DEVCTL, 2)
    rig.eng.config.write(e + C.PCI_EXP_DEVCTL, 2, ctl | C.PCI_EXP_DEVCTL_BCR_FLR)
    assert rig.rd(D.REG_CONTROL) == 0 and rig.rd(D.REG_RING_SIZE) == 0 and rig.rd(D.REG_RING_BASE_LO) == 0
    assert rig.eng.config.bus_master  # config space itself kept, as vfio-pci's reset restores it


async def test_soft_reset_bit(rig: Rig) -> None:
    rig.setup()
    rig.wr(D.REG_CONTROL, D.CTL_RESET | D.CTL_ENABLE)
    assert rig.rd(D.REG_CONTROL) == 0 and rig.rd(D.REG_RING_SIZE) == 0


async def test_register_access_rules(rig: Rig) -> None:
    rig.wr(D.REG_RING_BASE_LO, 0x1234_5678_9ABC_DEFF, 8)
    assert rig.rd(D.REG_RING_BASE_LO, 8) == 0x1234_5678_9ABC_DEE0  # 32-byte aligned
    assert rig.rd(D.REG_RING_BASE_HI) == 0x12345678
    rig.wr(D.REG_RING_SIZE, 0x20, 2)  # sub-dword writes are dropped
    rig.wr(D.REG_RING_SIZE + 1, 0x20, 4)  # and unaligned ones
    assert rig.rd(D.REG_RING_SIZE) == 0
    assert rig.rd(D.REG_RING_BASE_HI, 2) == 0x5678 and rig.rd(D.REG_RING_BASE_HI + 2, 2) == 0x1234
    assert rig.rd(D.REG_MAGIC + 1, 2) == 0xFFFF  # unaligned read
    assert rig.rd(0x3FFC) == 0  # nothing there
    rig.wr(0x0, 0, bar=2)  # the vector table drops writes
    assert rig.rd(0x0, bar=2) == 0xFFFFFFFF


async def test_an_unexpected_port_error_halts_the_device_only(rig: Rig) -> None:
    async def broken_copy(src: int, dst: int, n: int) -> None:
        raise OSError("not a DmaFault")

    rig.port.copy = broken_copy  # type: ignore[method-assign]
    rig.put_desc(0, desc(SRC, DST, 64))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    await rig.settle()
    assert rig.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_OTHER << 8


# -- read-ahead and contiguous chains (the engine's batching) -----------------------------


async def test_contiguous_chain_is_copied_as_one_piece(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.msix()
    data = pattern(4 * PAGE, 11)
    mem.put(SRC_PAGE, data)
    for i in range(4):
        rig.put_desc(i, desc(SRC + i * PAGE, DST + i * PAGE, PAGE, D.DESC_CHAIN if i < 3 else D.DESC_IRQ))
    rig.put_desc(4, desc(SRC, DST + 4 * PAGE, 100, D.DESC_IRQ))  # the next transfer: a piece of its own
    rig.setup()
    rig.wr(D.REG_TAIL, 5)
    await rig.settle()
    assert mem.get(DST_PAGE, 4 * PAGE) == data and mem.get(DST_PAGE + 4, 100) == data[:100]
    assert rig.port.copies == 2
    assert [rig.desc_status(i) for i in range(5)] == [0, 0, 0, D.DESC_ST_DONE, D.DESC_ST_DONE]
    assert (rig.rd(D.REG_HEAD), rig.rd(D.REG_COMPLETED)) == (5, 2)
    assert irq.msis() == [0, 0]


async def test_overlapping_chain_is_copied_descriptor_by_descriptor(rig: Rig, mem: Memory) -> None:
    # each descriptor copies the previous one's destination on: merged, the result would differ
    mem.put(SRC_PAGE, pattern(PAGE, 12))
    for i in range(3):
        rig.put_desc(i, desc(SRC + i * 256, SRC + (i + 1) * 256, 256, D.DESC_CHAIN if i < 2 else 0))
    rig.setup()
    rig.wr(D.REG_TAIL, 3)
    await rig.settle()
    assert rig.port.copies == 3
    assert mem.get(SRC_PAGE, 4 * 256) == pattern(PAGE, 12)[:256] * 4


async def test_fault_inside_a_contiguous_chain(rig: Rig, mem: Memory, irq: IrqLog) -> None:
    rig.msix()
    dst = 0xB000000  # two pages mapped, the third not (yet)
    mem.map(dst, 48, 2)
    data = pattern(4 * 3000, 13)
    mem.put(SRC_PAGE, data)
    for i in range(4):
        rig.put_desc(i, desc(SRC + i * 3000, dst + i * 3000, 3000, D.DESC_CHAIN if i < 3 else D.DESC_IRQ))
    rig.setup()
    rig.wr(D.REG_TAIL, 4)
    await rig.settle()
    # the fault (dst + 2 pages) is in descriptor 2: HEAD there, as if done one by one
    assert rig.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_NO_TRANSLATION << 8
    assert rig.rd(D.REG_HEAD) == 2 and rig.rd(D.REG_COMPLETED) == 0
    assert rig.fault_record(0) == (dst + 2 * PAGE, 2, D.SRC_WRITE << 4 | D.ERR_NO_TRANSLATION << 8 | 1, 1)
    assert [rig.desc_status(i) for i in range(4)] == [
        0,
        0,
        D.DESC_ST_ERROR | D.ERR_NO_TRANSLATION << 8 | D.SRC_WRITE << 16,
        0,
    ]
    assert mem.get(48, 2 * PAGE) == data[: 2 * PAGE]  # everything before the fault landed
    assert irq.msis() == [1]
    # map the rest, clear the halt: descriptor 2 is retried, the transfer completes
    mem.map(dst + 2 * PAGE, 50, 1)
    rig.wr(D.REG_STATUS, D.ST_HALTED)
    await rig.settle()
    assert mem.get(48, 3 * PAGE)[: len(data)] == data
    assert rig.desc_status(3) == D.DESC_ST_DONE
    assert (rig.rd(D.REG_HEAD), rig.rd(D.REG_COMPLETED), rig.rd(D.REG_STATUS)) == (4, 1, 0)
    assert irq.msis() == [1, 0]


async def test_read_ahead_stops_at_a_ring_page(rig: Rig, mem: Memory) -> None:
    # a ring whose first two slots end one mapped page; the third is on an unmapped page
    page = 0xC000000
    mem.map(page, 51, 1)
    ring = page + PAGE - 2 * D.DESC_SIZE
    mem.put(SRC_PAGE, pattern(256, 14))
    for i in range(2):
        mem.put(51, desc(SRC + 128 * i, DST + 128 * i, 128, D.DESC_IRQ), PAGE - (2 - i) * D.DESC_SIZE)
    rig.setup(base=ring)
    rig.wr(D.REG_TAIL, 3)
    await rig.settle()
    # the two on the mapped page are done; the fetch fault is taken on the third
    assert mem.get(DST_PAGE, 256) == pattern(256, 14)
    assert (rig.rd(D.REG_HEAD), rig.rd(D.REG_COMPLETED)) == (2, 2)
    assert rig.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_NO_TRANSLATION << 8
    assert rig.fault_record(0) == (page + PAGE, 2, D.SRC_FETCH << 4 | D.ERR_NO_TRANSLATION << 8, 1)


async def test_status_is_idle_right_after_a_reset_during_a_copy(rig: Rig, mem: Memory) -> None:
    rig.port.gate = threading.Event()
    rig.put_desc(0, desc(SRC, DST, NPAGES * PAGE, D.DESC_IRQ))
    rig.setup()
    rig.wr(D.REG_TAIL, 1)
    with trio.fail_after(5):
        while not rig.port.in_copy:
            await trio.sleep(0.001)
    assert rig.rd(D.REG_STATUS) == D.ST_BUSY
    rig.eng.reset()
    assert rig.rd(D.REG_STATUS) == 0  # though the old copy is still in flight
    rig.put_desc(1, desc(SRC, DST, 64))
    rig.wr(D.REG_RING_BASE_LO, RING + 32, 8)
    rig.wr(D.REG_RING_SIZE, 16)
    rig.wr(D.REG_CONTROL, D.CTL_ENABLE)
    rig.wr(D.REG_TAIL, 1)
    assert rig.rd(D.REG_STATUS) == D.ST_BUSY  # new work, waiting for the old copy to return
    rig.port.gate.set()
    await rig.settle()
    assert rig.rd(D.REG_STATUS) == 0 and rig.rd(D.REG_COMPLETED) == 1


# -- the same, with the engine's worker thread (a port that copies synchronously) -----------


class ThreadedPort(GatedPort):
    """A GatedPort that also offers copy_sync, as the daemon's port does: the
    engine then runs big batches in a worker thread (gated the same way)."""

    def copy_sync(self, src_iova: int, dst_iova: int, length: int) -> None:
        self._check(src_iova, False)
        self._check(dst_iova, True)
        self.copies += 1
        self.in_copy += 1
        try:
            if self.gate is not None:
                self.gate.wait()
            self._copy_now(src_iova, dst_iova, length)
        finally:
            self.in_copy -= 1


@pytest.fixture
async def trig(mem: Memory, irq: IrqLog, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> Rig:
    monkeypatch.setattr(D, "THREAD_MIN", 0)  # every batch goes to the worker thread
    return Rig(mem, ThreadedPort(mem), irq, Spawner(nursery))


async def wait_in_copy(rig: Rig) -> None:
    with trio.fail_after(5):
        while not rig.port.in_copy:
            await trio.sleep(0.001)


async def test_thread_copies_pieces_and_completes_each(trig: Rig, mem: Memory, irq: IrqLog) -> None:
    trig.msix()
    data = pattern(4 * PAGE, 15)
    mem.put(SRC_PAGE, data)
    for i in range(4):  # two transfers of two contiguous descriptors each
        trig.put_desc(i, desc(SRC + i * PAGE, DST + i * PAGE, PAGE, D.DESC_IRQ if i % 2 else D.DESC_CHAIN))
    trig.setup()
    trig.wr(D.REG_TAIL, 4)
    await trig.settle()
    assert mem.get(DST_PAGE, 4 * PAGE) == data
    assert trig.port.copies == 2
    assert [trig.desc_status(i) for i in range(4)] == [0, D.DESC_ST_DONE, 0, D.DESC_ST_DONE]
    assert (trig.rd(D.REG_HEAD), trig.rd(D.REG_COMPLETED), trig.rd(D.REG_STATUS)) == (4, 2, 0)
    assert irq.msis() == [0, 0]


async def test_thread_fault_inside_a_chain_then_retry(trig: Rig, mem: Memory, irq: IrqLog) -> None:
    trig.msix()
    dst = 0xB000000
    mem.map(dst, 48, 2)
    data = pattern(4 * 3000, 16)
    mem.put(SRC_PAGE, data)
    trig.put_desc(0, desc(SRC, DST, 100, D.DESC_IRQ))  # a transfer that completes first
    for i in range(1, 5):
        k = i - 1
        trig.put_desc(i, desc(SRC + k * 3000, dst + k * 3000, 3000, D.DESC_CHAIN if i < 4 else D.DESC_IRQ))
    trig.setup()
    trig.wr(D.REG_TAIL, 5)
    await trig.settle()
    assert trig.desc_status(0) == D.DESC_ST_DONE and trig.rd(D.REG_COMPLETED) == 1
    assert trig.rd(D.REG_HEAD) == 3  # descriptor 3 holds dst + 2 pages
    assert trig.fault_record(0) == (dst + 2 * PAGE, 3, D.SRC_WRITE << 4 | D.ERR_NO_TRANSLATION << 8 | 1, 1)
    assert trig.desc_status(3) == D.DESC_ST_ERROR | D.ERR_NO_TRANSLATION << 8 | D.SRC_WRITE << 16
    assert mem.get(48, 2 * PAGE) == data[: 2 * PAGE]
    assert irq.msis() == [0, 1]
    mem.map(dst + 2 * PAGE, 50, 1)
    trig.wr(D.REG_STATUS, D.ST_HALTED)
    await trig.settle()
    assert mem.get(48, 3 * PAGE)[: len(data)] == data and trig.desc_status(4) == D.DESC_ST_DONE
    assert (trig.rd(D.REG_HEAD), trig.rd(D.REG_COMPLETED), trig.rd(D.REG_STATUS)) == (5, 2, 0)
    assert irq.msis() == [0, 1, 0]


async def test_thread_disable_finishes_the_current_piece(trig: Rig, mem: Memory) -> None:
    trig.port.gate = threading.Event()
    for i in range(3):
        trig.put_desc(i, desc(SRC, DST, 64))
    trig.setup()
    trig.wr(D.REG_TAIL, 3)
    await wait_in_copy(trig)
    trig.wr(D.REG_CONTROL, 0)
    trig.port.gate.set()
    await trig.settle()
    assert trig.rd(D.REG_HEAD) == 1 and trig.desc_status(0) == D.DESC_ST_DONE and trig.desc_status(1) == 0
    trig.port.gate = None
    trig.wr(D.REG_CONTROL, D.CTL_ENABLE)
    await trig.settle()
    assert trig.rd(D.REG_HEAD) == 3 and trig.rd(D.REG_COMPLETED) == 3


@pytest.mark.parametrize("how", ["reset", "stop"])
async def test_thread_reset_or_stop_during_a_copy(trig: Rig, mem: Memory, irq: IrqLog, how: str) -> None:
    trig.msix()
    trig.port.gate = threading.Event()
    trig.put_desc(0, desc(SRC, DST, PAGE, D.DESC_IRQ))
    trig.put_desc(1, desc(SRC, DST + PAGE, PAGE, D.DESC_IRQ))
    trig.setup()
    trig.wr(D.REG_TAIL, 2)
    await wait_in_copy(trig)
    getattr(trig.eng, how)()
    assert trig.rd(D.REG_STATUS) == 0 and trig.rd(D.REG_HEAD) == 0
    trig.port.gate.set()
    await trig.settle()
    # the copy in flight landed, but nothing else: no status, no completion, no interrupt
    assert trig.port.copies == 1
    assert trig.desc_status(0) == 0 and trig.desc_status(1) == 0
    assert trig.rd(D.REG_COMPLETED) == 0 and irq.events == []
    assert trig.spawner.running == 0
