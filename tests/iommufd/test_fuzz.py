"""Random ioctls on every node: each gets an errno or a success, never a daemon
error (EIO from an exception in a handler), and the daemon keeps serving."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import random

import trio

from iommufd_cuse import uapi
from iommufd_cuse.client import Iommufd, VfioDevice, raw_ioctl

NUMBERS = sorted(
    {v for k, v in vars(uapi).items() if isinstance(v, int) and (k.startswith(("IOMMU_", "VFIO_"))) and v >> 8 == 0x3B}
)


def _fuzz(path: str, seed: int, rounds: int, iommufd: str | None = None) -> list[tuple[int, int]]:
    """Random ioctls on path; a device node is first bound to a fresh iommufd and
    attached to an IOAS, so the calls reach past the no-access-before-bind check."""
    rnd = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    ictx = None
    seen = []
    if iommufd is not None:
        ictx = Iommufd.open(iommufd)
        dev = VfioDevice(fd)
        dev.bind(ictx.fd)
        dev.attach(ictx.ioas_alloc())
    try:
        for _ in range(rounds):
            cmd = rnd.choice(NUMBERS) if rnd.random() < 0.9 else (0x3B << 8) | rnd.randrange(256)
            size = rnd.choice([0, 4, 8, 12, 16, 24, 32, 40, 48, 72, 80, rnd.randrange(200)])
            raw = bytearray(rnd.randbytes(max(size, 8) + 64))
            if rnd.random() < 0.7:
                raw[0:4] = size.to_bytes(4, "little")  # a plausible size/argsz word
            if rnd.random() < 0.6:
                raw[size:] = bytes(len(raw) - size)  # nothing past the struct
            for off in range(4, len(raw) - 4, 4):  # keep ids and fds small sometimes
                if rnd.random() < 0.3:
                    raw[off : off + 4] = rnd.randrange(8).to_bytes(4, "little")
            buf = ctypes.create_string_buffer(bytes(raw), len(raw))
            rc, err = raw_ioctl(fd, cmd, buf)
            seen.append((cmd, err))
    finally:
        os.close(fd)
        if ictx is not None:
            ictx.close()
    return seen


async def test_random_ioctls_never_break_the_daemon(daemon, caplog):
    caplog.set_level(logging.ERROR)
    nodes = ["iommu", "vfio/vfio"] + [f"vfio/devices/vfio{i}" for i in range(len(daemon.system.devices))]
    results = []
    for i, n in enumerate(nodes):
        path = os.path.join(daemon.dev_dir, n)
        bind = os.path.join(daemon.dev_dir, "iommu") if n.startswith("vfio/devices") else None
        results += await trio.to_thread.run_sync(_fuzz, path, 1000 + i, 3000, bind)
    assert not [e for _, e in results if e == errno.EIO], "a handler raised (EIO)"
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, failures[0].getMessage()
    # still serving, and everything the fuzzing made is gone with its files
    with trio.fail_after(5):
        while daemon.system.contexts:
            await trio.sleep(0.01)
    assert daemon.system.pinned_pages() == 0
    assert all(g.owner is None for g in daemon.system.groups.values())
