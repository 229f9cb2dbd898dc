"""The virtio-blk disk (iommufd_cuse/vfio/pci/virtio_blk.py) driven by examples/virtio_blk.c, a
userspace driver written from the virtio 1.2 specification and compiled as a user would, against
the real daemon: the capabilities found by walking the list, the feature handshake, a split
virtqueue, multi-segment requests checked against the backing file, indirect tables, GET_ID, FLUSH,
WRITE_ZEROES, the error statuses and the DMA faults behind them, DEVICE_NEEDS_RESET, a function-level
reset; and, from Python, the config space, the virtio structures and the handshake a driver relies on
(virtio 1.2: 4.1 Virtio Over PCI Bus, 5.2 Block Device, 2.7 Split Virtqueues)."""

from __future__ import annotations

import itertools
import re
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from harness import block_pattern, built_examples, device_nodes, open_files, run, scratch_dir, serving
from hypothesis import given
from hypothesis import strategies as st
from test_device_cdev import assert_released

from iommufd_cuse import config, uapi
from iommufd_cuse.client import AsyncIommufd, AsyncVfioDevice
from iommufd_cuse.vfio.pci import virtio_blk as VB

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "include"
MIB = 1 << 20
VBLK_INDEX = 5  # vfio5 in the default topology
BAD_IOVA = 0x7F0000000000  # what the example programs where nothing is mapped
CONFIG, BAR4 = uapi.VFIO_PCI_CONFIG_REGION_INDEX, uapi.VFIO_PCI_BAR4_REGION_INDEX

# virtio 1.2: feature bits (5.2.3, 6), the bits offered (bits 0-31, bits 32-63)
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_MQ, F_DISCARD, F_WRITE_ZEROES = 1, 2, 5, 6, 9, 12, 13, 14
F_INDIRECT_DESC, F_VERSION_1, F_ACCESS_PLATFORM = 28, 32, 33
OFFERED_LO = sum(1 << b for b in (F_SIZE_MAX, F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_MQ, F_WRITE_ZEROES, F_INDIRECT_DESC))
OFFERED_HI = 1 << (F_VERSION_1 - 32) | 1 << (F_ACCESS_PLATFORM - 32)
# device status (2.1)
ACKNOWLEDGE, DRIVER, FEATURES_OK = 1, 2, 8
# struct virtio_pci_cap (4.1.4) and its cfg_types; struct virtio_pci_common_cfg (4.1.4.3)
VIRTIO_PCI_CAP = struct.Struct("<BBBBBB2xII")  # cap_vndr, cap_next, cap_len, cfg_type, bar, id, offset, length
COMMON, NOTIFY, ISR, DEVICE, PCI_CFG = 1, 2, 3, 4, 5
DFSELECT, DF, GFSELECT, GF, NUM_QUEUES, STATUS = 0x00, 0x04, 0x08, 0x0C, 0x12, 0x14
Q_SELECT, Q_SIZE, Q_NOTIFY_OFF = 0x16, 0x18, 0x1E
COMMON_CFG_SIZE = 0x38  # through queue_device
BLK_CONFIG_SIZE = 0x3C  # struct virtio_blk_config through write_zeroes_may_unmap and its padding


@pytest.fixture(scope="module")
def example() -> Iterator[Path]:
    with built_examples("virtio_blk") as exes:
        yield exes["virtio_blk"]


def nodes(daemon, n: int = VBLK_INDEX) -> list[Path]:
    return device_nodes(daemon, n)


@asynccontextmanager
async def only_virtio_blk(base: Path, **options) -> AsyncIterator:
    """A daemon whose only device (vfio0) is the virtio-blk disk, with these model options."""
    cfg = config.load(None)
    vblk = next(d for d in cfg.devices if d.model == "virtio-blk")
    vblk.options = options
    cfg.devices = [vblk]
    async with serving(cfg, base) as d:
        yield d


@pytest.fixture
async def file_daemon() -> AsyncIterator:
    """A daemon whose only device is the virtio-blk disk, a 64 MiB file."""
    base = scratch_dir()
    async with only_virtio_blk(base, size=64 * MIB, backing=str(base / "disk.img"), serial="TESTVBLK42") as d:
        d.backing = base / "disk.img"
        yield d


def finished(p: subprocess.CompletedProcess, out: str) -> None:
    """The example's last word: every check passed (a failed check prints a FAILED line and
    makes it exit 1)."""
    assert [line for line in out.splitlines() if "FAILED" in line] == [], p.stderr.decode()
    assert p.returncode == 0 and out.splitlines()[-1] == "done", p.stderr.decode()


# -- the example ------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["memfd", "anon"])
async def test_example_round_trip_against_the_backing_file(file_daemon, example, memory) -> None:
    vdev = file_daemon.system.devices[0].vfio
    p = await run([example, "-m", memory, "-n", "8M", *nodes(file_daemon, 0)], check=False)
    out = p.stdout.decode()
    assert "virtio-blk 1af4:1042 rev 1, class 01:80:00" in out, p.stderr.decode()
    # the four structures were found by walking the list, all in BAR4
    for name in ("common", "notify", "isr", "device"):
        assert re.search(rf"^capability 0x[0-9a-f]+: virtio {name} cfg: bar 4 offset", out, re.M), out
    assert "virtio structures: common, notify, isr and device cfg found" in out
    assert "msi-x: 3 vectors" in out  # the configuration vector and one per request queue (2)
    assert "reset (initial): device_status 0x0, config_msix_vector 0xffff, queue 0 enable 0 msix_vector 0xffff" in out
    # everything offered is what the driver wants: accepted as offered, FEATURES_OK stays set
    assert "features: device 0x0000000310005246, accepted 0x0000000310005246, device_status 0xb (FEATURES_OK)" in out
    m = re.search(
        r"config: capacity (\d+) sectors, size_max (\d+), seg_max (\d+), blk_size (\d+), num_queues (\d+)", out
    )
    assert m, out
    assert int(m[1]) == 64 * MIB // 512 and int(m[2]) >= 512 and int(m[3]) >= 1 and m[4] == "512" and m[5] == "2"
    assert re.search(r"queue 0: size 256 \(max 256\), .*device_status 0xf \(DRIVER_OK\)", out), out
    assert re.search(
        r"round trip: wrote 8388608 bytes \(sectors 0-16383\) in \d+ requests of \d+ x \d+-byte segments, "
        r"read back in \d+ requests of \d+ x 3584-byte segments: equal",
        out,
    ), out
    assert (
        "indirect: 64 KiB read (sector 128) through a table of 6 descriptors, 4 segments in reverse order: equal" in out
    )
    assert "get id: serial 'TESTVBLK42'" in out
    assert "flush: status 0" in out
    assert "write zeroes (sectors 16320-16383) and read back: zeros" in out
    m = re.search(r"interrupts: (\d+) on vector 1 for (\d+) requests", out)
    assert m and int(m[1]) >= 1, out
    # the disk is the file: the pattern, then the zeroed tail, then nothing written
    data = file_daemon.backing.read_bytes()
    assert len(data) == 64 * MIB
    sectors = 8 * MIB // 512
    assert data[: (sectors - 64) * 512] == block_pattern(0, sectors - 64)
    assert data[(sectors - 64) * 512 : 8 * MIB] == bytes(64 * 512)
    assert data[8 * MIB :] == bytes(56 * MIB)
    assert vdev.fault_count == 0
    # 2.7.5.3.2: a chain of normal descriptors ending in an indirect one is valid
    assert "indirect after a normal descriptor: 8 KiB read (sector 256)" in out, out
    finished(p, out)
    await assert_released(file_daemon)


@pytest.mark.parametrize("memory", ["memfd", "anon"])
async def test_example_errors_and_function_level_reset(daemon, example, memory) -> None:
    vdev = daemon.system.devices[VBLK_INDEX].vfio
    faults = vdev.fault_count
    p = await run([example, "-e", "-r", "-m", memory, "-n", "2M", *nodes(daemon)], check=False)
    out = p.stdout.decode()
    assert "virtio-blk 1af4:1042" in out, p.stderr.decode()
    assert "read into an unmapped buffer: status 1 (IOERR)" in out, out
    assert "write from an unmapped buffer: status 1 (IOERR)" in out
    assert "after the unmapped buffers: device_status 0xf, data intact" in out
    sectors = (1 << 30) // 512  # the default disk: 1 GiB
    assert f"read at sector {sectors} (the capacity): status 1 (IOERR)" in out
    assert f"read across the end (sector {sectors - 4}, 8 sectors): status 1 (IOERR)" in out
    assert "unknown request type 0x7e: status 2 (UNSUPP)" in out
    assert "after the errors: device_status 0xf, data intact" in out
    # the descriptor table unmapped: the device needs a reset and said so on the config vector
    m = re.search(
        r"descriptor table at an unmapped IOVA: device_status 0x([0-9a-f]+) \(DEVICE_NEEDS_RESET\), "
        r"config interrupt on vector 0",
        out,
    )
    assert m and int(m[1], 16) == 0x4F, out
    assert "after the reset from DEVICE_NEEDS_RESET: device_status 0xf, data intact" in out
    assert (
        "reset (function-level reset): device_status 0x0, config_msix_vector 0xffff, queue 0 enable 0 "
        "msix_vector 0xffff" in out
    )
    assert "after the function-level reset: device_status 0xf, data intact" in out
    # the two buffers and the descriptor table: a fault each, recorded by the device at the address
    # programmed (a read into host memory is a DMA write; the table is read)
    assert vdev.fault_count == faults + 3
    assert [(f.iova, f.write, f.reason) for f in vdev.faults[-3:]] == [
        (BAD_IOVA, True, "no translation"),
        (BAD_IOVA, False, "no translation"),
        (BAD_IOVA, False, "no translation"),
    ]
    # 4.1.4.5.1: the ISR's configuration bit is set before the configuration change notification
    assert "ISR: the device configuration interrupt bit is not set" not in out
    finished(p, out)
    await assert_released(daemon)
    # and the device serves the next client from scratch
    p = await run([example, "-n", "1M", *nodes(daemon)], check=False)
    out = p.stdout.decode()
    assert "round trip: wrote 1048576 bytes" in out, p.stderr.decode()
    finished(p, out)
    await assert_released(daemon)


async def test_the_backing_file_is_closed_when_the_daemon_stops_after_faults(file_daemon, example) -> None:
    """Faults recorded on data buffers hold nothing of the disk: the daemon's stop unmaps and
    closes the backing file (as the NVMe namespace's)."""
    vdev = file_daemon.system.devices[0].vfio
    p = await run([example, "-e", "-n", "1M", *nodes(file_daemon, 0)], check=False)
    assert "read into an unmapped buffer: status 1 (IOERR)" in p.stdout.decode(), p.stderr.decode()
    assert vdev.fault_count == 3
    await assert_released(file_daemon)
    assert open_files(file_daemon.backing)  # the daemon holds it while it serves
    file_daemon.shutdown()
    assert vdev.model.disk.mm.closed
    assert not open_files(file_daemon.backing)


# -- from Python: config space, the virtio structures, the handshake -----------------------------


class Virtio:
    """An open, bound virtio-blk device and where its virtio structures are (found by walking the
    capability list, as a driver must)."""

    def __init__(self, ctx: AsyncIommufd, dev: AsyncVfioDevice) -> None:
        self.ctx, self.dev = ctx, dev
        self.caps: list[tuple[int, int]] = []  # (position, capability id) in list order
        self.vendor: list[tuple[int, tuple[int, ...]]] = []  # (position, struct virtio_pci_cap fields)

    @classmethod
    async def open(cls, daemon, index: int = VBLK_INDEX) -> Virtio:
        iommu, node = nodes(daemon, index)
        ctx = await AsyncIommufd.open(iommu)
        dev = await AsyncVfioDevice.open(node)
        await dev.bind(ctx.fd)
        v = cls(ctx, dev)
        await v.walk()
        return v

    async def cfg(self, off: int, size: int) -> int:
        return await self.dev.pread(CONFIG, off, size)

    async def walk(self) -> None:
        assert await self.cfg(0x06, 2) & 0x10  # PCI_STATUS_CAP_LIST
        pos = await self.cfg(0x34, 1) & ~3
        while pos:
            assert pos >= 0x40 and len(self.caps) < 48
            cap_id = await self.cfg(pos, 1)
            self.caps.append((pos, cap_id))
            if cap_id == 0x09:
                self.vendor.append((pos, VIRTIO_PCI_CAP.unpack(await self.dev.read(CONFIG, pos, 16))))
            pos = await self.cfg(pos + 1, 1) & ~3

    def first(self, cfg_type: int) -> tuple[int, tuple[int, ...]]:
        """The first capability of a virtio structure type (4.1.4: what a driver uses)."""
        return next((pos, c) for pos, c in self.vendor if c[3] == cfg_type)

    def at(self, cfg_type: int) -> int:
        """The BAR offset of a structure (all in BAR4 on this device)."""
        _, c = self.first(cfg_type)
        assert c[4] == 4
        return c[6]

    async def common(self, off: int, size: int) -> int:
        return await self.dev.pread(BAR4, self.at(COMMON) + off, size)

    async def set_common(self, off: int, size: int, value: int) -> None:
        await self.dev.pwrite(BAR4, self.at(COMMON) + off, size, value)

    async def reset(self) -> None:
        await self.set_common(STATUS, 1, 0)
        with trio.fail_after(10):
            while await self.common(STATUS, 1):
                await trio.sleep(0.001)

    async def offered(self) -> tuple[int, int]:
        await self.set_common(DFSELECT, 4, 0)
        lo = await self.common(DF, 4)
        await self.set_common(DFSELECT, 4, 1)
        return lo, await self.common(DF, 4)

    async def handshake(self, lo: int, hi: int) -> int:
        """Reset, ACKNOWLEDGE | DRIVER, accept (lo, hi), FEATURES_OK: device_status as read back."""
        await self.reset()
        await self.set_common(STATUS, 1, ACKNOWLEDGE)
        await self.set_common(STATUS, 1, ACKNOWLEDGE | DRIVER)
        for select, bits in ((0, lo), (1, hi)):
            await self.set_common(GFSELECT, 4, select)
            await self.set_common(GF, 4, bits)
        await self.set_common(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        return await self.common(STATUS, 1)

    async def close(self) -> None:
        await self.dev.close()
        await self.ctx.close()


async def test_config_space_and_virtio_capabilities(daemon) -> None:
    v = await Virtio.open(daemon)
    try:
        # 4.1.2: a non-transitional virtio 1.x device: 0x1040 + device id 2 (block), revision >= 1
        assert (await v.cfg(0x00, 2), await v.cfg(0x02, 2)) == (0x1AF4, 0x1042)
        assert await v.cfg(0x08, 1) == 1
        assert await v.cfg(0x08, 4) >> 8 == 0x018000  # mass storage, other
        assert await v.cfg(0x2E, 2) >= 0x40  # 4.1.2.1: subsystem device id 0x40 or higher
        assert await v.cfg(0x0E, 1) & 0x7F == 0 and await v.cfg(0x3D, 1) == 1  # type 0 header, INTA#
        assert await v.cfg(0x20, 4) & 0x7 == 0x4  # BAR4: memory, 64-bit
        assert await v.cfg(0x14, 4) & 0x1 == 0  # BAR1: memory
        bar4 = await v.dev.region(BAR4)
        assert bar4.size == 16 << 10
        assert not bar4.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP  # trapped: pread/pwrite only

        ids = [cap_id for _, cap_id in v.caps]
        assert 0x10 in ids and 0x11 in ids  # PCI Express, MSI-X
        # MSI-X: 1 + num_queues vectors, table at 0 and PBA at 0x800 of BAR1
        msix = next(pos for pos, cap_id in v.caps if cap_id == 0x11)
        assert await v.cfg(msix + 2, 2) & 0x7FF == 2
        assert await v.cfg(msix + 4, 4) == 0x000 | 1 and await v.cfg(msix + 8, 4) == 0x800 | 1
        assert (await v.dev.irq_info(uapi.VFIO_PCI_MSIX_IRQ_INDEX)).count == 3

        # the four structures: one capability each, in BAR4, inside it, apart, aligned, long enough
        types = [c[3] for _, c in v.vendor]
        for t in (COMMON, NOTIFY, ISR, DEVICE):
            assert t in types, types
        spans = []
        for t, min_len in ((COMMON, COMMON_CFG_SIZE), (NOTIFY, 2), (ISR, 1), (DEVICE, BLK_CONFIG_SIZE)):
            pos, (vndr, _nxt, cap_len, cfg_type, bar, _id, offset, length) = v.first(t)
            assert (vndr, cfg_type, bar) == (0x09, t, 4)
            assert cap_len >= (20 if t == NOTIFY else 16)
            assert length >= min_len and offset + length <= 16 << 10
            assert offset % (2 if t == NOTIFY else 4 if t != ISR else 1) == 0
            spans.append((offset, offset + length))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
        npos, (*_, n_offset, n_length) = v.first(NOTIFY)
        mult = await v.cfg(npos + 16, 4)
        assert mult == 0 or (mult % 2 == 0 and mult & (mult - 1) == 0)  # 4.1.4.4: an even power of 2, or 0

        # common cfg: two request queues of at most 256 entries, each notification address in the
        # notify structure; a queue that does not exist reads size 0
        assert await v.common(NUM_QUEUES, 2) == 2
        for q in (0, 1):
            await v.set_common(Q_SELECT, 2, q)
            assert await v.common(Q_SIZE, 2) == 256
            assert (await v.common(Q_NOTIFY_OFF, 2)) * mult + 2 <= n_length
        await v.set_common(Q_SELECT, 2, 2)
        assert await v.common(Q_SIZE, 2) == 0

        # 4.1.4.9: the PCI configuration access capability, a window on the BARs through config space
        pos, (_, _, cap_len, *_rest) = v.first(PCI_CFG)
        assert cap_len >= 20  # struct virtio_pci_cfg_cap
        await v.dev.pwrite(CONFIG, pos + 4, 1, 4)  # cap.bar
        await v.dev.pwrite(CONFIG, pos + 8, 4, v.at(COMMON) + NUM_QUEUES)  # cap.offset
        await v.dev.pwrite(CONFIG, pos + 12, 4, 2)  # cap.length
        assert await v.cfg(pos + 16, 2) == 2  # pci_cfg_data: num_queues
        await v.dev.pwrite(CONFIG, pos + 8, 4, v.at(COMMON) + DFSELECT)
        await v.dev.pwrite(CONFIG, pos + 12, 4, 4)
        await v.dev.pwrite(CONFIG, pos + 16, 4, 1)  # device_feature_select = 1, through the window
        assert await v.common(DFSELECT, 4) == 1 and await v.common(DF, 4) == OFFERED_HI
    finally:
        await v.close()
    await assert_released(daemon)


async def test_feature_handshake_and_device_config(daemon) -> None:
    v = await Virtio.open(daemon)
    try:
        await v.reset()
        assert await v.offered() == (OFFERED_LO, OFFERED_HI)  # RO only on a read-only disk
        # 3.1.1 / 2.2.2: FEATURES_OK does not stay set for a feature that was not offered ...
        assert await v.handshake(OFFERED_LO | 1 << F_DISCARD, OFFERED_HI) == ACKNOWLEDGE | DRIVER
        assert await v.handshake(OFFERED_LO, OFFERED_HI | 1 << (34 - 32)) == ACKNOWLEDGE | DRIVER  # RING_PACKED (34)
        # ... nor without VERSION_1 (6.1: a non-transitional device MUST refuse it)
        assert await v.handshake(OFFERED_LO, OFFERED_HI & ~(1 << (F_VERSION_1 - 32))) == ACKNOWLEDGE | DRIVER
        # what was offered is taken, and driver_feature shows what was accepted
        assert await v.handshake(OFFERED_LO, OFFERED_HI) == ACKNOWLEDGE | DRIVER | FEATURES_OK
        assert await v.handshake(1 << F_BLK_SIZE, OFFERED_HI) == ACKNOWLEDGE | DRIVER | FEATURES_OK
        for select, bits in ((0, 1 << F_BLK_SIZE), (1, OFFERED_HI)):
            await v.set_common(GFSELECT, 4, select)
            assert await v.common(GF, 4) == bits
        # struct virtio_blk_config (5.2.4): 1 GiB in 512-byte sectors, 64-bit as two 32-bit halves
        dc = v.at(DEVICE)
        lo, hi = await v.dev.pread(BAR4, dc, 4), await v.dev.pread(BAR4, dc + 4, 4)
        assert lo | hi << 32 == (1 << 30) // 512
        assert await v.dev.pread(BAR4, dc + 0x14, 4) == 512  # blk_size
        assert await v.dev.pread(BAR4, dc + 0x22, 2) == 2  # num_queues
        assert await v.dev.pread(BAR4, dc + 0x30, 4) >= 1 and await v.dev.pread(BAR4, dc + 0x34, 4) >= 1
        await v.reset()
        assert await v.common(STATUS, 1) == 0
    finally:
        await v.close()
    await assert_released(daemon)


async def test_read_only_disk_offers_ro() -> None:
    base = scratch_dir()
    async with only_virtio_blk(base, size=4 * MIB, read_only=True) as d:
        v = await Virtio.open(d, 0)
        try:
            assert await v.offered() == (OFFERED_LO | 1 << F_RO, OFFERED_HI)
            assert await v.handshake(OFFERED_LO | 1 << F_RO, OFFERED_HI) == ACKNOWLEDGE | DRIVER | FEATURES_OK
        finally:
            await v.close()
        await assert_released(d)


@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=64), st.booleans()), min_size=0, max_size=8),
    st.integers(min_value=0, max_value=600),
    st.integers(min_value=0, max_value=600),
)
def test_stream_pieces_are_the_slice_of_the_buffers(buffers: list[tuple[int, bool]], start: int, length: int) -> None:
    """A request's buffers read as one stream (no layout assumed): the pieces of [start, start + length) are
    that slice of the concatenated buffers, in order, none empty, buffers that follow each other in IOVA
    taken as one piece."""
    segs, memory, addr = [], {}, 0x1000
    for i, (n, apart) in enumerate(buffers):
        addr += 0x100 if apart else 0  # a hole before it: a piece that crossed into it would read nothing
        segs.append((addr, n))
        for k in range(n):
            memory[addr + k] = (i, k)
        addr += n
    whole = [memory[a + k] for a, n in segs for k in range(n)]
    pieces = VB._stream(segs, start, length)
    assert all(n > 0 for _, n in pieces)
    assert all(a + n != b for (a, n), (b, _) in itertools.pairwise(pieces))  # contiguous ones are merged
    assert [memory[a + k] for a, n in pieces for k in range(n)] == whole[start : start + length]
