"""iopt_pages: the memory behind one IOAS_MAP or MAP_FILE, shared by the areas
that COPY makes of it, pinned in the native page store when a domain or an
access needs it and accounted as the kernel does (drivers/iommu/iommufd/pages.c).

Where the bytes are:
  - shared file-backed memory (MAP_FILE memfds, MAP_SHARED mappings of memfd,
    shmem, hugetlbfs or files found through /proc/<pid>/map_files) is mapped
    into the daemon: pins keep it alive past the client's munmap and exit;
  - private anonymous memory is reached in place through /proc/<pid>/mem,
    opened when the area is mapped and so tied to that process's mm: once the
    process is gone, device access faults. (The kernel would keep the pages.)
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Any

from .._native import ffi, lib
from ..errors import Errno
from ..system import PAGE_SIZE, System, memlock_limit_pages
from ..transport.caller import CAP_IPC_LOCK, Caller, memlock_limit_of
from ..transport.loopback import identify
from ..transport.mount import fd_on_our_mount

log = logging.getLogger(__name__)


class AccountMode(enum.Enum):
    USER = 0  # IOPT_PAGES_ACCOUNT_USER: the user's locked_vm
    MM = 1  # IOPT_PAGES_ACCOUNT_MM: the process's pinned_vm


GIB = 1 << 30


@dataclass
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def shared_file(self) -> bool:
        # A MAP_SHARED mapping of a file object (memfd and shmem included);
        # map_files/ gives us the same file to map.
        return self.perms[3] == "s" and self.inode != 0


def read_maps(proc_dir: int, start: int = 0, end: int = 1 << 64) -> list[Vma]:
    """The mappings of a process that overlap [start, end) (all of them by default).
    Only their lines are parsed, found by bisection (the file is sorted by address):
    a VMM has thousands of mappings, and a guest's DMA API maps a page at a time."""
    fd = os.open("maps", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_dir)
    with os.fdopen(fd, "rb") as f:
        lines = f.read().splitlines()
    lo, hi = 0, len(lines)
    while lo < hi:  # the first line whose mapping ends above start
        mid = (lo + hi) // 2
        if int(lines[mid].split(b" ", 1)[0].split(b"-")[1], 16) <= start:
            lo = mid + 1
        else:
            hi = mid
    out = []
    for raw in lines[lo:]:
        parts = raw.decode(errors="surrogateescape").split(maxsplit=5)
        vstart, vend = (int(x, 16) for x in parts[0].split("-"))
        if vstart >= end:
            break
        out.append(
            Vma(vstart, vend, parts[1], int(parts[2], 16), int(parts[4]), parts[5].strip() if len(parts) > 5 else "")
        )
    return out


class Pages:
    """struct iopt_pages."""

    is_dmabuf = False  # IOPT_ADDRESS_DMABUF (DmabufPages)
    revoked = False  # a dma-buf's exporter took the memory back (iopt_dmabuf_revoked)

    def __init__(
        self,
        system: System,
        npages: int,
        writable: bool,
        caller: Caller,
        account_mode: AccountMode,
        align_offset: int,
    ) -> None:
        self.system = system
        self.npages = npages
        self.writable = writable
        self.refs = 1  # areas and copies in progress holding this
        # Accounting goes to the mapping process: the kernel records its user,
        # mm and task (for RLIMIT_MEMLOCK) when the pages are created.
        self.account: AccountMode | None = None if caller.capable(CAP_IPC_LOCK) else account_mode
        self.source_uid = caller.uid
        self.source_tgid = caller.tgid
        self._saved_rlimit = caller.memlock_limit()
        self.npinned = 0
        base = ffi.new("uint64_t *")
        pid = lib.icuse_pages_new(system.store, npages, align_offset % GIB, base)
        if pid < 0:
            raise Errno(-pid)
        self.id = pid
        self.pa_base = base[0]
        self._backed: list[tuple[int, int]] = []  # index ranges with a backing set
        self.areas: dict[Any, Any] = {}  # area -> its io_pagetable, the areas using these pages
        self._resources: list[object] = []  # fds and mmaps the backings use

    # -- backing ---------------------------------------------------------------
    def resolve(self, first: int, n: int) -> None:
        """Give pages [first, first+n) a backing in the store (EFAULT if none)."""
        raise NotImplementedError

    def _set_backing(self, first: int, n: int, kind: int, fd: int, addr: int) -> None:
        rc = lib.icuse_pages_set_backing(self.system.store, self.id, first, n, kind, fd, addr)
        if rc:
            raise Errno(-rc)
        self._backed.append((first, first + n))

    def _missing(self, first: int, n: int) -> list[tuple[int, int]]:
        """Index ranges inside [first, first+n) that have no backing yet."""
        todo = [(first, first + n)]
        for b0, b1 in self._backed:
            nxt = []
            for a0, a1 in todo:
                if b1 <= a0 or a1 <= b0:
                    nxt.append((a0, a1))
                    continue
                if a0 < b0:
                    nxt.append((a0, b0))
                if b1 < a1:
                    nxt.append((b1, a1))
            todo = nxt
        return todo

    # -- pins ------------------------------------------------------------------
    def pin(self, first: int, n: int, charge: bool = True) -> None:
        """Pin [first, first+n), charging newly pinned pages; all or nothing.
        charge=False is a transient hold for a CPU access (iommufd_access_rw),
        which the kernel does not account either."""
        for a, b in self._missing(first, n):
            self.resolve(a, b - a)
        newly = lib.icuse_pages_pin(self.system.store, self.id, first, n)
        if newly < 0:
            raise Errno(-newly)
        if charge:
            try:
                self._charge(newly)
            except BaseException:
                lib.icuse_pages_unpin(self.system.store, self.id, first, n)
                raise
            self.npinned += newly

    def unpin(self, first: int, n: int, charge: bool = True) -> None:
        gone = lib.icuse_pages_unpin(self.system.store, self.id, first, n)
        if gone < 0:
            log.error("unpin of unpinned pages %d+%d in pages %d", first, n, self.id)
            return
        if charge:
            self._uncharge(gone)
            self.npinned -= gone

    def pin_count(self, index: int) -> int:
        return lib.icuse_pages_pin_count(self.system.store, self.id, index)

    def _charge(self, npages: int) -> None:
        self._charge_as(self.source_uid, self.source_tgid, self._rlimit(), npages)

    def _uncharge(self, npages: int) -> None:
        self._uncharge_as(self.source_uid, self.source_tgid, npages)

    def _charge_as(self, uid: int, tgid: int, rlimit: int, npages: int) -> None:
        if not npages or self.account is None:
            return
        acct = self.system.accounting
        limit = memlock_limit_pages(rlimit)
        if self.account is AccountMode.USER:
            acct.charge_user(uid, npages, limit)
        else:
            acct.charge_mm(tgid, npages, limit)

    def _uncharge_as(self, uid: int, tgid: int, npages: int) -> None:
        if not npages or self.account is None:
            return
        if self.account is AccountMode.USER:
            self.system.accounting.uncharge_user(uid, npages)
        else:
            self.system.accounting.uncharge_mm(tgid, npages)

    # IOMMU_IOAS_CHANGE_PROCESS: the pinned pages change hands.
    def charge_to(self, caller: Caller, npages: int) -> None:
        self._charge_as(caller.uid, caller.tgid, caller.memlock_limit(), npages)

    def uncharge_from(self, caller: Caller, npages: int) -> None:
        self._uncharge_as(caller.uid, caller.tgid, npages)

    def move_source(self, caller: Caller) -> None:
        self._uncharge(self.npinned)
        self.source_uid = caller.uid
        self.source_tgid = caller.tgid
        self._saved_rlimit = caller.memlock_limit()

    def _rlimit(self) -> int:
        # The mapping task's limit now; its last known one once it has exited.
        limit = memlock_limit_of(f"/proc/{self.source_tgid}")
        return self._saved_rlimit if limit is None else limit

    def _map_file(self, fd: int, offset: int, length: int, prot: int) -> int:
        """Map [offset, offset + length) of a shmem or hugetlbfs file into the daemon
        (kept until the pages go); the address of offset. A hugetlbfs file maps only
        whole huge pages, so the huge pages around the range are mapped."""
        fs, bsize = _fs_type(fd)
        align = bsize if fs == HUGETLBFS_MAGIC and bsize > PAGE_SIZE else PAGE_SIZE
        lo = offset - offset % align
        hi = -(-(offset + length) // align) * align
        try:
            m = mmap.mmap(fd, hi - lo, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=prot, offset=lo)
        except OSError as e:
            raise Errno(e.errno or errno.EINVAL, f"cannot map the memory's file: {e}") from None
        self._resources.append(m)
        return int(ffi.cast("uint64_t", ffi.from_buffer(m))) + (offset - lo)

    # -- lifetime -----------------------------------------------------------------
    def put(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self._free()

    def _free(self) -> None:
        rc = lib.icuse_pages_remove(self.system.store, self.id)
        if rc:
            log.error("pages %d still pinned at free (%d)", self.id, rc)
            return
        for res in self._resources:
            try:
                if isinstance(res, int):
                    os.close(res)
                else:
                    res.close()  # type: ignore[attr-defined]
            except (OSError, BufferError) as e:
                log.warning("releasing a backing of pages %d: %s", self.id, e)
        self._resources.clear()


class UserPages(Pages):
    """Pages of a process's address space (IOMMU_IOAS_MAP)."""

    def __init__(
        self, system: System, caller: Caller, account_mode: AccountMode, uptr: int, length: int, writable: bool
    ) -> None:
        self.uptr = uptr - uptr % PAGE_SIZE
        self.address = self.uptr  # what IOVA allocation keeps the alignment of
        self.start_byte = uptr - self.uptr
        npages = (self.start_byte + length + PAGE_SIZE - 1) // PAGE_SIZE
        super().__init__(system, npages, writable, caller, account_mode, self.uptr)
        # The mm of the mapping process, as the kernel keeps source_mm: the
        # /proc/<pid> directory and mem file stay bound to that process.
        try:
            self.proc_dir = os.open(f"/proc/{caller.tgid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.mem_fd = os.open("mem", os.O_RDWR | os.O_CLOEXEC, dir_fd=self.proc_dir)
        except OSError as e:
            lib.icuse_pages_remove(system.store, self.id)
            raise Errno(errno.EFAULT, f"cannot reach the caller's memory: {e}") from None
        self._resources += [self.proc_dir, self.mem_fd]

    def resolve(self, first: int, n: int) -> None:
        start = self.uptr + first * PAGE_SIZE
        end = start + n * PAGE_SIZE
        # The mm must still be the one we mapped from (exit or exec: EFAULT).
        if os.pread(self.mem_fd, 0, start) == b"" and not self._mm_alive(start):
            raise Errno(errno.EFAULT, "the mapping process is gone")
        try:
            vmas = read_maps(self.proc_dir, start, end)
        except OSError:
            raise Errno(errno.EFAULT, "the mapping process is gone") from None
        pos = start
        for vma in vmas:
            if vma.end <= pos:
                continue
            if vma.start > pos:
                break
            if vma.perms[0] != "r" or (self.writable and vma.perms[1] != "w"):
                raise Errno(errno.EFAULT, f"{vma.start:#x}-{vma.end:#x} {vma.perms} does not allow the access")
            seg_end = min(vma.end, end)
            i0 = (pos - self.uptr) // PAGE_SIZE
            cnt = (seg_end - pos) // PAGE_SIZE
            if vma.shared_file:
                self._back_by_file(vma, pos, seg_end, i0, cnt)
            else:
                self._set_backing(i0, cnt, lib.ICUSE_BACKING_PROC, self.mem_fd, pos)
            pos = seg_end
            if pos >= end:
                return
        raise Errno(errno.EFAULT, f"no mapping at {pos:#x} in process {self.source_tgid}")

    def _mm_alive(self, addr: int) -> bool:
        try:
            return os.pread(self.mem_fd, 1, addr) != b""
        except OSError:
            return False

    def _back_by_file(self, vma: Vma, pos: int, end: int, first: int, n: int) -> None:
        name = f"map_files/{vma.start:x}-{vma.end:x}"
        mode = os.O_RDWR if "w" in vma.perms else os.O_RDONLY
        try:
            fd = os.open(name, mode | os.O_CLOEXEC, dir_fd=self.proc_dir)
        except OSError:
            # Not reachable as a file (e.g. a special mapping): use it in place.
            self._set_backing(first, n, lib.ICUSE_BACKING_PROC, self.mem_fd, pos)
            return
        try:
            if self.writable and _fs_type(fd)[0] not in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
                # A writable long-term pin of a shared mapping of a file that needs
                # dirty tracking (a disk file) is refused by the kernel's GUP.
                raise Errno(errno.EFAULT, f"{vma.path}: writable long-term pin of a shared file mapping")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if mode == os.O_RDWR else 0)
            addr = self._map_file(fd, vma.offset + (pos - vma.start), end - pos, prot)
        finally:
            os.close(fd)
        self._set_backing(first, n, lib.ICUSE_BACKING_MEM, -1, addr)


TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6


def _fs_type(fd: int) -> tuple[int, int]:
    """(f_type, f_bsize) of the file system holding fd (fstatfs); (-1, 0) if unknown.
    On hugetlbfs f_bsize is the huge page size."""
    buf = ctypes.create_string_buffer(120)  # struct statfs: f_type, f_bsize are its first two words
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        return -1, 0
    return int.from_bytes(buf.raw[:8], "little"), int.from_bytes(buf.raw[8:16], "little")


class FilePages(Pages):
    """Pages of a file (IOMMU_IOAS_MAP_FILE): a memfd or other shmem/hugetlbfs file."""

    def __init__(
        self,
        system: System,
        caller: Caller,
        account_mode: AccountMode,
        file_fd: int,
        start: int,
        length: int,
        writable: bool,
    ) -> None:
        self.file_fd = file_fd  # owned: a duplicate fetched from the caller
        self.start = start - start % PAGE_SIZE
        self.address = self.start
        self.start_byte = start - self.start
        npages = (self.start_byte + length + PAGE_SIZE - 1) // PAGE_SIZE
        super().__init__(system, npages, writable, caller, account_mode, self.start)
        self._resources.append(file_fd)

    def resolve(self, first: int, n: int) -> None:
        if fd_on_our_mount(self.file_fd):
            # Not shmem; and fstat() on a file of our own mount would wait for ourselves.
            raise Errno(errno.EINVAL, "not a memfd")
        st = os.fstat(self.file_fd)
        # The kernel pins file folios with memfd_pin_folios(): shmem or hugetlbfs only
        # (a memfd, a file of a tmpfs or hugetlbfs mount), never a disk file.
        if not stat.S_ISREG(st.st_mode) or _fs_type(self.file_fd)[0] not in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
            raise Errno(errno.EINVAL, "not a memfd (shmem or hugetlbfs file)")
        offset = self.start + first * PAGE_SIZE
        length = n * PAGE_SIZE
        if offset + length > st.st_size:
            raise Errno(errno.EINVAL, "range beyond the end of the file")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        self._set_backing(first, n, lib.ICUSE_BACKING_MEM, -1, self._map_file(self.file_fd, offset, length, prot))


async def dmabuf_get(fd: int) -> Any:
    """dma_buf_get: the dma-buf behind fd (the daemon's own duplicate) if it is a file of
    a dma-buf exporter of this daemon, else None. An exporter's file has a `dmabuf`
    attribute: here only the selftest's (IOMMU_TEST_OP_DMABUF_GET), as the kernel asks
    iommufd_test_dma_buf_iommufd_map first."""
    if not fd_on_our_mount(fd):
        return None
    return getattr(await identify(fd), "dmabuf", None)


class DmabufPages(FilePages):
    """Pages of a dma-buf (IOMMU_IOAS_MAP_FILE of one; IOPT_ADDRESS_DMABUF): the
    exporter's memory, attached for the pages' lifetime, never accounted. When the
    exporter revokes it (revoke_notify) every domain loses the areas' translations
    and the pages stay revoked: nothing loads them again, and accesses are refused
    (EINVAL) as for any dma-buf. The exporter (dmabuf) gives the memory as a memfd
    of its own (memfd()) and is told when the pages go (detach(pages))."""

    is_dmabuf = True

    def __init__(self, system: System, caller: Caller, dmabuf: Any, start: int, length: int, writable: bool) -> None:
        # iopt_alloc_dmabuf_pages: the range must lie inside the dma-buf
        if dmabuf.length <= start + length - 1:
            raise Errno(errno.EINVAL)
        if dmabuf.revoked:
            raise Errno(errno.ENODEV, "the dma-buf is revoked")
        super().__init__(system, caller, AccountMode.USER, os.dup(dmabuf.memfd()), start, length, writable)
        self.account = None  # dma-bufs use no pinned-page accounting
        self.dmabuf = dmabuf
        dmabuf.attach(self)

    async def revoke_notify(self) -> None:
        """iopt_revoke_notify: revoked (nothing loads the pages again), then every area
        unmapped from every domain, under each io_pagetable's lock so that no load is
        half done."""
        if self.revoked:
            return
        self.revoked = True
        for iopt in {id(t): t for t in self.areas.values()}.values():
            async with iopt.lock:
                for area, owner in list(self.areas.items()):
                    if owner is iopt:
                        iopt.unfill_area(area)

    def _free(self) -> None:
        super()._free()
        self.dmabuf.detach(self)
