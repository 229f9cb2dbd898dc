"""No client can stall or break another (DESIGN.md §11, docs/architecture.md): the calls
that used to freeze the daemon, made by a real hostile process, answer the kernel's
errno while a victim on another open keeps being served; they stop at the caller's
signal (EINTR) and at SIGTERM, leaving nothing behind. The same for a virtio-blk driver
whose every request is the longest chain the device follows."""

from __future__ import annotations

import errno
import logging
import os
import signal

import pytest
import trio
from harness import scratch_dir  # noqa: F401  (the scratch directories the fixtures use)
from test_service import mounted, served, stop

from iommufd_cuse import uapi
from iommufd_cuse.client import Iommufd


def victim_round_trips(node: str, n: int) -> list[int]:
    """n IOMMU_OPTION(RLIMIT_MODE, GET) calls on a fresh open (each raises on failure); their values."""
    f = Iommufd.open(node)
    try:
        return [f.option(uapi.IOMMU_OPTION_RLIMIT_MODE, uapi.IOMMU_OPTION_OP_GET) for _ in range(n)]
    finally:
        f.close()


VBLK_INDEX = 5  # the virtio-blk disk: vfio5 in the default topology; the other modes use the edu at vfio0
DEVICE = {"virtio_chains": f"vfio{VBLK_INDEX}"}


def device_node(dev_dir: str | os.PathLike, mode: str) -> str:
    return os.path.join(dev_dir, "vfio", "devices", DEVICE.get(mode, "vfio0"))


async def start_hostile(exe, mode: str, iommu: str, device: str, count: int) -> trio.Process:  # noqa: ANN001
    proc = await trio.lowlevel.open_process([str(exe), mode, iommu, device, str(count)], stdout=-1, stderr=-1, stdin=-1)
    return proc


async def read_lines(proc: trio.Process, want: int) -> list[str]:
    """The first `want` lines the process prints."""
    buf = b""
    while buf.count(b"\n") < want:
        chunk = await proc.stdout.receive_some()
        if not chunk:
            break
        buf += chunk
    return buf.decode().splitlines()


def steps(lines: list[str]) -> list[tuple[str, int]]:
    out = []
    for line in lines:
        if line.startswith("STEP "):
            name, rc, err = line.split()[1:4]
            out.append((name, int(err.split("=")[1]) if int(rc.split("=")[1]) else 0))
    return out


async def in_flight(daemon) -> None:  # noqa: ANN001
    """Until some request of the daemon is running as a task (the hostile call)."""
    with trio.fail_after(20):
        while not daemon.server._inflight:
            await trio.sleep(0.005)


EXPECTED = {
    "alloc_tail": [("alloc_tail", 0)],  # 4 GiB of zero tail: accepted, as by the kernel
    "hw_info": [("hw_info", errno.EFAULT)],  # clear_user stops at the PROT_NONE page
    "allow_iovas": [("allow_iovas", 0)],
    "map_high": [("map_high_map", 0), ("map_high_attach", errno.EFAULT), ("map_high_unmap", 0)],
    # 256 requests of an indirect table of 1024 descriptors each, all used with status OK and
    # their whole length: the device follows the longest chains it takes
    "virtio_chains": [("virtio_chains", 0)],
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
async def test_hostile_call_answers_the_kernels_errno(daemon, cbuild, caplog, mode):
    caplog.set_level(logging.ERROR)
    exe = cbuild("hostile")
    iommu = os.path.join(daemon.dev_dir, "iommu")
    proc = await start_hostile(exe, mode, iommu, device_node(daemon.dev_dir, mode), 1)
    with trio.fail_after(60):
        lines = await read_lines(proc, 1 + len(EXPECTED[mode]))
        await proc.wait()
    assert proc.returncode == 0, lines
    assert steps(lines) == EXPECTED[mode]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(d.vfio.fault_count == 0 for d in daemon.system.devices), "a device recorded a DMA fault"
    with trio.fail_after(5):
        while daemon.system.contexts:
            await trio.sleep(0.01)
    assert daemon.system.pinned_pages() == 0
    assert all(g.owner is None for g in daemon.system.groups.values())


async def test_victim_is_served_while_a_long_zero_tail_is_checked(daemon, cbuild):
    """While the 4 GiB tail of one client's IOAS_ALLOC is being checked, another
    client's calls are answered: the check is not on the loop."""
    exe = cbuild("hostile")
    iommu = os.path.join(daemon.dev_dir, "iommu")
    proc = await start_hostile(exe, "alloc_tail", iommu, "-", 1)
    assert await read_lines(proc, 1) == ["READY"]
    await in_flight(daemon)
    assert await trio.to_thread.run_sync(victim_round_trips, iommu, 50) == [0] * 50
    assert daemon.server._inflight, "the hostile call ended before the victim's calls: nothing was shown"
    with trio.fail_after(60):
        await proc.wait()


async def test_signal_interrupts_a_long_zero_tail_check(daemon, cbuild):
    """SIGUSR1 to the caller: FUSE_INTERRUPT cancels the scan between two chunks,
    the caller gets EINTR, and nothing of the request is left."""
    from iommufd_cuse.transport import caller

    exe = cbuild("hostile")
    iommu = os.path.join(daemon.dev_dir, "iommu")
    proc = await start_hostile(exe, "alloc_tail", iommu, "-", 1)
    assert await read_lines(proc, 1) == ["READY"]
    await in_flight(daemon)
    proc.send_signal(signal.SIGUSR1)
    with trio.fail_after(30):
        lines = await read_lines(proc, 1)
        await proc.wait()
    assert steps(lines) == [("alloc_tail", errno.EINTR)]
    with trio.fail_after(5):
        while daemon.system.contexts or daemon.server._inflight:
            await trio.sleep(0.01)
    assert not caller._scan_limiters


async def test_victim_is_served_while_a_virtio_blk_driver_loops_on_the_longest_chains(daemon, cbuild, caplog):
    """While a driver keeps the virtio-blk disk busy with requests of 1024 descriptors (the
    device's turn bounded in requests and descriptors, its copies made a few at a time between
    checkpoints), another client's calls are answered, the device goes on serving the driver,
    records no DMA fault, and nothing is logged as an error."""
    caplog.set_level(logging.ERROR)
    exe = cbuild("hostile")
    iommu = os.path.join(daemon.dev_dir, "iommu")
    vblk = daemon.system.devices[VBLK_INDEX].vfio
    proc = await start_hostile(exe, "virtio_chains", iommu, device_node(daemon.dev_dir, "virtio_chains"), 0)
    try:
        assert await read_lines(proc, 1) == ["READY"]
        with trio.fail_after(30):
            while not vblk.model.requests:
                await trio.sleep(0.005)
        before = vblk.model.requests
        with trio.fail_after(60):  # the victim's calls answered, batch after batch, while the disk serves the driver
            while vblk.model.requests < before + 64:
                assert await trio.to_thread.run_sync(victim_round_trips, iommu, 50) == [0] * 50
        with trio.fail_after(60):
            lines = await read_lines(proc, 2)  # (READY was read) two rounds of 256 requests
        assert steps(lines[:2]) == EXPECTED["virtio_chains"] * 2, lines
        assert vblk.fault_count == 0 and vblk.model.fault_count == 0
        assert not vblk.model.status()["needs_reset"]
    finally:
        proc.kill()
        await proc.wait()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with trio.fail_after(10):
        while daemon.system.contexts:
            await trio.sleep(0.01)
    assert daemon.system.pinned_pages() == 0


@pytest.mark.parametrize("mode", ["alloc_tail", "hw_info", "allow_iovas", "virtio_chains"])
async def test_sigterm_with_a_hostile_call_in_flight(cbuild, mode):
    """The daemon stops promptly on SIGTERM while a client loops on a long call, and
    leaves no mount, link or traceback."""
    exe = cbuild("hostile")
    async with served() as d:
        with trio.fail_after(30):
            while not os.path.exists(d.node):
                await trio.sleep(0.05)
        proc = await start_hostile(exe, mode, str(d.node), device_node(d.base / "dev", mode), 0)
        try:
            assert (await read_lines(proc, 1))[:1] == ["READY"]
            await trio.sleep(0.3)  # some calls in, one in flight
            # Bounded: a scan on the loop used to hold shutdown for its whole length.
            with trio.fail_after(10):
                await stop(d)
        finally:
            proc.kill()
            await proc.wait()
        assert not mounted(d.base / "mnt")
        assert not os.path.lexists(d.node)
        log = d.log_text()
        assert "Traceback" not in log and "ERROR" not in log, log
        assert "stopped, 0 pages pinned" in log, log
