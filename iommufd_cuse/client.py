"""A small Python client of the iommufd and VFIO device cdev uAPI.

It talks to whatever serves the nodes it opens: this project's daemon or the kernel
(the structs, ioctl numbers and errnos are the same, from :mod:`iommufd_cuse.uapi`).
Every failed ioctl raises :class:`OSError` with the errno the server answered, and the
ioctl's name as ``filename``; :meth:`raw` issues one without raising, for tests of
the error paths::

    from iommufd_cuse.client import Iommufd, VfioDevice

    with Iommufd.open("/dev/iommu") as ctx, VfioDevice.open("/dev/vfio/devices/vfio0") as dev:
        dev.bind(ctx)
        ioas = ctx.ioas()
        iova = ioas.map(buf, iova=0x100000)     # any writable buffer: mmap, bytearray, ctypes
        dev.attach(ioas)

The calls block. A test whose daemon runs in its own process's trio loop (this
project's suite) uses :class:`AsyncIommufd` / :class:`AsyncVfioDevice`, which run each
call in a worker thread (a blocking call on our node from the loop's own thread
would wait for itself).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

import trio

from . import uapi

__all__ = [
    "RW",
    "AsyncIommufd",
    "AsyncVfioDevice",
    "EventFd",
    "Ioas",
    "Iommufd",
    "Result",
    "VfioDevice",
    "address_of",
    "raw_ioctl",
]

RW = uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE
FIXED = uapi.IOMMU_IOAS_MAP_FIXED_IOVA
#: vfio-pci lays region N out at N << 40 of the device file (VFIO_PCI_OFFSET_SHIFT)
VFIO_PCI_OFFSET_SHIFT = 40
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
U64_MAX = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioctl_names() -> dict[int, list[str]]:
    """ioctl number -> its C names (both families share type ';', and a few numbers)."""
    names: dict[int, list[str]] = {}
    for name, value in vars(uapi).items():
        if (
            isinstance(value, int)
            and name.isupper()
            and (value >> 8) == uapi.IOMMUFD_TYPE
            and not name.startswith(("IOMMUFD_CMD_", "VFIO_BASE"))
        ):
            names.setdefault(value, []).append(name)
    return names


_NAMES = _ioctl_names()


def ioctl_name(cmd: int, prefer: str = "") -> str:
    """The C name of ioctl cmd (one starting with prefer where several share it)."""
    names = _NAMES.get(cmd, [])
    for n in names:
        if n.startswith(prefer):
            return n
    return names[0] if names else f"ioctl {cmd:#x}"


@dataclass
class Result:
    """One ioctl as issued by raw(): its return value, errno (0 on success) and the
    struct as the server copied it back."""

    rc: int
    errno: int
    out: Any


def address_of(buf: Any) -> int:
    """Address of a writable buffer (mmap, bytearray, ctypes object); an int is an address."""
    if isinstance(buf, int):
        return buf
    if isinstance(buf, ctypes.Array | ctypes.Structure):
        return ctypes.addressof(buf)
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def raw_ioctl(fd: int, cmd: int, arg: Any) -> tuple[int, int]:
    """One ioctl with an argument as given (a buffer, an address, or None): (rc, errno)."""
    rc = _libc.ioctl(fd, cmd, None if arg is None else address_of(arg))
    return rc, (ctypes.get_errno() if rc < 0 else 0)


def _u64_array(values: Sequence[int]) -> ctypes.Array:
    return (ctypes.c_uint64 * max(1, len(values)))(*values)


class _File:
    """One open of a node: ioctls with a uAPI struct."""

    _prefer = ""  # ioctl name prefix, for messages

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: str | os.PathLike) -> Self:
        return cls(os.open(os.fspath(path), os.O_RDWR | os.O_CLOEXEC))

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _issue(
        self, cmd: int, struct_: uapi.CStruct, fields: dict[str, Any], word: str | None, size: int | None, extra: bytes
    ) -> Result:
        obj = struct_.new(**fields)
        if word is not None:
            setattr(obj, word, struct_.SIZE + len(extra) if size is None else size)
        data = struct_.pack(obj) + extra
        buf = ctypes.create_string_buffer(data, len(data))
        rc, err = raw_ioctl(self.fd, cmd, buf)
        return Result(rc, err, struct_.unpack(buf.raw[: struct_.SIZE]))

    def raw(
        self, cmd: int, struct_: uapi.CStruct, size: int | None = None, extra: bytes = b"", **fields: Any
    ) -> Result:
        """Issue cmd with struct_ filled from fields, extra bytes appended, and its size
        word set to size (default sizeof + len(extra)); never raises for the ioctl.
        A VFIO struct (type1 compatibility on an iommufd) leads with argsz instead:
        argsz= sets it, and size is one of its fields."""
        word = "size"
        if "argsz" in struct_.FIELDS:
            if size is not None:
                fields["size"] = size
            size = fields.pop("argsz", None)
            word = "argsz"
        if struct_.FIELDS.get(word, (None,))[0] != 0:
            word = None
        return self._issue(cmd, struct_, fields, word, size, extra)

    def call(self, cmd: int, struct_: uapi.CStruct, **fields: Any) -> Any:
        """Issue cmd as raw() does; the struct as copied back, or OSError(errno, ..., ioctl name)."""
        r = self.raw(cmd, struct_, **fields)
        if r.rc < 0:
            raise OSError(r.errno, os.strerror(r.errno), ioctl_name(cmd, self._prefer))
        return r.out


class Iommufd(_File):
    """One open of /dev/iommu: an iommufd context. Object ids are plain ints; an
    :class:`Ioas` can stand wherever an id is asked for."""

    _prefer = "IOMMU_"

    def ioas_alloc(self) -> int:
        return self.call(uapi.IOMMU_IOAS_ALLOC, uapi.iommu_ioas_alloc).out_ioas_id

    def ioas(self) -> Ioas:
        """A new IOAS, as an object."""
        return Ioas(self, self.ioas_alloc())

    def destroy(self, obj_id: int) -> None:
        self.call(uapi.IOMMU_DESTROY, uapi.iommu_destroy, id=obj_id)

    def map(
        self, ioas: int, buf: Any, length: int | None = None, iova: int | None = None, flags: int = RW, offset: int = 0
    ) -> int:
        """IOAS_MAP of a buffer (or an address, with length); at iova if given
        (FIXED_IOVA), else where the IOAS chooses. Returns the iova."""
        if length is None:
            length = len(buf) - offset
        if iova is not None:
            flags |= FIXED
        out = self.call(
            uapi.IOMMU_IOAS_MAP,
            uapi.iommu_ioas_map,
            flags=flags,
            ioas_id=ioas,
            user_va=address_of(buf) + offset,
            length=length,
            iova=iova or 0,
        )
        return out.iova

    def map_file(self, ioas: int, fd: int, start: int, length: int, iova: int | None = None, flags: int = RW) -> int:
        """IOAS_MAP_FILE of [start, start + length) of a memfd; returns the iova."""
        if iova is not None:
            flags |= FIXED
        out = self.call(
            uapi.IOMMU_IOAS_MAP_FILE,
            uapi.iommu_ioas_map_file,
            flags=flags,
            ioas_id=ioas,
            fd=fd,
            start=start,
            length=length,
            iova=iova or 0,
        )
        return out.iova

    def unmap(self, ioas: int, iova: int = 0, length: int = U64_MAX) -> int:
        """IOAS_UNMAP; returns the length unmapped (the default: everything)."""
        return self.call(uapi.IOMMU_IOAS_UNMAP, uapi.iommu_ioas_unmap, ioas_id=ioas, iova=iova, length=length).length

    def copy(self, dst: int, src: int, src_iova: int, length: int, dst_iova: int | None = None, flags: int = RW) -> int:
        """IOAS_COPY of a mapped range of src into dst; returns the iova in dst."""
        if dst_iova is not None:
            flags |= FIXED
        out = self.call(
            uapi.IOMMU_IOAS_COPY,
            uapi.iommu_ioas_copy,
            flags=flags,
            dst_ioas_id=dst,
            src_ioas_id=src,
            length=length,
            dst_iova=dst_iova or 0,
            src_iova=src_iova,
        )
        return out.dst_iova

    def iova_ranges(self, ioas: int) -> tuple[list[tuple[int, int]], int]:
        """The usable IOVA ranges as (start, last) pairs, and the IOVA alignment."""
        while True:
            r = self.raw(uapi.IOMMU_IOAS_IOVA_RANGES, uapi.iommu_ioas_iova_ranges, ioas_id=ioas, num_iovas=0)
            if r.rc == 0:
                return [], r.out.out_iova_alignment
            if r.errno != errno.EMSGSIZE:
                raise OSError(r.errno, os.strerror(r.errno), "IOMMU_IOAS_IOVA_RANGES")
            n = r.out.num_iovas
            arr = _u64_array([0] * (2 * n))
            r = self.raw(
                uapi.IOMMU_IOAS_IOVA_RANGES,
                uapi.iommu_ioas_iova_ranges,
                ioas_id=ioas,
                num_iovas=n,
                allowed_iovas=ctypes.addressof(arr),
            )
            if r.rc == 0:
                return [(arr[2 * i], arr[2 * i + 1]) for i in range(r.out.num_iovas)], r.out.out_iova_alignment
            if r.errno != errno.EMSGSIZE:  # EMSGSIZE: the ranges changed between the two calls
                raise OSError(r.errno, os.strerror(r.errno), "IOMMU_IOAS_IOVA_RANGES")

    def allow_iovas(self, ioas: int, ranges: Iterable[tuple[int, int]]) -> None:
        """IOAS_ALLOW_IOVAS: only these (start, last) ranges may be allocated from."""
        flat = [x for r in ranges for x in r]
        arr = _u64_array(flat)
        self.call(
            uapi.IOMMU_IOAS_ALLOW_IOVAS,
            uapi.iommu_ioas_allow_iovas,
            ioas_id=ioas,
            num_iovas=len(flat) // 2,
            allowed_iovas=ctypes.addressof(arr),
        )

    def option(self, option_id: int, op: int, object_id: int = 0, val64: int = 0) -> int:
        """IOMMU_OPTION; returns val64 as copied back (the value, for OP_GET)."""
        return self.call(
            uapi.IOMMU_OPTION, uapi.iommu_option, option_id=option_id, op=op, object_id=object_id, val64=val64
        ).val64

    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0) -> int:
        """A paging HWPT for the device over an IOAS; returns its id."""
        out = self.call(uapi.IOMMU_HWPT_ALLOC, uapi.iommu_hwpt_alloc, flags=flags, dev_id=dev_id, pt_id=pt_id)
        return out.out_hwpt_id


class Ioas:
    """An IOAS of a context: its id (usable as an int) and its operations."""

    def __init__(self, ctx: Iommufd, ioas_id: int) -> None:
        self.ctx = ctx
        self.id = ioas_id

    def __index__(self) -> int:
        return self.id

    __int__ = __index__

    def __repr__(self) -> str:
        return f"Ioas({self.id})"

    def map(
        self, buf: Any, length: int | None = None, iova: int | None = None, flags: int = RW, offset: int = 0
    ) -> int:
        return self.ctx.map(self.id, buf, length, iova, flags, offset)

    def map_file(self, fd: int, start: int, length: int, iova: int | None = None, flags: int = RW) -> int:
        return self.ctx.map_file(self.id, fd, start, length, iova, flags)

    def unmap(self, iova: int = 0, length: int = U64_MAX) -> int:
        return self.ctx.unmap(self.id, iova, length)

    def copy_from(self, src: int, src_iova: int, length: int, dst_iova: int | None = None, flags: int = RW) -> int:
        """IOAS_COPY of src's [src_iova, +length) into this IOAS; returns the iova here."""
        return self.ctx.copy(self.id, src, src_iova, length, dst_iova, flags)

    def iova_ranges(self) -> tuple[list[tuple[int, int]], int]:
        return self.ctx.iova_ranges(self.id)

    def allow_iovas(self, ranges: Iterable[tuple[int, int]]) -> None:
        self.ctx.allow_iovas(self.id, ranges)

    def destroy(self) -> None:
        self.ctx.destroy(self.id)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class VfioDevice(_File):
    """One open of a VFIO device cdev (/dev/vfio/devices/vfioN)."""

    _prefer = "VFIO_DEVICE_"

    def raw(  # type: ignore[override]
        self, cmd: int, struct_: uapi.CStruct, argsz: int | None = None, extra: bytes = b"", **fields: Any
    ) -> Result:
        """Issue cmd with struct_ filled from fields (size, where a struct has one, is an
        ordinary field); argsz defaults to sizeof + len(extra). Never raises for the ioctl."""
        return self._issue(cmd, struct_, fields, "argsz", argsz, extra)

    def bind(self, iommufd: Iommufd | int, flags: int = 0) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD; returns the device's id in that context."""
        fd = iommufd.fd if isinstance(iommufd, Iommufd) else iommufd
        out = self.call(uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.vfio_device_bind_iommufd, iommufd=fd, flags=flags)
        return out.out_devid

    def attach(self, pt_id: int) -> int:
        """Attach to an IOAS (an automatic HWPT) or a HWPT; returns the HWPT id."""
        return self.call(uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, uapi.vfio_device_attach_iommufd_pt, pt_id=pt_id).pt_id

    def detach(self) -> None:
        self.call(uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, uapi.vfio_device_detach_iommufd_pt)

    def info(self) -> Any:
        return self.call(uapi.VFIO_DEVICE_GET_INFO, uapi.vfio_device_info)

    def region(self, index: int) -> Any:
        return self.call(uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.vfio_region_info, index=index)

    def irq_info(self, index: int) -> Any:
        return self.call(uapi.VFIO_DEVICE_GET_IRQ_INFO, uapi.vfio_irq_info, index=index)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET (no argument)."""
        rc, err = raw_ioctl(self.fd, uapi.VFIO_DEVICE_RESET, None)
        if rc < 0:
            raise OSError(err, os.strerror(err), "VFIO_DEVICE_RESET")

    # -- regions: BARs and config space by pread/pwrite ----------------------------
    def read(self, index: int, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, (index << VFIO_PCI_OFFSET_SHIFT) + offset)

    def write(self, index: int, offset: int, data: bytes) -> None:
        n = os.pwrite(self.fd, data, (index << VFIO_PCI_OFFSET_SHIFT) + offset)
        if n != len(data):
            raise OSError(errno.EIO, f"short write: {n} of {len(data)} bytes")

    def pread(self, index: int, offset: int, size: int) -> int:
        """A little-endian register of size bytes."""
        return int.from_bytes(self.read(index, offset, size), "little")

    def pwrite(self, index: int, offset: int, size: int, value: int) -> None:
        self.write(index, offset, value.to_bytes(size, "little"))

    def config_read(self, offset: int, size: int) -> int:
        return self.pread(uapi.VFIO_PCI_CONFIG_REGION_INDEX, offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.pwrite(uapi.VFIO_PCI_CONFIG_REGION_INDEX, offset, size, value)

    def bus_master(self, on: bool = True) -> None:
        """Set or clear bus mastering (and memory decoding with it) in PCI_COMMAND."""
        bits = PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY
        cmd = self.config_read(PCI_COMMAND, 2)
        self.config_write(PCI_COMMAND, 2, cmd | bits if on else cmd & ~PCI_COMMAND_MASTER)

    # -- interrupts ----------------------------------------------------------------
    def set_irqs(
        self, index: int, flags: int, start: int = 0, fds: Sequence[int] | None = None, count: int | None = None
    ) -> None:
        """VFIO_DEVICE_SET_IRQS with eventfds (or no data) for count vectors from start."""
        extra = b"".join(struct.pack("<i", int(f)) for f in fds or [])
        n = len(fds or []) if count is None else count
        self.call(
            uapi.VFIO_DEVICE_SET_IRQS, uapi.vfio_irq_set, extra=extra, flags=flags, index=index, start=start, count=n
        )

    def enable_irqs(self, index: int, eventfds: Sequence[int], start: int = 0) -> None:
        """Signal vectors start.. of irq index (INTx, MSI, MSI-X) on these eventfds."""
        flags = uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
        self.set_irqs(index, flags, start, [int(e) for e in eventfds])

    def disable_irqs(self, index: int) -> None:
        self.set_irqs(index, uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, count=0)


class EventFd:
    """An eventfd for device interrupts: pass it (or its fd) to enable_irqs."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def __index__(self) -> int:
        return self.fd

    __int__ = fileno = __index__

    def read(self) -> int:
        """The count signalled since the last read (0 if none), reset to 0."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None = None) -> int:
        """Wait until signalled (at most timeout seconds); the count, 0 if none came."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return self.read() if ready else 0

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the same from trio, each call in a worker thread -------------------------------

F = TypeVar("F", bound=_File)


class _Threaded(Generic[F]):
    """A file's methods as trio coroutines run in worker threads (for a daemon served
    by the same process's trio loop); .sync is the blocking object."""

    _cls: type[_File] = _File

    def __init__(self, sync: F) -> None:
        self.sync = sync

    @property
    def fd(self) -> int:
        return self.sync.fd

    @classmethod
    async def open(cls, path: str | os.PathLike) -> Self:
        return cls(await trio.to_thread.run_sync(cls._cls.open, path))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.sync, name)

        async def call(*args: Any, **kw: Any) -> Any:
            return await trio.to_thread.run_sync(lambda: method(*args, **kw))

        return call


class AsyncIommufd(_Threaded[Iommufd]):
    _cls = Iommufd


class AsyncVfioDevice(_Threaded[VfioDevice]):
    _cls = VfioDevice
