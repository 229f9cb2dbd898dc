"""`iommufd-cuse run [--] CMD ARGS...`: an unmodified client in a private mount namespace
whose /dev/iommu, /dev/vfio/... and sysfs paths are the daemon's.

In that namespace only (mount propagation from it is cut, so nothing outside changes):
- /dev is a private tmpfs copy of the host's /dev (device nodes made again, the file
  systems mounted under it bound again), in which the daemon's nodes are linked at
  their real paths (/dev/iommu, /dev/vfio/vfio, /dev/vfio/<group>, /dev/vfio/devices/vfioN);
- the sysfs directories clients read (/sys/bus/pci/devices, /sys/bus/pci/drivers,
  /sys/kernel/iommu_groups, /sys/module, /sys/class/iommu) are read-only overlays:
  the host's entries, and on top of them links to the daemon's view (its sys/),
  which hide a host entry of the same name (an emulated 0000:00:04.0 hides a real one);
- the companion library is preloaded (unless --no-companion), so files the daemon
  hands back (VFIO_GROUP_GET_DEVICE_FD, fault queues) reach dynamic binaries;
- a seccomp filter (unless --no-seccomp) notifies the daemon of those same ioctl calls
  and of no other call, so that the daemon installs the new file in every binary: static
  ones, set-uid ones, ones that clear their environment (iommufd/notified.py). As any
  unprivileged process must, CMD runs with no_new_privs set: a set-uid or file-capability
  CMD runs without that privilege. The filter is inherited by CMD's children.
Then CMD replaces this process: run exits with CMD's status. Everything made goes
with the namespace when its last process exits.

The namespace is made in this process and CMD is exec'ed from it, so whatever must
be set up in CMD before it runs (a seccomp filter whose listener goes to the daemon)
has one place: the hooks in BEFORE_EXEC, called last, just before execvp.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Callable

from .iommufd.notified import LISTENER_NODE, NOTIFIED_CMDS, REGISTER_LISTENER
from .transport.usernotif import install_filter

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 2

# The sysfs directories clients read at fixed paths, and where the daemon's view has them.
SYSFS_OVERLAYS = ("bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "module", "class/iommu")
STAGE = "/dev/.iommufd-cuse-run"  # on the namespace's own /dev tmpfs

# Called with (argv, env) just before CMD is exec'ed, in the namespace.
BEFORE_EXEC: list[Callable[[list[str], dict[str, str]], None]] = []


class RunError(RuntimeError):
    """run cannot set the namespace up; the message is one line for the user."""


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {target}: {os.strerror(e)}")


def _is_ours(mountpoint: str) -> bool:
    """A live daemon's mount at mountpoint (its iommu node answers stat)."""
    try:
        return stat.S_ISREG(os.stat(os.path.join(mountpoint, "iommu")).st_mode) and os.path.isdir(
            os.path.join(mountpoint, "sys")
        )
    except OSError:
        return False


def _copy_dev(src: str, dst: str) -> None:
    """The entries of the host's /dev (src, a path into it) made again under dst:
    device nodes with mknod, links as links, mounts bound again."""
    for entry in os.scandir(src):
        s, d = entry.path, os.path.join(dst, entry.name)
        st = os.lstat(s)
        mode = st.st_mode
        try:
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISDIR(mode):
                os.mkdir(d)
                if os.lstat(os.path.join(s, "..")).st_dev != st.st_dev:  # a file system of its own
                    _mount(s, d, None, MS_BIND | MS_REC)
                else:
                    _copy_dev(s, d)
            elif stat.S_ISREG(mode):
                shutil.copyfile(s, d)
            else:
                os.mknod(d, mode, st.st_rdev)
            if not stat.S_ISLNK(mode):
                os.chmod(d, stat.S_IMODE(mode))
            os.lchown(d, st.st_uid, st.st_gid)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.EPERM):
                raise


def _private_dev() -> None:
    old = os.open("/dev", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _mount("iommufd-cuse-run", "/dev", "tmpfs", MS_NOSUID, "mode=0755")
        _copy_dev(f"/proc/self/fd/{old}", "/dev")
    finally:
        os.close(old)


def _dev_nodes(mountpoint: str) -> list[str]:
    """The daemon's nodes (paths in its mount), but its sysfs view."""
    out = []
    for dirpath, dirnames, filenames in os.walk(mountpoint):
        rel = os.path.relpath(dirpath, mountpoint)
        if rel == "sys":
            dirnames.clear()
            continue
        out += [os.path.normpath(os.path.join(rel, f)) for f in filenames]
    return sorted(out)


def _link_nodes(mountpoint: str) -> None:
    for rel in _dev_nodes(mountpoint):
        path = os.path.join("/dev", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)  # the host's own node of that name: ours replaces it here
        os.symlink(os.path.join(mountpoint, rel), path)


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _overlay_sysfs(mountpoint: str) -> None:
    os.mkdir(STAGE, 0o700)
    _mount("iommufd-cuse-run", STAGE, "tmpfs", MS_NOSUID, "mode=0700")
    try:
        for i, rel in enumerate(SYSFS_OVERLAYS):
            ours = os.path.join(mountpoint, "sys", rel)
            if not os.path.isdir(ours):
                continue
            # the deepest directory the host has: the overlay goes there
            base, sub = rel, ""
            while not os.path.isdir(os.path.join("/sys", base)):
                base, tail = os.path.split(base)
                sub = os.path.join(tail, sub) if sub else tail
            top = os.path.join(STAGE, str(i))
            where = os.path.join(top, sub) if sub else top
            os.makedirs(where)
            for name in os.listdir(ours):
                os.symlink(os.path.join(ours, name), os.path.join(where, name))
            target = os.path.join("/sys", base)
            _mount("overlay", target, "overlay", MS_RDONLY, f"lowerdir={_escape(top)}:{_escape(target)}")
    finally:
        # the overlays hold their layers: the staging mount can go from sight
        _libc.umount2(STAGE.encode(), MNT_DETACH)
        os.rmdir(STAGE)


def enter(mountpoint: str) -> None:
    """Make this process's private mount namespace with the daemon's views."""
    if os.geteuid() != 0:
        raise RunError("must run as root (it makes a mount namespace)")
    mountpoint = os.path.abspath(mountpoint)
    if not _is_ours(mountpoint):
        raise RunError(f"no iommufd-cuse daemon serves {mountpoint} (start `iommufd-cuse serve` first)")
    if _libc.unshare(CLONE_NEWNS) != 0:
        e = ctypes.get_errno()
        raise RunError(f"unshare: {os.strerror(e)}")
    # Nothing done here propagates out; the host's later mounts still come in.
    _mount(None, "/", None, MS_REC | MS_SLAVE)
    try:
        _private_dev()
        _link_nodes(mountpoint)
        _overlay_sysfs(mountpoint)
    except OSError as e:
        raise RunError(str(e)) from None


def hand_listener_to_daemon(mountpoint: str) -> None:
    """Install the seccomp filter of the calls that hand back a file in this process
    (CMD inherits it across exec) and give its listener to the daemon of mountpoint."""
    try:
        node = os.open(os.path.join(mountpoint, LISTENER_NODE), os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise RunError(f"seccomp: {LISTENER_NODE} of the daemon: {e.strerror} (--no-seccomp runs without)") from None
    try:
        listener = install_filter(NOTIFIED_CMDS, zero_reads=True)
        try:
            fcntl.ioctl(node, REGISTER_LISTENER, listener)
        finally:
            os.close(listener)  # the daemon has its own copy; CMD must not hold one
    except OSError as e:
        raise RunError(f"seccomp: {e.strerror}") from None
    finally:
        os.close(node)


def run(mountpoint: str, argv: list[str], companion: str | None, seccomp: bool = True) -> int:
    """enter(), then exec argv; returns only on failure (the exit status to use)."""
    enter(mountpoint)
    env = dict(os.environ)
    if companion:
        env["LD_PRELOAD"] = f"{companion} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else companion
    for hook in BEFORE_EXEC:
        hook(argv, env)
    if seccomp:
        hand_listener_to_daemon(os.path.abspath(mountpoint))  # last: nothing else runs under the filter
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise RunError(f"{argv[0]}: {e.strerror}") from None
