"""mmap() of an iommufd: regions a driver registers for its objects (driver.c's
iommufd_viommu_alloc_mmap, main.c's iommufd_fops_mmap), here the mock vIOMMU's page.

FUSE never forwards mmap() to its server: on our FOPEN_DIRECT_IO iommufd a MAP_SHARED
mmap is ENODEV in the kernel's FUSE code. So the companion library (LD_PRELOAD)
intercepts mmap() of a FUSE iommufd and asks the daemon with MMAP_REGION; the daemon
makes mainline's checks (length not page aligned or not MAP_SHARED EINVAL, PROT_EXEC
EPERM, no region at exactly that offset and length ENXIO), takes a users reference
on the region's owner, and answers a token. The companion opens the region's own node,
MMAP_DIR/<token> (one inode per mapping request, so no page cache is shared between
regions; only the requesting process may open it, once), maps it MAP_SHARED through
the page cache (the node is not direct-I/O), and closes it. The mapping holds that
file, as the kernel's VMA holds the iommufd: its release, when the last VMA goes
(munmap, exit, forks included), drops the owner's reference, so IOMMU_DESTROY of the
owner is EBUSY while it is mapped. The file also keeps the context alive, as a VMA of
the iommufd file does.

The bytes come from the region's data through FUSE READ at fault time, and writes go
back by writeback: a copy in the client's page cache, not the kernel's direct mapping
of the page, which is enough for a region the daemon does not change after it is made
(the mock's loopback page). See docs/selftest.md.
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import Any

from .. import uapi
from ..errors import Errno
from ..system import PAGE_SIZE
from ..transport.nodes import FileHandle
from .companion import TOKEN_BASE
from .object import Context, Object

log = logging.getLogger(__name__)

MMAP_DIR = "iommufd-cuse/mmap"
# On an iommufd, arg: struct { u64 offset, length; u32 prot, flags; }; answers a token.
MMAP_REGION = uapi._IO(uapi.IOMMUFD_TYPE, 0xE2)
MMAP_REQ = struct.Struct("<QQII")  # the companion's struct mmap_region (not a kernel uAPI struct)
PROT_EXEC = 0x4
MAP_SHARED = 0x1
MAP_SHARED_VALIDATE = 0x3
MAP_TYPE = 0xF


class Region:
    """struct iommufd_mmap: length bytes at offset of the context's mmap space, owned
    by an object; data is what a mapping shows."""

    def __init__(self, owner: Object, offset: int, length: int, data: bytearray) -> None:
        self.owner = owner
        self.offset = offset
        self.length = length
        self.data = data


def _regions(ctx: Context) -> dict[int, Region]:
    return ctx.mmap_regions


def alloc_mmap(ctx: Context, owner: Object, length: int, data: bytearray) -> int:
    """iommufd_viommu_alloc_mmap: the lowest free offset from PAGE_SIZE in the context's
    mmap space (the kernel's mt_mmap), for a region of owner showing data."""
    regions = _regions(ctx)
    start = PAGE_SIZE
    for off in sorted(regions):
        if start + length <= off:
            break
        start = max(start, off + regions[off].length)
    regions[start] = Region(owner, start, length, data)
    return start


def free_mmap(ctx: Context, offset: int) -> None:
    """iommufd_viommu_destroy_mmap: later mmaps at offset are ENXIO."""
    _regions(ctx).pop(offset, None)


class MmapNodes:
    """The per-request nodes under MMAP_DIR: made by a request, gone at the release
    of the file opened on them (or with the context when never opened)."""

    def __init__(self, tree: Any, mode: int, uid: int, gid: int) -> None:
        self.tree = tree
        self.mode, self.uid, self.gid = mode, uid, gid
        self.seq = 0

    def add(self, ctx: Context, region: Region, tgid: int) -> int:
        self.seq += 1
        token = TOKEN_BASE + self.seq % TOKEN_BASE
        state: dict[str, Any] = {"opened": False}

        def opener(req: Any, flags: int) -> MmapFile:
            if req.caller.tgid != tgid or state["opened"]:
                raise Errno(errno.EACCES)
            state["opened"] = True
            ctx.release_hooks.remove(unopened)
            return MmapFile(self, node, ctx, region)

        def unopened() -> None:
            # The context goes and nobody opened the node: drop what the request took.
            self.remove(node)
            region.owner.users -= 1

        node = self.tree.add(f"{MMAP_DIR}/{token}", self.mode, self.uid, self.gid, opener)
        node.size = region.length
        ctx.release_hooks.append(unopened)
        return token

    def remove(self, node: Any) -> None:
        self.tree.remove(node)


class MmapFile(FileHandle):
    """The file behind one mapping of a region: served through the page cache."""

    open_flags = 0  # cached I/O: MAP_SHARED works, and pages come by READ

    def __init__(self, nodes: MmapNodes, node: Any, ctx: Context, region: Region) -> None:
        self.nodes, self.node, self.ctx, self.region = nodes, node, ctx, region
        ctx.hold_file()

    def read(self, req: Any, offset: int, size: int) -> bytes:
        return bytes(self.region.data[offset : offset + size])

    def write(self, req: Any, offset: int, data: bytes) -> int:
        end = min(offset + len(data), self.region.length)
        if offset < end:
            self.region.data[offset:end] = data[: end - offset]
        return len(data)

    def release(self) -> None:
        self.nodes.remove(self.node)
        self.region.owner.users -= 1
        self.ctx.drop_file()


def mmap_region(ctx: Context, caller: Any, arg: int) -> int:
    """MMAP_REGION, the companion's stand-in for iommufd_fops_mmap: mainline's checks,
    then a users reference on the region's owner and a token naming its node."""
    offset, length, prot, flags = MMAP_REQ.unpack(caller.read(arg, MMAP_REQ.size))
    if not length or length % PAGE_SIZE or offset % PAGE_SIZE:
        raise Errno(errno.EINVAL)  # the last two are mmap()'s own checks
    if flags & MAP_TYPE not in (MAP_SHARED, MAP_SHARED_VALIDATE):
        raise Errno(errno.EINVAL)
    if prot & PROT_EXEC:
        raise Errno(errno.EPERM)
    region = None
    for r in _regions(ctx).values():
        if r.offset <= offset < r.offset + r.length:
            region = r
    if region is None or region.owner.users == 0:
        raise Errno(errno.ENXIO)
    if offset != region.offset or length != region.length:
        raise Errno(errno.ENXIO)  # only the exact region may be mapped
    nodes = ctx.system.mmap_nodes
    if nodes is None:
        raise Errno(errno.ENODEV)
    region.owner.users += 1
    try:
        return nodes.add(ctx, region, caller.tgid)
    except BaseException:
        region.owner.users -= 1
        raise
