"""The selftest's accesses: CREATE_ACCESS, ACCESS_PAGES, ACCESS_RW,
DESTROY_ACCESS_PAGES, ACCESS_REPLACE_IOAS.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

import trio

from ... import uapi
from ...errors import Errno
from ...system import PAGE_SIZE
from ..companion import CLAIM, COMPANION_MAGIC, TOKEN_BASE, HandedFile, refuse_without_companion
from ..io_pagetable import IOMMU_READ, IOMMU_WRITE
from ..ioas import get_ioas
from ..object import Context, Object, ObjType
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
    pins: list[tuple[Any, int, int]]  # (area, first page index, pages)


class SelftestAccess(Object):
    """struct iommufd_access with the selftest's ops: CPU access to an IOAS, and
    pins that are dropped whenever the IOAS unmaps under them."""

    type = ObjType.ACCESS

    def __init__(self, ctx: Context, needs_pin_pages: bool) -> None:
        super().__init__()
        self.ctx = ctx
        self.needs_pin_pages = needs_pin_pages
        self.iova_alignment = PAGE_SIZE if needs_pin_pages else 1
        self.ioas: Any = None
        self.items: dict[int, _AccessItem] = {}
        self.next_id = 0
        self.file: AccessFile | None = None
        self.closed = False

    # -- the IOAS -------------------------------------------------------------------
    def attach(self, ioas: Any) -> None:
        """iopt_add_access: the IOAS's alignment must fit (else EADDRINUSE)."""
        iopt = ioas.iopt
        iopt.accesses.append(self)
        try:
            iopt.calculate_iova_alignment()
        except BaseException:
            iopt.accesses.remove(self)
            raise
        ioas.users += 1
        self.ioas = ioas

    def detach(self) -> None:
        ioas, self.ioas = self.ioas, None
        if ioas is None:
            return
        self.notify_unmap(0, ULONG_MAX)
        ioas.iopt.accesses.remove(self)
        try:
            ioas.iopt.calculate_iova_alignment()
        except Errno:
            pass
        ioas.users -= 1

    def notify_unmap(self, iova: int, length: int) -> None:
        """iommufd_test_access_unmap: drop every item overlapping [iova, iova + length)."""
        last = min(iova + length - 1, ULONG_MAX)
        for item in list(self.items.values()):
            if iova > item.iova + item.length - 1 or last < item.iova:
                continue
            del self.items[item.id]
            _access_unpin(item.pins)

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

    def destroy(self) -> None:
        self.detach()


def _access_pin(access: SelftestAccess, iova: int, length: int, write: bool) -> list[tuple[Any, int, int]]:
    """iommufd_access_pin_pages: pin the pages under [iova, iova + length), which must
    be contiguous areas (else ENOENT), page aligned where areas meet (else EINVAL) and
    mapped with the access's permission (else EPERM)."""
    if not length:
        raise Errno(errno.EINVAL)
    last = iova + length - 1
    if last > ULONG_MAX:
        raise Errno(errno.EOVERFLOW)
    if access.ioas is None:
        raise Errno(errno.ENOENT)
    pins: list[tuple[Any, int, int]] = []
    pos = iova
    try:
        for area in access.ioas.iopt.areas_in(iova, last):
            if area.start > pos or area.busy:
                break
            end = min(last, area.last)
            first_byte = area.start_byte + (pos - area.start)
            area_last_byte = area.start_byte + area.length - 1
            if first_byte % PAGE_SIZE or (end != last and area_last_byte % PAGE_SIZE != PAGE_SIZE - 1):
                raise Errno(errno.EINVAL)
            if not area.prot & (IOMMU_WRITE if write else IOMMU_READ):
                raise Errno(errno.EPERM)
            first = first_byte // PAGE_SIZE
            n = (area.start_byte + (end - area.start)) // PAGE_SIZE - first + 1
            area.pages.pin(first, n)
            area.num_accesses += 1
            pins.append((area, first, n))
            pos = end + 1
            if end == last:
                break
        if pos <= last:
            raise Errno(errno.ENOENT)
    except BaseException:
        _access_unpin(pins)
        raise
    return pins


def _access_unpin(pins: list[tuple[Any, int, int]]) -> None:
    for area, first, n in pins:
        area.pages.unpin(first, n)
        area.num_accesses -= 1


class AccessFile(HandedFile):
    """An open of ACCESS_NODE: the file of one access once claimed (its close
    destroys the access, as the kernel's staccess release)."""

    kind = "access"

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
    if t.ucmd.cmd.reserved != COMPANION_MAGIC:
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
        token = AccessFile.issue(t.system, access, t.ucmd.caller.tgid)
        ctx.release_hooks.append(access.close)
        t.arg.out_access_fd = token
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
    pins = _access_pin(access, iova, a.length, bool(a.flags & uapi.MOCK_FLAGS_ACCESS_WRITE))
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
        _access_unpin(pins)
        raise
    return 0


def _check_pages(t: SelftestCall, uptr: int, pins: list[tuple[Any, int, int]]) -> None:
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


async def op_access_rw(t: SelftestCall) -> int:
    a = t.arg
    if a.length > ACCESS_MAX_LENGTH:
        raise Errno(errno.ENOMEM)
    if a.flags & ~(uapi.MOCK_ACCESS_RW_WRITE | uapi.MOCK_ACCESS_RW_SLOW_PATH | uapi.MOCK_FLAGS_ACCESS_SYZ):
        raise Errno(errno.EOPNOTSUPP)
    access = await _get_access(t, t.id)
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
    with access.ctx.hold(access):
        if a.length > 1 << 20:
            await trio.to_thread.run_sync(access.ioas.iopt.access_rw, iova, buf, write)
        else:
            access.ioas.iopt.access_rw(iova, buf, write)
    if not write:
        caller.write(a.uptr, buf)
    return 0


async def op_destroy_access_pages(t: SelftestCall) -> int:
    access = await _get_access(t, t.id)
    item = access.items.pop(t.arg.access_pages_id, None)
    if item is None:
        raise Errno(errno.ENOENT)
    _access_unpin(item.pins)
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
    with access.ctx.hold(new):
        async with new.iopt.lock:
            access.attach(new)  # sets access.ioas = new
    access.notify_unmap(0, ULONG_MAX)
    old.iopt.accesses.remove(access)
    try:
        old.iopt.calculate_iova_alignment()
    except Errno:
        pass
    old.users -= 1
    return 0
