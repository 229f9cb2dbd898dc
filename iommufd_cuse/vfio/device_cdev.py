"""The VFIO device cdev, /dev/vfio/devices/vfioN (drivers/vfio/device_cdev.c,
vfio_main.c, iommufd.c), and the vfio-pci ioctls behind it.

No access before VFIO_DEVICE_BIND_IOMMUFD: every other ioctl, read and write
is EINVAL. Binding takes an iommufd file descriptor from the caller; the daemon
learns which of its contexts that file is by a private ioctl issued on the
fetched descriptor from a worker thread, which comes back to the daemon as a
FUSE request on that open. The fetched descriptor is kept while bound, as the
kernel keeps a reference on the iommufd file.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import trio

from .. import uapi
from ..errors import Errno
from ..iommu.core import VFIO_DRIVER, Device
from ..iommufd import device as iommufd_device
from ..iommufd.main import IommufdFile
from ..iommufd.object import Context
from ..transport.caller import Caller
from ..transport.loopback import identify
from ..transport.mount import fd_inode, fd_on_our_mount
from ..transport.nodes import FileHandle
from ..transport.protocol import FOPEN_DIRECT_IO
from .pci.core import ERR, NUM_IRQS, NUM_REGIONS, REGION_SHIFT, VfioPciDevice

log = logging.getLogger(__name__)

u = uapi
DEVICE_IOCTLS = {
    u.VFIO_DEVICE_GET_INFO,
    u.VFIO_DEVICE_GET_REGION_INFO,
    u.VFIO_DEVICE_GET_IRQ_INFO,
    u.VFIO_DEVICE_SET_IRQS,
    u.VFIO_DEVICE_RESET,
    u.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    u.VFIO_DEVICE_PCI_HOT_RESET,
    u.VFIO_DEVICE_IOEVENTFD,
}
U32_MAX = (1 << 32) - 1
FEATURE_FLAGS = (
    u.VFIO_DEVICE_FEATURE_MASK | u.VFIO_DEVICE_FEATURE_SET | u.VFIO_DEVICE_FEATURE_GET | u.VFIO_DEVICE_FEATURE_PROBE
)


def _end(s: uapi.CStruct, field: str) -> int:
    return uapi.offsetofend(s, field)


def _read_pt_op(caller: Caller, arg: int, s: uapi.CStruct, last: str, pasid_flag: int) -> Any:
    """The attach/detach struct s, read up to its field `last` and zero-extended:
    EINVAL if argsz does not cover that or flags has unknown bits, EOPNOTSUPP for
    the PASID flag (no PASID support on the emulated devices)."""
    minsz = _end(s, last)
    a = s.unpack(caller.read(arg, minsz) + bytes(s.SIZE - minsz))
    if a.argsz < minsz:
        raise Errno(errno.EINVAL)
    if a.flags & ~pasid_flag:
        raise Errno(errno.EINVAL)
    if a.flags & pasid_flag:
        raise Errno(errno.EOPNOTSUPP)
    return a


class VfioDeviceFile(FileHandle):
    """One open of a device cdev (struct vfio_device_file)."""

    open_flags = FOPEN_DIRECT_IO
    release_order = 0  # released before iommufd files at shutdown: it holds one

    def __init__(self, vdev: VfioPciDevice, daemon_iommufd_nodes: set[int]) -> None:
        self.vdev = vdev
        self.device: Device = vdev.device
        self.iommufd_inodes = daemon_iommufd_nodes
        self.idev = None
        self.ctx: Context | None = None
        self.iommufd_fd = -1  # our reference on the bound iommufd file
        self._busy = False
        self._blocking = False  # this file counts in its group's cdev_device_open_cnt

    # -- dispatch ---------------------------------------------------------------------
    def ioctl(self, req, cmd: int, arg: int):  # noqa: ANN001, ANN201
        if cmd == u.VFIO_DEVICE_BIND_IOMMUFD:
            return self._bind(req.caller, arg)
        if self.idev is None:
            raise Errno(errno.EINVAL)  # no access before bind
        if cmd == u.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            return self._attach(req.caller, arg)
        if cmd == u.VFIO_DEVICE_DETACH_IOMMUFD_PT:
            return self._detach(req.caller, arg)
        if cmd == u.VFIO_DEVICE_FEATURE:
            return self._feature(req.caller, arg)
        if cmd in DEVICE_IOCTLS:
            return self._pci_ioctl(req.caller, cmd, arg)
        raise Errno(errno.ENOTTY)

    def read(self, req, offset: int, size: int) -> bytes:  # noqa: ANN001
        if self.idev is None:
            raise Errno(errno.EINVAL)
        return self.vdev.rw(offset, None, size)

    def write(self, req, offset: int, data: bytes) -> int:  # noqa: ANN001
        if self.idev is None:
            raise Errno(errno.EINVAL)
        return self.vdev.rw(offset, data, len(data))

    async def release(self) -> None:
        if self.idev is not None:
            await self._unbind()

    # -- bind ---------------------------------------------------------------------------
    async def _bind(self, caller: Caller, arg: int) -> int:
        s = u.vfio_device_bind_iommufd
        minsz = _end(s, "out_devid")
        bind = s.unpack(caller.read(arg, minsz) + bytes(s.SIZE - minsz))
        if bind.argsz < minsz or bind.flags & ~u.VFIO_DEVICE_BIND_FLAG_TOKEN or bind.iommufd < 0:
            raise Errno(errno.EINVAL)
        if bind.flags & u.VFIO_DEVICE_BIND_FLAG_TOKEN:
            if bind.argsz < s.SIZE:
                raise Errno(errno.EINVAL)
            # A VF token only means something to an SR-IOV PF/VF; these are neither.
            raise Errno(errno.EINVAL)
        vgroup = self.device.group.vfio  # vfio_device_block_group: not while the group is open
        if vgroup is not None and not self._blocking:
            vgroup.block()
            self._blocking = True
        try:
            return await self._bind_blocked(caller, arg, bind)
        except BaseException:
            if self.idev is None:
                self._unblock_group()
            raise

    def _unblock_group(self) -> None:
        if self._blocking:
            self._blocking = False
            self.device.group.vfio.unblock()

    async def _bind_blocked(self, caller: Caller, arg: int, bind: Any) -> int:
        s = u.vfio_device_bind_iommufd
        if self.idev is not None or self._busy:
            raise Errno(errno.EINVAL)  # this file is bound already
        if self.device.driver != VFIO_DRIVER:
            raise Errno(errno.ENODEV)
        self._busy = True
        try:
            fd = caller.fetch_fd(bind.iommufd)
            try:
                ctx = await self._context_of(fd)
                # vfio_df_open: bound through another open of the cdev (which has no
                # shared opens) is EINVAL, after the iommufd was looked up. No await
                # from here to enable(), so two opens cannot both get past this.
                if self.vdev.in_use:
                    raise Errno(errno.EINVAL)
                idev = iommufd_device.bind(ctx, self.device)
            except BaseException:
                os.close(fd)
                raise
            self.idev, self.ctx, self.iommufd_fd = idev, ctx, fd
            self.vdev.enable()
            try:
                caller.write(arg + s.FIELDS["out_devid"][0], idev.id.to_bytes(4, "little"))
            except BaseException:
                await self._unbind()
                raise
        finally:
            self._busy = False
        log.info("%s bound to a context as device %d", self.device.bdf, self.idev.id)
        return 0

    async def _context_of(self, fd: int) -> Context:
        """Which context the fetched iommufd file is: EBADFD if it is not one of ours."""
        # Not fstat(): on a file of our own mount whose attributes are not cached it
        # sends GETATTR to this very loop, which would wait for itself forever.
        if fd_inode(fd) not in self.iommufd_inodes or not fd_on_our_mount(fd):
            raise Errno(errno.EBADFD)
        handle = await identify(fd)
        ctx = handle.ctx if isinstance(handle, IommufdFile) else None
        if ctx is None:
            raise Errno(errno.EBADFD)
        return ctx

    async def _unbind(self) -> None:
        idev, self.idev = self.idev, None
        with trio.CancelScope(shield=True):
            self.vdev.disable()
            await iommufd_device.unbind(idev)
            fd, self.iommufd_fd = self.iommufd_fd, -1
            self.ctx = None
            # A file of ours: by FUSE closing it never waits for us (no FLUSH), but by CUSE the last close
            # waits for our answer to its RELEASE, so it is closed off the loop.
            await trio.to_thread.run_sync(os.close, fd)
            self._unblock_group()
        log.info("%s unbound", self.device.bdf)

    # -- attach / detach ------------------------------------------------------------------
    async def _attach(self, caller: Caller, arg: int) -> int:
        s = u.vfio_device_attach_iommufd_pt
        a = _read_pt_op(caller, arg, s, "pt_id", u.VFIO_DEVICE_ATTACH_PASID)
        pt_id = await iommufd_device.attach(self.idev, a.pt_id)
        try:
            caller.write(arg + s.FIELDS["pt_id"][0], pt_id.to_bytes(4, "little"))
        except BaseException:
            await iommufd_device.detach(self.idev)
            raise
        return 0

    async def _detach(self, caller: Caller, arg: int) -> int:
        _read_pt_op(caller, arg, u.vfio_device_detach_iommufd_pt, "flags", u.VFIO_DEVICE_DETACH_PASID)
        await iommufd_device.detach(self.idev)
        return 0

    # -- features ------------------------------------------------------------------------
    def _feature(self, caller: Caller, arg: int) -> int:
        s = u.vfio_device_feature
        f = s.unpack(caller.read(arg, s.SIZE))
        if f.argsz < s.SIZE or f.flags & ~FEATURE_FLAGS:
            raise Errno(errno.EINVAL)
        get_set = f.flags & (u.VFIO_DEVICE_FEATURE_GET | u.VFIO_DEVICE_FEATURE_SET)
        if not f.flags & u.VFIO_DEVICE_FEATURE_PROBE and get_set == (
            u.VFIO_DEVICE_FEATURE_GET | u.VFIO_DEVICE_FEATURE_SET
        ):
            raise Errno(errno.EINVAL)
        feature = f.flags & u.VFIO_DEVICE_FEATURE_MASK
        # No migration, no dirty logging, no VF token, no DMA-buf export here:
        # the features mainline answers ENOTTY for when the driver lacks them.
        log.debug("%s: device feature %d not supported: ENOTTY", self.device.bdf, feature)
        raise Errno(errno.ENOTTY)

    # -- vfio-pci ioctls -----------------------------------------------------------------
    def _pci_ioctl(self, caller: Caller, cmd: int, arg: int) -> int:
        vdev = self.vdev
        if cmd == u.VFIO_DEVICE_GET_INFO:
            s = u.vfio_device_info
            minsz = _end(s, "num_irqs")
            info = s.unpack(caller.read(arg, minsz) + bytes(s.SIZE - minsz))
            if info.argsz < minsz:
                raise Errno(errno.EINVAL)
            info.flags = u.VFIO_DEVICE_FLAGS_PCI | (u.VFIO_DEVICE_FLAGS_RESET if vdev.reset_works else 0)
            info.num_regions, info.num_irqs, info.cap_offset = NUM_REGIONS, NUM_IRQS, 0
            caller.write(arg, s.pack(info)[: min(info.argsz, s.SIZE)])
            return 0
        if cmd == u.VFIO_DEVICE_GET_REGION_INFO:
            s = u.vfio_region_info
            minsz = _end(s, "offset")
            info = s.unpack(caller.read(arg, minsz))
            if info.argsz < minsz or info.index >= NUM_REGIONS:
                raise Errno(errno.EINVAL)
            info.flags, info.size = vdev.region_info(info.index)
            info.offset = info.index << REGION_SHIFT
            info.cap_offset = 0
            caller.write(arg, s.pack(info))
            return 0
        if cmd == u.VFIO_DEVICE_GET_IRQ_INFO:
            s = u.vfio_irq_info
            info = s.unpack(caller.read(arg, s.SIZE))
            if info.argsz < s.SIZE or info.index >= NUM_IRQS:
                raise Errno(errno.EINVAL)
            if info.index == ERR and not vdev.model.express:
                raise Errno(errno.EINVAL)
            info.flags = u.VFIO_IRQ_INFO_EVENTFD
            info.count = vdev.irqs.count(info.index)
            if info.index == 0:
                info.flags |= u.VFIO_IRQ_INFO_MASKABLE | u.VFIO_IRQ_INFO_AUTOMASKED
            elif info.index != 2:  # MSI-X can grow (dynamic MSI-X): no NORESIZE
                info.flags |= u.VFIO_IRQ_INFO_NORESIZE
            caller.write(arg, s.pack(info))
            return 0
        if cmd == u.VFIO_DEVICE_SET_IRQS:
            return self._set_irqs(caller, arg)
        if cmd == u.VFIO_DEVICE_RESET:
            vdev.reset()
            return 0
        if cmd in (u.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, u.VFIO_DEVICE_PCI_HOT_RESET):
            s = u.vfio_pci_hot_reset_info
            hdr = s.unpack(caller.read(arg, s.SIZE))
            if hdr.argsz < s.SIZE:
                raise Errno(errno.EINVAL)
            # Functions on the root bus have neither a slot nor a bus reset.
            raise Errno(errno.ENODEV)
        log.info("%s: VFIO_DEVICE_IOEVENTFD is not supported: ENOTTY", self.device.bdf)
        raise Errno(errno.ENOTTY)

    def _set_irqs(self, caller: Caller, arg: int) -> int:
        s = u.vfio_irq_set
        hdr = s.unpack(caller.read(arg, s.SIZE))
        irqs = self.vdev.irqs
        # vfio_set_irqs_validate_and_prepare, in its order
        if (
            hdr.argsz < s.SIZE
            or hdr.index >= NUM_IRQS
            or hdr.count >= U32_MAX - hdr.start
            or hdr.flags & ~(u.VFIO_IRQ_SET_DATA_TYPE_MASK | u.VFIO_IRQ_SET_ACTION_TYPE_MASK)
        ):
            raise Errno(errno.EINVAL)
        max_irqs = irqs.count(hdr.index)
        if hdr.start >= max_irqs or hdr.start + hdr.count > max_irqs:
            raise Errno(errno.EINVAL)  # even with count 0: an index without irqs takes nothing
        size = {u.VFIO_IRQ_SET_DATA_NONE: 0, u.VFIO_IRQ_SET_DATA_BOOL: 1, u.VFIO_IRQ_SET_DATA_EVENTFD: 4}.get(
            hdr.flags & u.VFIO_IRQ_SET_DATA_TYPE_MASK
        )
        if size is None:
            raise Errno(errno.EINVAL)
        data_size = hdr.count * size
        if hdr.argsz - s.SIZE < data_size:
            raise Errno(errno.EINVAL)
        data = bytes(caller.read(arg + s.SIZE, data_size)) if data_size else b""
        # vfio_pci_set_irqs_ioctl: no handler for anything but exactly one action
        if hdr.flags & u.VFIO_IRQ_SET_ACTION_TYPE_MASK not in (
            u.VFIO_IRQ_SET_ACTION_MASK,
            u.VFIO_IRQ_SET_ACTION_UNMASK,
            u.VFIO_IRQ_SET_ACTION_TRIGGER,
        ):
            raise Errno(errno.ENOTTY)
        irqs.set_irqs(hdr.flags, hdr.index, hdr.start, hdr.count, data, caller)
        return 0
