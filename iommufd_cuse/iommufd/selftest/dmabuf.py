"""The selftest's dma-buf exporter: IOMMU_TEST_OP_DMABUF_GET and DMABUF_REVOKE
(selftest.c's iommufd_test_dma_buf). The importer side, IOMMU_IOAS_MAP_FILE of a
dma-buf, is the core's (pages.py DmabufPages, ioas.py).

DMABUF_GET answers a new dma-buf in the caller: the ioctl's return value is its fd
(mainline 7.3.4 returns 0 there, its own bug: the selftest expects the fd). With the
companion (__reserved = COMPANION_MAGIC) the answer is a token, which the companion
claims on DMABUF_NODE and turns into the descriptor it returns.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from ...errors import Errno
from ...system import PAGE_SIZE
from ..companion import COMPANION_MAGIC, HandedFile, carrier_of, hand_back, refuse_without_companion
from .stdev import SelftestCall

log = logging.getLogger(__name__)

DMABUF_NODE = "iommufd-selftest/dmabuf"
DMABUF_MAX_LENGTH = PAGE_SIZE * 512


class TestDmabuf:
    """struct iommufd_test_dma_buf with its dma_buf: length bytes of zeroed daemon
    memory (a memfd), the revoked flag, and the pages attached to it (the importers).
    It lives while its file or any importer holds it."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.revoked = False
        self.importers: list[Any] = []
        self.refs = 1  # the file's (or the unclaimed token's)
        self.unclaimed: tuple[Any, Any] | None = None  # (context, its release hook) until claimed
        self._memfd = os.memfd_create("iommufd-test-dmabuf", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, length)

    def memfd(self) -> int:
        return self._memfd

    def attach(self, pages: Any) -> None:
        self.importers.append(pages)
        self.refs += 1

    def detach(self, pages: Any) -> None:
        self.importers.remove(pages)
        self.put()

    def put(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            os.close(self._memfd)

    async def revoke(self, revoked: bool) -> None:
        """iommufd_test_dmabuf_revoke: set the flag, then dma_buf_invalidate_mappings:
        every importer not revoked yet loses its mappings for good (a later map of the
        dma-buf sees the flag: ENODEV while revoked)."""
        self.revoked = revoked
        for pages in list(self.importers):
            await pages.revoke_notify()


class DmabufFile(HandedFile):
    """An open of DMABUF_NODE: the dma-buf's file once claimed. It holds the dma-buf,
    not the iommufd context (a dma-buf outlives the iommufd that made it)."""

    kind = "dmabuf"
    node = DMABUF_NODE

    def claimed(self, obj: Any) -> None:
        self.obj = obj
        if obj.unclaimed is not None:
            ctx, hook = obj.unclaimed
            obj.unclaimed = None
            ctx.release_hooks.remove(hook)

    @property
    def dmabuf(self) -> TestDmabuf | None:
        """What IOMMU_IOAS_MAP_FILE imports (pages.dmabuf_get)."""
        return self.obj

    def on_release(self) -> None:
        if self.obj is not None:
            self.obj.put()
            self.obj = None


async def op_dmabuf_get(t: SelftestCall) -> int:
    """DMABUF_GET: length rounded up to pages, 0 or over 512 pages EINVAL; a new
    dma-buf of zeroed memory whose fd is the return value (through the companion or a
    notified call, companion.hand_back; without either EOPNOTSUPP, logged)."""
    length = (t.arg.length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if length == 0 or length > DMABUF_MAX_LENGTH:
        raise Errno(errno.EINVAL)
    carrier = carrier_of(t.ucmd.caller, t.ucmd.cmd.reserved == COMPANION_MAGIC)
    if carrier is None:
        refuse_without_companion(log, "IOMMU_TEST_OP_DMABUF_GET", "a dma-buf")
    dmabuf = TestDmabuf(length)
    system = t.system

    def unclaimed() -> None:
        # The context closes with the token never claimed: the dma-buf goes.
        pending = DmabufFile.pending(system)
        for token, (obj, _tgid) in list(pending.items()):
            if obj is dmabuf:
                del pending[token]
                dmabuf.put()

    t.ctx.release_hooks.append(unclaimed)
    dmabuf.unclaimed = (t.ctx, unclaimed)
    try:
        return await hand_back(
            DmabufFile, system, dmabuf, t.ucmd.caller, carrier, log, "IOMMU_TEST_OP_DMABUF_GET", "a dma-buf", True
        )
    except BaseException:
        if dmabuf.unclaimed is not None:  # no file holds it (a claimed one puts it at its release)
            dmabuf.unclaimed = None
            t.ctx.release_hooks.remove(unclaimed)
            dmabuf.put()
        raise


async def op_dmabuf_revoke(t: SelftestCall) -> int:
    """DMABUF_REVOKE of the caller's fd: no fd EBADF, not a dma-buf EINVAL, a dma-buf
    of another exporter EOPNOTSUPP; else revoked set as asked, and the mappings of
    every importer invalidated."""
    fd = t.ucmd.caller.fetch_fd(t.arg.dmabuf_fd)
    try:
        dmabuf = await DmabufFile.of_dup(t.system, fd)
        target = os.readlink(f"/proc/self/fd/{fd}") if dmabuf is None else ""
    finally:
        os.close(fd)
    if dmabuf is None:
        raise Errno(errno.EOPNOTSUPP if target.startswith(("anon_inode:dmabuf", "/dmabuf:")) else errno.EINVAL)
    await dmabuf.revoke(bool(t.arg.revoked))
    return 0
