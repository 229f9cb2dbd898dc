"""The selftest's accesses: CREATE_ACCESS, ACCESS_PAGES, ACCESS_RW,
DESTROY_ACCESS_PAGES, ACCESS_REPLACE_IOAS.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import trio

from ... import uapi
from ...errors import Errno
from ...system import PAGE_SIZE
from ..access import Access, Pins, pin_pages, unpin_pages
from ..companion import CLAIM, COMPANION_MAGIC, TOKEN_BASE, HandedFile, carrier_of, hand_back, refuse_without_companion
from ..ioas import get_ioas
from ..object import Context
from .md_check import _AddressSpace, _name_page
from .mock import ULONG_MAX
from .stdev import SelftestCall

log = logging.getLogger(__name__)


# ACCESS_PAGES / ACCESS_RW refuse more than this (the kernel's guard for its kvzalloc).
ACCESS_MAX_LENGTH = 16 * 1024 * 1024


# -- accesses: CREATE_ACCESS, ACCESS_PAGES, ACCESS_RW, DESTROY_ACCESS_PAGES, ACCESS_REPLACE_IOAS ------
# An access is a new file in the caller, which a FUSE server cannot create. With the
# companion library (tools/iommufd_selftest_preload.c, LD_PRELOAD) in the caller,
# CREATE_ACCESS carries COMPANION_MAGIC in __reserved; the daemon then answers with a
# token in out_access_fd, and the companion opens ACCESS_NODE and claims the token on
# that file (ACCESS_CLAIM), putting the new fd in out_access_fd. Every semantic stays
# here; the companion only turns a token into an open file (companion.py). Without
# it: EOPNOTSUPP.
ACCESS_NODE = "iommufd-selftest/access"
ACCESS_TOKEN_BASE = TOKEN_BASE
ACCESS_CLAIM = CLAIM  # on ACCESS_NODE, arg: the token


@dataclass
class _AccessItem:
    """struct selftest_access_item: pinned pages of one ACCESS_PAGES."""

    id: int
    iova: int
    length: int
    pins: Pins


class SelftestAccess(Access):
    """An access with the selftest's ops (struct selftest_access): its pins are
    items, dropped whenever the IOAS unmaps under them."""

    def __init__(self, ctx: Context, needs_pin_pages: bool) -> None:
        super().__init__(ctx, needs_pin_pages)
        self.items: dict[int, _AccessItem] = {}
        self.next_id = 0
        self.file: AccessFile | None = None
        self.closed = False

    def notify_unmap(self, iova: int, length: int) -> None:
        """iommufd_test_access_unmap: drop every item overlapping [iova, iova + length)."""
        last = min(iova + length - 1, ULONG_MAX)
        for item in list(self.items.values()):
            if iova > item.iova + item.length - 1 or last < item.iova:
                continue
            del self.items[item.id]
            unpin_pages(item.pins)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """The access's file is closed (or its context is): unpin, detach, destroy."""
        if self.closed:
            return
        self.closed = True
        self.detach()
        if self.file is not None:
            self.file.obj = None
            self.file = None
        self.users -= 1  # the driver's reference (the file's)
        ctx = self.ctx
        if not ctx.closed and ctx.objects.get(self.id) is self:
            try:
                ctx.remove(self.id)
            except Errno:
                log.warning("access %d still in use at close", self.id)
        AccessFile.forget(ctx.system, self)
        if self.close in ctx.release_hooks:
            ctx.release_hooks.remove(self.close)


class AccessFile(HandedFile):
    """An open of ACCESS_NODE: the file of one access once claimed (its close
    destroys the access, as the kernel's staccess release)."""

    kind = "access"
    node = ACCESS_NODE

    def on_release(self) -> None:
        if self.obj is not None:
            self.obj.close()


async def _get_access(t: SelftestCall, fd: int) -> SelftestAccess:
    """iommufd_access_get: the access whose file the caller has as fd; EBADFD for
    no fd or a file that is not an access."""
    return await AccessFile.lookup(t.system, t.ucmd.caller, fd)


def _syz_iova(ioas: Any, iova: int) -> int:
    """iommufd_test_syz_conv_iova: syzkaller's iova is (nth area, offset in it)."""
    if ioas is None:
        return 0
    nth, offset = iova & 0xFFFFFFFF, iova >> 32
    for i, area in enumerate(ioas.iopt.areas):
        if i == nth:
            return area.start + offset
    return 0


async def op_create_access(t: SelftestCall) -> int:
    """CREATE_ACCESS: an access to the IOAS t.id, as a new file in the caller."""
    if t.arg.flags & ~uapi.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES:
        raise Errno(errno.EOPNOTSUPP)
    ctx = t.ctx
    carrier = carrier_of(t.ucmd.caller, t.ucmd.cmd.reserved == COMPANION_MAGIC)
    if carrier is None:
        get_ioas(ctx, t.id)
        refuse_without_companion(log, "IOMMU_TEST_OP_CREATE_ACCESS", "an access")
    # iommufd_access_create makes the object visible at once, then attaches it.
    access = ctx.alloc(SelftestAccess(ctx, bool(t.arg.flags & uapi.MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES)))
    ctx.finalize(access)
    access.users += 1  # the driver's (the file's) reference
    try:
        ioas = get_ioas(ctx, t.id)
        with ctx.hold(ioas):
            async with ioas.iopt.lock:
                access.attach(ioas)
        ctx.release_hooks.append(access.close)
        t.arg.out_access_fd = await hand_back(
            AccessFile, t.system, access, t.ucmd.caller, carrier, log, "IOMMU_TEST_OP_CREATE_ACCESS", "an access"
        )
        t.respond()
    except BaseException:
        access.close()
        raise
    return 0


async def op_access_pages(t: SelftestCall) -> int:
    a = t.arg
    if a.length > ACCESS_MAX_LENGTH:
        raise Errno(errno.ENOMEM)
    if a.flags & ~(uapi.MOCK_FLAGS_ACCESS_WRITE | uapi.MOCK_FLAGS_ACCESS_SYZ):
        raise Errno(errno.EOPNOTSUPP)
    access = await _get_access(t, t.id)
    if not access.needs_pin_pages:
        raise Errno(errno.EOPNOTSUPP)
    iova = _syz_iova(access.ioas, a.iova) if a.flags & uapi.MOCK_FLAGS_ACCESS_SYZ else a.iova
    pins = pin_pages(access, iova, a.length, bool(a.flags & uapi.MOCK_FLAGS_ACCESS_WRITE))
    try:
        if a.uptr:  # the pinned pages must be the caller's at uptr (NULL skips, for syzkaller)
            _check_pages(t, a.uptr - iova % PAGE_SIZE, pins)
        item = _AccessItem(access.next_id, iova, a.length, pins)
        access.next_id += 1
        access.items[item.id] = item
        a.out_access_pages_id = item.id
        try:
            t.respond()
        except BaseException:
            del access.items[item.id]
            raise
    except BaseException:
        unpin_pages(pins)
        raise
    return 0


def _check_pages(t: SelftestCall, uptr: int, pins: Pins) -> None:
    """iommufd_test_check_pages: EBADE unless each pinned page is the caller's page
    at uptr, uptr + PAGE_SIZE, ...; EFAULT where the caller has none."""
    user = _AddressSpace(t.ucmd.caller.tgid)
    spaces: dict[Any, Any] = {}
    for area, first, n in pins:
        for index in range(first, first + n):
            mine = user.page(uptr & ~(PAGE_SIZE - 1))
            if mine is None:
                raise Errno(errno.EFAULT)
            if _name_page(area.pages, index, spaces) != mine:
                raise Errno(errno.EBADE)
            uptr += PAGE_SIZE


def op_access_rw(t: SelftestCall) -> int | Awaitable[int]:
    a = t.arg
    if a.length > ACCESS_MAX_LENGTH:
        raise Errno(errno.ENOMEM)
    if a.flags & ~(uapi.MOCK_ACCESS_RW_WRITE | uapi.MOCK_ACCESS_RW_SLOW_PATH | uapi.MOCK_FLAGS_ACCESS_SYZ):
        raise Errno(errno.EOPNOTSUPP)
    # A file seen before is known at once; a long copy goes to a thread.
    access = AccessFile.lookup_known(t.ucmd.caller, t.id)
    if access is None or a.length > 1 << 20:
        return _access_rw_async(t, access)
    _access_rw(t, access, False)
    return 0


async def _access_rw_async(t: SelftestCall, access: SelftestAccess | None) -> int:
    if access is None:
        access = await _get_access(t, t.id)
    if t.arg.length > 1 << 20:
        await _access_rw(t, access, True)
    else:
        _access_rw(t, access, False)
    return 0


def _access_rw(t: SelftestCall, access: SelftestAccess, threaded: bool) -> Awaitable[None] | None:
    """iommufd_access_rw between the caller's buffer and the access's IOAS (with
    threaded, as an awaitable that copies in a thread)."""
    a = t.arg
    write = bool(a.flags & uapi.MOCK_ACCESS_RW_WRITE)
    caller = t.ucmd.caller
    buf = bytearray(caller.read(a.uptr, a.length)) if write and a.length else bytearray(a.length)
    iova = _syz_iova(access.ioas, a.iova) if a.flags & uapi.MOCK_FLAGS_ACCESS_SYZ else a.iova
    # iommufd_access_rw
    if not a.length:
        raise Errno(errno.EINVAL)
    if iova + a.length - 1 > ULONG_MAX:
        raise Errno(errno.EOVERFLOW)
    if access.ioas is None:
        raise Errno(errno.ENOENT)
    if threaded:
        return _access_rw_threaded(t, access, iova, buf, write)
    access.ioas.iopt.access_rw(iova, buf, write)  # no await: nothing can destroy it meanwhile
    if not write:
        caller.write(a.uptr, buf)
    return None


async def _access_rw_threaded(t: SelftestCall, access: SelftestAccess, iova: int, buf: bytearray, write: bool) -> None:
    with access.ctx.hold(access):
        await trio.to_thread.run_sync(access.ioas.iopt.access_rw, iova, buf, write)
    if not write:
        t.ucmd.caller.write(t.arg.uptr, buf)


async def op_destroy_access_pages(t: SelftestCall) -> int:
    access = await _get_access(t, t.id)
    item = access.items.pop(t.arg.access_pages_id, None)
    if item is None:
        raise Errno(errno.ENOENT)
    unpin_pages(item.pins)
    return 0


async def op_access_replace_ioas(t: SelftestCall) -> int:
    """iommufd_access_replace: attach to the new IOAS first (nothing changes if that
    fails), then drop every pin and leave the old one."""
    access = await _get_access(t, t.id)
    old = access.ioas
    if old is None:
        raise Errno(errno.ENOENT)
    new = get_ioas(access.ctx, t.arg.ioas_id)
    if new is old:
        return 0
    await access.replace(new)
    return 0
