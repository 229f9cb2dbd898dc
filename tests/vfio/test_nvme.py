"""The NVMe controller (iommufd_cuse/vfio/pci/nvme.py) driven by examples/nvme.c, a
userspace driver compiled as a user would, against the real daemon: identify,
I/O through PRP1/PRP2 and PRP lists checked against the backing file, error
statuses and the faults behind them, controller and function-level reset,
shutdown; and, from Python, the registers and admin commands a driver relies on."""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from harness import block_pattern, built_examples, device_nodes, open_files, run, scratch_dir, serving
from test_device_cdev import assert_released

from iommufd_cuse import config, uapi
from iommufd_cuse.client import AsyncIommufd, AsyncVfioDevice
from iommufd_cuse.service import collect_status
from iommufd_cuse.vfio.pci import nvme as N

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "include"
MIB = 1 << 20
NVME_INDEX = 4  # vfio4 in the default topology


@pytest.fixture(scope="module")
def example() -> Iterator[Path]:
    with built_examples("nvme") as exes:
        yield exes["nvme"]


def nodes(daemon, n: int = NVME_INDEX) -> list[Path]:
    return device_nodes(daemon, n)


@pytest.fixture
async def file_daemon() -> AsyncIterator:
    """A daemon whose NVMe namespace is a 64 MiB file (vfio0 is the controller)."""
    base = scratch_dir()
    backing = base / "ns.img"
    cfg = config.load(None)
    nvme = next(d for d in cfg.devices if d.model == "nvme")
    nvme.options = {"size": 64 * MIB, "backing": str(backing), "serial": "TESTSN42", "model_name": "test ctrl"}
    cfg.devices = [nvme]
    async with serving(cfg, base) as d:
        d.backing = backing
        yield d


async def test_the_backing_file_is_closed_when_the_daemon_stops(file_daemon) -> None:
    assert open_files(file_daemon.backing)  # the daemon holds it while it serves
    file_daemon.shutdown()
    assert not open_files(file_daemon.backing)
    assert file_daemon.system.devices[0].vfio.model.ns.mm.closed


async def test_example_round_trip_against_the_backing_file(file_daemon, example) -> None:
    vdev = file_daemon.system.devices[0].vfio
    p = await run([example, "-n", "8M", *nodes(file_daemon, 0)])
    out = p.stdout.decode()
    assert "bound" in out and "class 01:08:02" in out
    assert re.search(r"CAP 0x[0-9a-f]+ \(MQES 1024, TO 10000 ms, DSTRD 0\), VS 0x00010400", out), out
    assert "identify: vid 0x1de5 sn 'TESTSN42' mn 'test ctrl' fr '1.0' mdts 8 namespaces 1" in out
    assert f"namespace 1: {64 * MIB // 512} blocks of 512 bytes" in out
    assert "round trip: wrote and read back 8388608 bytes (LBA 0-16383)" in out
    assert "chained PRP list: 1 MiB read through two list pages: equal" in out
    assert "scatter: reverse-order pages and a buffer at offset 0x200: equal" in out
    assert "flush, write zeroes (LBA 16320-16383) and read back: zeros" in out
    assert out.splitlines()[-1] == "done"
    # the namespace is the file: the pattern, then the zeroed tail, then nothing written
    data = file_daemon.backing.read_bytes()
    assert len(data) == 64 * MIB
    blocks = 8 * MIB // 512
    assert data[: (blocks - 64) * 512] == block_pattern(0, blocks - 64)
    assert data[(blocks - 64) * 512 : 8 * MIB] == bytes(64 * 512)
    assert data[8 * MIB :] == bytes(56 * MIB)
    assert vdev.fault_count == 0
    ctrl = vdev.model
    assert ctrl.reads > 0 and ctrl.blocks_written >= blocks
    await assert_released(file_daemon)


async def test_example_errors_resets_shutdown(daemon, example) -> None:
    vdev = daemon.system.devices[NVME_INDEX].vfio
    faults = vdev.fault_count
    p = await run([example, "-e", "-r", "-s", "-m", "anon", *nodes(daemon)])
    out = p.stdout.decode()
    assert "read to an unmapped PRP (data transfer error): status 0x004" in out
    assert "write from an unmapped PRP2 (data transfer error): status 0x004" in out
    assert "read past the namespace (LBA out of range): status 0x080" in out
    assert "read of namespace 2 (invalid namespace): status 0x00b" in out
    assert "read with an SGL (invalid field: SGLs not supported): status 0x002" in out
    assert "unknown I/O opcode (invalid opcode): status 0x001" in out
    assert "read over MDTS (invalid field): status 0x002" in out
    assert "after the errors: CSTS 0x1, a read returns the data" in out
    # the two bad PRPs: a fault each, recorded by the device, at the addresses programmed
    assert vdev.fault_count == faults + 2
    assert [(f.iova, f.write, f.reason) for f in vdev.faults[-2:]] == [
        (0x7F0000000000, True, "no translation"),
        (0x7F0000000000, False, "no translation"),
    ]
    assert vdev.model.fault_count >= 2
    assert "controller reset: CSTS 0x0, ASQ kept (0x100000000)" in out
    assert "after the controller reset: controller ready, data intact" in out
    assert "function-level reset: CC 0x0 CSTS 0x0 AQA 0x0" in out
    assert "after the function-level reset: controller ready, data intact" in out
    assert "shutdown: CSTS 0x9 (shutdown complete)" in out
    assert "after the shutdown: controller ready, data intact" in out
    assert out.splitlines()[-1] == "done"
    await assert_released(daemon)
    # and the controller serves the next client from scratch
    p = await run([example, *nodes(daemon)])
    assert p.stdout.decode().splitlines()[-1] == "done"
    await assert_released(daemon)


# -- from Python: registers, admin commands, events, back-pressure, faults ----------------------

IOVA = 1 << 32
ASQ, ACQ, DATA, IOSQ, IOCQ = 0x0000, 0x1000, 0x2000, 0x10000, 0x20000
MEM = 1 << 20
BAR0, CONFIG = 0, uapi.VFIO_PCI_CONFIG_REGION_INDEX
DNR = 0x4000  # in the status field


class Driver:
    """A minimal NVMe driver in the test process: queues in private anonymous memory."""

    def __init__(self, daemon, ctx: AsyncIommufd, dev: AsyncVfioDevice, ioas: int, mem: mmap.mmap) -> None:
        self.daemon, self.ctx, self.dev, self.ioas, self.mem = daemon, ctx, dev, ioas, mem
        self.vdev = daemon.system.devices[NVME_INDEX].vfio
        self.cid = 0
        self.queues: dict[
            int, list[int]
        ] = {}  # qid -> [sq offset, cq offset, SQ entries, sq tail, cq head, phase, CQ entries]

    @classmethod
    async def open(cls, daemon, bus_master: bool = True) -> Driver:
        iommu, node = nodes(daemon)
        ctx = await AsyncIommufd.open(iommu)
        dev = await AsyncVfioDevice.open(node)
        await dev.bind(ctx.fd)
        ioas = await ctx.ioas_alloc()
        await dev.attach(ioas)
        mem = mmap.mmap(-1, MEM, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        await ctx.map(ioas, mem, iova=IOVA)
        d = cls(daemon, ctx, dev, ioas, mem)
        if bus_master:
            cmd = await dev.pread(CONFIG, 4, 2)
            await dev.pwrite(CONFIG, 4, 2, cmd | 0x4)
        return d

    async def rd(self, off: int, size: int = 4) -> int:
        return await self.dev.pread(BAR0, off, size)

    async def wr(self, off: int, value: int, size: int = 4) -> None:
        await self.dev.pwrite(BAR0, off, size, value)

    async def wait_csts(self, mask: int, want: int) -> None:
        with trio.fail_after(10):
            while await self.rd(N.REG_CSTS) & mask != want:
                await trio.sleep(0.001)

    async def enable(self, entries: int = 8, asq: int = IOVA + ASQ, wait: bool = True) -> None:
        """Controller reset, admin queues, CC.EN; and (wait) CSTS.RDY."""
        await self.wr(N.REG_CC, 0)
        await self.wait_csts(N.CSTS_RDY, 0)
        self.mem[ASQ : ASQ + 0x2000] = bytes(0x2000)
        await self.wr(N.REG_AQA, (entries - 1) << 16 | (entries - 1))
        await self.wr(N.REG_ASQ, asq, 8)
        await self.wr(N.REG_ACQ, IOVA + ACQ, 8)
        await self.wr(N.REG_CC, N.CC_EN | 6 << 16 | 4 << 20)
        self.queues = {0: [ASQ, ACQ, entries, 0, 0, 1, entries]}
        if wait:
            await self.wait_csts(N.CSTS_RDY | N.CSTS_CFS, N.CSTS_RDY)

    def submit(self, qid: int, opcode: int, nsid: int = 0, prp1: int = 0, prp2: int = 0, cdw=(), cdw0: int = 0) -> int:
        q = self.queues[qid]
        self.cid = (self.cid + 1) & 0xFFFF
        d = [0] * 6
        d[: len(cdw)] = cdw
        sqe = N.SQE.pack(opcode | cdw0 | self.cid << 16, nsid, 0, 0, prp1, prp2, *d)
        self.mem[q[0] + q[3] * 64 : q[0] + q[3] * 64 + 64] = sqe
        q[3] = (q[3] + 1) % q[2]
        return self.cid

    async def ring(self, qid: int) -> None:
        await self.wr(N.DOORBELLS + 8 * qid, self.queues[qid][3])

    def peek(self, qid: int) -> tuple[int, int, int] | None:
        """(cid, status field, dw0) of the next completion, or None."""
        q = self.queues[qid]
        off = q[1] + q[4] * 16
        dw0, _, _, _, cid, st = struct.unpack_from("<IIHHHH", self.mem, off)
        if st & 1 != q[5]:
            return None
        return cid, st >> 1, dw0

    async def reap(self, qid: int, doorbell: bool = True) -> tuple[int, int, int]:
        with trio.fail_after(10):
            while (e := self.peek(qid)) is None:
                await trio.sleep(0.001)
        q = self.queues[qid]
        q[4] += 1
        if q[4] == q[6]:
            q[4], q[5] = 0, q[5] ^ 1
        if doorbell:
            await self.wr(N.DOORBELLS + 8 * qid + 4, q[4])
        return e

    async def cmd(self, qid: int, opcode: int, **kw) -> tuple[int, int]:
        """(status field, dw0) of one command."""
        cid = self.submit(qid, opcode, **kw)
        await self.ring(qid)
        got, st, dw0 = await self.reap(qid)
        assert got == cid
        return st, dw0

    async def io_queues(self, entries: int = 16, cq_entries: int | None = None, iv: int = 0) -> None:
        n = cq_entries or entries
        assert (await self.cmd(0, N.ADM_CREATE_CQ, prp1=IOVA + IOCQ, cdw=((n - 1) << 16 | 1, iv << 16 | 3)))[0] == 0
        assert (await self.cmd(0, N.ADM_CREATE_SQ, prp1=IOVA + IOSQ, cdw=((entries - 1) << 16 | 1, 1 << 16 | 1)))[
            0
        ] == 0
        self.queues[1] = [IOSQ, IOCQ, entries, 0, 0, 1, n]

    async def close(self) -> None:
        await self.dev.close()
        await self.ctx.close()
        self.mem.close()


async def test_identify_features_logs_and_queue_statuses(daemon) -> None:
    d = await Driver.open(daemon)
    assert await d.dev.pread(CONFIG, 8, 4) >> 8 == 0x010802
    assert await d.rd(N.REG_CAP, 8) == N.CAP and await d.rd(N.REG_VS) == 0x10400
    await d.enable()

    # Identify controller, namespace, active list, descriptors; CNS 5 (NVMe 2.0) is refused
    assert await d.cmd(0, N.ADM_IDENTIFY, prp1=IOVA + DATA, cdw=(1,)) == (0, 0)
    idc = d.mem[DATA : DATA + 4096]
    assert struct.unpack_from("<HH", idc, 0) == (0x1DE5, 0x1DE5)
    assert idc[4:24] == b"ICUSE0001".ljust(20) and idc[77] == N.MDTS and idc[111] == 1
    assert (idc[512], idc[513], struct.unpack_from("<I", idc, 516)[0]) == (0x66, 0x44, 1)
    assert struct.unpack_from("<H", idc, 520)[0] == 1 << 3 and idc[525] & 1  # Write Zeroes, a write cache
    assert await d.cmd(0, N.ADM_IDENTIFY, nsid=1, prp1=IOVA + DATA, cdw=(0,)) == (0, 0)
    assert struct.unpack_from("<QQ", d.mem, DATA) == (2 << 20, 2 << 20)  # 1 GiB in 512-byte blocks
    assert struct.unpack_from("<I", d.mem, DATA + 128)[0] == 9 << 16
    assert await d.cmd(0, N.ADM_IDENTIFY, nsid=0, prp1=IOVA + DATA, cdw=(2,)) == (0, 0)
    assert struct.unpack_from("<II", d.mem, DATA) == (1, 0)
    assert await d.cmd(0, N.ADM_IDENTIFY, nsid=1, prp1=IOVA + DATA, cdw=(2,)) == (0, 0)
    assert struct.unpack_from("<I", d.mem, DATA)[0] == 0  # nothing above 1
    assert await d.cmd(0, N.ADM_IDENTIFY, nsid=1, prp1=IOVA + DATA, cdw=(3,)) == (0, 0)
    assert [d.mem[DATA + o] for o in (0, 1, 12, 13, 32, 33)] == [1, 8, 2, 16, 3, 16]  # EUI-64, NGUID, UUID
    assert d.mem[DATA + 4 : DATA + 12] == d.vdev.model._ns_ids()[0][1]
    assert (await d.cmd(0, N.ADM_IDENTIFY, nsid=1, prp1=IOVA + DATA, cdw=(5,)))[0] == N.SC_INVALID_FIELD | DNR
    assert (await d.cmd(0, N.ADM_IDENTIFY, nsid=2, prp1=IOVA + DATA, cdw=(0,)))[0] == N.SC_INVALID_NS | DNR

    # features
    assert await d.cmd(0, N.ADM_GET_FEATURES, cdw=(N.FEAT_VOLATILE_WC,)) == (0, 1)
    assert await d.cmd(0, N.ADM_SET_FEATURES, cdw=(N.FEAT_VOLATILE_WC, 0)) == (0, 0)
    assert await d.cmd(0, N.ADM_GET_FEATURES, cdw=(N.FEAT_VOLATILE_WC,)) == (0, 0)
    assert await d.cmd(0, N.ADM_GET_FEATURES, cdw=(N.FEAT_VOLATILE_WC | 1 << 8,)) == (0, 1)  # default
    assert (await d.cmd(0, N.ADM_SET_FEATURES, cdw=(N.FEAT_ARBITRATION | 1 << 31, 0)))[0] == 0x10D | DNR
    assert (await d.cmd(0, N.ADM_GET_FEATURES, cdw=(0x7F,)))[0] == N.SC_INVALID_FIELD | DNR
    assert await d.cmd(0, N.ADM_SET_FEATURES, cdw=(N.FEAT_NUM_QUEUES, 3 << 16 | 99)) == (0, 15 | 3 << 16)
    assert (await d.cmd(0, N.ADM_SET_FEATURES, cdw=(N.FEAT_NUM_QUEUES, 0xFFFF)))[0] == N.SC_INVALID_FIELD | DNR

    # queue creation: the specification's statuses
    cq = lambda qid, qsize, flags=3: (qsize - 1 << 16 | qid, flags)  # noqa: E731
    assert (await d.cmd(0, N.ADM_CREATE_CQ, prp1=IOVA + IOCQ, cdw=cq(0, 8)))[0] == N.SC_QID_INVALID | DNR
    assert (await d.cmd(0, N.ADM_CREATE_CQ, prp1=IOVA + IOCQ, cdw=cq(5, 8)))[0] == N.SC_QID_INVALID | DNR
    assert (await d.cmd(0, N.ADM_CREATE_CQ, prp1=IOVA + IOCQ, cdw=cq(1, 1)))[0] == N.SC_QUEUE_SIZE | DNR
    assert (await d.cmd(0, N.ADM_CREATE_CQ, prp1=IOVA + IOCQ, cdw=cq(1, 8, 2)))[0] == N.SC_INVALID_FIELD | DNR
    assert (await d.cmd(0, N.ADM_CREATE_CQ, prp1=IOVA + IOCQ + 8, cdw=cq(1, 8)))[0] == 0x013 | DNR
    assert (await d.cmd(0, N.ADM_CREATE_CQ, prp1=IOVA + IOCQ, cdw=cq(1, 8, 17 << 16 | 3)))[0] == 0x108 | DNR
    assert (await d.cmd(0, N.ADM_CREATE_SQ, prp1=IOVA + IOSQ, cdw=(7 << 16 | 1, 1 << 16 | 1)))[0] == 0x100 | DNR
    await d.io_queues()
    assert (await d.cmd(0, N.ADM_SET_FEATURES, cdw=(N.FEAT_NUM_QUEUES, 0)))[0] == N.SC_CMD_SEQ_ERROR | DNR
    assert (await d.cmd(0, N.ADM_DELETE_CQ, cdw=(1,)))[0] == N.SC_INVALID_QUEUE_DELETION | DNR
    assert await d.cmd(0, N.ADM_ABORT, cdw=(1 | 5 << 16,)) == (0, 1)  # not aborted

    # logs: SMART counts what was done, firmware slot 1, an unknown log
    d.mem[DATA : DATA + 4096] = block_pattern(0, 8)
    assert (await d.cmd(1, N.IO_WRITE, nsid=1, prp1=IOVA + DATA, cdw=(0, 0, 7)))[0] == 0
    assert (await d.cmd(1, N.IO_READ, nsid=1, prp1=IOVA + DATA + 4096, cdw=(0, 0, 7)))[0] == 0
    assert d.mem[DATA + 4096 : DATA + 8192] == block_pattern(0, 8)
    assert await d.cmd(0, N.ADM_GET_LOG_PAGE, nsid=0xFFFFFFFF, prp1=IOVA + DATA, cdw=(2 | 127 << 16,)) == (0, 0)
    smart = d.mem[DATA : DATA + 512]
    assert struct.unpack_from("<H", smart, 1)[0] == N.TEMPERATURE_K and smart[3] == 100
    assert [int.from_bytes(smart[o : o + 16], "little") for o in (32, 48, 64, 80)] == [1, 1, 1, 1]
    assert await d.cmd(0, N.ADM_GET_LOG_PAGE, prp1=IOVA + DATA, cdw=(3 | 127 << 16,)) == (0, 0)
    assert d.mem[DATA] == 1 and d.mem[DATA + 8 : DATA + 16] == b"1.0".ljust(8)
    assert (await d.cmd(0, N.ADM_GET_LOG_PAGE, prp1=IOVA + DATA, cdw=(0x7F | 127 << 16,)))[0] == 0x109 | DNR
    # the error log: the newest failure first (the unknown log page)
    assert await d.cmd(0, N.ADM_GET_LOG_PAGE, prp1=IOVA + DATA, cdw=(1 | 15 << 16,)) == (0, 0)
    count, sqid, _cid, status = struct.unpack_from("<QHHH", d.mem, DATA)
    assert (sqid, status >> 1) == (0, 0x109 | DNR) and count == d.vdev.model.error_count
    assert (await d.cmd(0, 0x7F))[0] == N.SC_INVALID_OPCODE | DNR
    await d.close()
    await assert_released(daemon)


async def test_asynchronous_event_on_a_bad_doorbell(daemon) -> None:
    d = await Driver.open(daemon)
    await d.enable()
    aer = d.submit(0, N.ADM_AER)
    await d.ring(0)
    await trio.sleep(0.05)
    assert d.peek(0) is None  # held
    for _ in range(N.AERL):
        d.submit(0, N.ADM_AER)
    d.submit(0, N.ADM_AER)  # one more than AERL + 1
    await d.ring(0)
    assert (await d.reap(0))[1] == N.SC_AER_LIMIT | DNR
    await d.wr(N.DOORBELLS + 8 * 5, 1)  # SQ 5 does not exist
    cid, st, dw0 = await d.reap(0)
    assert (cid, st, dw0) == (aer, 0, N.AE_INVALID_DOORBELL << 8 | N.LOG_ERROR << 16)
    await d.wr(N.DOORBELLS, 100)  # past the admin SQ: masked until the error log is read
    await trio.sleep(0.05)
    assert d.peek(0) is None
    log_page = d.submit(0, N.ADM_GET_LOG_PAGE, prp1=IOVA + DATA, cdw=(1 | 15 << 16,))
    await d.ring(0)
    assert (await d.reap(0))[:2] == (log_page, 0)
    cid, st, dw0 = await d.reap(0)  # now the second event, on the next held AER
    assert (st, dw0) == (0, N.AE_INVALID_DOORBELL_VALUE << 8 | N.LOG_ERROR << 16)
    await d.close()
    await assert_released(daemon)


async def test_a_full_completion_queue_holds_its_submission_queue(daemon) -> None:
    d = await Driver.open(daemon)
    await d.enable()
    await d.io_queues(entries=16, cq_entries=4)  # a CQ of 4 holds 3 completions
    for _ in range(6):
        d.submit(1, N.IO_FLUSH, nsid=1)
    await d.ring(1)
    await trio.sleep(0.05)
    got = [await d.reap(1, doorbell=False) for _ in range(3)]
    await trio.sleep(0.05)
    assert d.peek(1) is None and all(st == 0 for _, st, _ in got)
    assert d.vdev.model.sqs[1].head == 3  # the rest waits in the SQ
    await d.wr(N.DOORBELLS + 12, d.queues[1][4])  # the CQ head moves: the rest completes
    got += [await d.reap(1) for _ in range(3)]
    assert [c for c, _, _ in got] == sorted(c for c, _, _ in got)
    await d.close()
    await assert_released(daemon)


async def test_dma_faults_and_intx(daemon) -> None:
    d = await Driver.open(daemon, bus_master=False)
    vdev = d.vdev
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        await d.dev.enable_irqs(uapi.VFIO_PCI_INTX_IRQ_INDEX, [efd])
        # bus mastering off: the controller cannot even fetch a command: fatal status, a fault
        faults = vdev.fault_count
        await d.enable()
        d.submit(0, N.ADM_IDENTIFY, prp1=IOVA + DATA, cdw=(1,))
        await d.ring(0)
        await d.wait_csts(N.CSTS_CFS, N.CSTS_CFS)
        assert vdev.fault_count == faults + 1 and vdev.faults[-1].reason == "bus master disabled"
        # mastering on, reset: it works, and signals INTx (vfio masks the line: unmask per interrupt)
        cmd = await d.dev.pread(CONFIG, 4, 2)
        await d.dev.pwrite(CONFIG, 4, 2, cmd | 0x4)
        await d.enable()
        assert await d.cmd(0, N.ADM_IDENTIFY, prp1=IOVA + DATA, cdw=(1,)) == (0, 0)
        assert os.eventfd_read(efd) == 1
        await d.io_queues()
        # an unmapped list page: Data Transfer Error (retry allowed: no DNR), the fault recorded
        faults = vdev.fault_count
        st, _ = await d.cmd(1, N.IO_READ, nsid=1, prp1=IOVA + DATA, prp2=IOVA + MEM + 0x10000, cdw=(0, 0, 63))
        assert st == N.SC_DATA_TRANSFER_ERROR
        assert vdev.fault_count == faults + 1
        f = vdev.faults[-1]
        assert (f.iova, f.write, f.reason) == (IOVA + MEM + 0x10000, False, "no translation")
        # a list entry that is not page aligned: PRP Offset Invalid, no fault
        struct.pack_into("<Q", d.mem, DATA + 0x8000, IOVA + DATA + 0x1000 + 8)
        st, _ = await d.cmd(1, N.IO_READ, nsid=1, prp1=IOVA + DATA, prp2=IOVA + DATA + 0x8000, cdw=(0, 0, 23))
        assert st == N.SC_PRP_OFFSET_INVALID | DNR and vdev.fault_count == faults + 1
        # the status shows the device's faults and the controller
        dev = next(x for x in collect_status(daemon)["devices"] if x["bdf"] == "0000:00:07.0")
        assert dev["dma_faults"] == vdev.fault_count and dev["model"]["ready"] and not dev["model"]["fatal"]
    finally:
        await d.close()
        os.close(efd)
    await assert_released(daemon)
