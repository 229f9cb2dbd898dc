"""VFIO groups, /dev/vfio/<N> (drivers/vfio/group.c), with iommufd as the container
(CONFIG_IOMMUFD_VFIO_CONTAINER: /dev/vfio/vfio is an iommufd, drivers/vfio/iommufd.c).

One open of a group at a time, and none while a member is bound through its cdev
(and no cdev bind while the group is open). SET_CONTAINER takes an iommufd file
(ours, of /dev/iommu or /dev/vfio/vfio): the group holds that context (the daemon
keeps the fetched descriptor, as the kernel's iommufd_ctx_get) and makes sure it
has a compat IOAS. GET_DEVICE_FD finds the member by name (vfio-pci's match), and
the device file reaches the caller through the companion: the call answers a token
which the companion claims on the device hand-back node; the claim opens the
device (the first open binds it to the group's context and attaches it to the
compat IOAS; the last close unbinds it). Device files hold the group: closing the
group file while they are open releases it only with the last of them.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import trio

from .. import uapi
from ..errors import Errno
from ..iommu.core import VFIO_DRIVER, Device, Group
from ..iommufd import device as iommufd_device
from ..iommufd.companion import (
    CLAIM,
    COMPANION,
    GROUP_GET_DEVICE_TOKEN,
    Carrier,
    HandedFile,
    carrier_of,
    hand_back,
)
from ..iommufd.ioas import Ioas
from ..iommufd.main import IommufdFile
from ..iommufd.object import Context
from ..transport.caller import Caller
from ..transport.loopback import identify
from ..transport.mount import fd_inode, fd_on_our_mount
from ..transport.nodes import FileHandle
from .device_cdev import VfioDeviceFile

log = logging.getLogger(__name__)

u = uapi
DEVICE_NODE = "iommufd-cuse/vfio-device"  # where the companion claims a device file
PAGE_SIZE = 4096
VF_TOKEN_ARG = "vf_token="
UUID_STRING_LEN = 36


class VfioGroup:
    """struct vfio_group: the VFIO side of one IOMMU group with vfio-pci members."""

    def __init__(self, system: Any, group: Group, iommufd_inodes: set[int]) -> None:
        self.system = system
        self.group = group
        self.iommufd_inodes = iommufd_inodes
        self.opened_file: GroupFile | None = None
        self.iommufd: Context | None = None
        self.iommufd_fd = -1  # our reference on the container's file
        self.cdev_device_open_cnt = 0
        self.device_files = 0  # device files opened through the group hold it
        self.opens: dict[int, tuple[Any, int]] = {}  # id(device) -> (idev, open count)

    @property
    def has_iommu(self) -> bool:
        return self.iommufd is not None

    @property
    def members(self) -> list[Device]:
        """The devices registered with VFIO: the members bound to vfio-pci."""
        return [d for d in self.group.devices if d.driver == VFIO_DRIVER]

    # -- the cdev path's side (vfio_device_block_group) ----------------------------------
    def block(self) -> None:
        if self.opened_file is not None:
            raise Errno(errno.EBUSY, f"group {self.group.id} is open")
        self.cdev_device_open_cnt += 1

    def unblock(self) -> None:
        self.cdev_device_open_cnt -= 1

    # -- container -----------------------------------------------------------------------
    def detach_container(self) -> None:
        fd, self.iommufd_fd = self.iommufd_fd, -1
        self.iommufd = None
        if fd >= 0:
            os.close(fd)  # a file of our own mount: closing it never waits for us

    # -- device opens (vfio_df_group_open / vfio_df_group_close) -------------------------
    async def open_device(self, device: Device) -> Any:
        if not self.has_iommu:
            raise Errno(errno.EINVAL, "no container set")
        idev, count = self.opens.get(id(device), (None, 0))
        if count == 0:
            ctx = self.iommufd
            assert ctx is not None
            idev = iommufd_device.bind(ctx, device)  # EPERM for a group owned elsewhere
            device.vfio.enable()
            try:
                # vfio_iommufd_compat_attach_ioas: ENODEV without a compat IOAS
                if ctx.vfio_ioas is None:
                    raise Errno(errno.ENODEV)
                await iommufd_device.attach(idev, ctx.vfio_ioas.id)
            except BaseException:
                await self._close(device, idev)
                raise
        self.opens[id(device)] = (idev, count + 1)
        return idev

    async def close_device(self, device: Device) -> None:
        idev, count = self.opens[id(device)]
        if count > 1:
            self.opens[id(device)] = (idev, count - 1)
            return
        del self.opens[id(device)]
        await self._close(device, idev)

    async def _close(self, device: Device, idev: Any) -> None:
        with trio.CancelScope(shield=True):
            device.vfio.disable()
            await iommufd_device.unbind(idev)
        log.info("%s closed (group %d)", device.bdf, self.group.id)

    def release(self) -> None:
        """vfio_group_fops_release: once the group file and every device file are closed."""
        self.detach_container()
        self.opened_file = None
        _forget_tokens(self)

    def status(self) -> dict:
        return {
            "open": self.opened_file is not None,
            "container_set": self.has_iommu,
            "device_files": self.device_files,
        }


def match(device: Device, name: str) -> bool:
    """vfio_pci_core_match: the device's name, then only options after a space; an
    unknown option or a malformed token is EINVAL, other trailing text no match."""
    bdf = device.bdf
    if not name.startswith(bdf):
        return False
    rest = name[len(bdf) :]
    if rest and rest[0] != " ":
        return False
    vf_token = False
    i = 0
    while i < len(rest):
        if rest[i] == " ":
            i += 1
            continue
        if not vf_token and rest.startswith(VF_TOKEN_ARG, i):
            i += len(VF_TOKEN_ARG)
            if len(rest) - i < UUID_STRING_LEN or not _is_uuid(rest[i : i + UUID_STRING_LEN]):
                raise Errno(errno.EINVAL)
            vf_token = True
            i += UUID_STRING_LEN
        else:
            raise Errno(errno.EINVAL)  # unknown or duplicate option
    if vf_token:
        # vfio_pci_core_match_token_uuid: a token for a function that is neither PF nor VF
        log.info("%s: VF token incorrectly provided, not a PF or VF: EINVAL", bdf)
        raise Errno(errno.EINVAL)
    return True


def _is_uuid(s: str) -> bool:
    """uuid_parse's format: 8-4-4-4-12 hex digits."""
    for i, c in enumerate(s):
        if i in (8, 13, 18, 23):
            if c != "-":
                return False
        elif c not in "0123456789abcdefABCDEF":
            return False
    return True


def read_name(caller: Caller, addr: int) -> str:
    """strndup_user(arg, PAGE_SIZE): the NUL-terminated string at addr; EFAULT for
    unreadable memory before its end, EINVAL if it does not end within a page."""
    out = bytearray()
    while len(out) < PAGE_SIZE:
        n = min(PAGE_SIZE - len(out), PAGE_SIZE - (addr + len(out)) % PAGE_SIZE)
        chunk = caller.read(addr + len(out), n)  # one page at a time: stops at the first fault
        nul = chunk.find(0)
        if nul >= 0:
            out += chunk[:nul]
            return out.decode("latin-1")
        out += chunk
    raise Errno(errno.EINVAL)


class GroupFile(FileHandle):
    """One open of /dev/vfio/<N>."""

    release_order = 0  # before iommufd files at shutdown: it holds one

    def __init__(self, vgroup: VfioGroup) -> None:
        self.vgroup = vgroup
        self.released = False

    def ioctl(self, req, cmd: int, arg: int):  # noqa: ANN001, ANN201
        caller = req.caller
        if cmd == u.VFIO_GROUP_GET_DEVICE_FD:
            return self.get_device_fd(caller, arg, carrier_of(caller, False))
        if cmd == GROUP_GET_DEVICE_TOKEN:
            return self.get_device_fd(caller, arg, COMPANION)
        if cmd == u.VFIO_GROUP_GET_STATUS:
            return self._get_status(caller, arg)
        if cmd == u.VFIO_GROUP_SET_CONTAINER:
            return self._set_container(caller, arg)
        if cmd == u.VFIO_GROUP_UNSET_CONTAINER:
            return self._unset_container()
        raise Errno(errno.ENOTTY)

    def _get_status(self, caller: Caller, arg: int) -> int:
        s = u.vfio_group_status
        st = s.unpack(caller.read(arg, s.SIZE))
        if st.argsz < s.SIZE:
            raise Errno(errno.EINVAL)
        vg = self.vgroup
        st.flags = 0
        # With iommufd the DMA owner is claimed at GET_DEVICE_FD, not SET_CONTAINER:
        # a group with a container is always reported viable (as mainline).
        if vg.has_iommu:
            st.flags = u.VFIO_GROUP_FLAGS_CONTAINER_SET | u.VFIO_GROUP_FLAGS_VIABLE
        elif not vg.group.owner_cnt:
            st.flags = u.VFIO_GROUP_FLAGS_VIABLE
        caller.write(arg, s.pack(st))
        return 0

    async def _set_container(self, caller: Caller, arg: int) -> int:
        fd_num = int.from_bytes(caller.read(arg, 4), "little", signed=True)
        fd = caller.fetch_fd(fd_num)  # EBADF for no such descriptor
        try:
            vg = self.vgroup
            if vg.has_iommu:
                raise Errno(errno.EINVAL, "a container is set already")
            # iommufd_ctx_from_file: an iommufd of ours, else "not recognized"
            if fd_inode(fd) not in vg.iommufd_inodes or not fd_on_our_mount(fd):
                raise Errno(errno.EBADFD)
            handle = await identify(fd)
            ctx = handle.ctx if isinstance(handle, IommufdFile) else None
            if ctx is None or ctx.closed:
                raise Errno(errno.EBADFD)
            if vg.has_iommu:  # set by a racing call while we asked
                raise Errno(errno.EINVAL)
            _compat_ioas_create(ctx)
        except BaseException:
            os.close(fd)
            raise
        vg.iommufd, vg.iommufd_fd = ctx, fd
        log.info("group %d: container set", vg.group.id)
        return 0

    def _unset_container(self) -> int:
        vg = self.vgroup
        if not vg.has_iommu:
            raise Errno(errno.EINVAL)
        vg.detach_container()
        return 0

    async def get_device_fd(self, caller: Caller, arg: int, carrier: Carrier | None) -> int:
        """VFIO_GROUP_GET_DEVICE_FD: the device file through carrier (None: none, EOPNOTSUPP):
        the companion's, or a notified call's (carrier_of the caller)."""
        vg = self.vgroup
        name = read_name(caller, arg)
        device = next((d for d in vg.members if match(d, name)), None)
        if device is None:
            raise Errno(errno.ENODEV)
        # A descriptor is reserved before the device is opened (FD_ADD): no way to
        # hand one back comes first, then what the open checks; the open itself is
        # done when the file is claimed, by the process that asked.
        if carrier is not None and not vg.has_iommu:
            raise Errno(errno.EINVAL, "no container set")
        return await hand_back(
            GroupDeviceFile,
            vg.system,
            (vg, device),
            caller,
            carrier,
            log,
            "VFIO_GROUP_GET_DEVICE_FD",
            "a device",
            returns_fd=True,
        )

    def release(self) -> None:
        self.released = True
        vg = self.vgroup
        # Device files hold the group file: it goes with the last of them.
        if vg.device_files == 0:
            vg.release()


def _forget_tokens(vg: VfioGroup) -> None:
    """Tokens of a group's devices that were never claimed go with the group's file."""
    pending = GroupDeviceFile.pending(vg.system)
    for token, ((g, _dev), _tgid) in list(pending.items()):
        if g is vg:
            del pending[token]


def _compat_ioas_create(ctx: Context) -> None:
    """iommufd_vfio_compat_ioas_create: the compat IOAS, made unless one is set."""
    if ctx.vfio_ioas is not None:
        return
    ioas = ctx.alloc(Ioas(ctx))
    ctx.vfio_ioas = ioas
    ctx.finalize(ioas)  # a userspace-visible object (IOMMU_VFIO_IOAS_GET), destroyed with the context


class GroupDeviceFile(VfioDeviceFile, HandedFile):
    """A device file opened through its group (df->group): it is claimed on the
    hand-back node; it has no BIND (EINVAL) and no ATTACH/DETACH_PT (ENOTTY)."""

    kind = "vfio-device"
    node = DEVICE_NODE

    def __init__(self, system: Any, iommufd_inodes: set[int]) -> None:
        self.system = system  # the registry lives on the System
        self.obj = None
        self.vgroup: VfioGroup | None = None
        self._claiming = False
        self.iommufd_inodes = iommufd_inodes
        self.idev = None
        self.ctx = None
        self.iommufd_fd = -1
        self._busy = False
        self._blocking = False

    def ioctl(self, req, cmd: int, arg: int):  # noqa: ANN001, ANN201
        if cmd == CLAIM:
            return self._claim(req.caller, arg)
        if self.vgroup is None or cmd == u.VFIO_DEVICE_BIND_IOMMUFD:
            raise Errno(errno.EINVAL)  # no device yet; BIND_IOMMUFD only for cdev files
        if cmd in (u.VFIO_DEVICE_ATTACH_IOMMUFD_PT, u.VFIO_DEVICE_DETACH_IOMMUFD_PT):
            raise Errno(errno.ENOTTY)  # cdev only: vfio-pci has no such ioctl
        return super().ioctl(req, cmd, arg)

    async def _claim(self, caller: Caller, token: int) -> int:
        pending = GroupDeviceFile.pending(self.system)
        entry = pending.get(token)
        if entry is None or entry[1] != caller.tgid or self.vgroup is not None or self._claiming:
            raise Errno(errno.EINVAL)
        del pending[token]
        vg, device = entry[0]
        self._claiming = True
        try:
            idev = await vg.open_device(device)
        finally:
            self._claiming = False
        self.vgroup, self.vdev, self.device, self.idev = vg, device.vfio, device, idev
        vg.device_files += 1
        log.info("%s opened through group %d", device.bdf, vg.group.id)
        return 0

    async def release(self) -> None:
        vg, self.vgroup = self.vgroup, None
        if vg is None:
            return
        self.idev = None
        await vg.close_device(self.device)
        vg.device_files -= 1
        if vg.device_files == 0 and vg.opened_file is not None and vg.opened_file.released:
            vg.release()


def group_opener(vgroup: VfioGroup):  # noqa: ANN201
    """The opener of /dev/vfio/<N> (vfio_group_fops_open)."""

    def opener(req, flags: int) -> GroupFile:  # noqa: ANN001
        if not vgroup.members:
            raise Errno(errno.ENODEV)  # no member on vfio-pci: the kernel has no such group
        if vgroup.cdev_device_open_cnt or vgroup.opened_file is not None:
            raise Errno(errno.EBUSY)
        f = GroupFile(vgroup)
        vgroup.opened_file = f
        return f

    return opener
