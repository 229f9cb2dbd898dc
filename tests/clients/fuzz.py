"""A syzkaller-shaped fuzzing client: random ioctls on one node of the daemon, from
a process of its own, printing one JSON line {errno: count} at the end.

    fuzz.py NODE IOMMU_NODE_OR_- SEED ROUNDS

Real ioctl numbers from the uapi table (and some neighbours), random sizes (up to
0xffffffff), flags, ids and IOVAs, and pointers, both the ioctl's argument and those
inside the struct: NULL, unmapped, read-only, straddling a PROT_NONE guard page,
past the user address space, valid. A device node is first bound to an iommufd
and attached to an IOAS, so that calls reach past the no-access-before-bind check.
"""

import ctypes
import json
import mmap
import os
import random
import sys

from iommufd_cuse import uapi
from iommufd_cuse.client import Iommufd, VfioDevice

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
PAGE = 4096
NUMBERS = sorted(
    {v for k, v in vars(uapi).items() if isinstance(v, int) and k.startswith(("IOMMU_", "VFIO_")) and v >> 8 == 0x3B}
)
SIZES = [0, 4, 8, 12, 16, 24, 32, 40, 48, 64, 72, 80, 96, 128, 4095, 4096, 65536, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF]
IOVAS = [0, PAGE, 1 << 20, 1 << 32, (1 << 47) - PAGE, 1 << 63, (1 << 64) - PAGE, (1 << 64) - 1]


def main() -> int:
    node, iommu, seed, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rnd = random.Random(seed)
    # Memory to point at: a writable region whose last page is PROT_NONE, a read-only page.
    rw = mmap.mmap(-1, 4 * PAGE)
    rw_addr = ctypes.addressof(ctypes.c_char.from_buffer(rw))
    libc.mprotect(ctypes.c_void_p(rw_addr + 3 * PAGE), PAGE, 0)
    ro = mmap.mmap(-1, PAGE)
    ro_addr = ctypes.addressof(ctypes.c_char.from_buffer(ro))
    libc.mprotect(ctypes.c_void_p(ro_addr), PAGE, mmap.PROT_READ)
    unmapped = 0x1000  # below mmap_min_addr: never mapped
    pointers = [0, unmapped, ro_addr, rw_addr + 3 * PAGE - 8, rw_addr, rw_addr + PAGE, 1 << 63, (1 << 64) - 8]

    fd = os.open(node, os.O_RDWR)
    ictx = None
    if iommu != "-":
        ictx = Iommufd.open(iommu)
        dev = VfioDevice(fd)
        dev.bind(ictx.fd)
        dev.attach(ictx.ioas_alloc())
    seen: dict[int, int] = {}
    for _ in range(rounds):
        cmd = rnd.choice(NUMBERS) if rnd.random() < 0.9 else (0x3B << 8) | rnd.randrange(256)
        size = rnd.choice(SIZES) if rnd.random() < 0.3 else rnd.randrange(200)
        # The struct: random bytes, a plausible size word, small ids and fds, IOVAs, pointers.
        n = rnd.randrange(8, 3 * PAGE - 8)
        n = min(n, 200) if rnd.random() < 0.9 else n
        raw = bytearray(rnd.randbytes(n))
        if rnd.random() < 0.7:
            raw[0:4] = size.to_bytes(4, "little")
        if rnd.random() < 0.6 and size < n:
            raw[size:] = bytes(n - size)
        for off in range(4, n - 8, 4):
            r = rnd.random()
            if r < 0.2:
                raw[off : off + 4] = rnd.randrange(8).to_bytes(4, "little")
            elif r < 0.25 and off % 8 == 0:
                raw[off : off + 8] = rnd.choice(pointers).to_bytes(8, "little")
            elif r < 0.28 and off % 8 == 0:
                raw[off : off + 8] = rnd.choice(IOVAS).to_bytes(8, "little")
        # Where the struct is: mostly in writable memory, ending right before the
        # guard page sometimes; or the argument itself is a bad pointer.
        r = rnd.random()
        if r < 0.1:
            arg = rnd.choice([0, unmapped, ro_addr, (1 << 64) - 8])
        else:
            start = 3 * PAGE - len(raw) if r < 0.4 else 0
            rw[start : start + len(raw)] = raw
            arg = rw_addr + start
        rc = libc.ioctl(fd, cmd, ctypes.c_void_p(arg))
        err = ctypes.get_errno() if rc < 0 else 0
        seen[err] = seen.get(err, 0) + 1
    os.close(fd)
    if ictx is not None:
        ictx.close()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
