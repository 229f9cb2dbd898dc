"""The VFIO type1 container API on /dev/vfio/vfio and /dev/iommu, from a C program."""

from __future__ import annotations

import errno
import os

import pytest
from clientkit import parse_steps
from harness import run

OK = 0


def outcome(steps, name):  # noqa: ANN001, ANN201
    return steps[name].rc, steps[name].errno


@pytest.mark.parametrize("node", ["vfio/vfio", "iommu"])
@pytest.mark.parametrize("iommu_type", [1, 3])
async def test_type1_program(daemon, cbuild, node, iommu_type):
    exe = cbuild("vfio_compat")
    p = await run([exe, os.path.join(daemon.dev_dir, node), str(iommu_type)])
    s = parse_steps(p.stdout)
    assert outcome(s, "api_version") == (0, OK)
    assert outcome(s, "ext_type1") == (1, OK)
    assert outcome(s, "ext_type1v2") == (1, OK)
    assert outcome(s, "ext_unmap_all") == (1, OK)
    assert outcome(s, "ext_update_vaddr") == (0, OK)  # refused: cannot be made safe
    assert outcome(s, "ext_spapr") == (0, OK)
    # Without a compat IOAS the container has "no group": ENODEV.
    assert outcome(s, "ext_cc_no_ioas") == (-1, errno.ENODEV)
    assert outcome(s, "set_iommu_no_ioas") == (-1, errno.ENODEV)
    assert outcome(s, "map_before_ioas") == (-1, errno.ENODEV)
    assert outcome(s, "vfio_ioas_set") == (0, OK)
    assert s["vfio_ioas_get"]["id"] == s["ioas_alloc"]["id"]
    assert outcome(s, "ext_cc") == (1, OK)
    assert outcome(s, "set_iommu_bad") == (-1, errno.EINVAL)
    assert outcome(s, "set_iommu") == (0, OK)
    # GET_INFO: the bare struct learns the size of the chain
    assert outcome(s, "get_info_small") == (0, OK)
    small = s["get_info_small"]
    assert int(small["flags"], 16) == 0x3 and int(small["cap_offset"]) == 0
    assert int(small["argsz"]) == 24 + 12 + 16 + 16  # info + DMA_AVAIL + one IOVA range
    # no domain yet: every size from PAGE_SIZE up, as mainline computes it
    assert int(small["pgsizes"], 16) == ((1 << 64) - 1) & ~0xFFF
    assert int(s["get_info"]["cap_offset"]) == 24
    assert s["cap_dma_avail"]["avail"] == str(0xFFFFFFFF) and s["cap_dma_avail"]["at"] == "24"
    assert s["cap_iova"]["at"] == "36" and s["cap_iova"]["nr"] == "1"
    assert (int(s["cap_iova_0"]["start"], 16), int(s["cap_iova_0"]["end"], 16)) == (0, (1 << 64) - 1)
    # map, overlap, bad flags and argsz
    assert outcome(s, "map") == (0, OK)
    assert outcome(s, "map_overlap") == (-1, errno.EEXIST)
    assert outcome(s, "map2") == (0, OK)
    assert outcome(s, "map_flag_vaddr") == (-1, errno.EINVAL)
    assert outcome(s, "map_argsz") == (-1, errno.EINVAL)
    assert outcome(s, "copy_from_compat") == (0, OK)  # the mappings are in the IOAS
    # v1 may unmap inside a mapping; v2 may not
    if iommu_type == 1:
        assert outcome(s, "unmap_partial") == (0, OK) and int(s["unmap_partial"]["size"], 16) == 0x1000
    else:
        assert outcome(s, "unmap_partial") == (-1, errno.ENOENT)
        assert int(s["unmap_partial"]["size"], 16) == 0
    assert outcome(s, "unmap_dirty_flag") == (-1, errno.EINVAL)
    assert outcome(s, "unmap") == (0, OK) and int(s["unmap"]["size"], 16) == 1 << 20
    assert outcome(s, "unmap_empty") == (0, OK) and int(s["unmap_empty"]["size"], 16) == 0
    assert outcome(s, "ioas_unmap_empty") == (-1, errno.ENOENT)
    assert outcome(s, "unmap_all_with_iova") == (-1, errno.EINVAL)
    assert outcome(s, "unmap_all") == (0, OK)
    left = (1 << 20) - 0x1000 if iommu_type == 1 else 1 << 20
    assert int(s["unmap_all"]["size"], 16) == left
    assert outcome(s, "dirty_pages") == (-1, errno.ENOTTY)
    assert outcome(s, "vfio_ioas_clear") == (0, OK)
    assert outcome(s, "vfio_ioas_get_cleared") == (-1, errno.ENODEV)
    assert outcome(s, "vfio_ioas_bad_op") == (-1, errno.EOPNOTSUPP)
    assert outcome(s, "vfio_ioas_set_unknown") == (-1, errno.ENOENT)


async def test_cdev_device_on_the_compat_ioas(daemon):
    """A device bound through its cdev attaches to the compat IOAS; type1 maps reach it."""
    import ctypes
    import mmap

    from iommufd_cuse import uapi
    from iommufd_cuse.client import AsyncIommufd, AsyncVfioDevice

    fd = await AsyncIommufd.open(os.path.join(daemon.dev_dir, "vfio/vfio"))
    dev = await AsyncVfioDevice.open(os.path.join(daemon.dev_dir, "vfio/devices/vfio0"))
    try:
        ioas = await fd.ioas_alloc()
        r = await fd.raw(uapi.IOMMU_VFIO_IOAS, uapi.iommu_vfio_ioas, ioas_id=ioas, op=uapi.IOMMU_VFIO_IOAS_SET)
        assert r.rc == 0
        await dev.bind(fd.fd)
        assert await dev.attach(ioas) > 0
        buf = mmap.mmap(-1, 1 << 21)
        buf[:4] = b"\x01\x02\x03\x04"
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        rw = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
        m = uapi.vfio_iommu_type1_dma_map
        r = await fd.raw(uapi.VFIO_IOMMU_MAP_DMA, m, flags=rw, vaddr=addr, iova=0x200800, size=0x1000)
        assert r.errno == errno.EINVAL  # unaligned to the attached IOMMU's page size
        r = await fd.raw(uapi.VFIO_IOMMU_MAP_DMA, m, flags=rw, vaddr=addr, iova=0xFEE00000, size=0x1000)
        assert r.errno == errno.EINVAL  # inside the device's MSI window
        r = await fd.raw(uapi.VFIO_IOMMU_MAP_DMA, m, flags=rw, vaddr=addr, iova=0x200000, size=1 << 21)
        assert r.rc == 0, r
        info = await fd.raw(uapi.VFIO_IOMMU_GET_INFO, uapi.vfio_iommu_type1_info)
        assert info.out.iova_pgsizes == 0x40201000
        # the edu device reads the mapping through its domain
        await dev.pwrite(7, 4, 2, (await dev.pread(7, 4, 2)) | 4)  # bus master
        for reg, val in ((0x80, 0x200000), (0x88, 0x40000), (0x90, 4), (0x98, 1)):
            await dev.pwrite(0, reg, 8, val)
        assert await dev.pread(0, 0x40000, 4) == 0x04030201
    finally:
        await dev.close()
        await fd.close()
