"""Dirty tracking end to end: emulated-device DMA writes through a tracked domain."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest
import trio
from clientkit import config_daemon

from iommufd_cuse import config, uapi
from iommufd_cuse.client import AsyncIommufd, AsyncVfioDevice

DIRTY_TOML = config.DEFAULT_TOML.replace("dirty_tracking = false", "dirty_tracking = true")


@pytest.fixture
async def dirty_daemon():
    async with config_daemon(DIRTY_TOML) as d:
        yield d


async def _setup(d, flags):  # noqa: ANN001, ANN202
    fd = await AsyncIommufd.open(os.path.join(d.dev_dir, "iommu"))
    dev = await AsyncVfioDevice.open(os.path.join(d.dev_dir, "vfio/devices/vfio0"))
    devid = await dev.bind(fd.fd)
    ioas = await fd.ioas_alloc()
    r = await fd.raw(uapi.IOMMU_HWPT_ALLOC, uapi.iommu_hwpt_alloc, flags=flags, dev_id=devid, pt_id=ioas)
    assert r.rc == 0, r
    hwpt = r.out.out_hwpt_id
    assert await dev.attach(hwpt) == hwpt
    buf = mmap.mmap(-1, 1 << 20)
    await fd.map(ioas, buf, iova=0x100000)
    await dev.pwrite(7, 4, 2, (await dev.pread(7, 4, 2)) | 4)  # bus master
    return fd, dev, ioas, hwpt, buf


async def _edu_write(dev, iova: int) -> None:  # noqa: ANN001
    """edu copies its buffer to RAM at iova: a device write through the IOMMU."""
    for reg, val in ((0x80, 0x40000), (0x88, iova), (0x90, 64), (0x98, 3)):
        await dev.pwrite(0, reg, 8, val)


async def _bitmap(fd, hwpt: int, iova: int, length: int, flags: int = 0, page: int = 4096):  # noqa: ANN001, ANN202
    nbits = length // (page or 4096)
    arr = (ctypes.c_uint64 * ((nbits + 63) // 64))()
    r = await fd.raw(
        uapi.IOMMU_HWPT_GET_DIRTY_BITMAP,
        uapi.iommu_hwpt_get_dirty_bitmap,
        hwpt_id=hwpt,
        flags=flags,
        iova=iova,
        length=length,
        page_size=page,
        data=ctypes.addressof(arr),
    )
    bits = {i for i in range(nbits) if arr[i // 64] >> (i % 64) & 1}
    return r, bits


async def test_dirty_bitmap_end_to_end(dirty_daemon):
    fd, dev, ioas, hwpt, buf = await _setup(dirty_daemon, uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    try:
        st = uapi.iommu_hwpt_set_dirty_tracking
        # tracking off: a device write leaves no trace, and a bitmap is refused
        await _edu_write(dev, 0x105000)
        r, _ = await _bitmap(fd, hwpt, 0x100000, 1 << 20)
        assert r.errno == errno.EINVAL
        assert (await fd.raw(uapi.IOMMU_HWPT_SET_DIRTY_TRACKING, st, hwpt_id=hwpt, flags=1)).rc == 0
        r, bits = await _bitmap(fd, hwpt, 0x100000, 1 << 20)
        assert r.rc == 0 and bits == set()  # what happened before enabling is gone
        await _edu_write(dev, 0x103000)
        await _edu_write(dev, 0x1FF000)
        r, bits = await _bitmap(fd, hwpt, 0x100000, 1 << 20, flags=uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR)
        assert bits == {3, 0xFF}
        r, bits = await _bitmap(fd, hwpt, 0x100000, 1 << 20)
        assert bits == {3, 0xFF}  # NO_CLEAR kept them
        r, bits = await _bitmap(fd, hwpt, 0x100000, 1 << 20)
        assert bits == set()  # cleared by the previous read
        # a larger page size groups pages; the range is checked against it
        await _edu_write(dev, 0x103000)
        r, bits = await _bitmap(fd, hwpt, 0x100000, 1 << 20, page=1 << 16)
        assert bits == {0}
        r, _ = await _bitmap(fd, hwpt, 0x100800, 1 << 20)
        assert r.errno == errno.EINVAL
        r, _ = await _bitmap(fd, hwpt, 0x100000, 1 << 20, page=0)
        assert r.errno == errno.EINVAL
        r, _ = await _bitmap(fd, hwpt, 0x100000, 1 << 20, flags=2)
        assert r.errno == errno.EOPNOTSUPP
        r, _ = await _bitmap(fd, hwpt + 50, 0x100000, 1 << 20)
        assert r.errno == errno.ENOENT
        # off again: writes are not recorded
        assert (await fd.raw(uapi.IOMMU_HWPT_SET_DIRTY_TRACKING, st, hwpt_id=hwpt, flags=0)).rc == 0
        await _edu_write(dev, 0x104000)
        assert (await fd.raw(uapi.IOMMU_HWPT_SET_DIRTY_TRACKING, st, hwpt_id=hwpt, flags=1)).rc == 0
        r, bits = await _bitmap(fd, hwpt, 0x100000, 1 << 20)
        assert bits == set()
        assert (await fd.raw(uapi.IOMMU_HWPT_SET_DIRTY_TRACKING, st, hwpt_id=hwpt, flags=2)).errno == errno.EOPNOTSUPP
    finally:
        await dev.close()
        await fd.close()


async def test_dirty_needs_the_alloc_flag(dirty_daemon):
    fd, dev, ioas, hwpt, buf = await _setup(dirty_daemon, 0)
    try:
        st = uapi.iommu_hwpt_set_dirty_tracking
        r = await fd.raw(uapi.IOMMU_HWPT_SET_DIRTY_TRACKING, st, hwpt_id=hwpt, flags=1)
        assert r.errno == errno.EOPNOTSUPP
        r, _ = await _bitmap(fd, hwpt, 0x100000, 1 << 20)
        assert r.errno == errno.EOPNOTSUPP
    finally:
        await dev.close()
        await fd.close()
    await trio.sleep(0)
