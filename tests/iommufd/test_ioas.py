"""IOAS ioctls against the real daemon: semantics and the kernel's errnos."""

from __future__ import annotations

import errno
import mmap
import os
import signal
from contextlib import asynccontextmanager

import pytest
import trio

from iommufd_cuse import uapi
from iommufd_cuse.client import FIXED, RW, AsyncIommufd
from iommufd_cuse.iommu.domain import PagingDomain
from iommufd_cuse.iommufd import debug
from iommufd_cuse.iommufd.object import Context

ULONG_MAX = (1 << 64) - 1
PGSIZES = 0x1000 | 0x200000 | 0x40000000
MSI = (0xFEE00000, 0xFEEFFFFF)


def context(daemon) -> Context:
    (ctx,) = daemon.system.contexts
    return ctx


async def attach_domain(daemon, ioas_id: int, **kw) -> PagingDomain:
    """What a device attach does to the IOAS: a paging domain loaded with every area."""
    ioas = context(daemon).get(ioas_id)
    dom = PagingDomain(kw.pop("pgsize_bitmap", PGSIZES), **kw)
    async with ioas.iopt.lock:
        await ioas.iopt.add_domain(dom)
    return dom


def iopt(daemon, ioas_id: int):
    return context(daemon).get(ioas_id).iopt


@pytest.fixture
async def fd(daemon):
    f = await AsyncIommufd.open(os.path.join(daemon.dev_dir, "iommu"))
    yield f
    await f.close()


def anon(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size)
    m[:] = bytes(size)
    return m


async def expect_errno(err: int, coro) -> None:
    with pytest.raises(OSError) as e:
        await coro
    assert e.value.errno == err, f"got {errno.errorcode.get(e.value.errno)}, want {errno.errorcode[err]}"


# -- IOVA_RANGES and ALLOW_IOVAS ----------------------------------------------------------
async def test_iova_ranges_protocol(daemon, fd):
    ioas = await fd.ioas_alloc()
    r = await fd.raw(uapi.IOMMU_IOAS_IOVA_RANGES, uapi.iommu_ioas_iova_ranges, ioas_id=ioas, num_iovas=0)
    assert (r.rc, r.errno) == (-1, errno.EMSGSIZE)
    assert r.out.num_iovas == 1 and r.out.out_iova_alignment == 1
    assert await fd.iova_ranges(ioas) == ([(0, ULONG_MAX)], 1)
    # A device's aperture and MSI window narrow the space and raise the alignment.
    await attach_domain(daemon, ioas, aperture_end=(1 << 48) - 1)
    iopt(daemon, ioas).reserve(*MSI, owner="msi")
    ranges, align = await fd.iova_ranges(ioas)
    assert ranges == [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]  # as the reference VT-d kernel
    assert align == 0x1000
    r = await fd.raw(
        uapi.IOMMU_IOAS_IOVA_RANGES, uapi.iommu_ioas_iova_ranges, ioas_id=ioas, num_iovas=1, allowed_iovas=0
    )
    assert r.errno == errno.EFAULT  # a bad array pointer faults


async def test_iova_ranges_bad_input(fd):
    ioas = await fd.ioas_alloc()
    r = await fd.raw(uapi.IOMMU_IOAS_IOVA_RANGES, uapi.iommu_ioas_iova_ranges, ioas_id=ioas, reserved=1)
    assert r.errno == errno.EOPNOTSUPP
    r = await fd.raw(uapi.IOMMU_IOAS_IOVA_RANGES, uapi.iommu_ioas_iova_ranges, ioas_id=ioas + 1)
    assert r.errno == errno.ENOENT


async def test_allow_iovas(daemon, fd):
    ioas = await fd.ioas_alloc()
    buf = anon(1 << 16)
    await fd.allow_iovas(ioas, [(0x100000, 0x10FFFF)])
    assert await fd.map(ioas, buf) == 0x100000  # allocation only inside the allowed range
    await expect_errno(errno.ENOSPC, fd.map(ioas, buf))  # full
    # FIXED_IOVA is not limited by the allowed ranges
    assert await fd.map(ioas, buf, iova=0x400000) == 0x400000
    # start >= last and overlapping ranges are EINVAL; over a reserved range EADDRINUSE
    await expect_errno(errno.EINVAL, fd.allow_iovas(ioas, [(0x5000, 0x5000)]))
    await expect_errno(errno.EINVAL, fd.allow_iovas(ioas, [(0, 0x1FFF), (0x1000, 0x2FFF)]))
    iopt(daemon, ioas).reserve(*MSI, owner="msi")
    await expect_errno(errno.EADDRINUSE, fd.allow_iovas(ioas, [(0xFE000000, 0xFEFFFFFF)]))
    # the empty list clears the restriction
    await fd.allow_iovas(ioas, [])
    assert len(iopt(daemon, ioas).allowed) == 0
    r = await fd.raw(
        uapi.IOMMU_IOAS_ALLOW_IOVAS, uapi.iommu_ioas_allow_iovas, ioas_id=ioas, num_iovas=1, allowed_iovas=8
    )
    assert r.errno == errno.EFAULT
    r = await fd.raw(uapi.IOMMU_IOAS_ALLOW_IOVAS, uapi.iommu_ioas_allow_iovas, ioas_id=ioas, reserved=1)
    assert r.errno == errno.EOPNOTSUPP


async def test_reserve_refuses_mapped_or_allowed(daemon, fd):
    ioas = await fd.ioas_alloc()
    buf = anon(1 << 16)
    await fd.map(ioas, buf, iova=0x10000)
    with pytest.raises(OSError) as e:
        iopt(daemon, ioas).reserve(0x10000, 0x10FFF, owner="x")
    assert e.value.errno == errno.EADDRINUSE


# -- MAP ------------------------------------------------------------------------------------
async def test_map_bad_input(daemon, fd):
    ioas = await fd.ioas_alloc()
    buf = anon(1 << 21)
    await attach_domain(daemon, ioas, aperture_end=(1 << 48) - 1)  # 4 KiB alignment from now on
    await expect_errno(errno.EINVAL, fd.map(ioas, buf, iova=0x1800, length=0x1000))  # unaligned iova
    await expect_errno(errno.EINVAL, fd.map(ioas, buf, iova=0x2000, length=0x1800))  # unaligned length
    await expect_errno(errno.EINVAL, fd.map(ioas, buf, iova=0x2000, length=0x1000, offset=0x800))  # uptr
    await expect_errno(errno.EINVAL, fd.map(ioas, buf, length=0x1000, offset=0x800))  # uptr, auto iova
    await expect_errno(errno.EINVAL, fd.map(ioas, buf, length=0))
    await expect_errno(errno.EOVERFLOW, fd.map(ioas, buf, iova=ULONG_MAX - 0xFFF, length=0x2000))
    await expect_errno(errno.EINVAL, fd.map(ioas, buf, iova=1 << 60, length=0x1000))  # beyond aperture
    iopt(daemon, ioas).reserve(*MSI, owner="msi")
    await expect_errno(errno.EINVAL, fd.map(ioas, buf, iova=0xFEE00000, length=0x1000))  # reserved
    await expect_errno(errno.EINVAL, fd.map(ioas, buf, iova=0xFED00000, length=0x200000))  # reaches into it
    await expect_errno(errno.ENOENT, fd.map(ioas + 7, buf))
    await expect_errno(errno.EOPNOTSUPP, fd.map(ioas, buf, flags=RW | 0x8))
    await expect_errno(errno.EINVAL, fd.map(ioas, buf, flags=0))  # neither readable nor writeable
    r = await fd.raw(
        uapi.IOMMU_IOAS_MAP, uapi.iommu_ioas_map, flags=RW, ioas_id=ioas, reserved=1, user_va=0x10000, length=0x1000
    )
    assert r.errno == errno.EOPNOTSUPP
    await expect_errno(errno.EFAULT, fd.map(ioas, 0x1000, length=0x1000))  # no memory there: pinning faults
    # nothing was left behind by the failures
    assert iopt(daemon, ioas).areas == [] and daemon.system.pinned_pages() == 0


async def test_map_fixed_overlap_and_unmap_rules(daemon, fd):
    ioas = await fd.ioas_alloc()
    buf = anon(1 << 21)
    assert await fd.map(ioas, buf, iova=0x400000) == 0x400000
    await expect_errno(errno.EEXIST, fd.map(ioas, buf, iova=0x400000))
    await expect_errno(errno.EEXIST, fd.map(ioas, buf, length=0x1000, iova=0x5FF000))  # overlaps the tail
    # unmapping part of an area, or a range with no area: ENOENT
    await expect_errno(errno.ENOENT, fd.unmap(ioas, 0x400000, 0x1000))
    await expect_errno(errno.ENOENT, fd.unmap(ioas, 0x800000, 0x1000))
    await expect_errno(errno.EINVAL, fd.unmap(ioas, 0x800000, 0))
    await expect_errno(errno.EOVERFLOW, fd.unmap(ioas, ULONG_MAX - 0xFFF, 0x2000))
    await expect_errno(errno.ENOENT, fd.unmap(ioas + 1, 0, 0x1000))
    # a covering range unmaps whole areas and reports their length
    assert await fd.unmap(ioas, 0x3FF000, 0x300000) == 1 << 21
    assert await fd.unmap(ioas, 0, ULONG_MAX) == 0  # unmap-all of an empty IOAS succeeds


async def test_unmap_all_reports_length(daemon, fd):
    ioas = await fd.ioas_alloc()
    a, b = anon(1 << 16), anon(1 << 20)
    await fd.map(ioas, a)
    await fd.map(ioas, b)
    assert await fd.unmap(ioas, 0, ULONG_MAX) == (1 << 16) + (1 << 20)
    assert iopt(daemon, ioas).areas == []


async def test_failed_unmap_does_not_write_length(fd):
    ioas = await fd.ioas_alloc()
    r = await fd.raw(uapi.IOMMU_IOAS_UNMAP, uapi.iommu_ioas_unmap, ioas_id=ioas, iova=0x200000, length=0x200000)
    assert r.errno == errno.ENOENT and r.out.length == 0x200000


async def test_auto_iova_alignment_and_reuse(fd):
    ioas = await fd.ioas_alloc()
    big = anon(4 << 20)
    iova = await fd.map(ioas, big)
    addr = debug_addr(big)
    # the IOVA keeps the user address's alignment up to 2 MiB
    assert iova % min(2 << 20, addr & -addr) == 0
    await fd.unmap(ioas, iova, 4 << 20)
    await fd.map(ioas, big, iova=0x10000000)
    small = anon(1 << 12)
    i2 = await fd.map(ioas, small)
    assert i2 == 0x1000  # the lowest free page-aligned IOVA, as the reference kernel answered
    await fd.unmap(ioas, i2, 0x1000)
    assert await fd.map(ioas, small) == 0x1000


def debug_addr(buf) -> int:
    from iommufd_cuse.client import address_of

    return address_of(buf)


async def test_unaligned_uptr_allowed_without_domain(daemon, fd):
    # With no device attached the IOVA alignment is 1, as the kernel reports.
    ioas = await fd.ioas_alloc()
    buf = anon(1 << 13)
    buf[0x10:0x15] = b"abcde"
    iova = await fd.map(ioas, buf, length=0x100, offset=0x10, iova=0x10010)
    assert iova == 0x10010
    assert debug.read(iopt(daemon, ioas), 0x10010, 5) == b"abcde"


# -- data through the translation --------------------------------------------------------
async def test_anon_data_both_ways(daemon, fd):
    ioas = await fd.ioas_alloc()
    dom = await attach_domain(daemon, ioas)
    buf = anon(3 << 20)
    buf[0:4] = b"ABCD"
    buf[(2 << 20) + 5 : (2 << 20) + 9] = b"WXYZ"
    iova = await fd.map(ioas, buf)
    io = iopt(daemon, ioas)
    assert debug.read(io, iova, 4) == b"ABCD"
    assert debug.read(io, iova + (2 << 20) + 5, 4) == b"WXYZ"
    debug.write(io, iova + 100, b"from-device")
    assert buf[100:111] == b"from-device"
    # the domain translates every page of the area to the pages' physical addresses
    area = io.areas[0]
    for off in (0, 0x1000, 2 << 20, (3 << 20) - 0x1000):
        pa, prot, _ = dom.walk(iova + off)
        assert pa == area.pa(iova + off) and prot == 3
    assert dom.walk(iova + (3 << 20)) is None


async def test_memfd_data_and_survives_munmap(daemon, fd):
    ioas = await fd.ioas_alloc()
    await attach_domain(daemon, ioas)
    mfd = os.memfd_create("t")
    os.ftruncate(mfd, 1 << 20)
    m = mmap.mmap(mfd, 1 << 20, flags=mmap.MAP_SHARED)
    m[:5] = b"hello"
    iova = await fd.map(ioas, m)  # a shared file mapping: the daemon maps the same file
    io = iopt(daemon, ioas)
    assert debug.read(io, iova, 5) == b"hello"
    debug.write(io, iova + 8, b"dma")
    assert m[8:11] == b"dma"
    m.close()  # the client unmaps; the pin keeps the pages
    os.pwrite(mfd, b"after", 16)
    assert debug.read(io, iova + 16, 5) == b"after"
    os.close(mfd)
    assert debug.read(io, iova, 5) == b"hello"


async def test_map_file(daemon, fd):
    ioas = await fd.ioas_alloc()
    await attach_domain(daemon, ioas)
    mfd = os.memfd_create("f")
    os.ftruncate(mfd, 1 << 20)
    os.pwrite(mfd, b"file-data", 0x3000)
    iova = await fd.map_file(ioas, mfd, 0x2000, 0x10000)
    assert debug.read(iopt(daemon, ioas), iova + 0x1000, 9) == b"file-data"
    assert daemon.system.pinned_pages() == 16
    # a start/length outside the file; an fd that is not a memfd; an fd that is not open
    await expect_errno(errno.EINVAL, fd.map_file(ioas, mfd, 0xF0000, 0x20000))
    r, w = os.pipe()
    await expect_errno(errno.EINVAL, fd.map_file(ioas, r, 0, 0x1000))
    await expect_errno(errno.EBADF, fd.map_file(ioas, 999, 0, 0x1000))
    await expect_errno(errno.EINVAL, fd.map_file(ioas, mfd, 0, 0))
    await expect_errno(errno.EOVERFLOW, fd.map_file(ioas, mfd, ULONG_MAX - 0xFFF, 0x2000))
    for x in (r, w, mfd):
        os.close(x)
    assert daemon.system.pinned_pages() == 16  # the failures left no pins


async def test_read_only_mapping(daemon, fd):
    ioas = await fd.ioas_alloc()
    dom = await attach_domain(daemon, ioas)
    buf = anon(1 << 12)
    iova = await fd.map(ioas, buf, flags=uapi.IOMMU_IOAS_MAP_READABLE)
    assert dom.walk(iova)[1] == 1  # read only in the page table
    with pytest.raises(OSError) as e:
        debug.write(iopt(daemon, ioas), iova, b"x")
    assert e.value.errno == errno.EPERM


# -- COPY ------------------------------------------------------------------------------------
async def test_copy_shares_pages(daemon, fd):
    src = await fd.ioas_alloc()
    dst = await fd.ioas_alloc()
    await attach_domain(daemon, src)
    await attach_domain(daemon, dst)
    buf = anon(1 << 20)
    buf[0x2000:0x2004] = b"copy"
    iova = await fd.map(src, buf)
    pinned = daemon.system.pinned_pages()
    d_iova = await fd.copy(dst, src, iova + 0x1000, 0x4000)
    assert debug.read(iopt(daemon, dst), d_iova + 0x1000, 4) == b"copy"
    assert daemon.system.pinned_pages() == pinned  # the same pinned pages, pinned once
    assert debug.pin_count(iopt(daemon, dst), d_iova) == 2
    assert debug.translate(iopt(daemon, dst), d_iova) == debug.translate(iopt(daemon, src), iova + 0x1000)
    await fd.unmap(src, 0, ULONG_MAX)
    assert debug.read(iopt(daemon, dst), d_iova + 0x1000, 4) == b"copy"  # dst still holds them
    assert daemon.system.pinned_pages() == 4
    await fd.unmap(dst, 0, ULONG_MAX)
    assert daemon.system.pinned_pages() == 0


async def test_copy_bad_input(daemon, fd):
    src = await fd.ioas_alloc()
    dst = await fd.ioas_alloc()
    buf = anon(1 << 16)
    iova = await fd.map(src, buf, flags=uapi.IOMMU_IOAS_MAP_READABLE)
    await expect_errno(errno.ENOENT, fd.copy(dst, src, iova + (1 << 16), 0x1000))  # unmapped source
    await expect_errno(errno.ENOENT, fd.copy(dst, src, iova, 2 << 16))  # runs past the area
    await expect_errno(errno.EPERM, fd.copy(dst, src, iova, 0x1000))  # write from read-only pages
    await expect_errno(errno.ENOENT, fd.copy(dst + 5, src, iova, 0x1000, flags=uapi.IOMMU_IOAS_MAP_READABLE))
    await expect_errno(errno.EINVAL, fd.copy(dst, src, iova, 0, flags=uapi.IOMMU_IOAS_MAP_READABLE))
    await expect_errno(errno.EOPNOTSUPP, fd.copy(dst, src, iova, 0x1000, flags=0x10 | RW))
    d = await fd.copy(dst, src, iova, 0x1000, dst_iova=0x7000, flags=uapi.IOMMU_IOAS_MAP_READABLE)
    assert d == 0x7000
    await expect_errno(
        errno.EEXIST, fd.copy(dst, src, iova, 0x1000, dst_iova=0x7000, flags=uapi.IOMMU_IOAS_MAP_READABLE)
    )


# -- options -----------------------------------------------------------------------------------
async def test_huge_pages_option(daemon, fd):
    ioas = await fd.ioas_alloc()
    get = uapi.IOMMU_OPTION_OP_GET
    set_ = uapi.IOMMU_OPTION_OP_SET
    assert await fd.option(uapi.IOMMU_OPTION_HUGE_PAGES, get, object_id=ioas) == 1
    await fd.option(uapi.IOMMU_OPTION_HUGE_PAGES, set_, object_id=ioas, val64=0)
    assert await fd.option(uapi.IOMMU_OPTION_HUGE_PAGES, get, object_id=ioas) == 0
    assert (await fd.iova_ranges(ioas))[1] == 0x1000  # disabling large pages forces page alignment
    await expect_errno(errno.EINVAL, fd.option(uapi.IOMMU_OPTION_HUGE_PAGES, set_, object_id=ioas, val64=2))
    await expect_errno(errno.ENOENT, fd.option(uapi.IOMMU_OPTION_HUGE_PAGES, get, object_id=ioas + 1))
    await expect_errno(errno.EOPNOTSUPP, fd.option(uapi.IOMMU_OPTION_HUGE_PAGES, 7, object_id=ioas))
    # with a domain holding mappings, it cannot be disabled again
    await fd.option(uapi.IOMMU_OPTION_HUGE_PAGES, set_, object_id=ioas, val64=1)
    await attach_domain(daemon, ioas)
    await fd.map(ioas, anon(1 << 12))
    await expect_errno(errno.EINVAL, fd.option(uapi.IOMMU_OPTION_HUGE_PAGES, set_, object_id=ioas, val64=0))


async def test_large_leaves_follow_huge_pages_option(daemon, fd):
    ioas = await fd.ioas_alloc()
    dom = await attach_domain(daemon, ioas)
    buf = anon(8 << 20)
    addr = debug_addr(buf)
    iova = (64 << 20) + addr % (2 << 20)  # IOVA congruent to the user address modulo 2 MiB
    await fd.map(ioas, buf, iova=iova)
    first_2m = (-addr) % (2 << 20)  # the first 2 MiB-aligned user address inside buf
    assert dom.walk(iova + first_2m)[2] == 2 << 20  # a 2 MiB leaf where both sides align
    await fd.unmap(ioas, iova, 8 << 20)
    # no mappings left: large pages can be turned off
    await fd.option(uapi.IOMMU_OPTION_HUGE_PAGES, uapi.IOMMU_OPTION_OP_SET, object_id=ioas, val64=0)
    await fd.map(ioas, buf, iova=iova)
    assert dom.walk(iova + first_2m)[2] == 4 << 10  # now only page-sized leaves


# -- pins and accounting --------------------------------------------------------------------
async def test_pins_only_with_a_domain_and_returned(daemon, fd):
    ioas = await fd.ioas_alloc()
    buf = anon(1 << 20)
    await fd.map(ioas, buf)
    assert daemon.system.pinned_pages() == 0  # nothing needs the pages yet
    dom = await attach_domain(daemon, ioas)
    assert daemon.system.pinned_pages() == 256
    async with iopt(daemon, ioas).lock:
        iopt(daemon, ioas).remove_domain(dom)
    assert daemon.system.pinned_pages() == 0
    assert dom.stats()["leaves"] == 0


async def test_close_returns_everything(daemon):
    f = await AsyncIommufd.open(os.path.join(daemon.dev_dir, "iommu"))
    ioas = await f.ioas_alloc()
    await attach_domain(daemon, ioas)
    await f.map(ioas, anon(1 << 20))
    mfd = os.memfd_create("c")
    os.ftruncate(mfd, 1 << 20)
    await f.map_file(ioas, mfd, 0, 1 << 20)
    assert daemon.system.pinned_pages() == 512
    await f.close()
    os.close(mfd)
    with trio.fail_after(5):
        while daemon.system.contexts:
            await trio.sleep(0.01)
    assert daemon.system.pinned_pages() == 0


@pytest.mark.parametrize("mode", ["user", "process"])
async def test_rlimit_memlock(daemon, scripted, mode):
    """A caller without CAP_IPC_LOCK is held to its RLIMIT_MEMLOCK; ENOMEM past it."""
    c = await scripted(drop_caps=("ipc_lock",))
    # /dev/vfio/vfio contexts account to the process, as VFIO did (the kernel's
    # default there); /dev/iommu ones to the user. Setting RLIMIT_MODE needs
    # CAP_SYS_RESOURCE, which this sandbox's root may lack.
    node = "vfio/vfio" if mode == "process" else "iommu"
    await c.ok("open", path=os.path.join(daemon.dev_dir, node))
    await c.call("option", option_id=uapi.IOMMU_OPTION_RLIMIT_MODE, op=uapi.IOMMU_OPTION_OP_GET)
    await c.ok("memlock", limit=64 * 4096)
    ioas = await c.call("ioas_alloc")
    await attach_domain(daemon, ioas)
    await c.ok("mmap", name="a", size=48 * 4096)
    await c.ok("mmap", name="b", size=32 * 4096)
    await c.ok("call", method="map", ioas=ioas, buf="a", length=48 * 4096)
    acct = daemon.system.accounting
    tgid = c.proc.pid
    charged = acct.mm[tgid] if mode == "process" else acct.user[0]
    assert charged == 48
    r = await c.do("call", method="map", ioas=ioas, buf="b", length=32 * 4096)
    assert r == {"errno": errno.ENOMEM}
    assert daemon.system.pinned_pages() == 48  # the failed map pinned nothing
    await c.exit()
    with trio.fail_after(5):
        while daemon.system.contexts:
            await trio.sleep(0.01)
    assert daemon.system.pinned_pages() == 0
    assert not acct.user and not acct.mm


async def test_rlimit_mode_set_needs_caller_capability(daemon, scripted):
    c = await scripted(drop_caps=("sys_resource",))
    await c.ok("open", path=os.path.join(daemon.dev_dir, "iommu"))
    r = await c.do(
        "call", method="option", option_id=uapi.IOMMU_OPTION_RLIMIT_MODE, op=uapi.IOMMU_OPTION_OP_SET, val64=1
    )
    assert r == {"errno": errno.EPERM}


async def test_anon_owner_exit_faults(daemon, scripted):
    c = await scripted()
    await c.ok("open", path=os.path.join(daemon.dev_dir, "iommu"))
    ioas = await c.call("ioas_alloc")
    await c.ok("mmap", name="a", size=1 << 16)
    await c.ok("fill", name="a", data="c0ffee")
    iova = await c.call("map", ioas=ioas, buf="a", length=1 << 16)
    ctx = context(daemon)
    io = ctx.get(ioas).iopt
    assert debug.read(io, iova, 3) == bytes.fromhex("c0ffee")
    # Keep the context alive past the client's exit, as a bound device would.
    ioas_obj = ctx.get(ioas)
    with ctx.hold(ioas_obj):
        c.proc.kill()
        await c.proc.wait()
        with pytest.raises(OSError) as e:
            debug.read(io, iova, 3)
        assert e.value.errno in (errno.ESRCH, errno.EFAULT)


async def test_memfd_survives_client_exit(daemon, scripted):
    c = await scripted()
    await c.ok("open", path=os.path.join(daemon.dev_dir, "iommu"))
    ioas = await c.call("ioas_alloc")
    await attach_domain(daemon, ioas)
    await c.ok("mmap", name="m", size=1 << 16, kind="memfd")
    await c.ok("fill", name="m", data="5eed")
    iova = await c.call("map", ioas=ioas, buf="m", length=1 << 16)
    await c.ok("munmap", name="m")
    ctx = context(daemon)
    with ctx.hold(ctx.get(ioas)):
        assert debug.read(ctx.get(ioas).iopt, iova, 2) == bytes.fromhex("5eed")
        c.proc.kill()
        await c.proc.wait()
        assert debug.read(ctx.get(ioas).iopt, iova, 2) == bytes.fromhex("5eed")


async def test_unknown_ioas_everywhere(fd):
    buf = anon(1 << 12)
    await expect_errno(errno.ENOENT, fd.map(1, buf))
    await expect_errno(errno.ENOENT, fd.unmap(1, 0, ULONG_MAX))
    await expect_errno(errno.ENOENT, fd.allow_iovas(3, []))


async def test_map_fixed_unmap_property_against_model(daemon, fd):
    """Random FIXED maps/unmaps on one IOAS agree with a model of disjoint areas."""
    import random

    rnd = random.Random(1234)
    ioas = await fd.ioas_alloc()
    buf = anon(64 << 12)
    model: dict[int, int] = {}  # start page -> npages
    for _ in range(120):
        start = rnd.randrange(0, 64)
        n = rnd.randrange(1, 8)
        overl = [s for s, k in model.items() if s < start + n and start < s + k]
        if rnd.random() < 0.6:
            r = await fd.raw(
                uapi.IOMMU_IOAS_MAP,
                uapi.iommu_ioas_map,
                flags=RW | FIXED,
                ioas_id=ioas,
                user_va=debug_addr(buf),
                length=n << 12,
                iova=start << 12,
            )
            assert (r.errno == errno.EEXIST) == bool(overl)
            if not overl:
                model[start] = n
        else:
            r = await fd.raw(
                uapi.IOMMU_IOAS_UNMAP, uapi.iommu_ioas_unmap, ioas_id=ioas, iova=start << 12, length=n << 12
            )
            inside = [s for s in overl if s >= start and s + model[s] <= start + n]
            sticking = [s for s in overl if s not in inside]
            if not overl:
                assert r.errno == errno.ENOENT
            elif not sticking:
                assert r.rc == 0 and r.out.length == sum(model[s] for s in inside) << 12
                for s in inside:
                    del model[s]
            else:
                assert r.errno == errno.ENOENT
                # areas before the first one sticking out were removed (kernel order)
                first_bad = min(sticking)
                for s in [s for s in inside if s < first_bad]:
                    del model[s]
        assert sorted((a.start >> 12, a.length >> 12) for a in iopt(daemon, ioas).areas) == sorted(model.items())


async def test_change_process(daemon, scripted):
    """Accounting of file-backed pins moves to the caller; anonymous areas refuse (EINVAL)."""
    a = await scripted(drop_caps=("ipc_lock",))
    a_fd = (await a.ok("open", path=os.path.join(daemon.dev_dir, "vfio/vfio")))["fdnum"]  # process accounting
    ioas = await a.call("ioas_alloc")
    await attach_domain(daemon, ioas)
    await a.ok("mmap", name="m", size=1 << 16, kind="memfd")
    r = await a.do("call", method="map_file", ioas=ioas, memfd="m", start=0, length=1 << 16)
    assert r.get("ok"), r
    acct = daemon.system.accounting
    assert acct.mm[a.proc.pid] == 16
    r = await a.call("raw", cmd=uapi.IOMMU_IOAS_CHANGE_PROCESS, struct_name="iommu_ioas_change_process", reserved=1)
    assert r == {"rc": -1, "errno_": errno.EOPNOTSUPP}
    # The same process again: nothing moves.
    r = await a.call("raw", cmd=uapi.IOMMU_IOAS_CHANGE_PROCESS, struct_name="iommu_ioas_change_process")
    assert r == {"rc": 0, "errno_": 0} and acct.mm[a.proc.pid] == 16
    # An anonymous area makes the whole call EINVAL.
    await a.ok("mmap", name="x", size=1 << 12)
    iova = await a.call("map", ioas=ioas, buf="x", length=1 << 12)
    r = await a.call("raw", cmd=uapi.IOMMU_IOAS_CHANGE_PROCESS, struct_name="iommu_ioas_change_process")
    assert r == {"rc": -1, "errno_": errno.EINVAL}
    await a.call("unmap", ioas=ioas, iova=iova, length=1 << 12)
    assert acct.mm[a.proc.pid] == 16
    # Another process holding the same context takes the charge over.
    b = await scripted(drop_caps=("ipc_lock",))
    await b.ok("grab", pid=a.proc.pid, fdnum=a_fd)
    r = await b.call("raw", cmd=uapi.IOMMU_IOAS_CHANGE_PROCESS, struct_name="iommu_ioas_change_process")
    assert r == {"rc": 0, "errno_": 0}
    assert acct.mm[b.proc.pid] == 16 and a.proc.pid not in acct.mm
    await a.exit()
    await b.exit()
    with trio.fail_after(5):
        while daemon.system.contexts:
            await trio.sleep(0.01)
    assert not acct.mm and daemon.system.pinned_pages() == 0


async def test_map_file_of_our_own_node_is_refused_without_hanging(daemon, fd):
    """A file of the daemon's own mount passed to MAP_FILE: EINVAL (not shmem), and
    never a request from the daemon to itself (its attributes are no longer cached)."""
    ioas = await fd.ioas_alloc()
    await attach_domain(daemon, ioas)
    await trio.sleep(1.2)  # past the attribute cache: fstat() would now ask the daemon
    with trio.fail_after(10):
        await expect_errno(errno.EINVAL, fd.map_file(ioas, fd.fd, 0, 0x1000))


@asynccontextmanager
async def held_map(daemon, scripted, monkeypatch, *, catch_sigusr1: bool = False):  # noqa: ANN001, ANN201
    """A client process whose IOAS_MAP (1 MiB, a domain attached) is held while being
    loaded into the domain, until `release` is set or the map is interrupted. Yields
    (client, ioas, result dict filled when the map returns, release event)."""
    from iommufd_cuse.iommufd.io_pagetable import IoPagetable

    loading, release = trio.Event(), trio.Event()
    original = IoPagetable._map_into

    async def held_map_into(self, area, domain):  # noqa: ANN001, ANN202
        loading.set()
        await release.wait()
        await original(self, area, domain)

    c = await scripted()
    if catch_sigusr1:
        await c.ok("catch_sigusr1")
    await c.ok("open", path=os.path.join(daemon.dev_dir, "iommu"))
    ioas = await c.call("ioas_alloc")
    await attach_domain(daemon, ioas)
    await c.ok("mmap", name="m", size=1 << 20)
    monkeypatch.setattr(IoPagetable, "_map_into", held_map_into)
    result: dict = {}
    async with trio.open_nursery() as nursery:

        async def do_map() -> None:
            result.update(await c.do("call", method="map", ioas=ioas, buf="m", length=1 << 20))

        nursery.start_soon(do_map)
        with trio.fail_after(10):
            await loading.wait()
        yield c, ioas, result, release
    monkeypatch.undo()


async def test_interrupted_map_returns_eintr_and_leaves_nothing(daemon, scripted, monkeypatch):
    """A client signalled while its IOAS_MAP is being loaded into the domains gets
    EINTR (FUSE_INTERRUPT cancels the work), and the half-made mapping is undone."""
    async with held_map(daemon, scripted, monkeypatch, catch_sigusr1=True) as (c, ioas, result, _):
        assert daemon.system.pinned_pages() == 256  # pinned, loading
        os.kill(c.proc.pid, signal.SIGUSR1)
    assert result == {"errno": errno.EINTR}
    io = context(daemon).get(ioas).iopt
    assert io.areas == [] and daemon.system.pinned_pages() == 0
    assert not io.lock.locked()
    assert await c.call("map", ioas=ioas, buf="m", length=1 << 20) > 0  # the IOAS still works


async def test_alloc_whose_answer_cannot_be_written_leaves_no_object(daemon, fd):
    """Creation is two-phase: when copying the answer out faults (EFAULT), the object
    is aborted, its id never seen and free again."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.mmap(-1, 4096)
    s = uapi.iommu_ioas_alloc
    page[: s.SIZE] = s.pack(s.new(size=s.SIZE))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    assert libc.mprotect(ctypes.c_void_p(addr), 4096, 1) == 0  # PROT_READ: readable, not writable

    def alloc_into_read_only() -> int:
        from iommufd_cuse.client import raw_ioctl

        return raw_ioctl(fd.fd, uapi.IOMMU_IOAS_ALLOC, addr)[1]

    assert await trio.to_thread.run_sync(alloc_into_read_only) == errno.EFAULT
    assert context(daemon).live_objects() == []
    assert await fd.ioas_alloc() == 1


async def test_map_file_takes_shmem_not_disk_files(daemon, fd, tmp_path):
    """As memfd_pin_folios(): a memfd or a tmpfs file maps, a file on a disk file
    system is EINVAL (once pinned: with a domain attached)."""
    ioas = await fd.ioas_alloc()
    await attach_domain(daemon, ioas)
    disk = tmp_path / "disk-file"  # pytest's tmp_path is not on a tmpfs here
    disk.write_bytes(bytes(1 << 16))
    dfd = os.open(disk, os.O_RDWR)
    try:
        import ctypes

        buf = ctypes.create_string_buffer(120)
        ctypes.CDLL(None).fstatfs(dfd, buf)
        if int.from_bytes(buf.raw[:8], "little") == 0x01021994:
            pytest.skip("the test's scratch directory is on a tmpfs")
        await expect_errno(errno.EINVAL, fd.map_file(ioas, dfd, 0, 1 << 16))
    finally:
        os.close(dfd)
    shm = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.ftruncate(shm, 1 << 16)
        assert await fd.map_file(ioas, shm, 0, 1 << 16) > 0
    finally:
        os.close(shm)


async def test_writable_shared_mapping_of_a_disk_file_cannot_be_pinned(daemon, fd, tmp_path):
    """As the kernel's long-term GUP: a writable pin of a MAP_SHARED disk file mapping
    is EFAULT; read-only is fine, and shmem (a memfd) is fine either way."""
    ioas = await fd.ioas_alloc()
    await attach_domain(daemon, ioas)
    disk = tmp_path / "disk-file"
    disk.write_bytes(bytes(1 << 16))
    with open(disk, "r+b") as f:
        m = mmap.mmap(f.fileno(), 1 << 16, flags=mmap.MAP_SHARED)
    import ctypes

    buf = ctypes.create_string_buffer(120)
    ctypes.CDLL(None).statfs(str(disk).encode(), buf)
    if int.from_bytes(buf.raw[:8], "little") == 0x01021994:
        pytest.skip("the test's scratch directory is on a tmpfs")
    await expect_errno(errno.EFAULT, fd.map(ioas, m))
    assert await fd.map(ioas, m, flags=uapi.IOMMU_IOAS_MAP_READABLE) > 0
    assert daemon.system.pinned_pages() == 16


async def test_a_long_map_does_not_stall_other_clients(daemon, scripted, monkeypatch):
    """While one client's IOAS_MAP is being loaded (held here until released), other
    clients are served: long work runs as a task of its own, never in the reader."""
    async with held_map(daemon, scripted, monkeypatch) as (_, _ioas, result, release):
        # another process is served meanwhile, through a whole context's life
        b = await scripted()
        await b.ok("open", path=os.path.join(daemon.dev_dir, "iommu"))
        other = await b.call("ioas_alloc")
        r = await b.call("option", option_id=uapi.IOMMU_OPTION_HUGE_PAGES, op=uapi.IOMMU_OPTION_OP_GET, object_id=other)
        assert r == 1  # huge pages on, the default
        await b.exit()
        assert not result  # the first map is still being loaded
        release.set()
    assert result.get("ok"), result


async def test_long_memfd_map_is_faulted_in_off_the_loop(daemon, fd):
    """A memfd longer than what mmap populates on the loop is faulted in by a worker
    (MADV_POPULATE_WRITE) when it is pinned: its pages are then the file's, in RAM."""
    from iommufd_cuse.iommufd import pages as pages_mod

    ioas = await fd.ioas_alloc()
    await attach_domain(daemon, ioas)
    size = pages_mod.POPULATE_INLINE + (1 << 20)
    mfd = os.memfd_create("long")
    try:
        os.ftruncate(mfd, size)
        os.pwrite(mfd, b"tail-data", size - 4096)
        iova = await fd.map_file(ioas, mfd, 0, size)
        assert daemon.system.pinned_pages() == size // 4096
        assert debug.read(iopt(daemon, ioas), iova + size - 4096, 9) == b"tail-data"
        st = os.fstat(mfd)
        assert st.st_blocks * 512 >= size  # every page of the file allocated: populated
    finally:
        os.close(mfd)
