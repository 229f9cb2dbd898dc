"""iommufd_cuse.client against a real daemon: the plugin's fixtures (a daemon
subprocess, so the blocking calls need no worker thread), the way a user drives it."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from iommufd_cuse import uapi
from iommufd_cuse.client import U64_MAX, EventFd, address_of

EDU, ENGINE = "0000:00:04.0", "0000:00:05.0"
ENGINE_RING_SIZE = 0x28
BAR0, MSI = 0, uapi.VFIO_PCI_MSI_IRQ_INDEX
EDU_LIVENESS, EDU_IRQ_STATUS, EDU_IRQ_RAISE, EDU_IRQ_ACK = 0x04, 0x24, 0x60, 0x64
MIB = 1 << 20


def anon(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size)
    m[:] = bytes(size)
    return m


def test_a_failed_ioctl_is_oserror_with_the_errno_and_the_ioctl(iommufd) -> None:
    with pytest.raises(FileNotFoundError) as e:  # OSError's subclass for ENOENT
        iommufd.map(7, anon(4096))
    assert (e.value.errno, e.value.filename) == (errno.ENOENT, "IOMMU_IOAS_MAP")
    assert str(e.value) == "[Errno 2] No such file or directory: 'IOMMU_IOAS_MAP'"
    with pytest.raises(OSError) as e:
        iommufd.destroy(7)
    assert (e.value.errno, e.value.filename) == (errno.ENOENT, "IOMMU_DESTROY")
    # raw() reports instead of raising: a size below the struct's is EINVAL
    r = iommufd.raw(uapi.IOMMU_IOAS_ALLOC, uapi.iommu_ioas_alloc, size=4)
    assert (r.rc, r.errno) == (-1, errno.EINVAL)
    r = iommufd.raw(uapi.IOMMU_IOAS_ALLOC, uapi.iommu_ioas_alloc)
    assert (r.rc, r.errno, r.out.out_ioas_id) == (0, 0, 1)
    iommufd.destroy(1)


def test_ioas_map_unmap_copy_ranges(iommufd) -> None:
    with iommufd.ioas() as src, iommufd.ioas() as dst:
        assert (src.id, dst.id) == (1, 2)
        assert src.iova_ranges() == ([(0, U64_MAX)], 1)  # no device attached: all of it
        src.allow_iovas([(0x100000, 0x1FFFFF)])
        buf = anon(MIB)
        buf[:5] = b"hello"
        assert src.map(buf) == 0x100000  # allocated inside the allowed range
        with pytest.raises(OSError) as e:
            src.map(buf)
        assert e.value.errno == errno.ENOSPC  # which the first map filled
        assert src.map(buf, length=4096, iova=0x400000, flags=uapi.IOMMU_IOAS_MAP_READABLE) == 0x400000
        assert dst.copy_from(src, 0x100000, MIB, dst_iova=0x800000) == 0x800000
        # a read-only source area: the copy may not ask for write
        with pytest.raises(PermissionError):
            iommufd.copy(dst, src, 0x400000, 4096)
        assert (
            iommufd.copy(dst, src, 0x400000, 4096, flags=uapi.IOMMU_IOAS_MAP_READABLE) == 0x1000
        )  # dst chose its lowest free
        # a memfd, by file
        fd = os.memfd_create("test-client")
        try:
            os.ftruncate(fd, 2 * MIB)
            assert dst.map_file(fd, MIB, MIB, iova=0x10000000) == 0x10000000
        finally:
            os.close(fd)
        assert src.unmap(0x100000, MIB) == MIB
        assert src.unmap() == 4096  # everything left
        assert dst.unmap() == 2 * MIB + 4096
        src.allow_iovas([])
    # both destroyed by the with blocks
    with pytest.raises(OSError) as e:
        iommufd.destroy(1)
    assert e.value.errno == errno.ENOENT


def test_option(iommufd) -> None:
    get, set_ = uapi.IOMMU_OPTION_OP_GET, uapi.IOMMU_OPTION_OP_SET
    with iommufd.ioas() as ioas:
        assert iommufd.option(uapi.IOMMU_OPTION_HUGE_PAGES, get, object_id=ioas) == 1
        iommufd.option(uapi.IOMMU_OPTION_HUGE_PAGES, set_, object_id=ioas, val64=0)
        assert iommufd.option(uapi.IOMMU_OPTION_HUGE_PAGES, get, object_id=ioas) == 0
        assert ioas.iova_ranges()[1] == 4096  # no huge pages: page alignment


def test_vfio_device_info_regions_config(iommufd, vfio_device) -> None:
    dev = vfio_device(EDU)
    with pytest.raises(OSError) as e:
        dev.info()  # nothing before bind
    assert (e.value.errno, e.value.filename) == (errno.EINVAL, "VFIO_DEVICE_GET_INFO")
    assert dev.bind(iommufd) == 1
    info = dev.info()
    assert info.flags == uapi.VFIO_DEVICE_FLAGS_PCI  # QEMU's edu has no function reset
    assert (info.num_regions, info.num_irqs) == (uapi.VFIO_PCI_NUM_REGIONS, uapi.VFIO_PCI_NUM_IRQS)
    assert dev.region(BAR0).size == MIB  # edu's BAR0
    assert dev.irq_info(MSI).count == 1
    assert dev.config_read(0, 4) == 0x11E81234  # QEMU's vendor, edu's device id
    dev.bus_master(True)
    assert dev.config_read(0x04, 2) & 0x6 == 0x6
    dev.bus_master(False)
    assert dev.config_read(0x04, 2) & 0x6 == 0x2  # memory decoding stays on
    dev.pwrite(BAR0, EDU_LIVENESS, 4, 0x12345678)
    assert dev.pread(BAR0, EDU_LIVENESS, 4) == 0xEDCBA987  # edu answers the complement
    assert dev.read(BAR0, 0, 4) == (0x010000ED).to_bytes(4, "little")  # edu's identification
    with pytest.raises(OSError) as e:
        dev.reset()
    assert (e.value.errno, e.value.filename) == (errno.EINVAL, "VFIO_DEVICE_RESET")


def test_reset(iommufd, vfio_device) -> None:
    dev = vfio_device(ENGINE)
    dev.bind(iommufd)
    assert dev.info().flags & uapi.VFIO_DEVICE_FLAGS_RESET
    dev.pwrite(BAR0, ENGINE_RING_SIZE, 4, 16)
    assert dev.pread(BAR0, ENGINE_RING_SIZE, 4) == 16
    dev.reset()  # every register at its power-on value
    assert dev.pread(BAR0, ENGINE_RING_SIZE, 4) == 0


def test_msi_on_an_eventfd(iommufd, vfio_device) -> None:
    dev = vfio_device(EDU)
    dev.bind(iommufd)
    dev.bus_master(True)
    with EventFd() as irq:
        assert irq.read() == 0
        dev.enable_irqs(MSI, [irq])
        dev.pwrite(BAR0, EDU_IRQ_RAISE, 4, 0x1)
        assert irq.wait(timeout=10) == 1
        assert dev.pread(BAR0, EDU_IRQ_STATUS, 4) == 0x1
        dev.pwrite(BAR0, EDU_IRQ_ACK, 4, 0x1)
        dev.disable_irqs(MSI)
        dev.pwrite(BAR0, EDU_IRQ_RAISE, 4, 0x1)  # pending, but signalled nowhere
        assert irq.read() == 0
        dev.pwrite(BAR0, EDU_IRQ_ACK, 4, 0x1)
        with pytest.raises(OSError) as e:
            dev.enable_irqs(MSI, [irq, irq])  # one vector only
        assert (e.value.errno, e.value.filename) == (errno.EINVAL, "VFIO_DEVICE_SET_IRQS")


def test_address_of() -> None:
    m = anon(4096)
    b = bytearray(16)
    assert address_of(m) % 4096 == 0 and address_of(b) != 0 and address_of(1234) == 1234
