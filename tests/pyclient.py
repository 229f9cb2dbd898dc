"""A Python iommufd client for the tests: ioctls from worker threads of the test
process against the daemon that trio runs in its main thread (a blocking ioctl
on the FUSE node from the trio thread itself would deadlock)."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Any, Self

import trio

from iommufd_cuse import uapi

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

RW = uapi.IOMMU_IOAS_MAP_READABLE | uapi.IOMMU_IOAS_MAP_WRITEABLE
FIXED = uapi.IOMMU_IOAS_MAP_FIXED_IOVA


class IoctlError(OSError):
    pass


@dataclass
class Result:
    rc: int
    errno: int
    out: Any  # the struct as copied back


def _ioctl(fd: int, cmd: int, buf: ctypes.Array) -> tuple[int, int]:
    rc = libc.ioctl(fd, cmd, ctypes.addressof(buf))
    return rc, (ctypes.get_errno() if rc < 0 else 0)


def addr_of(buf: Any) -> int:
    """Address of a writable Python buffer (mmap, bytearray, ctypes array)."""
    if isinstance(buf, ctypes.Array):
        return ctypes.addressof(buf)
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class IoctlFd:
    """One open of a node of ours, called from a thread or a client process:
    ioctls with a struct (raw: the Result; call: the struct, IoctlError if it fails)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: str | os.PathLike) -> Self:
        return cls(os.open(str(path), os.O_RDWR))

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def raw(self, cmd: int, struct: uapi.CStruct, *args: Any, **fields: Any) -> Result:
        raise NotImplementedError

    def _raw(
        self, cmd: int, struct: uapi.CStruct, fields: dict[str, Any], word: str | None, size: int | None, extra: bytes
    ) -> Result:
        """Issue cmd with struct filled from fields, and its size word (the field `word`,
        None: none) set to size, by default sizeof + the extra bytes appended."""
        obj = struct.new(**fields)
        if word is not None:
            setattr(obj, word, struct.SIZE + len(extra) if size is None else size)
        data = struct.pack(obj) + extra
        buf = ctypes.create_string_buffer(data, len(data))
        rc, err = _ioctl(self.fd, cmd, buf)
        return Result(rc, err, struct.unpack(buf.raw[: struct.SIZE]))

    def call(self, cmd: int, struct: uapi.CStruct, **fields: Any) -> Any:
        r = self.raw(cmd, struct, **fields)
        if r.rc:
            raise IoctlError(r.errno, os.strerror(r.errno))
        return r.out


class IommufdSync(IoctlFd):
    """One open of an iommufd node."""

    def raw(self, cmd: int, struct: uapi.CStruct, size: int | None = None, extra: bytes = b"", **fields: Any) -> Result:
        """Issue cmd with struct filled from fields; size defaults to sizeof."""
        # The leading u32 carries the struct's size: iommufd's `size`, VFIO's `argsz`
        # (where `size` is an ordinary field, and argsz= overrides the default).
        if "argsz" in struct.FIELDS:
            if size is not None:
                fields["size"] = size
            size = fields.pop("argsz", None)
            word = "argsz"
        else:
            word = "size"
        if struct.FIELDS.get(word, (None,))[0] != 0:
            word = None
        return self._raw(cmd, struct, fields, word, size, extra)

    # -- conveniences ------------------------------------------------------------------
    def ioas_alloc(self) -> int:
        return (self.call(uapi.IOMMU_IOAS_ALLOC, uapi.iommu_ioas_alloc)).out_ioas_id

    def destroy(self, obj_id: int) -> None:
        self.call(uapi.IOMMU_DESTROY, uapi.iommu_destroy, id=obj_id)

    def map(
        self, ioas: int, buf: Any, length: int | None = None, iova: int | None = None, flags: int = RW, offset: int = 0
    ) -> int:
        """IOAS_MAP of a Python buffer (or an address as int); returns the iova."""
        va = buf if isinstance(buf, int) else addr_of(buf)
        if length is None:
            length = len(buf) - offset
        if iova is not None:
            flags |= FIXED
        out = self.call(
            uapi.IOMMU_IOAS_MAP,
            uapi.iommu_ioas_map,
            flags=flags,
            ioas_id=ioas,
            user_va=va + offset,
            length=length,
            iova=iova or 0,
        )
        return out.iova

    def map_file(self, ioas: int, fd: int, start: int, length: int, iova: int | None = None, flags: int = RW) -> int:
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

    def unmap(self, ioas: int, iova: int, length: int) -> int:
        out = self.call(uapi.IOMMU_IOAS_UNMAP, uapi.iommu_ioas_unmap, ioas_id=ioas, iova=iova, length=length)
        return out.length

    def copy(self, dst: int, src: int, src_iova: int, length: int, dst_iova: int | None = None, flags: int = RW) -> int:
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
        r = self.raw(uapi.IOMMU_IOAS_IOVA_RANGES, uapi.iommu_ioas_iova_ranges, ioas_id=ioas, num_iovas=0)
        if r.rc == 0:
            return [], r.out.out_iova_alignment
        assert r.errno == errno.EMSGSIZE, r
        n = r.out.num_iovas
        arr = (ctypes.c_uint64 * (2 * n))()
        out = self.call(
            uapi.IOMMU_IOAS_IOVA_RANGES,
            uapi.iommu_ioas_iova_ranges,
            ioas_id=ioas,
            num_iovas=n,
            allowed_iovas=ctypes.addressof(arr),
        )
        return [(arr[2 * i], arr[2 * i + 1]) for i in range(out.num_iovas)], out.out_iova_alignment

    def allow_iovas(self, ioas: int, ranges: list[tuple[int, int]]) -> Result:
        arr = (ctypes.c_uint64 * max(1, 2 * len(ranges)))(*[x for r in ranges for x in r])
        return self.raw(
            uapi.IOMMU_IOAS_ALLOW_IOVAS,
            uapi.iommu_ioas_allow_iovas,
            ioas_id=ioas,
            num_iovas=len(ranges),
            allowed_iovas=ctypes.addressof(arr),
        )

    def option(self, option_id: int, op: int, object_id: int = 0, val64: int = 0) -> Result:
        return self.raw(
            uapi.IOMMU_OPTION, uapi.iommu_option, option_id=option_id, op=op, object_id=object_id, val64=val64
        )


class Iommufd:
    """The same, for tests running under trio: every call runs in a worker thread."""

    def __init__(self, sync: IommufdSync) -> None:
        self.sync = sync

    @property
    def fd(self) -> int:
        return self.sync.fd

    @classmethod
    async def open(cls, path: str | os.PathLike) -> Iommufd:
        return cls(await trio.to_thread.run_sync(IommufdSync.open, path))

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.sync, name)

        async def call(*args: Any, **kw: Any) -> Any:
            return await trio.to_thread.run_sync(lambda: method(*args, **kw))

        return call


class VfioDeviceSync(IoctlFd):
    """One open of a VFIO device cdev."""

    def raw(
        self, cmd: int, struct: uapi.CStruct, argsz: int | None = None, extra: bytes = b"", **fields: Any
    ) -> Result:
        """Issue cmd with struct filled from fields (`size` among them, an ordinary
        field); argsz defaults to sizeof + extra."""
        return self._raw(cmd, struct, fields, "argsz", argsz, extra)

    def bind(self, iommufd: int) -> int:
        return self.call(uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.vfio_device_bind_iommufd, iommufd=iommufd).out_devid

    def attach(self, pt_id: int) -> int:
        return self.call(uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, uapi.vfio_device_attach_iommufd_pt, pt_id=pt_id).pt_id

    def detach(self) -> None:
        self.call(uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, uapi.vfio_device_detach_iommufd_pt)

    def region(self, index: int) -> Any:
        return self.call(uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.vfio_region_info, index=index)

    def pread(self, index: int, offset: int, size: int) -> int:
        return int.from_bytes(os.pread(self.fd, size, (index << 40) + offset), "little")

    def pwrite(self, index: int, offset: int, size: int, value: int) -> None:
        n = os.pwrite(self.fd, value.to_bytes(size, "little"), (index << 40) + offset)
        assert n == size

    def set_irqs(
        self, index: int, flags: int, start: int = 0, fds: list[int] | None = None, count: int | None = None
    ) -> Result:
        import struct as st

        extra = b"".join(st.pack("<i", f) for f in fds or [])
        n = len(fds or []) if count is None else count
        return self.raw(
            uapi.VFIO_DEVICE_SET_IRQS, uapi.vfio_irq_set, extra=extra, flags=flags, index=index, start=start, count=n
        )


class VfioDevice(Iommufd):
    """VfioDeviceSync for tests under trio (calls run in worker threads)."""

    @classmethod
    async def open(cls, path: str | os.PathLike) -> VfioDevice:  # type: ignore[override]
        return cls(await trio.to_thread.run_sync(VfioDeviceSync.open, path))
