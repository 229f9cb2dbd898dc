"""The NVMe controller (iommufd_cuse/vfio/pci/nvme.py) driven by examples/nvme.c, a
userspace driver compiled as a user would, against the real daemon: identify,
I/O through PRP1/PRP2 and PRP lists checked against the backing file, error
statuses and the faults behind them, controller and function-level reset,
shutdown; and, from Python, the registers and admin commands a driver relies on."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from harness import make_daemon, run, scratch_dir

from iommufd_cuse import config

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "include"
MIB = 1 << 20
NVME_INDEX = 4  # vfio4 in the default topology


def pattern(lba: int, blocks: int) -> bytes:
    """What examples/nvme.c writes: LBA n holds n (u64), then (n % 251 + i) & 0xff."""
    table = bytes(i & 0xFF for i in range(251 + 512))
    return b"".join(struct.pack("<Q", n) + table[n % 251 : n % 251 + 504] for n in range(lba, lba + blocks))


@pytest.fixture(scope="module")
def example() -> Iterator[Path]:
    out = scratch_dir()
    exe = out / "nvme"
    subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{INCLUDE}", "-o", str(exe), str(ROOT / "examples/nvme.c")],
        check=True,
    )
    yield exe
    shutil.rmtree(out, ignore_errors=True)


def nodes(daemon, n: int = NVME_INDEX) -> list[Path]:
    return [Path(daemon.dev_dir) / "iommu", Path(daemon.dev_dir) / "vfio" / "devices" / f"vfio{n}"]


@pytest.fixture
async def file_daemon() -> AsyncIterator:
    """A daemon whose NVMe namespace is a 64 MiB file (vfio0 is the controller)."""
    base = scratch_dir()
    backing = base / "ns.img"
    cfg = config.load(None)
    nvme = next(d for d in cfg.devices if d.model == "nvme")
    nvme.options = {"size": 64 * MIB, "backing": str(backing), "serial": "TESTSN42", "model_name": "test ctrl"}
    cfg.devices = [nvme]
    try:
        async with trio.open_nursery() as nursery:
            d = make_daemon(base, cfg)
            await nursery.start(d.run)
            d.backing = backing
            yield d
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def released(daemon) -> None:
    with trio.move_on_after(10):
        while daemon.system.contexts or daemon.system.pinned_pages():
            await trio.sleep(0.01)
    assert not daemon.system.contexts and daemon.system.pinned_pages() == 0


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
    assert data[: (blocks - 64) * 512] == pattern(0, blocks - 64)
    assert data[(blocks - 64) * 512 : 8 * MIB] == bytes(64 * 512)
    assert data[8 * MIB :] == bytes(56 * MIB)
    assert vdev.fault_count == 0
    ctrl = vdev.model
    assert ctrl.reads > 0 and ctrl.blocks_written >= blocks
    await released(file_daemon)


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
    await released(daemon)
    # and the controller serves the next client from scratch
    p = await run([example, *nodes(daemon)])
    assert p.stdout.decode().splitlines()[-1] == "done"
    await released(daemon)
