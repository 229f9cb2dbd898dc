"""Random ioctls (syzkaller-shaped, tests/clients/fuzz.py) from several client
processes at once, on every node: every answer is a kernel errno (never EIO, the
daemon's answer to a handler that raised), the daemon logs no error or traceback,
keeps serving, and afterwards holds no context, pin or owned device."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from collections.abc import AsyncIterator

import pytest
import trio
from harness import CLIENTS, run, serving

from iommufd_cuse import uapi
from iommufd_cuse.client import Iommufd
from iommufd_cuse.daemon import Daemon

# What the kernel's iommufd and VFIO ioctls answer to bad input.
KERNEL_ERRNOS = {
    0,
    errno.EPERM,
    errno.ENOENT,
    errno.ESRCH,
    errno.EINTR,
    errno.ENXIO,
    errno.E2BIG,
    errno.EBADF,
    errno.EAGAIN,
    errno.ENOMEM,
    errno.EACCES,
    errno.EFAULT,
    errno.EBUSY,
    errno.EEXIST,
    errno.ENODEV,
    errno.EINVAL,
    errno.ENOSPC,
    errno.ENOTTY,
    errno.ERANGE,
    errno.EOVERFLOW,
    errno.EOPNOTSUPP,
    errno.EADDRINUSE,
    errno.EMSGSIZE,
}
ROUNDS = int(os.environ.get("ICUSE_FUZZ_ROUNDS", "1500"))  # per process


@pytest.fixture
async def selftest_daemon() -> AsyncIterator[Daemon]:
    """A daemon in test mode: IOMMU_TEST_CMD and its mock IOMMU are fuzzed too."""
    async with serving(selftest=True) as d:
        yield d


async def test_random_ioctls_from_several_processes_never_break_the_daemon(daemon, caplog):
    await fuzz_from_processes(daemon, caplog)


async def test_random_ioctls_in_test_mode(selftest_daemon, caplog):
    await fuzz_from_processes(selftest_daemon, caplog)


async def fuzz_from_processes(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    iommu = os.path.join(daemon.dev_dir, "iommu")
    # One process per line at once; the devices of a group one after the other (a
    # group is owned by one iommufd at a time: a concurrent bind would be refused).
    lines = [["iommu"], ["iommu"], ["vfio/vfio"]]
    by_group: dict[int, list[str]] = {}
    for i, dev in enumerate(daemon.system.devices):
        by_group.setdefault(id(dev.group), []).append(f"vfio/devices/vfio{i}")
    lines += by_group.values()
    results: list[dict[str, int]] = []

    async def one(i: int, nodes: list[str]) -> None:
        for j, node in enumerate(nodes):
            bind = iommu if node.startswith("vfio/devices") else "-"
            path = os.path.join(daemon.dev_dir, node)
            p = await run([sys.executable, CLIENTS / "fuzz.py", path, bind, 1000 + 16 * i + j, ROUNDS], timeout=300)
            results.append(json.loads(p.stdout.decode().splitlines()[-1]))

    async with trio.open_nursery() as nursery:
        for i, nodes in enumerate(lines):
            nursery.start_soon(one, i, nodes)
    nodes = [n for line in lines for n in line]
    seen = {int(e) for r in results for e in r}
    assert len(results) == len(nodes)
    assert errno.EIO not in seen, "a handler raised (EIO)"
    assert seen <= KERNEL_ERRNOS, f"answers that are no kernel errno here: {seen - KERNEL_ERRNOS}"
    assert sum(r.get("0", 0) for r in results) > 0, "nothing succeeded: the calls never got far"
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, failures[0].getMessage()
    # everything the fuzzing made is gone with its files, and the daemon still serves
    with trio.fail_after(10):
        while daemon.system.contexts:
            await trio.sleep(0.01)
    assert daemon.system.pinned_pages() == 0
    assert all(g.owner is None for g in daemon.system.groups.values())
    f = await trio.to_thread.run_sync(Iommufd.open, iommu)
    try:
        assert await trio.to_thread.run_sync(f.option, uapi.IOMMU_OPTION_RLIMIT_MODE, uapi.IOMMU_OPTION_OP_GET) == 0
    finally:
        f.close()
