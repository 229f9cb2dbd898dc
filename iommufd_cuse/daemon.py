"""The daemon: builds the node tree, mounts it, links the nodes at their /dev
paths, serves until cancelled, and takes down exactly what it set up."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

import trio

from . import sysfs
from .config import Config
from .errors import Errno
from .iommu.core import VFIO_DRIVER, Device, Group, Iommu
from .iommufd.fault import FAULT_NODE, FaultFile
from .iommufd.main import IommufdFile
from .iommufd.mmap import MMAP_DIR, MmapNodes
from .iommufd.notified import LISTENER_NODE, ListenerFile
from .iommufd.pages import AccountMode
from .iommufd.selftest import ACCESS_NODE, DMABUF_NODE, AccessFile, DmabufFile
from .iommufd.viommu import VEVENTQ_NODE, VeventqFile
from .system import System
from .transport.loopback import prime_no_flush
from .transport.mount import fuse_mount, fuse_umount, mount_dev, mounted_here, register_own, unregister_own
from .transport.nodes import Node, Tree
from .transport.server import MAX_WRITE, FuseServer, Request
from .vfio.device_cdev import VfioDeviceFile
from .vfio.group import DEVICE_NODE, GroupDeviceFile, VfioGroup, group_opener
from .vfio.pci.core import VfioPciDevice

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The daemon cannot start; the message is one line for the operator."""


@dataclass
class Links:
    """Symlinks from /dev paths to nodes of the mount, and directories made for them."""

    made_links: list[str] = field(default_factory=list)
    made_dirs: list[str] = field(default_factory=list)

    def remove(self) -> None:
        for path in reversed(self.made_links):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove %s: %s", path, e)
        for d in reversed(self.made_dirs):
            try:
                os.rmdir(d)
            except OSError:
                pass  # not empty: someone else uses it now
        self.made_links.clear()
        self.made_dirs.clear()


def _is_ours(path: str, mountpoint: str) -> bool:
    try:
        target = os.readlink(path)
    except OSError:
        return False
    return target.startswith(mountpoint.rstrip("/") + "/")


class Daemon:
    def __init__(
        self,
        config: Config,
        dev_dir: str = "/dev",
        mountpoint: str = "/run/iommufd-cuse/mnt",
        selftest: bool = False,
    ) -> None:
        self.config = config
        self.dev_dir = os.path.abspath(dev_dir)
        self.mountpoint = os.path.abspath(mountpoint)
        self.system = System()
        self.system.mountpoint = self.mountpoint  # where a child opens the nodes of handed-back files
        # Test mode: IOMMU_TEST_CMD and the mock IOMMU, as a kernel built with
        # CONFIG_IOMMUFD_TEST. Never for production: any client may then create
        # mock devices and inspect pinned pages.
        self.system.selftest = selftest
        if selftest:
            log.warning(
                "TEST MODE: IOMMU_TEST_CMD (the kernel's CONFIG_IOMMUFD_TEST interface) is enabled; "
                "do not use this daemon for anything but tests"
            )
        self.tree = Tree()
        self.server = FuseServer(self.tree)
        self.links = Links()
        self._fd = -1
        self._mounted = False
        self.fs_dev: tuple[int, int] | None = None
        self.ready = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._build_topology()
        self._build_tree()

    # -- topology -----------------------------------------------------------------
    def _build_topology(self) -> None:
        system = self.system
        system.iommus = {c.name: Iommu(c) for c in self.config.iommus}
        system.groups = {}
        system.devices = []
        for dc in self.config.devices:
            iommu = system.iommus[dc.iommu]
            group = system.groups.get(dc.group)
            if group is None:
                group = system.groups[dc.group] = Group(dc.group, iommu)
            elif group.iommu is not iommu:
                raise StartupError(f"group {dc.group} spans two IOMMUs")
            dev = Device(dc, group, iommu, driver="none")
            group.devices.append(dev)
            try:
                dev.bind_driver(dc.driver, quiet=True)
            except OSError as e:
                raise StartupError(f"{dc.bdf}: driver {dc.driver}: {e.strerror}") from None
            try:
                VfioPciDevice(system, dev, self._spawn)
            except ValueError as e:
                raise StartupError(str(e)) from None
            system.devices.append(dev)
        # Functions sharing a slot announce it in their header type.
        slots: dict[str, list[Device]] = {}
        for dev in system.devices:
            slots.setdefault(dev.bdf.rsplit(".", 1)[0], []).append(dev)
        for devs in slots.values():
            for dev in devs:
                dev.vfio.config.set_multifunction(len(devs) > 1)

    def _spawn(self, fn) -> None:  # noqa: ANN001
        """Start a device model's background work in the daemon's nursery."""
        if self._nursery is None:
            raise RuntimeError("the daemon is not running")
        self._nursery.start_soon(fn)

    # -- nodes ---------------------------------------------------------------------
    def _build_tree(self) -> None:
        n = self.config.nodes["iommu"]
        iommu = self.tree.add("iommu", n.mode, n.uid, n.gid, self._open_iommufd(AccountMode.USER))
        n = self.config.nodes["vfio"]
        # The kernel's /dev/vfio/vfio is an iommufd that accounts like VFIO did.
        vfio = self.tree.add("vfio/vfio", n.mode, n.uid, n.gid, self._open_iommufd(AccountMode.MM))
        self.iommufd_inodes = {iommu.ino, vfio.ino}
        if self.system.selftest:
            # Test mode: the node the selftest companion opens to receive the
            # file of an access (IOMMU_TEST_OP_CREATE_ACCESS), see docs/selftest.md.
            n = self.config.nodes["iommu"]
            node = self.tree.add(ACCESS_NODE, n.mode, n.uid, n.gid, lambda req, flags: AccessFile(self.system))
            self.system.node_inos[AccessFile.kind] = node.ino
            # And the node of dma-bufs (IOMMU_TEST_OP_DMABUF_GET).
            node = self.tree.add(DMABUF_NODE, n.mode, n.uid, n.gid, lambda req, flags: DmabufFile(self.system))
            self.system.node_inos[DmabufFile.kind] = node.ino
        # The node the companion opens to receive the file of a fault object
        # (IOMMU_FAULT_QUEUE_ALLOC), see docs/selftest.md; in every mode.
        n = self.config.nodes["iommu"]
        self.tree.add(
            FAULT_NODE, n.mode, n.uid, n.gid, lambda req, flags: FaultFile(self.system, self.server.notify_poll)
        )
        # Where `iommufd-cuse run` hands over the listener of its seccomp filter
        # (iommufd/notified.py): files handed back to binaries the companion cannot reach.
        self.tree.add(LISTENER_NODE, n.mode, n.uid, n.gid, lambda req, flags: ListenerFile(self._spawn))
        # Likewise the node of vEVENT queues (IOMMU_VEVENTQ_ALLOC).
        self.tree.add(
            VEVENTQ_NODE, n.mode, n.uid, n.gid, lambda req, flags: VeventqFile(self.system, self.server.notify_poll)
        )
        # The directory of the nodes behind mmap() of an iommufd region (iommufd/mmap.py).
        n = self.config.nodes["iommu"]
        self.tree.add(MMAP_DIR + "/", 0o755)  # made now: only its files come and go
        self.system.mmap_nodes = MmapNodes(self.tree, n.mode, n.uid, n.gid)
        for i, dev in enumerate(self.system.devices):
            nc = dev.cfg.node
            dev.node = self.tree.add(f"vfio/devices/vfio{i}", nc.mode, nc.uid, nc.gid, self._open_device(dev))
        # VFIO groups, /dev/vfio/<N>, with the owner and mode of their first member's node.
        for gid in sorted(self.system.groups):
            group = self.system.groups[gid]
            group.vfio = VfioGroup(self.system, group, self.iommufd_inodes)
            nc = group.devices[0].cfg.node
            self.tree.add(f"vfio/{gid}", nc.mode, nc.uid, nc.gid, group_opener(group.vfio))
        # Where the companion claims a device file of VFIO_GROUP_GET_DEVICE_FD: open to
        # all, as the file holds nothing until a token of the opening process is claimed.
        node = self.tree.add(
            DEVICE_NODE, 0o666, 0, 0, lambda req, flags: GroupDeviceFile(self.system, self.iommufd_inodes)
        )
        self.system.node_inos[GroupDeviceFile.kind] = node.ino
        # The sysfs view (sys/ in the mount, never linked into dev_dir). The nodes are
        # regular files here, no char devices: their device number is 0:0.
        cdevs = {i: dev.node for i, dev in enumerate(self.system.devices)}
        sysfs.build(self.tree, self.system, cdevs, lambda node: 0)

    def dev_nodes(self) -> list[Node]:
        """The nodes linked at their /dev paths: every file but the sysfs view's."""
        return [n for n in self.tree.files() if not n.path().startswith(sysfs.ROOT + "/")]

    def _open_device(self, dev: Device):  # noqa: ANN202
        def opener(req: Request, flags: int) -> VfioDeviceFile:
            if dev.driver != VFIO_DRIVER:
                # The kernel has no vfio cdev for a device on another driver.
                raise Errno(errno.ENODEV)
            return VfioDeviceFile(dev.vfio, self.iommufd_inodes)

        return opener

    def _open_iommufd(self, mode: AccountMode):  # noqa: ANN202
        def opener(req: Request, flags: int) -> IommufdFile:
            return IommufdFile(self.system, req.caller, mode)

        return opener

    def link_path(self, node_path: str) -> str:
        return os.path.join(self.dev_dir, node_path)

    # -- start-up ------------------------------------------------------------------
    def check_and_clean(self) -> None:
        """Refuse what cannot work; remove what a crashed run left behind."""
        if os.geteuid() != 0:
            raise StartupError("must run as root (it mounts a FUSE file system)")
        if not os.path.exists("/dev/fuse"):
            raise StartupError("/dev/fuse is missing (is FUSE available in this kernel?)")
        # A mount of ours there is a live daemon's or a crashed run's. Ask with
        # statfs: FUSE never answers it from a cache (stat can be, for a second),
        # and a dead connection answers ENOTCONN. Restart=on-failure relies on this.
        for _ in range(8):  # crashed runs may have stacked mounts
            if not mounted_here(self.mountpoint):
                break
            try:
                os.statvfs(self.mountpoint)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise StartupError(f"mountpoint {self.mountpoint}: {e.strerror}") from None
                log.warning("removing the stale mount at %s", self.mountpoint)
                fuse_umount(self.mountpoint)
            else:
                raise StartupError(f"mountpoint {self.mountpoint} is busy (another daemon?)")
        try:
            os.makedirs(self.mountpoint, exist_ok=True)
            live = os.path.ismount(self.mountpoint)
        except OSError as e:
            raise StartupError(f"mountpoint {self.mountpoint}: {e.strerror}") from None
        if live:
            raise StartupError(f"mountpoint {self.mountpoint} is busy (another daemon?)")
        if os.listdir(self.mountpoint):
            raise StartupError(f"mountpoint {self.mountpoint} is not empty")
        for node in self.dev_nodes():
            path = self.link_path(node.path())
            if os.path.islink(path) and _is_ours(path, self.mountpoint):
                log.warning("removing the stale link %s", path)
                os.unlink(path)
                # and the directories made for it, now empty (made again, and
                # then removed at exit, by this run)
                parent = os.path.dirname(path)
                while parent.startswith(self.dev_dir + "/"):
                    try:
                        os.rmdir(parent)
                    except OSError:
                        break
                    parent = os.path.dirname(parent)
            elif os.path.lexists(path):
                raise StartupError(f"{path} exists and was not created by iommufd-cuse")

    def _make_links(self) -> None:
        for node in self.dev_nodes():
            path = self.link_path(node.path())
            parent = os.path.dirname(path)
            missing = []
            while not os.path.isdir(parent):
                missing.append(parent)
                parent = os.path.dirname(parent)
            for d in reversed(missing):
                os.mkdir(d, 0o755)
                self.links.made_dirs.append(d)
            os.symlink(os.path.join(self.mountpoint, node.path()), path)
            self.links.made_links.append(path)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        """Serve until cancelled. task_status.started() once the nodes answer."""
        self.check_and_clean()
        self._real_mountpoint = os.path.realpath(self.mountpoint)  # before the mount: no lookup on it after
        try:
            self._fd = fuse_mount(self.mountpoint, MAX_WRITE)
        except OSError as e:
            raise StartupError(f"cannot mount {self.mountpoint}: {e.strerror}") from None
        self._mounted = True
        # Files of this mount are recognised by its superblock, from any namespace.
        self.fs_dev = mount_dev(self._real_mountpoint)
        if self.fs_dev is not None:
            register_own(self.fs_dev)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._serve_then_stop, nursery.cancel_scope)
                with trio.fail_after(10):
                    await self.server.initialized.wait()
                await prime_no_flush(os.path.join(self.mountpoint, "iommu"))
                self._make_links()
                log.info("serving %s", ", ".join(self.link_path(n.path()) for n in self.dev_nodes()))
                self.ready.set()
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                self.shutdown()

    async def _serve_then_stop(self, scope: trio.CancelScope) -> None:
        await self.server.serve(self._fd)
        scope.cancel()  # unmounted under us: stop

    def shutdown(self) -> None:
        self.links.remove()
        if self._mounted:
            try:
                fuse_umount(self.mountpoint)
            except OSError as e:
                log.error("unmount %s: %s", self.mountpoint, e)
            self._mounted = False
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        # Contexts of clients that still hold files are released with the mount.
        for ctx in list(self.system.contexts):
            ctx.destroy_all()
        self.system.contexts.clear()
        if self.fs_dev is not None:
            unregister_own(self.fs_dev)
            self.fs_dev = None
        for dev in self.system.devices:
            if dev.vfio is not None:
                dev.vfio.model.close()
        log.info("stopped")
