"""DMA through a paging domain (iommu/domain.py): dma_rw and dma_copy reach the page
store's memory at the translated address, and a refused access is an IoFault that
names the first page refused, the direction and why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from memhelp import PAGE, Memory, R, W

from iommufd_cuse.iommu.domain import IoFault, PagingDomain, dma_copy


@pytest.fixture
def mem() -> Iterator[Memory]:
    m = Memory(4)
    yield m
    m.close()


def test_rw_reaches_the_translated_page(mem: Memory) -> None:
    dom = PagingDomain(PAGE)
    dom.map(0x10000, mem.pa + 2 * PAGE, PAGE, R | W)
    dom.dma_rw(mem.store, 0x10010, bytearray(b"through the iommu"), True)
    assert mem.mm[2 * PAGE + 0x10 : 2 * PAGE + 0x21] == b"through the iommu"
    buf = bytearray(17)
    dom.dma_rw(mem.store, 0x10010, buf, False)
    assert buf == b"through the iommu"


def test_faults_name_page_direction_and_reason(mem: Memory) -> None:
    dom = PagingDomain(PAGE)
    dom.map(0x10000, mem.pa, PAGE, R)
    with pytest.raises(IoFault) as e:
        dom.dma_rw(mem.store, 0x10000, bytearray(8), True)
    assert (e.value.iova, e.value.write, e.value.reason) == (0x10000, True, "no permission")
    with pytest.raises(IoFault) as e:  # the read runs off the end of the mapping
        dom.dma_rw(mem.store, 0x10800, bytearray(PAGE), False)
    assert (e.value.iova, e.value.write, e.value.reason) == (0x11000, False, "no translation")


def test_copy_between_two_domains(mem: Memory) -> None:
    src, dst = PagingDomain(PAGE), PagingDomain(PAGE)
    src.map(0x1000, mem.pa, PAGE, R)
    dst.map(0x5000, mem.pa + PAGE, PAGE, R | W)
    mem.mm[0:5] = b"hello"
    dma_copy(mem.store, src, 0x1000, dst, 0x5000, PAGE)
    assert mem.mm[PAGE : PAGE + 5] == b"hello"
    with pytest.raises(IoFault) as e:  # the destination side refuses: a write fault there
        dma_copy(mem.store, src, 0x1000, src, 0x1000, 16)
    assert (e.value.iova, e.value.write, e.value.reason) == (0x1000, True, "no permission")
