"""The DMA examples (examples/edu.c, examples/dma_engine.c), compiled as a user
would and run against the real daemon, and the device behaviours around them
that a driver relies on: no DMA without bus mastering, VFIO_DEVICE_RESET of the
engine, and closing the device while the engine is copying.

The C examples check their own results (they exit non-zero otherwise); these
tests also look inside the daemon: the faults the devices recorded, the
interrupts they signalled and the DMA that went through the IOMMU."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from harness import built_examples, device_nodes

from iommufd_cuse import uapi
from iommufd_cuse.client import AsyncIommufd, AsyncVfioDevice
from iommufd_cuse.vfio.pci import dmaengine as D
from iommufd_cuse.vfio.pci import edu as E
from iommufd_cuse.vfio.pci.core import MSI, MSIX

# (tests/conftest.py's helpers cannot be imported from here: tests/vfio/conftest.py
# takes the module name; its fixtures, `daemon` included, are available as usual.)
ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "include"
EXAMPLES = ROOT / "examples"
MIB = 1 << 20
BAR0, CONFIG = 0, uapi.VFIO_PCI_CONFIG_REGION_INDEX
PCI_COMMAND, MASTER = 0x04, 0x4
R = uapi.IOMMU_IOAS_MAP_READABLE
W = uapi.IOMMU_IOAS_MAP_WRITEABLE
EVENTFD_TRIGGER = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER

# what the examples use
EDU_GONE_IOVA = 0x600000  # edu.c: mapped, unmapped, then written by the device
ENGINE_SRC_IOVA, ENGINE_DST_IOVA = 1 << 32, 1 << 36  # dma_engine.c


async def run(argv: list, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a client process to completion while the daemon keeps serving; it must exit 0."""
    argv = [str(a) for a in argv]
    with trio.fail_after(timeout):
        p = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert p.returncode == 0, (
        f"{argv} exited {p.returncode}\nstdout:\n{p.stdout.decode()}\nstderr:\n{p.stderr.decode()}"
    )
    return p


async def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll predicate (on the trio loop, so the daemon keeps serving) until true."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
    assert predicate(), f"{what}: still false after {timeout} s"


@pytest.fixture(scope="module")
def examples() -> Iterator[dict[str, Path]]:
    with built_examples("edu", "dma_engine") as exes:
        yield exes


def record_signals(monkeypatch: pytest.MonkeyPatch, vdev) -> list[tuple[int, int]]:
    """Every interrupt the device's vfio layer signals on an eventfd: (irq index, vector)."""
    seen: list[tuple[int, int]] = []
    signal = vdev.irqs._signal

    def recording(index: int, vector: int) -> None:
        seen.append((index, vector))
        signal(index, vector)

    monkeypatch.setattr(vdev.irqs, "_signal", recording)
    return seen


def record_copies(monkeypatch: pytest.MonkeyPatch, vdev) -> list[tuple[int, int, int]]:
    """Every device copy through the DmaPort (the IOMMU): (src iova, dst iova, length),
    on the event loop or from the engine's worker thread."""
    seen: list[tuple[int, int, int]] = []
    copy, copy_sync = vdev.dma.copy, vdev.dma.copy_sync

    async def recording(src: int, dst: int, n: int) -> None:
        seen.append((src, dst, n))
        await copy(src, dst, n)

    def recording_sync(src: int, dst: int, n: int) -> None:
        seen.append((src, dst, n))
        copy_sync(src, dst, n)

    monkeypatch.setattr(vdev.dma, "copy", recording)
    monkeypatch.setattr(vdev.dma, "copy_sync", recording_sync)
    return seen


async def released(daemon) -> None:
    """Everything the clients held is gone: contexts, pins, device bindings."""
    await wait_until(
        lambda: (
            not daemon.system.contexts
            and daemon.system.pinned_pages() == 0
            and not any(d.vfio.in_use for d in daemon.system.devices)
        ),
        timeout=10,
        what="clients' state released",
    )


# -- 1. edu.c ---------------------------------------------------------------------------


async def test_edu_example(daemon, examples, monkeypatch) -> None:
    vdev = daemon.system.devices[0].vfio
    edu = vdev.model
    signals = record_signals(monkeypatch, vdev)
    faults, edu_faults = vdev.fault_count, edu.fault_count

    p = await run([examples["edu"], *device_nodes(daemon, 0)])
    out = p.stdout.decode()

    # RAM -> device buffer -> RAM, verified by the driver
    assert "dma 0x401000 -> 0x40000, 2048 bytes, cmd 0x4" in out
    assert "dma 0x40000 -> 0x500000, 2048 bytes, cmd 0x6" in out
    assert "verified: 2048 bytes went RAM -> device -> RAM (first bytes 03 0a 11 18)" in out
    # command bit 4: each DMA raised MSI 0 with 0x100 in the interrupt status, acknowledged at 0x64
    assert out.count("interrupt: eventfd count 1, irq status 0x100") == 3
    assert out.count("acknowledged: irq status now 0x0") == 3
    assert signals == [(MSI, 0)] * 3
    # the DMA to the unmapped IOVA: one fault, recorded by the IOMMU side and by edu; memory untouched
    assert vdev.fault_count == faults + 1 and edu.fault_count == edu_faults + 1
    f = edu.faults[-1]
    assert (f.iova, f.write, f.reason) == (EDU_GONE_IOVA, True, "no translation")
    assert vdev.faults[-1] is f
    assert "dma to unmapped iova 0x600000: refused by the IOMMU, memory unchanged (still 0xee)" in out
    assert out.splitlines()[-1] == "done"
    await released(daemon)


# -- 2. dma_engine.c ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["anon", "thp", "memfd"])
async def test_engine_example_copies_64mib(daemon, examples, monkeypatch, kind: str) -> None:
    vdev = daemon.system.devices[1].vfio
    signals = record_signals(monkeypatch, vdev)
    copies = record_copies(monkeypatch, vdev)
    faults = vdev.fault_count

    p = await run([examples["dma_engine"], "-m", kind, *device_nodes(daemon, 1)])
    out = p.stdout.decode()

    memory = {"anon": "anonymous", "thp": "anonymous huge page", "memfd": "memfd"}[kind]
    assert f"copy 67108864 bytes of {memory} memory: 1048576-byte descriptors, 16 per transfer" in out
    assert re.search(r"^run 1: 64 MiB in [0-9.]+ ms: [0-9.]+ GB/s, verified byte for byte$", out, re.M), out
    assert "completed 4 transfers, fault log 0 record(s)" in out
    # 64 descriptors of 1 MiB: all 64 MiB went through the IOMMU, source to destination, in order
    assert sum(n for _, _, n in copies) == 64 * MIB
    pos = 0
    for src, dst, n in copies:
        assert (src, dst) == (ENGINE_SRC_IOVA + pos, ENGINE_DST_IOVA + pos)
        pos += n
    # one completion interrupt (MSI-X vector 0) per transfer, no fault
    assert signals == [(MSIX, D.VEC_DONE)] * 4
    assert vdev.fault_count == faults
    await released(daemon)


@pytest.mark.parametrize("kind", ["anon", "memfd"])
async def test_engine_example_unmap_while_queued(daemon, examples, monkeypatch, kind: str) -> None:
    vdev = daemon.system.devices[1].vfio
    signals = record_signals(monkeypatch, vdev)
    faults = vdev.fault_count

    p = await run([examples["dma_engine"], "-u", "-m", kind, *device_nodes(daemon, 1)])
    out = p.stdout.decode()

    assert "unmapped the destination of the last transfer (iova 0x1003000000 +0x1000000)" in out
    # a later descriptor (of the last transfer) faulted writing to the unmapped buffer
    m = re.search(
        r"fault log: 1 record\(s\); #1: descriptor (\d+), iova (0x[0-9a-f]+), write while "
        r"writing the destination: no translation \(0x01\)",
        out,
    )
    assert m, out
    index, iova = int(m[1]), int(m[2], 16)
    assert 48 <= index < 64 and iova == ENGINE_DST_IOVA + index * MIB
    assert "STATUS 0x102 (halted 1, error 0x01)" in out
    assert "no DMA after the unmap: the unmapped buffer is unchanged" in out
    # the fault as the daemon recorded it, and its interrupt (MSI-X vector 1)
    assert vdev.fault_count == faults + 1
    f = vdev.faults[-1]
    assert (f.iova, f.write, f.reason) == (iova, True, "no translation")
    assert signals.count((MSIX, D.VEC_FAULT)) == 1
    # remapped and restarted: the copy finished and verified
    assert signals.count((MSIX, D.VEC_DONE)) == 4
    assert "verified byte for byte" in out and "completed 4 transfers, fault log 1 record(s)" in out
    await released(daemon)


# -- 3. bus mastering, reset, close mid-transfer (Python clients) --------------------------------


class Client:
    """An iommufd + one bound device, attached to a fresh IOAS, for tests under trio."""

    def __init__(self, ctx: AsyncIommufd, dev: AsyncVfioDevice, ioas: int) -> None:
        self.ctx, self.dev, self.ioas = ctx, dev, ioas
        self.maps: list[mmap.mmap] = []

    @classmethod
    async def open(cls, daemon, n: int) -> Client:
        iommu, node = device_nodes(daemon, n)
        ctx = await AsyncIommufd.open(iommu)
        dev = await AsyncVfioDevice.open(node)
        await dev.bind(ctx.fd)
        ioas = await ctx.ioas_alloc()
        await dev.attach(ioas)
        return cls(ctx, dev, ioas)

    async def memory(self, size: int, iova: int, prot: int = R | W) -> mmap.mmap:
        """Private anonymous memory mapped at iova."""
        m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.maps.append(m)
        await self.ctx.map(self.ioas, m, iova=iova, flags=prot)
        return m

    async def rd(self, off: int, size: int = 4) -> int:
        return await self.dev.pread(BAR0, off, size)

    async def wr(self, off: int, value: int, size: int = 4) -> None:
        await self.dev.pwrite(BAR0, off, size, value)

    async def bus_master(self, on: bool) -> None:
        cmd = await self.dev.pread(CONFIG, PCI_COMMAND, 2)
        await self.dev.pwrite(CONFIG, PCI_COMMAND, 2, cmd | MASTER if on else cmd & ~MASTER)

    async def close(self) -> None:
        await self.dev.close()
        await self.ctx.close()
        for m in self.maps:
            m.close()


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed * 31 + (i >> 9)) & 0xFF for i in range(n))


async def test_edu_without_bus_mastering_does_no_dma(daemon) -> None:
    vdev = daemon.system.devices[0].vfio
    c = await Client.open(daemon, 0)
    buf = await c.memory(2 * MIB, 0x400000)
    data = pattern(2048)
    buf[0x1000 : 0x1000 + 2048] = data
    assert not await c.dev.pread(CONFIG, PCI_COMMAND, 2) & MASTER  # vfio-pci opens it with mastering off

    async def dma(src: int, dst: int, cmd: int) -> None:
        await c.wr(E.REG_DMA_SRC, src, 8)
        await c.wr(E.REG_DMA_DST, dst, 8)
        await c.wr(E.REG_DMA_COUNT, 2048, 8)
        await c.wr(E.REG_DMA_CMD, cmd | E.DMA_CMD_START, 8)

    faults = vdev.fault_count
    await dma(0x401000, E.BUF_START, 0)  # RAM -> device: refused, the device buffer stays zero
    assert await c.rd(E.BUF_START, 2048) == 0
    await c.wr(E.BUF_START, int.from_bytes(b"\x5a" * 2048, "little"), 2048)  # device -> RAM: refused
    await dma(E.BUF_START, 0x500000, E.DMA_CMD_TO_RAM)
    assert buf[0x100000 : 0x100000 + 2048] == bytes(2048)
    assert vdev.fault_count == faults + 2
    assert [(f.iova, f.write, f.reason) for f in vdev.faults[-2:]] == [
        (0x401000, False, "bus master disabled"),
        (0x500000, True, "bus master disabled"),
    ]
    # with bus mastering on, the same transfers go through
    await c.bus_master(True)
    await dma(0x401000, E.BUF_START, 0)
    await dma(E.BUF_START, 0x500000, E.DMA_CMD_TO_RAM)
    assert buf[0x100000 : 0x100000 + 2048] == data and vdev.fault_count == faults + 2
    await c.close()
    await released(daemon)


RING_IOVA, SRC_IOVA, DST_IOVA = 0x100000, 0x1000000, 0x8000000


async def engine_client(daemon, size: int, ring_entries: int = 16) -> tuple[Client, mmap.mmap, mmap.mmap, mmap.mmap]:
    """The engine bound and attached, with a ring and size-byte src/dst buffers mapped."""
    c = await Client.open(daemon, 1)
    ring = await c.memory(max(4096, ring_entries * D.DESC_SIZE), RING_IOVA)
    src = await c.memory(size, SRC_IOVA, R)
    dst = await c.memory(size, DST_IOVA, W)
    await c.wr(D.REG_RING_BASE_LO, RING_IOVA, 8)
    await c.wr(D.REG_RING_SIZE, ring_entries)
    return c, ring, src, dst


def put_desc(ring: mmap.mmap, index: int, src: int, dst: int, n: int, flags: int = D.DESC_IRQ) -> None:
    D.DESC.pack_into(ring, index * D.DESC_SIZE, src, dst, n, flags, 0, index)


def desc_status(ring: mmap.mmap, index: int) -> int:
    return int.from_bytes(ring[index * D.DESC_SIZE + 0x18 : index * D.DESC_SIZE + 0x1C], "little")


async def test_engine_without_bus_mastering_does_no_dma(daemon) -> None:
    vdev = daemon.system.devices[1].vfio
    c, ring, src, dst = await engine_client(daemon, 64 << 10)
    src[:] = pattern(64 << 10)
    put_desc(ring, 0, SRC_IOVA, DST_IOVA, 64 << 10)
    faults = vdev.fault_count
    await c.wr(D.REG_CONTROL, D.CTL_ENABLE | D.CTL_DONE_IRQ | D.CTL_FAULT_IRQ)
    await c.wr(D.REG_TAIL, 1)
    await wait_until(lambda: vdev.model.halted, what="engine halted")
    # halted on fetching descriptor 0: reason 0x04 (bus mastering off); no memory touched
    assert await c.rd(D.REG_STATUS) == D.ST_HALTED | D.ERR_BUS_MASTER << 8
    assert await c.rd(D.REG_FAULT_COUNT) == 1
    rec = D.FAULT_LOG_BASE
    assert await c.rd(rec, 8) == RING_IOVA and await c.rd(rec + 8) == 0
    assert await c.rd(rec + 12) == D.SRC_FETCH << 4 | D.ERR_BUS_MASTER << 8
    assert dst[:] == bytes(64 << 10) and desc_status(ring, 0) == 0
    assert await c.rd(D.REG_HEAD) == 0 and await c.rd(D.REG_COMPLETED) == 0
    assert vdev.fault_count == faults + 1 and vdev.faults[-1].reason == "bus master disabled"
    # mastering on, clear the halt: the engine retries the same descriptor and completes it
    await c.bus_master(True)
    await c.wr(D.REG_STATUS, D.ST_HALTED)
    await wait_until(lambda: vdev.model.completed == 1, what="copy completed")
    assert dst[:] == src[:] and desc_status(ring, 0) == D.DESC_ST_DONE
    await c.close()
    await released(daemon)


ENGINE_REGS = [
    D.REG_CONTROL,
    D.REG_STATUS,
    D.REG_INT_STATUS,
    D.REG_RING_BASE_LO,
    D.REG_RING_BASE_HI,
    D.REG_RING_SIZE,
    D.REG_HEAD,
    D.REG_TAIL,
    D.REG_COMPLETED,
    D.REG_FAULT_COUNT,
]


async def test_engine_reset_returns_registers_and_queue_to_defaults(daemon) -> None:
    vdev = daemon.system.devices[1].vfio
    eng = vdev.model
    size = 64 * MIB
    c, ring, src, dst = await engine_client(daemon, size)
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    try:
        await c.dev.set_irqs(uapi.VFIO_PCI_MSIX_IRQ_INDEX, EVENTFD_TRIGGER, fds=efds)
        await c.bus_master(True)
        # some history: two copies done, then one halted on an unmapped source
        src[: 1 << 16] = pattern(1 << 16)
        put_desc(ring, 0, SRC_IOVA, DST_IOVA, 4096)
        put_desc(ring, 1, SRC_IOVA + 4096, DST_IOVA + 4096, 4096)
        put_desc(ring, 2, 0x7000000, DST_IOVA, 4096)
        await c.wr(D.REG_CONTROL, D.CTL_ENABLE | D.CTL_DONE_IRQ | D.CTL_FAULT_IRQ)
        await c.wr(D.REG_TAIL, 3)
        await wait_until(lambda: eng.halted, what="engine halted")
        assert [await c.rd(r) for r in (D.REG_HEAD, D.REG_COMPLETED, D.REG_FAULT_COUNT)] == [2, 2, 1]

        # and work in flight: clear the halt with the bad descriptor fixed, plus
        # 8 big copies queued behind it
        put_desc(ring, 2, SRC_IOVA, DST_IOVA, 4096)
        for i in range(3, 11):
            put_desc(ring, i, SRC_IOVA, DST_IOVA, size)
        await c.wr(D.REG_TAIL, 11)
        await c.wr(D.REG_STATUS, D.ST_HALTED)
        await wait_until(lambda: eng.head >= 3 and eng.status & D.ST_BUSY, what="engine busy")

        await c.dev.reset()
        # every register at its power-on value at once, the fault log empty
        assert [await c.rd(r) for r in ENGINE_REGS] == [0] * len(ENGINE_REGS)
        assert [await c.rd(D.FAULT_LOG_BASE + 32 * s + 16) for s in range(D.FAULT_LOG_ENTRIES)] == [0] * 16
        statuses = [desc_status(ring, i) for i in range(11)]
        assert statuses[10] == 0  # the queue was not finished
        # the engine task ends (a copy under way may finish into memory, but gets no status)
        await wait_until(lambda: not eng._active and eng._scope is None, timeout=10, what="engine task gone")
        assert [await c.rd(r) for r in ENGINE_REGS] == [0] * len(ENGINE_REGS)
        assert [desc_status(ring, i) for i in range(11)] == statuses
        # config space kept, as vfio-pci restores it around the reset: mastering and MSI-X still on
        assert await c.dev.pread(CONFIG, PCI_COMMAND, 2) & MASTER
        assert vdev.config.msix_enabled

        # the device works again once reprogrammed
        ring[:] = bytes(len(ring))
        dst[: 1 << 16] = bytes(1 << 16)
        put_desc(ring, 0, SRC_IOVA, DST_IOVA, 1 << 16)
        await c.wr(D.REG_RING_BASE_LO, RING_IOVA, 8)
        await c.wr(D.REG_RING_SIZE, 16)
        await c.wr(D.REG_CONTROL, D.CTL_ENABLE | D.CTL_DONE_IRQ)
        await c.wr(D.REG_TAIL, 1)
        await wait_until(lambda: eng.completed == 1, what="copy after reset")
        assert dst[: 1 << 16] == src[: 1 << 16] and desc_status(ring, 0) == D.DESC_ST_DONE
    finally:
        await c.close()
        for fd in efds:
            os.close(fd)
    await released(daemon)


def task_count() -> int:
    """Tasks alive in this trio run (the daemon's included)."""

    def walk(task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


async def test_closing_the_device_mid_transfer_stops_the_engine(daemon, examples) -> None:
    vdev = daemon.system.devices[1].vfio
    eng = vdev.model
    size = 64 * MIB
    c, ring, src, dst = await engine_client(daemon, size)
    await c.bus_master(True)
    for i in range(15):  # 15 x 64 MiB queued: far more than can finish before the close
        put_desc(ring, i, SRC_IOVA, DST_IOVA, size, D.DESC_IRQ)
    await c.wr(D.REG_CONTROL, D.CTL_ENABLE | D.CTL_DONE_IRQ)
    tasks = task_count()
    await c.wr(D.REG_TAIL, 15)
    await wait_until(lambda: eng.status & D.ST_BUSY, what="engine busy")
    assert task_count() > tasks  # the engine task
    pinned = daemon.system.pinned_pages()
    assert pinned > 0

    await c.dev.close()  # unbinds: the engine must stop, the device go back to power-on state
    await wait_until(lambda: not vdev.in_use, what="device unbound")
    await wait_until(lambda: not eng._active and eng._scope is None, timeout=10, what="engine task gone")
    await wait_until(lambda: task_count() <= tasks, what="the daemon's tasks back to what they were")
    assert (eng.control, eng.head, eng.tail, eng.completed) == (0, 0, 0, 0)
    statuses = [desc_status(ring, i) for i in range(15)]
    assert statuses.count(D.DESC_ST_DONE) < 15  # it was stopped part way
    # nothing moves after that: no more copies, no more status
    snapshot = bytes(dst)
    await trio.sleep(0.2)
    assert bytes(dst) == snapshot and [desc_status(ring, i) for i in range(15)] == statuses
    # the device's pins went with its domain: the IOAS mappings alone pin nothing
    await wait_until(lambda: daemon.system.pinned_pages() == 0, what="pins released")

    # the daemon keeps serving: the same device, bound again, copies
    dev = await AsyncVfioDevice.open(device_nodes(daemon, 1)[1])
    await dev.bind(c.ctx.fd)
    await dev.attach(c.ioas)
    c.dev = dev
    await c.bus_master(True)
    ring[:] = bytes(len(ring))
    put_desc(ring, 0, SRC_IOVA, DST_IOVA, 1 * MIB)
    src[:MIB] = pattern(MIB, 5)
    await c.wr(D.REG_RING_BASE_LO, RING_IOVA, 8)
    await c.wr(D.REG_RING_SIZE, 16)
    await c.wr(D.REG_CONTROL, D.CTL_ENABLE)
    await c.wr(D.REG_TAIL, 1)
    await wait_until(lambda: eng.completed == 1, what="copy after the reopen")
    assert dst[:MIB] == src[:MIB]
    await c.close()
    await released(daemon)
    # and another client: the edu example runs as usual
    await run([examples["edu"], *device_nodes(daemon, 0)])
    await released(daemon)
