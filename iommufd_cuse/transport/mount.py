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


def fd_on_our_mount(fd: int) -> bool:
    """Whether an open file is one of this daemon's: on a file system of ours (any mount of it), or one of
    our CUSE devices (wherever its node is). Such a file must never be touched by a daemon thread in a way
    that waits for the daemon: see loopback.py."""
    return _mount_type(fd) == f"fuse.{FSNAME}" or _cuse_node(fd) is not None


def _mount_type(fd: int) -> str | None:
    mnt_id = _fdinfo(fd, "mnt_id")
    if mnt_id is None:
        return None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                if line.split(maxsplit=1)[0] == str(mnt_id):
                    return line.split(" - ", 1)[1].split()[0]
    except (OSError, IndexError):
        pass
    return None


def _cuse_node(fd: int) -> int | None:
    if not cuse_devices:
        return None
    # fstat() asks the file system; a character device's inode lives on the file system of its node, never
    # on a FUSE mount of ours (CUSE devices have no such node), and no FUSE file system is asked at all.
    if (_mount_type(fd) or "fuse").startswith("fuse"):
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return cuse_devices.get(st.st_rdev) if stat.S_ISCHR(st.st_mode) else None
