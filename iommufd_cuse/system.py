"""What the kernel holds machine-wide: the page store, pinned-memory accounting,
the emulated IOMMUs and devices, and every open iommufd context.
"""

from __future__ import annotations

import errno
import logging
import resource
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._native import ffi, lib
from .errors import Errno

if TYPE_CHECKING:
    from .iommu.core import Device, Group, Iommu
    from .iommufd.companion import Pending
    from .iommufd.main import IoctlTable
    from .iommufd.mmap import MmapNodes
    from .iommufd.object import Context

log = logging.getLogger(__name__)

PAGE_SIZE = 4096


@dataclass
class Accounting:
    """Pinned pages charged to users (the kernel's user->locked_vm, as iommufd
    uses it) and to processes (mm->locked_vm for IOPT_PAGES_ACCOUNT_MM), each
    against the RLIMIT_MEMLOCK of the process that mapped the memory.

    The kernel's counters also hold pages locked by other subsystems; ours hold
    iommufd's pins, plus, for a process, what it has mlock()ed (VmLck), which
    the kernel counts in the same mm->locked_vm."""

    user: Counter = field(default_factory=Counter)  # uid -> pages
    mm: Counter = field(default_factory=Counter)  # tgid -> pages

    def charge_user(self, uid: int, npages: int, limit_pages: int | None) -> None:
        if limit_pages is not None and self.user[uid] + npages > limit_pages:
            raise Errno(errno.ENOMEM, "RLIMIT_MEMLOCK exceeded (user accounting)")
        self.user[uid] += npages

    def charge_mm(self, tgid: int, npages: int, limit_pages: int | None) -> None:
        if limit_pages is not None and self.mm[tgid] + _mlocked_pages(tgid) + npages > limit_pages:
            raise Errno(errno.ENOMEM, "RLIMIT_MEMLOCK exceeded (process accounting)")
        self.mm[tgid] += npages

    def uncharge_user(self, uid: int, npages: int) -> None:
        self.user[uid] -= npages
        if self.user[uid] <= 0:
            del self.user[uid]

    def uncharge_mm(self, tgid: int, npages: int) -> None:
        self.mm[tgid] -= npages
        if self.mm[tgid] <= 0:
            del self.mm[tgid]


def _mlocked_pages(tgid: int) -> int:
    try:
        with open(f"/proc/{tgid}/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) * 1024 // PAGE_SIZE
    except OSError:
        pass
    return 0


def memlock_limit_pages(rlimit: int) -> int | None:
    return None if rlimit == resource.RLIM_INFINITY else rlimit // PAGE_SIZE


class System:
    def __init__(self) -> None:
        self.store = ffi.gc(lib.icuse_store_new(), lib.icuse_store_free)
        self.accounting = Accounting()
        self.contexts: set[Context] = set()
        # IOAS map and unmap operations that succeeded, on every context ever (status).
        self.maps = 0
        self.unmaps = 0
        # Test mode (IOMMU_TEST_CMD, as CONFIG_IOMMUFD_TEST), set by the daemon before it serves.
        self.selftest = False
        # The topology, built by the daemon from its configuration.
        self.iommus: dict[str, Iommu] = {}  # name -> Iommu
        self.groups: dict[int, Group] = {}  # id -> Group
        self.devices: list[Device] = []  # in node order (vfio0, vfio1, ...)
        # The ioctl table for the mode, built at the first open (iommufd/main.py).
        self.ioctl_table: IoctlTable | None = None
        # Files handed back through the companion (iommufd/companion.py), by kind of
        # node: unclaimed tokens, the last token number, the node's inode.
        self.pending_files: dict[str, Pending] = {}
        self.file_seqs: dict[str, int] = {}
        self.node_inos: dict[str, int] = {}
        self.mountpoint = ""  # the daemon's mount (set by the daemon)
        # The nodes behind mmap() of iommufd regions (iommufd/mmap.py), set by the daemon.
        self.mmap_nodes: MmapNodes | None = None
        # Test mode only (iommufd/selftest/), globals of the kernel's selftest.c: the
        # mock IOMMU (made at first use) and iommufd_test_memory_limit (its default).
        self.mock_iommu: Iommu | None = None
        self.selftest_memory_limit = 65536

    def pinned_pages(self) -> int:
        return lib.icuse_store_pinned_pages(self.store)
