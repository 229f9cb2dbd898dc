"""The daemon: builds the node tree, mounts it, links the nodes at their /dev
paths, serves until cancelled, and takes down exactly what it set up."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
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
from .transport import cuse
from .transport.loopback import prime_no_flush
from .transport.mount import (
    cuse_devices,
    fuse_mount,
    fuse_umount,
    mount_dev,
    mounted_here,
    register_own,
    unregister_own,
)
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


BACKENDS = ("auto", "cuse", "fuse")
REMOVE_GRACE = 10  # seconds a removed CUSE device waits for its open files to close


class Daemon:
    def __init__(
        self,
        config: Config,
        dev_dir: str = "/dev",
        mountpoint: str = "/run/iommufd-cuse/mnt",
        selftest: bool = False,
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: one of {', '.join(BACKENDS)}")
        self.config = config
        # "auto", "cuse" or "fuse" as asked; self.backend is what run() chose
        self.requested_backend = backend
        self.backend: str | None = None
        self.backend_note = ""
        # CUSE: per file node, its channel's server and fd, its device name and major:minor
        self.channels: list[tuple[cuse.CuseServer, int]] = []
        self.devts: dict[str, tuple[int, int]] = {}
        self._dirs_before: set[str] = set()
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
            FAULT_NODE, n.mode, n.uid, n.gid, lambda req, flags: FaultFile(self.system, req.server.notify_poll)
        )
        # Where `iommufd-cuse run` hands over the listener of its seccomp filter
        # (iommufd/notified.py): files handed back to binaries the companion cannot reach.
        self.tree.add(LISTENER_NODE, n.mode, n.uid, n.gid, lambda req, flags: ListenerFile(self._spawn))
        # Likewise the node of vEVENT queues (IOMMU_VEVENTQ_ALLOC).
        self.tree.add(
            VEVENTQ_NODE, n.mode, n.uid, n.gid, lambda req, flags: VeventqFile(self.system, req.server.notify_poll)
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
        sysfs.build(self.tree, self.system, cdevs, self.node_rdev)

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
            self._make_parents(path)
            os.symlink(os.path.join(self.mountpoint, node.path()), path)
            self.links.made_links.append(path)

    def choose_backend(self) -> str:
        """CUSE when asked for (a one-line StartupError without it) or, for auto, when /dev/cuse opens."""
        if self.requested_backend == "fuse":
            return "fuse"
        why = cuse.available()
        if why is None:
            return "cuse"
        if self.requested_backend == "cuse":
            raise StartupError(why)
        self.backend_note = f" (by FUSE: {why})"  # said once serving, not before a start-up error
        return "fuse"

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        """Serve until cancelled. task_status.started() once the nodes answer."""
        # By CUSE the nodes of /dev are character devices; the rest (the sysfs view, mmap nodes) stays on the
        # FUSE mount either way.
        self.backend = self.choose_backend()
        if self.backend == "cuse" and os.geteuid() == 0:
            self._check_cuse_paths()
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
                if self.backend == "cuse":
                    await self._serve_cuse(nursery, task_status)
                    return
                self._make_links()
                nodes = ", ".join(self.link_path(n.path()) for n in self.dev_nodes())
                log.info("serving %s%s", nodes, self.backend_note)
                self.ready.set()
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                self.shutdown()
                self._remove_made_parents()

    # -- CUSE ----------------------------------------------------------------------
    def devname(self, node_path: str) -> str:
        """The CUSE device name of a node: its path under /dev when the nodes are to be there (devtmpfs makes
        them), else a name of its own under /dev/iommufd-cuse/ (the daemon makes the node in dev_dir)."""
        if self.dev_dir == "/dev":
            return node_path
        tag = hashlib.sha256(self.dev_dir.encode()).hexdigest()[:8]
        return f"iommufd-cuse/{tag}/{node_path}"

    def _check_cuse_paths(self) -> None:
        for node in self.dev_nodes():
            path = self.link_path(node.path())
            parent = os.path.dirname(path)
            while parent.startswith(self.dev_dir + "/"):
                if os.path.isdir(parent):
                    self._dirs_before.add(parent)
                parent = os.path.dirname(parent)
            if os.path.lexists(path):
                st = os.lstat(path)
                rdev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                if stat.S_ISCHR(st.st_mode) and not os.path.exists(f"/sys/dev/char/{rdev}"):
                    log.warning("removing the stale device node %s (%s)", path, rdev)
                    os.unlink(path)
                elif os.path.islink(path) and _is_ours(path, self.mountpoint):
                    log.warning("removing the stale link %s", path)
                    os.unlink(path)
                else:
                    raise StartupError(f"{path} exists and was not created by iommufd-cuse")

    async def _serve_cuse(self, nursery: trio.Nursery, task_status) -> None:  # noqa: ANN001
        """The /dev nodes as CUSE devices, served until cancelled; then removed as the kernel removes them."""
        major = 0
        for minor, node in enumerate(self.dev_nodes()):
            # One major for all, as the first device got it, and a minor per node.
            major = (await self._cuse_device(node, (major, minor) if major else (0, 0)))[0]
        # An outer cancel (SIGTERM) does not stop the channels at once: the devices are removed first.
        serving = trio.CancelScope(shield=True)
        nursery.start_soon(self._serve_channels, serving, nursery.cancel_scope)
        log.info(
            "serving by CUSE %s",
            ", ".join(f"{self.link_path(p)} ({d[0]}:{d[1]})" for p, d in self.devts.items()),
        )
        self.ready.set()
        task_status.started(self)
        try:
            await trio.sleep_forever()
        finally:
            try:
                with trio.CancelScope(shield=True):
                    await self._remove_devices()
            finally:
                serving.cancel()

    async def _serve_channels(self, serving: trio.CancelScope, stop: trio.CancelScope) -> None:
        with serving:
            async with trio.open_nursery() as channels:
                for server, fd in self.channels:
                    channels.start_soon(self._serve_channel, server, fd, channels.cancel_scope)
        stop.cancel()  # a channel ended under us, or the devices are gone: stop

    async def _remove_devices(self) -> None:
        """As the kernel removes a device: its node leaves /dev at once, a file still open gets ENODEV for
        everything but its release, and the device goes with the last close (or after REMOVE_GRACE s)."""
        for server, _ in self.channels:
            server.removed = True
        for path in self.devts:
            try:
                os.unlink(self.link_path(path))  # devtmpfs's own, or made here
            except FileNotFoundError:
                pass
        self.links.remove()
        with trio.move_on_after(REMOVE_GRACE):
            while any(server.handles for server, _ in self.channels):
                await trio.sleep(0.05)
        still = sum(len(server.handles) for server, _ in self.channels)
        if still:
            log.warning("%d files still open %s s after removal began: the devices go anyway", still, REMOVE_GRACE)

    def _remove_made_parents(self) -> None:
        """Directories above the nodes that were not there at start (devtmpfs leaves its own behind when a node
        was unlinked before its device went)."""
        for path in sorted({os.path.dirname(self.link_path(p)) for p in self.devts}, key=len, reverse=True):
            while path.startswith(self.dev_dir + "/") and path not in self._dirs_before:
                try:
                    os.rmdir(path)
                except OSError:
                    break
                path = os.path.dirname(path)

    async def _cuse_device(self, node, devt: tuple[int, int]) -> tuple[int, int]:  # noqa: ANN001
        """Create one node's device: its channel, the kernel's CUSE_INIT answered, the node's mode and owner."""
        name = self.devname(node.path())
        try:
            fd = cuse.open_channel()
        except OSError as e:
            raise StartupError(f"{cuse.CUSE_DEVICE}: {e.strerror}") from None
        server = cuse.CuseServer(self.tree, node, name, devt)
        self.channels.append((server, fd))
        with trio.fail_after(10):
            await server.handshake(fd)
        got = cuse.devt_of(name)
        if got is None:
            raise StartupError(f"CUSE refused the device {name} {devt[0]}:{devt[1]} (one of that name exists?)")
        self.devts[node.path()] = got
        rdev = os.makedev(*got)
        cuse_devices[rdev] = node.ino
        path = self.link_path(node.path())
        if self.dev_dir != "/dev":
            self._make_parents(path)
            os.mknod(path, stat.S_IFCHR | 0o600, rdev)
            self.links.made_links.append(path)
        os.chown(path, node.uid, node.gid)
        os.chmod(path, node.mode)
        # what udev makes: /dev/char/MAJ:MIN -> the node
        char = os.path.join(self.dev_dir, "char", f"{got[0]}:{got[1]}")
        self._make_parents(char)
        if os.path.lexists(char):
            os.unlink(char)
        os.symlink(os.path.relpath(path, os.path.dirname(char)), char)
        self.links.made_links.append(char)
        return got

    def _make_parents(self, path: str) -> None:
        """The missing directories above path (removed again at exit)."""
        parent = os.path.dirname(path)
        missing = []
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            self.links.made_dirs.append(d)

    async def _serve_channel(self, server: cuse.CuseServer, fd: int, scope: trio.CancelScope) -> None:
        await server.serve(fd)
        scope.cancel()  # a channel ended under us: stop

    def devt(self, node_path: str) -> tuple[int, int] | None:
        """The major:minor of a node served by CUSE (None by FUSE)."""
        return self.devts.get(node_path)

    def node_rdev(self, node: Node) -> int:
        """st_rdev of a node as clients see it (the sysfs view's `dev` files): its CUSE device's, 0 by FUSE."""
        devt = self.devts.get(node.path())
        return os.makedev(*devt) if devt else 0

    async def _serve_then_stop(self, scope: trio.CancelScope) -> None:
        await self.server.serve(self._fd)
        scope.cancel()  # unmounted under us: stop

    def shutdown(self) -> None:
        # Closing a channel removes its device (and the node devtmpfs made for it).
        for server, fd in self.channels:
            os.close(fd)
            server.fd = -1
        self.channels.clear()
        for devt in self.devts.values():
            cuse_devices.pop(os.makedev(*devt), None)
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
        log.info("stopped, %d pages pinned", self.system.pinned_pages())
