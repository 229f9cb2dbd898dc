"""Mounting the FUSE file system, and the links that make its nodes appear at /dev paths."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
FSNAME = "iommufd-cuse"


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def fuse_mount(mountpoint: str, max_read: int) -> int:
    """Open /dev/fuse and mount it at mountpoint; returns the fuse device fd."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    opts = f"fd={fd},rootmode=40755,user_id=0,group_id=0,allow_other,default_permissions,max_read={max_read}"
    try:
        _check(
            _libc.mount(
                FSNAME.encode(),
                mountpoint.encode(),
                f"fuse.{FSNAME}".encode(),
                MS_NOSUID | MS_NODEV,
                opts.encode(),
            ),
            f"mount {mountpoint}",
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def fuse_umount(mountpoint: str) -> None:
    """Lazy unmount: clients still holding files keep them until they close."""
    rc = _libc.umount2(mountpoint.encode(), MNT_DETACH)
    if rc != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _check(rc, f"umount {mountpoint}")


def mounted_here(mountpoint: str) -> bool:
    """Whether a file system of ours is mounted at mountpoint (a stale one counts)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and _unescape(fields[1]) == target and fields[0] == FSNAME:
                return True
    return False


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _fdinfo(fd: int, key: str) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# The character devices this process serves by CUSE (transport/cuse.py): st_rdev -> the node's inode number
# in the tree, which is what fd_inode() answers for them (a FUSE file's inode number is that already).
cuse_devices: dict[int, int] = {}


def fd_inode(fd: int) -> int | None:
    """The node (inode number in the tree) of an open file, from /proc: unlike fstat() no request
    reaches the file's file system (which, for our own mount, is us). For one of our CUSE devices, its node."""
    ino = _cuse_node(fd)
    return ino if ino is not None else _fdinfo(fd, "ino")


# statx(2): with an empty request mask FUSE answers from the inode and its superblock
# and never asks the server (fuse_update_get_attr), so it is safe on our own files.
_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000
_STATX = ctypes.c_uint8 * 256  # struct statx; stx_dev_major/minor at 136/140


def _statx(fd: int) -> bytes | None:
    buf = _STATX()
    if _libc.statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, 0, buf) != 0:
        return None
    return bytes(buf)


def fd_dev(fd: int) -> tuple[int, int] | None:
    """(major, minor) of the superblock an open file lives on, without any request
    to its file system (for ours: no request to ourselves)."""
    raw = _statx(fd)
    if raw is None:
        return None
    return int.from_bytes(raw[136:140], "little"), int.from_bytes(raw[140:144], "little")


def _cuse_node(fd: int) -> int | None:
    """The node of one of our CUSE devices open as fd (its st_rdev, by the same request-free statx)."""
    if not cuse_devices:
        return None
    raw = _statx(fd)
    if raw is None or not stat.S_ISCHR(int.from_bytes(raw[28:30], "little")):  # stx_mode
        return None
    rdev = os.makedev(int.from_bytes(raw[128:132], "little"), int.from_bytes(raw[132:136], "little"))
    return cuse_devices.get(rdev)


# The superblocks of this process's FUSE file systems: a file of one of them is
# ours in whatever mount namespace, and through whatever mount, the caller has it.
_our_devs: set[tuple[int, int]] = set()


def mount_dev(mountpoint: str) -> tuple[int, int] | None:
    """(major, minor) of our file system mounted at mountpoint (a path without
    symlinks: resolving it would ask the file system), from our mountinfo (the
    last such mount there: the one on top)."""
    target = mountpoint
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target and f" - fuse.{FSNAME} " in line:
                major, minor = fields[2].split(":")
                dev = (int(major), int(minor))
    return dev


def register_own(dev: tuple[int, int]) -> None:
    _our_devs.add(dev)


def unregister_own(dev: tuple[int, int]) -> None:
    _our_devs.discard(dev)


def fd_on_our_mount(fd: int) -> bool:
    """Whether an open file is one of this daemon's: on a file system of ours (any mount of it, in any mount
    namespace), or one of our CUSE devices (wherever its node is). Such a file must never be touched by a
    daemon thread in a way that waits for the daemon: see loopback.py."""
    dev = fd_dev(fd)
    return (dev is not None and dev in _our_devs) or _cuse_node(fd) is not None
