"""The kernel FUSE protocol (include/uapi/linux/fuse.h): opcodes, flags, struct formats.

Only what the daemon speaks. All structs are little-endian x86_64 layouts.
"""

import struct

KERNEL_VERSION = 7
# The minor we answer with; the kernel uses min(its minor, ours). 31 gives the
# 64-byte init_out and every op below.
KERNEL_MINOR_VERSION = 31

# opcodes
LOOKUP = 1
FORGET = 2
GETATTR = 3
READLINK = 5
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
IOCTL = 39
POLL = 40
BATCH_FORGET = 42
CUSE_INIT = 4096

OPCODE_NAMES = {
    globals()[n]: n
    for n in "LOOKUP FORGET GETATTR READLINK SETATTR OPEN READ WRITE STATFS RELEASE FSYNC FLUSH INIT "
    "OPENDIR READDIR RELEASEDIR ACCESS INTERRUPT DESTROY IOCTL POLL BATCH_FORGET CUSE_INIT".split()
}

# requests that get no reply
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})
# what a removed device still serves: closing its files
AFTER_REMOVAL = frozenset({RELEASE, FLUSH, INTERRUPT, FORGET, BATCH_FORGET, DESTROY})

# init flags
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_MAX_PAGES = 1 << 22

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_NONSEEKABLE = 1 << 2

# ioctl
FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1

# poll
FUSE_POLL_SCHEDULE_NOTIFY = 1 << 0
NOTIFY_POLL = 1

S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
DT_DIR = 4
DT_REG = 8
DT_LNK = 10

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (the rest is ignored)
# major minor max_readahead flags max_background congestion_threshold max_write
# time_gran max_pages map_alignment flags2 max_stack_depth request_timeout unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime nsec*3 mode nlink uid gid rdev blksize flags
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid *_nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = READ_IN
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
INTERRUPT_IN = struct.Struct("<Q")
IOCTL_IN = struct.Struct("<QIIQII")  # fh flags cmd arg in_size out_size
IOCTL_OUT = struct.Struct("<iIII")  # result flags in_iovs out_iovs
POLL_IN = struct.Struct("<QQII")  # fh kh flags events
POLL_OUT = struct.Struct("<II")
NOTIFY_POLL_OUT = struct.Struct("<Q")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type


def dirent(ino: int, off: int, name: bytes, kind: int) -> bytes:
    """One fuse_dirent, padded to 8 bytes."""
    rec = DIRENT_HEAD.pack(ino, off, len(name), kind) + name
    return rec + b"\0" * (-len(rec) % 8)
