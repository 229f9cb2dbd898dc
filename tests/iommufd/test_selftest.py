"""IOMMU_TEST_CMD, the kernel's selftest interface (drivers/iommu/iommufd/selftest.c),
served in test mode (`iommufd-cuse serve --selftest`): real C clients
(tests/clients/selftest_*.c) against a daemon started with selftest=True, each call
checked against mainline's answer.

Where the daemon cannot give mainline's answer (a new fd in the caller), the
expected value says so and docs/selftest.md explains it.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from clientkit import Step, mismatches, parse_steps, wait_until
from harness import run, serving

from iommufd_cuse import config, uapi
from iommufd_cuse.daemon import Daemon
from iommufd_cuse.iommufd.main import IOMMUFD_CMD_BASE, ioctl_table
from iommufd_cuse.transport.caller import Errno

OK = "OK"


async def _serve(selftest: bool) -> AsyncIterator[Daemon]:
    async with serving(selftest=selftest) as d:
        yield d


@pytest.fixture
async def selftest_daemon() -> AsyncIterator[Daemon]:
    """A running daemon in test mode (IOMMU_TEST_CMD served), nodes under a scratch /dev."""
    async for d in _serve(True):
        yield d


@pytest.fixture
async def plain_daemon() -> AsyncIterator[Daemon]:
    async for d in _serve(False):
        yield d


async def client(d: Daemon, cbuild, name: str, *args: str) -> dict[str, Step]:  # noqa: ANN001
    exe = cbuild(name)
    p = await run([exe, Path(d.dev_dir) / "iommu", *args])
    return parse_steps(p.stdout)


async def companion_client(d: Daemon, cbuild, preload: Path, name: str, *args: str) -> dict[str, Step]:  # noqa: ANN001
    """client() with the companion library preloaded."""
    env = dict(os.environ, LD_PRELOAD=str(preload))
    p = await run([cbuild(name), Path(d.dev_dir) / "iommu", *args], env=env)
    return parse_steps(p.stdout)


def assert_kernel(steps: dict[str, Step], expected: dict[str, str]) -> None:
    problems = mismatches(steps, expected)
    assert not problems, "answers differ from mainline's:\n" + "\n".join(problems)


def fields(steps: dict[str, Step], name: str) -> dict[str, str]:
    return steps[name].fields


# -- test mode on and off -------------------------------------------------------------------
async def test_absent_without_test_mode(plain_daemon, cbuild):
    """Without --selftest the number is not in the table: ENOTTY, as a kernel without
    CONFIG_IOMMUFD_TEST."""
    steps = await client(plain_daemon, cbuild, "selftest_ops", "absent")
    assert_kernel(steps, {"test_cmd": "ENOTTY"})
    table = ioctl_table(plain_daemon.system)
    assert not table.in_range(uapi.IOMMU_TEST_CMD)
    assert table.last_nr < IOMMUFD_CMD_BASE + 32


async def test_table_is_per_daemon(selftest_daemon, plain_daemon):
    assert ioctl_table(selftest_daemon.system).in_range(uapi.IOMMU_TEST_CMD)
    assert not ioctl_table(plain_daemon.system).in_range(uapi.IOMMU_TEST_CMD)


def test_test_mode_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="iommufd_cuse.daemon"):
        d = Daemon(config.load(None), dev_dir="/nonexistent", mountpoint="/nonexistent", selftest=True)
    assert d.system.selftest
    assert any(r.levelno == logging.WARNING and "IOMMU_TEST_CMD" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iommufd_cuse.daemon"):
        d = Daemon(config.load(None), dev_dir="/nonexistent", mountpoint="/nonexistent")
    assert not d.system.selftest and not caplog.records


def test_cli_flag():
    out = subprocess.run(
        [sys.executable, "-m", "iommufd_cuse.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--selftest" in out


# -- the generic ops --------------------------------------------------------------------------
async def test_generic(selftest_daemon, cbuild):
    steps = await client(selftest_daemon, cbuild, "selftest_ops", "generic")
    assert_kernel(
        steps,
        {
            "size_short": "EINVAL",
            "size_exact": OK,
            "size_long_zero": OK,
            "size_long_nonzero": "E2BIG",
            "bad_pointer": "EFAULT",
            "op_zero": "EOPNOTSUPP",
            "op_unknown": "EOPNOTSUPP",
            "reserved_zero_length": "EINVAL",
            "reserved_overflow": "EOVERFLOW",
            "reserved_bad_ioas": "ENOENT",
            "reserved_ok": OK,
            "map_auto": OK,
            "map_fixed_in_reserved": "EINVAL",
            "reserved_over_area": "EADDRINUSE",
            "allow_iovas": OK,
            "reserved_over_allowed": "EADDRINUSE",
            "reserved_id_zero": "ENOENT",
            "limit_11": "EINVAL",
            "limit_12": OK,
            "limit_default": OK,
        },
    )
    assert fields(steps, "map_auto") == {"above": "1"}
    assert selftest_daemon.system.selftest_memory_limit == 65536


# -- mock devices and domains --------------------------------------------------------------------
async def test_mock_domain(selftest_daemon, cbuild):
    steps = await client(selftest_daemon, cbuild, "selftest_ops", "mock")
    expected = {
        "mock_bad_ioas": "ENOENT",
        "mock_id_zero": "ENOENT",
        "mock_flags_unknown": "EINVAL",
        "mock_flags_huge_iova_removed": "EINVAL",
        "mock": OK,
        "mock2": OK,
        "mock_on_hwpt": OK,
        "destroy_mock3": OK,
        "hw_info": OK,
        "hw_info_stdev": "ENOENT",
        "iova_ranges": OK,
        "map_below_aperture": "EINVAL",
        "map_2k_offset": OK,
        "destroy_idev": "EBUSY",
        "destroy_hwpt_in_use": "EBUSY",
        "replace_bad_stdev": "ENOENT",
        "replace_idev_not_stdev": "ENOENT",
        "replace_bad_pt": "ENOENT",
        "replace_to_device": "EINVAL",
        "replace_same": OK,
        "replace_ioas2": OK,
        "replace_back": OK,
        "hwpt_alloc": OK,
        "replace_manual": OK,
        "destroy_manual_in_use": "EBUSY",
        "replace_from_manual": OK,
        "destroy_manual": OK,
        "hwpt_bad_type": "EOPNOTSUPP",
        "hwpt_short_data": "EINVAL",
        "hwpt_other_data": "EOPNOTSUPP",
        "hwpt_unknown_flag": "EOPNOTSUPP",
        "hwpt_fault_id": "ENOENT",
        "hwpt_huge": OK,
        "destroy_huge": OK,
        "hwpt_nest_parent": OK,
        "destroy_nest_parent": OK,
        "mock_no_dirty": OK,
        "hwpt_dirty_no_dirty_dev": "EOPNOTSUPP",
        "hwpt_dirty": OK,
        "replace_no_dirty_to_dirty": "EINVAL",
        "mock_no_dirty_on_dirty": "EINVAL",
        "hw_info_no_dirty": OK,
        "destroy_dirty": OK,
        "destroy_no_dirty": OK,
        **{f"cache_{i}": OK for i in range(uapi.MOCK_DEV_CACHE_NUM)},
        "cache_bad_index": "EINVAL",
        "cache_wrong_value": "EINVAL",
        "cache_not_device": "ENOENT",
        "iotlb_paging": "ENOENT",
        "iotlb_missing": "ENOENT",
        "iopf": OK,
        "iopf_not_device": "ENOENT",
        "vevent_no_viommu": "ENOENT",
        "vevent_missing": "ENOENT",
        "check_map_ioas": "ENOENT",
        "check_map_stdev": "ENOENT",
        "check_map_empty": OK,
        "destroy_stdev2": OK,
        "destroy_stdev": OK,
        "destroy_idev_gone": "ENOENT",
        "destroy_hwpt_gone": "ENOENT",
        "destroy_ioas": OK,
        "destroy_stdev_again": "ENOENT",
        "mock_again": OK,
    }
    assert_kernel(steps, expected)
    # ids: the selftest object, then the bound device, then the automatic HWPT
    assert fields(steps, "mock") == {"stdev": "2", "idev": "3", "hwpt": "4"}
    assert fields(steps, "mock2") == {"stdev": "5", "idev": "6", "hwpt": "4", "same_hwpt": "1"}
    assert fields(steps, "mock_on_hwpt") == {"hwpt": "4"}
    assert fields(steps, "hw_info") == {
        "type": hex(uapi.IOMMU_HW_INFO_TYPE_SELFTEST),
        "reg": hex(uapi.IOMMU_HW_INFO_SELFTEST_REGVAL),
        "flags": "0",
        "len": "8",
        "caps": hex(uapi.IOMMU_HW_CAP_DIRTY_TRACKING),
        "pasid": "0",
    }
    assert fields(steps, "hw_info_no_dirty") == {"caps": "0"}
    assert fields(steps, "iova_ranges") == {
        "n": "1",
        "start": hex(uapi.MOCK_APERTURE_START),
        "last": hex(uapi.MOCK_APERTURE_LAST),
        "align": "2048",
    }
    assert fields(steps, "replace_same") == {"pt": "4"}
    assert fields(steps, "replace_ioas2") == {"pt": "8"}
    assert fields(steps, "replace_back") == {"pt": "4", "same": "1"}
    assert fields(steps, "replace_manual") == {"same": "1"}
    assert fields(steps, "mock_again") == {"stdev": "1", "idev": "2", "hwpt": "3"}
    # the context's release (the client exited) takes every mock device with it
    mock = selftest_daemon.system.mock_iommu
    await wait_until(lambda: not mock.dev_ids and not selftest_daemon.system.contexts, what="release")


async def test_access_and_dmabuf(selftest_daemon, cbuild, caplog):
    """What needs a new fd in the caller, without the companion: CREATE_ACCESS and
    DMABUF_GET answer EOPNOTSUPP (mainline: a new fd), after mainline's own checks; the ops that take
    an access fd find none, as mainline for an fd that is not an access."""
    with caplog.at_level(logging.WARNING, logger="iommufd_cuse.iommufd.selftest"):
        steps = await client(selftest_daemon, cbuild, "selftest_ops", "files")
    assert_kernel(
        steps,
        {
            "access_bad_flags": "EOPNOTSUPP",
            "access_bad_ioas": "ENOENT",
            "access_create": "EOPNOTSUPP",  # mainline: OK, out_access_fd = a new fd
            "access_pages_too_long": "ENOMEM",
            "access_pages_bad_flags": "EOPNOTSUPP",
            "access_pages_not_access": "EBADFD",
            "access_rw_too_long": "ENOMEM",
            "access_rw_bad_flags": "EOPNOTSUPP",
            "access_rw_not_access": "EBADFD",
            "access_destroy_not_access": "EBADFD",
            "access_replace_no_fd": "EBADFD",
            "dmabuf_zero": "EINVAL",
            "dmabuf_too_long": "EINVAL",
            "dmabuf_get": "EOPNOTSUPP",  # without the companion (mainline: a new dma-buf fd)
            "dmabuf_revoke_no_fd": "EBADF",
            "dmabuf_revoke_not_dmabuf": "EINVAL",
        },
    )
    assert fields(steps, "access_create") == {"fd": "12345"}  # nothing written back
    msgs = [r.getMessage() for r in caplog.records]
    assert any("CREATE_ACCESS" in m and "EOPNOTSUPP" in m for m in msgs)
    assert any("DMABUF_GET" in m for m in msgs)


# -- MD_CHECK_MAP / MD_CHECK_REFS ---------------------------------------------------------------------
MAP_EXPECTED = {
    "refs_before": OK,
    "mock": OK,
    "mock2": OK,
    "ranges": "EMSGSIZE",
    "map": OK,
    "check_map": OK,
    "check_map_tail": OK,
    "check_map_shifted": "EINVAL",
    "check_map_copy_of_data": "EINVAL",
    "check_map_unmapped_iova": "EINVAL",
    "check_map_unaligned_iova": "EINVAL",
    "check_map_unaligned_length": "EINVAL",
    "check_map_unaligned_uptr": "EINVAL",
    "check_map_overflow": "EINVAL",
    "check_map_unmapped_uptr": "EFAULT",
    "check_map_wrong_hwpt": "EINVAL",
    "refs_mapped": OK,
    "refs_mapped_wrong": "EIO",
    "refs_other": OK,
    "refs_unaligned": "EINVAL",
    "refs_unaligned_length": "EINVAL",
    "refs_unmapped": "EFAULT",
    "refs_empty": OK,
    "copy": OK,
    "check_map_copy": OK,
    "refs_copy": OK,
    "map_again": OK,
    "check_map_again": OK,
    "refs_twice": OK,
    "unmap_again": OK,
    "refs_after_unmap": OK,
    "check_map_unmapped": "EINVAL",
    "replace": OK,
    "check_map_replaced": OK,
    "refs_replaced": OK,
    "unmap_copy": OK,
    "refs_unmapped_all": OK,
    "replace_back": OK,
    "check_map_back": OK,
    "refs_back": OK,
    "destroy_stdev": OK,
    "refs_no_domain": OK,
    "mock_again": OK,
    "check_map_new_domain": OK,
    "refs_new_domain": OK,
    "refs_closed": OK,
}


@pytest.mark.parametrize("memory", ["anon", "memfd"])
@pytest.mark.parametrize("domain", ["default", "huge"])
async def test_check_map_and_refs(selftest_daemon, cbuild, memory, domain):
    steps = await client(selftest_daemon, cbuild, "selftest_map", memory, domain)
    expected = dict(MAP_EXPECTED)
    # a 2 KiB step: one mock page of the default domain; half a page of the huge one
    expected["check_map_2k"] = OK if domain == "default" else "EINVAL"
    if memory == "memfd":
        expected |= {
            "check_map_alias": OK,
            "refs_alias": OK,
            "map_file": OK,
            "check_map_file": OK,
            "refs_file": OK,
            "unmap_file": OK,
        }
    if domain == "huge":
        expected |= {"hwpt_huge": OK, "hwpt_huge2": OK, "replace_huge": OK, "replace_huge2": OK, "destroy_manual": OK}
    assert_kernel(steps, expected)
    assert set(steps) == set(expected), set(steps) ^ set(expected)
    if domain == "default":
        assert fields(steps, "ranges") == {"n": "1", "align": "2048"}
        assert fields(steps, "check_map_replaced") == {"shared": "1"}  # the automatic HWPT of the IOAS
    else:  # the whole IOVA space, PAGE_SIZE granule
        assert fields(steps, "ranges") == {"n": "1", "align": "4096"}
        assert fields(steps, "check_map_replaced") == {"shared": "0"}  # a manual HWPT is never picked
    await wait_until(lambda: selftest_daemon.system.pinned_pages() == 0, what="all unpinned")


async def test_check_refs_skips_compound_pages(selftest_daemon, cbuild):
    """The kernel's check skips compound pages (THP): any refs value passes there."""
    steps = await client(selftest_daemon, cbuild, "selftest_ops", "thp")
    if int(fields(steps, "refs_thp")["thp_kb"]) < 2048:
        pytest.skip("no transparent huge page was granted to the client")
    assert_kernel(steps, {"refs_thp": OK})


async def test_check_map_sees_the_domain(selftest_daemon, cbuild):
    """MD_CHECK_MAP reads the mock domain's page table, not the IOAS: a translation
    removed behind the IOAS's back fails the check (the test can fail)."""
    from iommufd_cuse.client import AsyncIommufd
    from iommufd_cuse.iommufd.selftest import MockDomain

    fd = await AsyncIommufd.open(Path(selftest_daemon.dev_dir) / "iommu")
    ioas = await fd.ioas_alloc()
    r = await fd.raw(uapi.IOMMU_TEST_CMD, uapi.iommu_test_cmd, **_tc(uapi.IOMMU_TEST_OP_MOCK_DOMAIN, ioas))
    assert r.rc == 0, r
    md = uapi.IOMMU_TEST_OP_STRUCTS[uapi.IOMMU_TEST_OP_MOCK_DOMAIN].unpack(r.out.data)
    import ctypes
    import mmap

    buf = mmap.mmap(-1, 1 << 16)
    buf[:] = b"\1" * len(buf)
    va = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    await fd.map(ioas, va, 1 << 16, iova=uapi.MOCK_APERTURE_START)
    check = _tc(uapi.IOMMU_TEST_OP_MD_CHECK_MAP, md.out_hwpt_id, iova=uapi.MOCK_APERTURE_START, length=1 << 16, uptr=va)
    assert (await fd.raw(uapi.IOMMU_TEST_CMD, uapi.iommu_test_cmd, **check)).rc == 0
    ctx = next(iter(selftest_daemon.system.contexts))
    domain = ctx.get(md.out_hwpt_id).domain
    assert isinstance(domain, MockDomain)
    # `iommufd-cuse status` shows the selftest object and its mock device
    import json

    from iommufd_cuse import service

    st = json.loads(json.dumps(service.collect_status(selftest_daemon)))
    objs = {o["id"]: o for o in st["contexts"][0]["objects"]}
    assert objs[md.out_stdev_id]["type"] == "selftest"
    assert objs[md.out_stdev_id]["device"] == objs[md.out_idev_id]["device"] == "iommufd_mock0"
    domain.unmap(uapi.MOCK_APERTURE_START + 0x800, 0x800)
    r = await fd.raw(uapi.IOMMU_TEST_CMD, uapi.iommu_test_cmd, **check)
    assert r.errno == 22, r  # EINVAL
    del buf
    await fd.close()


def _tc(op: int, obj_id: int = 0, **kw: int) -> dict:
    st = uapi.IOMMU_TEST_OP_STRUCTS[op]
    data = st.pack(st.new(**kw))
    return {"op": op, "id": obj_id, "data": data + bytes(48 - len(data))}


# -- DIRTY -------------------------------------------------------------------------------------
@pytest.mark.parametrize("domain", ["default", "huge"])
async def test_dirty(selftest_daemon, cbuild, domain):
    steps = await client(selftest_daemon, cbuild, "selftest_dirty", domain)
    assert_kernel(
        steps,
        {
            "mock": OK,
            "map": OK,
            "dirty_auto": "EINVAL",
            "hwpt_dirty": OK,
            "replace": OK,
            "dirty_tracking_off": "EINVAL",
            "tracking_on": OK,
            "dirty_page_size_0": "EINVAL",
            "dirty_length_0": "EINVAL",
            "dirty_iova_unaligned": "EINVAL",
            "dirty_length_unaligned": "EINVAL",
            "dirty_no_bitmap": "EINVAL",
            "dirty_bad_bitmap": "EFAULT",
            "dirty_on_ioas": "ENOENT",
            "dirty_missing": "ENOENT",
            "dirty": OK,
            "bitmap": OK,
            "bitmap_cleared": OK,
            "dirty_again": OK,
            "bitmap_no_clear": OK,
            "bitmap_kept": OK,
            "dirty_unmapped": OK,
            "tracking_off": OK,
            "dirty_after_off": "EINVAL",
        },
    )
    nbits = (4 << 20) // (uapi.MOCK_HUGE_PAGE_SIZE if domain == "huge" else uapi.MOCK_PAGE_SIZE)
    want = len(range(0, nbits, 3))
    # the default mock's 4 KiB entries (PAGE_SIZE mappings of its 2 KiB granule) are
    # dirty as a whole: both 2 KiB halves of each marked page read back
    pages = {i // 2 for i in range(0, nbits, 3)}
    read_back = want if domain == "huge" else 2 * len(pages)
    assert fields(steps, "dirty") == {"nr": str(want), "expected": str(want)}
    assert fields(steps, "bitmap") == {"match": "1", "set": str(read_back)}
    assert fields(steps, "bitmap_cleared") == {"set": "0"}
    assert fields(steps, "bitmap_no_clear") == {"match": "1"}
    assert fields(steps, "bitmap_kept") == {"match": "1"}
    assert fields(steps, "dirty_unmapped") == {"nr": str(want)}  # every set bit counts


# -- PASID -----------------------------------------------------------------------------------------
async def test_pasid(selftest_daemon, cbuild):
    steps = await client(selftest_daemon, cbuild, "selftest_pasid")
    assert_kernel(
        steps,
        {
            "mock": OK,
            "hw_info": OK,
            "hwpt_pasid": OK,
            "hwpt_pasid2": OK,
            "hwpt_plain": OK,
            "attach_rid_not_compat": "EINVAL",
            "replace_rid": OK,
            "attach_plain": "EINVAL",
            "attach": OK,
            "check": OK,
            "check_detached": "EINVAL",
            "check_other": "EINVAL",
            "check_free_pasid": OK,
            "check_missing_hwpt": "ENOENT",
            "check_ioas": "EINVAL",
            "check_rid": OK,
            "check_bad_stdev": "ENOENT",
            "attach_again": "EBUSY",
            "attach_again_ioas": "EBUSY",
            "attach_ioas": "EINVAL",
            "attach_device": "EINVAL",
            "attach_missing": "ENOENT",
            "attach_bad_stdev": "ENOENT",
            "attach_idev_not_stdev": "ENOENT",
            "attach_pasid_too_big": "EINVAL",
            "replace_rid_plain": "EINVAL",
            "destroy_in_use": "EBUSY",
            "replace": OK,
            "check_replaced": OK,
            "replace_plain": "EINVAL",
            "replace_not_attached": "EINVAL",
            "replace_same": OK,
            "replace_ioas": "EINVAL",
            "attach_1024": OK,
            "replace_1024_fails": "ENOMEM",
            "check_1024_unchanged": OK,
            "replace_1024": OK,
            "check_1024": OK,
            "detach_1024": OK,
            "check_1024_detached": OK,
            "detach": OK,
            "detach_again": OK,
            "check_after_detach": OK,
            "replace_rid_plain_now": OK,
            "mock_no_pasid": OK,
            "attach_no_pasid_dev": "EINVAL",
            "destroy_no_pasid": OK,
            "replace_rid_back": OK,
            "attach_last": OK,
            "destroy_hp2_in_use": "EBUSY",
            "destroy_stdev": OK,
            "destroy_hp2": OK,
            "destroy_hp": OK,
        },
    )
    assert fields(steps, "hw_info") == {"pasid_log2": str(uapi.MOCK_PASID_WIDTH)}
    assert fields(steps, "attach") == {"same": "1"}


# -- nested HWPTs, IOMMU_HWPT_INVALIDATE, MD_CHECK_IOTLB ---------------------------------------------
async def test_nested(selftest_daemon, cbuild):
    """Mainline's nested HWPTs of the mock IOMMU (tools/testing/selftests/iommu,
    alloc_hwpt_nested): allocation errnos, the mock IOTLB, the invalidation array
    protocol (entry_num out = entries handled), attach/replace and destroy rules."""
    steps = await client(selftest_daemon, cbuild, "selftest_nested")
    expected = {
        "mock": OK,
        "parent": OK,
        "plain": OK,
        # HWPT_ALLOC on a parent
        "data_none_with_data": "EINVAL",
        "data_none": "EOPNOTSUPP",  # a nested domain needs data
        "data_type_unknown": "EOPNOTSUPP",
        "data_short": "EINVAL",
        "data_long_zero_tail": "EINVAL",  # iommu_copy_struct_from_user: longer than the struct
        "data_long_nonzero_tail": "EINVAL",
        "data_null": "EFAULT",
        "paging_data_long_zero_tail": "EINVAL",
        "paging_data_null": "EFAULT",
        "flag_nest_parent": "EOPNOTSUPP",
        "flag_dirty": "EOPNOTSUPP",
        "flag_unknown": "EOPNOTSUPP",
        "fault_id": "ENOENT",  # no fault object
        "parent_not_nest_parent": "EINVAL",
        "parent_auto": "EINVAL",
        "parent_device": "EINVAL",
        "parent_missing": "EINVAL",
        "dev_missing": "ENOENT",
        "nested0": OK,
        "nested1": OK,
        "nested2_min_len": OK,
        # MD_CHECK_IOTLB
        "iotlb_default": OK,
        "iotlb_wrong_value": "EINVAL",
        "iotlb_bad_id": "EINVAL",
        "iotlb_parent": "ENOENT",
        "iotlb_missing": "ENOENT",
        "nested_on_nested": "EINVAL",
        "destroy_parent_busy": "EBUSY",
        "check_map_nested": "ENOENT",
        "dirty_tracking_nested": "ENOENT",
        # IOMMU_HWPT_INVALIDATE
        "inv_parent": "EINVAL",
        "inv_ioas": "EINVAL",
        "inv_missing": "ENOENT",
        "inv_empty": OK,
        "inv_empty_null": OK,
        "inv_bad_type": "EINVAL",
        "inv_bad_type_empty": "EINVAL",
        "inv_len_plus_1": "EINVAL",
        "inv_len_1": "EINVAL",
        "inv_len_page_plus_1": "EINVAL",
        "inv_num_over_max": "EINVAL",
        "inv_num_over_max_missing": "EINVAL",
        "inv_null": "EINVAL",
        "inv_len_0": "EINVAL",
        "inv_bad_flags": "EOPNOTSUPP",
        "inv_bad_id": "EINVAL",
        "inv_reserved": "EOPNOTSUPP",
        "inv_unreadable_entry": "EFAULT",
        "iotlb_untouched": OK,
        "inv_partial_flags": "EOPNOTSUPP",
        "inv_partial_id": "EINVAL",
        "inv_one": OK,
        "inv_two": OK,
        "inv_all_bad_id": "EINVAL",
        "inv_all": OK,
        "inv_len_4": "EINVAL",
        "inv_readonly_cmd": "EFAULT",
        # attach, replace, destroy
        "replace_nested0": OK,
        "check_rid_nested0": OK,
        "destroy_nested0_busy": "EBUSY",
        "replace_nested1": OK,
        "destroy_nested1_busy": "EBUSY",
        "destroy_nested0": OK,
        "iotlb_destroyed": "ENOENT",
        "mock_on_nested": OK,
        "destroy_mock_on_nested": OK,
        "replace_parent": OK,
        "destroy_nested1": OK,
        "replace_nested2": OK,
        "replace_ioas": OK,
        "destroy_parent_busy_n2": "EBUSY",
        "destroy_nested2": OK,
        "destroy_parent": OK,
        "destroy_plain": OK,
        # PASIDs
        "mock_pasid": OK,
        "parent_pasid": OK,
        "nested_pasid": OK,
        "nested_no_pasid": OK,
        "replace_rid_parent_pasid": OK,
        "pasid_attach_nested": OK,
        "pasid_check_nested": OK,
        "pasid_attach_not_compat": "EINVAL",
        "pasid_replace_parent": OK,
        "pasid_replace_nested": OK,
        "destroy_nested_pasid_busy": "EBUSY",
        "replace_rid_nested_pasid": OK,
        "replace_rid_nested_no_pasid": "EINVAL",
        "pasid_detach": OK,
        "replace_rid_nested_no_pasid_now": OK,
    }
    assert_kernel(steps, expected)
    assert set(steps) == set(expected), set(steps) ^ set(expected)
    assert fields(steps, "iotlb_default") == {"all0": "4", "all1": "4", "all2": "4"}
    for name in (
        "inv_parent",
        "inv_ioas",
        "inv_missing",
        "inv_empty",
        "inv_empty_null",
        "inv_bad_type",
        "inv_bad_type_empty",
        "inv_len_plus_1",
        "inv_len_1",
        "inv_len_page_plus_1",
        "inv_num_over_max",
        "inv_num_over_max_missing",
        "inv_null",
        "inv_len_0",
        "inv_bad_flags",
        "inv_bad_id",
        "inv_reserved",
        "inv_len_4",
    ):
        assert fields(steps, name) == {"num": "0"}, name
    # entry_num out: the entries handled before the one that failed
    assert fields(steps, "inv_unreadable_entry") == {"num": "1", "iotlb": "0VVV"}
    assert fields(steps, "iotlb_untouched") == {"all": "4"}
    assert fields(steps, "inv_partial_flags") == {"num": "1", "iotlb": "0VVV"}
    assert fields(steps, "inv_partial_id") == {"num": "1", "iotlb": "0VVV"}
    assert fields(steps, "inv_one") == {"num": "1", "iotlb": "00VV"}
    assert fields(steps, "inv_two") == {"num": "2", "iotlb": "0000"}
    assert fields(steps, "inv_all_bad_id") == {"num": "0", "iotlb": "VVVV"}
    assert fields(steps, "inv_all") == {"num": "1", "iotlb": "0000"}
    # the invalidation happened; only writing entry_num back failed
    assert fields(steps, "inv_readonly_cmd") == {"num": "1", "iotlb2_cleared": "1"}
    assert fields(steps, "replace_nested0") == {"same": "1"}
    assert fields(steps, "replace_nested1") == {"same": "1"}
    assert fields(steps, "mock_on_nested") == {"same": "1"}
    # the client exited with nested HWPTs allocated and attached: its release takes all
    mock = selftest_daemon.system.mock_iommu
    await wait_until(lambda: not mock.dev_ids and not selftest_daemon.system.contexts, what="release")


async def test_nested_objects(selftest_daemon):
    """The object model behind test_nested: a nested HWPT holds a users reference on
    its parent, attaches through the parent's IOAS, and its mock domain keeps the
    parent's (stage-2) domain; `iommufd-cuse status` names the parent."""
    import json

    from iommufd_cuse import service
    from iommufd_cuse.client import AsyncIommufd
    from iommufd_cuse.iommufd.hw_pagetable import HwptNested
    from iommufd_cuse.iommufd.selftest import MockNestedDomain

    fd = await AsyncIommufd.open(Path(selftest_daemon.dev_dir) / "iommu")
    try:
        ioas = await fd.ioas_alloc()
        r = await fd.raw(uapi.IOMMU_TEST_CMD, uapi.iommu_test_cmd, **_tc(uapi.IOMMU_TEST_OP_MOCK_DOMAIN, ioas))
        assert r.rc == 0, r
        md = uapi.IOMMU_TEST_OP_STRUCTS[uapi.IOMMU_TEST_OP_MOCK_DOMAIN].unpack(r.out.data)
        r = await fd.raw(
            uapi.IOMMU_HWPT_ALLOC,
            uapi.iommu_hwpt_alloc,
            dev_id=md.out_idev_id,
            pt_id=ioas,
            flags=uapi.IOMMU_HWPT_ALLOC_NEST_PARENT,
        )
        assert r.rc == 0, r
        parent_id = r.out.out_hwpt_id
        import ctypes

        cfg = ctypes.create_string_buffer(uapi.iommu_hwpt_selftest.pack(uapi.iommu_hwpt_selftest.new(iotlb=7)))
        r = await fd.raw(
            uapi.IOMMU_HWPT_ALLOC,
            uapi.iommu_hwpt_alloc,
            dev_id=md.out_idev_id,
            pt_id=parent_id,
            data_type=uapi.IOMMU_HWPT_DATA_SELFTEST,
            data_len=uapi.iommu_hwpt_selftest.SIZE,
            data_uptr=ctypes.addressof(cfg),
        )
        assert r.rc == 0, r
        nested_id = r.out.out_hwpt_id
        ctx = next(iter(selftest_daemon.system.contexts))
        parent, nested = ctx.get(parent_id), ctx.get(nested_id)
        assert isinstance(nested, HwptNested) and nested.parent is parent
        assert parent.users == 2  # the table's and the nested HWPT's
        assert isinstance(nested.domain, MockNestedDomain) and nested.domain.parent is parent.domain
        assert nested.domain.iotlb == [7] * uapi.MOCK_NESTED_DOMAIN_IOTLB_NUM
        assert nested.ioas is parent.ioas
        r = await fd.raw(
            uapi.IOMMU_TEST_CMD,
            uapi.iommu_test_cmd,
            **_tc(uapi.IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, md.out_stdev_id, pt_id=nested_id),
        )
        assert r.rc == 0, r
        group = ctx.get(md.out_idev_id).device.group
        assert group.domain is nested.domain
        st = json.loads(json.dumps(service.collect_status(selftest_daemon)))
        objs = {o["id"]: o for o in st["contexts"][0]["objects"]}
        assert objs[nested_id]["type"] == "hwpt_nested" and objs[nested_id]["parent"] == parent_id
        assert objs[nested_id]["ioas"] == ioas
        await fd.destroy(md.out_stdev_id)
        assert nested.users == 1
        await fd.destroy(nested_id)
        assert parent.users == 1
    finally:
        await fd.close()


async def test_nested_not_on_vtd(cbuild):
    """The emulated VT-d IOMMU does not nest: HWPT_ALLOC on a NEST_PARENT parent is
    EOPNOTSUPP, and IOMMU_HWPT_INVALIDATE of its paging HWPT is mainline's EINVAL."""
    import ctypes
    import os

    from clientkit import config_daemon

    from iommufd_cuse import config
    from iommufd_cuse.client import AsyncIommufd, AsyncVfioDevice

    toml = config.DEFAULT_TOML.replace("nest_parent = false", "nest_parent = true")
    async with config_daemon(toml) as d:
        fd = await AsyncIommufd.open(os.path.join(d.dev_dir, "iommu"))
        dev = await AsyncVfioDevice.open(os.path.join(d.dev_dir, "vfio/devices/vfio0"))
        try:
            devid = await dev.bind(fd.fd)
            ioas = await fd.ioas_alloc()
            r = await fd.raw(
                uapi.IOMMU_HWPT_ALLOC,
                uapi.iommu_hwpt_alloc,
                dev_id=devid,
                pt_id=ioas,
                flags=uapi.IOMMU_HWPT_ALLOC_NEST_PARENT,
            )
            assert r.rc == 0, r
            parent = r.out.out_hwpt_id
            cfg = ctypes.create_string_buffer(uapi.iommu_hwpt_selftest.SIZE)
            for data_type in (uapi.IOMMU_HWPT_DATA_SELFTEST, uapi.IOMMU_HWPT_DATA_VTD_S1):
                r = await fd.raw(
                    uapi.IOMMU_HWPT_ALLOC,
                    uapi.iommu_hwpt_alloc,
                    dev_id=devid,
                    pt_id=parent,
                    data_type=data_type,
                    data_len=len(cfg),
                    data_uptr=ctypes.addressof(cfg),
                )
                assert r.errno == errno.EOPNOTSUPP, r
            reqs = ctypes.create_string_buffer(16)
            r = await fd.raw(
                uapi.IOMMU_HWPT_INVALIDATE,
                uapi.iommu_hwpt_invalidate,
                hwpt_id=parent,
                data_uptr=ctypes.addressof(reqs),
                data_type=uapi.IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
                entry_len=16,
                entry_num=1,
            )
            assert r.errno == errno.EINVAL and r.out.entry_num == 0, r
        finally:
            await dev.close()
            await fd.close()


# -- accesses, through the companion library ------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def preload() -> Path:
    """The companion as the package installs it (`iommufd-cuse companion`)."""
    import sys

    exe = Path(sys.executable).parent / "iommufd-cuse"
    out = subprocess.run([str(exe), "companion"], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert path.is_file(), path
    return path


async def test_access_with_companion(selftest_daemon, cbuild, preload):
    steps = await companion_client(selftest_daemon, cbuild, preload, "selftest_access")
    assert_kernel(
        steps,
        {
            "map": OK,
            "map_ro": OK,
            "create": OK,
            "ioas2": OK,
            "destroy_access_obj": "EBUSY",
            "destroy_ioas_with_access": "EBUSY",
            "access_pages_iommufd": "EBADFD",
            "refs_none": OK,
            "pages": OK,
            "refs_pinned": OK,
            "refs_rest": OK,
            "pages_wrong_uptr": "EBADE",
            "pages_no_uptr": OK,
            "pages_unaligned": "EINVAL",
            "pages_beyond": "ENOENT",
            "pages_zero": "EINVAL",
            "pages_ro_write": "EPERM",
            "pages_ro_read": OK,
            "destroy_pages_missing": "ENOENT",
            "destroy_pages": OK,
            "destroy_pages_again": "ENOENT",
            "destroy_pages_no_uptr": OK,
            "refs_unpinned": OK,
            "rw_read": OK,
            "rw_write": OK,
            "rw_slow": OK,
            "rw_zero": "EINVAL",
            "rw_beyond": "ENOENT",
            "rw_ro_write": "EPERM",
            "rw_ro_read": OK,
            "rw_bad_uptr": "EFAULT",
            "other_map": OK,
            "other_create": OK,
            "other_rw": OK,
            "number_reused_rw": OK,
            "number_reused_iommufd": "EBADFD",
            "number_restored_rw": OK,
            "child_rw": OK,
            "pages_again": OK,
            "unmap_pinned": OK,
            "refs_after_unmap": OK,
            "destroy_pages_unmapped": "ENOENT",
            "replace_missing": "ENOENT",
            "replace": OK,
            "rw_empty_ioas": "ENOENT",
            "map2": OK,
            "rw_ioas2": OK,
            "destroy_old_ioas": OK,
            "replace_same": OK,
            "create_nopin": OK,
            "pages_nopin": "EOPNOTSUPP",
            "rw_nopin": OK,
            "map_2k": OK,
            "create_unaligned_ioas": "EADDRINUSE",
            "create_nopin_unaligned": OK,
            "map_2k_with_pin_access": "EINVAL",
            "pages_before_close": OK,
            "destroy_ioas2_after_close": OK,
            "refs_closed": OK,
            "pages_closed_fd": "EBADFD",
        },
    )
    # a real, close-on-exec descriptor; the access object took id 2 (so the next IOAS is 3)
    assert fields(steps, "create") == {"fd_ok": "1", "cloexec": "1"}
    assert fields(steps, "ioas2") == {"id": "3"}
    assert fields(steps, "pages") == {"id": "0"}
    assert fields(steps, "pages_no_uptr") == {"id": "1"}
    assert fields(steps, "pages_again") == {"id": "3"}  # ids only advance on success
    assert fields(steps, "pages_before_close") == {"id": "4"}
    assert fields(steps, "child_rw") == {"ok": "1"}
    for name in ("rw_read", "rw_write", "rw_slow", "rw_ioas2", "number_reused_rw", "number_restored_rw"):
        assert fields(steps, name) == {"same": "1"}, name
    await wait_until(lambda: selftest_daemon.system.pinned_pages() == 0, what="all unpinned")
    assert not getattr(selftest_daemon.system, "selftest_pending_accesses", {})


@pytest.fixture
def hugepages() -> None:
    """A few free 2 MiB huge pages for the test: nr_hugepages raised if too low (set back
    afterwards unless someone else changed it meanwhile)."""
    path = Path("/proc/sys/vm/nr_hugepages")
    was = int(path.read_text())
    if was < 8:
        path.write_text("8")
    now = int(path.read_text())
    yield
    if now != was and int(path.read_text()) == now:
        path.write_text(str(was))


async def test_access_hugetlb(selftest_daemon, cbuild, preload, hugepages):
    """Hugetlb memory, which the daemon can map only in whole huge pages: one small page
    of a MAP_SHARED | MAP_HUGETLB buffer pinned by an access (the kernel selftest's
    access_domain_destory), read through it, in a mock domain that is destroyed under
    the pin; a hugetlb memfd mapped with IOAS_MAP_FILE from a small-page offset."""
    import os

    exe = cbuild("selftest_access")
    p = await run(
        [exe, Path(selftest_daemon.dev_dir) / "iommu", "hugetlb"], env=dict(os.environ, LD_PRELOAD=str(preload))
    )
    assert b"nohuge" not in p.stdout, "no free huge page"
    steps = parse_steps(p.stdout)
    assert_kernel(
        steps,
        {
            "huge_map": OK,
            "huge_create": OK,
            "huge_pages": OK,
            "huge_rw": OK,
            "huge_mock_domain": OK,
            "huge_check_map": OK,
            "huge_destroy_stdev": OK,
            "huge_destroy_pages": OK,
            "huge_file_mock_domain": OK,
            "huge_map_file": OK,
            "huge_file_check_map": OK,
            "huge_file_check_map_other": "EINVAL",
        },
    )
    assert fields(steps, "huge_rw") == {"same": "1"}
    await wait_until(lambda: selftest_daemon.system.pinned_pages() == 0, what="all unpinned")


async def test_access_protocol_and_context_close(selftest_daemon):
    """The companion's protocol done by hand: a token for CREATE_ACCESS marked by the
    companion, claimed once on the access node by the process that asked. Closing the
    iommufd with the access file still open keeps the context alive until the access
    file is closed, as the kernel does."""
    import ctypes
    import fcntl
    import mmap
    import os

    from iommufd_cuse.client import AsyncIommufd
    from iommufd_cuse.iommufd import selftest as st
    from iommufd_cuse.iommufd.companion import COMPANION_MAGIC

    system = selftest_daemon.system
    fd = await AsyncIommufd.open(Path(selftest_daemon.dev_dir) / "iommu")
    ioas = await fd.ioas_alloc()
    buf = mmap.mmap(-1, 1 << 16)
    buf[:] = b"x" * len(buf)
    va = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    await fd.map(ioas, va, 1 << 16, iova=0x100000)

    async def create() -> int:
        r = await fd.raw(
            uapi.IOMMU_TEST_CMD,
            uapi.iommu_test_cmd,
            reserved=COMPANION_MAGIC,
            **_tc(uapi.IOMMU_TEST_OP_CREATE_ACCESS, ioas, flags=1),
        )
        assert r.rc == 0, r
        token = uapi.IOMMU_TEST_OP_STRUCTS[uapi.IOMMU_TEST_OP_CREATE_ACCESS].unpack(r.out.data).out_access_fd
        assert token >= st.ACCESS_TOKEN_BASE  # never a descriptor number
        return token

    def claim(afd: int, token: int) -> int:
        try:
            fcntl.ioctl(afd, st.ACCESS_CLAIM, token)
        except OSError as e:
            return e.errno
        return 0

    node = Path(selftest_daemon.mountpoint) / st.ACCESS_NODE
    token, unclaimed = await create(), await create()
    assert token != unclaimed
    afd = await trio.to_thread.run_sync(os.open, node, os.O_RDWR)
    other = await trio.to_thread.run_sync(os.open, node, os.O_RDWR)
    try:
        assert await trio.to_thread.run_sync(claim, afd, 12345) == 22  # not a token: EINVAL
        assert await trio.to_thread.run_sync(claim, afd, token) == 0
        assert await trio.to_thread.run_sync(claim, other, token) == 22  # claimed once only
        assert await trio.to_thread.run_sync(claim, afd, unclaimed) == 22  # one access per file
        r = await fd.raw(
            uapi.IOMMU_TEST_CMD,
            uapi.iommu_test_cmd,
            **_tc(uapi.IOMMU_TEST_OP_ACCESS_PAGES, afd, iova=0x100000, length=8192, uptr=va),
        )
        assert r.rc == 0, r
        r = await fd.raw(
            uapi.IOMMU_TEST_CMD,
            uapi.iommu_test_cmd,
            **_tc(uapi.IOMMU_TEST_OP_ACCESS_PAGES, other, iova=0x100000, length=4096, uptr=va),
        )
        assert r.errno == 77, r  # EBADFD: an access node file that holds no access
        assert system.pinned_pages() == 2
        (ctx,) = system.contexts
        await fd.close()
        await wait_until(lambda: ctx.file_released, what="the iommufd released")
        # The access file keeps the context alive (iommufd_ctx_get), as in the kernel.
        assert system.contexts == {ctx} and system.pinned_pages() == 2
        fd2 = await AsyncIommufd.open(Path(selftest_daemon.dev_dir) / "iommu")
        r = await fd2.raw(
            uapi.IOMMU_TEST_CMD,
            uapi.iommu_test_cmd,
            **_tc(uapi.IOMMU_TEST_OP_ACCESS_RW, afd, iova=0x100000, length=4, uptr=va),
        )
        assert r.rc == 0, r  # the access still works
        await fd2.close()
    finally:
        await trio.to_thread.run_sync(os.close, afd)
        await trio.to_thread.run_sync(os.close, other)
    # With the last file the context goes, its pins and its unclaimed token with it.
    await wait_until(lambda: not system.contexts and system.pinned_pages() == 0, what="context released")
    assert not system.pending_files.get("access")
    del buf


# -- fault queues, through the companion library --------------------------------------------------
POLLIN = 0x1


async def test_fault_queue_with_companion(selftest_daemon, cbuild, preload):
    steps = await companion_client(selftest_daemon, cbuild, preload, "selftest_iopf")
    assert_kernel(
        steps,
        {
            "alloc": OK,
            "alloc_flags": "EOPNOTSUPP",
            "ioas": OK,
            "mock": OK,
            "hwpt_bad_fault_id": "ENOENT",
            "hwpt_missing_fault_id": "ENOENT",
            "hwpt_fault_nest_parent": "EOPNOTSUPP",
            "hwpt_fault": OK,
            "destroy_fault_busy": "EBUSY",
            "poll_empty": OK,
            "read_empty": OK,
            "trigger_not_attached": OK,
            "read_dropped": OK,
            "trigger_bad_dev": "ENOENT",
            "replace": OK,
            "trigger": OK,
            "poll_ready": OK,
            "read_short": "ESPIPE",
            "read_unaligned": "ESPIPE",
            "read": OK,
            "poll_drained": OK,
            "write_short": "ESPIPE",
            "write_bad_code": "EINVAL",
            "write_bad_cookie": "EINVAL",
            "write": OK,
            "write_again": "EINVAL",
            "trigger_a": OK,
            "trigger_b": OK,
            "trigger_pasid_dropped": OK,
            "read_one_of_two": OK,
            "read_rest": OK,
            "write_partial": OK,
            "poll_wakeup": OK,
            "read_woken": OK,
            "trigger_before_replace": OK,
            "replace_back": OK,
            "read_after_replace": OK,
            "respond_after_replace": "EINVAL",
            "fault2": OK,
            "parent": OK,
            "nested_fault": OK,
            "replace_nested": OK,
            "trigger_pasid": OK,
            "read_nested": OK,
            "respond_nested": OK,
            "read_other_queue": OK,
            "destroy_hwpt": OK,
            "destroy_fault_open": "EBUSY",
            "destroy_fault": OK,
            "destroy_fault_again": "ENOENT",
            "destroy_fault2_in_use": "EBUSY",
        },
    )
    assert fields(steps, "alloc") == {"id": "1", "fd_ok": "1", "cloexec": "1"}
    assert fields(steps, "alloc_flags") == {"fd": "-1"}
    assert fields(steps, "poll_empty") == {"revents": "0"}  # POLLOUT is always set, but not asked for
    assert steps["read_empty"].rc == 0 and steps["read_dropped"].rc == 0
    assert fields(steps, "poll_ready") == {"revents": str(POLLIN)}
    # mainline's record: LAST_PAGE, the device object's id, length 0, cookies from 1
    assert steps["read"].rc == 40
    assert fields(steps, "read") == {
        "flags": str(uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE),
        "dev_id": "1",
        "pasid": "0",
        "grpid": "2",
        "perm": "3",
        "addr": "0xdeadbeaf",
        "length": "0",
        "cookie": "1",
        "reserved": "0",
    }
    assert fields(steps, "poll_drained") == {"revents": "0"}
    assert steps["write"].rc == 8
    assert steps["read_one_of_two"].rc == 40 and fields(steps, "read_one_of_two") == {"cookie": "1"}
    flags_pasid = uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE | uapi.IOMMU_PGFAULT_FLAGS_PASID_VALID
    assert steps["read_rest"].rc == 40
    last_page = str(uapi.IOMMU_PGFAULT_FLAGS_LAST_PAGE)
    assert fields(steps, "read_rest") == {"cookie": "2", "pasid": "0", "flags": last_page, "grpid": "4"}
    assert steps["write_partial"].rc == 16  # the bad third entry stops, the two before count
    assert fields(steps, "poll_wakeup") == {"revents": str(POLLIN), "fast": "1"}
    assert steps["read_woken"].rc == 40 and fields(steps, "read_woken") == {"grpid": "7", "cookie": "1"}
    assert steps["read_after_replace"].rc == 0
    assert steps["read_nested"].rc == 40
    assert fields(steps, "read_nested") == {"pasid": "1", "flags": str(flags_pasid), "cookie": "1"}
    assert steps["read_other_queue"].rc == 0
    assert not getattr(selftest_daemon.system, "pending_fault_files", {})


async def test_fault_queue_without_companion(selftest_daemon, plain_daemon, cbuild, caplog):
    """Without the companion FAULT_QUEUE_ALLOC is EOPNOTSUPP with a logged reason."""
    for d in (selftest_daemon, plain_daemon):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            steps = await client(d, cbuild, "selftest_iopf", "plain")
        assert_kernel(steps, {"alloc": "EOPNOTSUPP"})
        assert "companion" in caplog.text


async def test_fault_queue_normal_mode(plain_daemon, cbuild, preload):
    """The companion works without the test mode too (the node is in every mount)."""
    steps = await companion_client(plain_daemon, cbuild, preload, "selftest_iopf", "plain")
    assert_kernel(
        steps,
        {
            "alloc": OK,
            "poll_empty": OK,
            "read_empty": OK,
            "write_no_cookie": "EINVAL",
            "ioas": OK,
            "destroy_open": "EBUSY",
            "destroy_closed": OK,
        },
    )
    assert fields(steps, "alloc") == {"id": "1", "fd_ok": "1", "cloexec": "1"}
    assert fields(steps, "poll_empty") == {"revents": "0"}  # POLLOUT is always set, but not asked for
    assert steps["read_empty"].rc == 0


# -- pages of a process that is gone (the kernel's fork_gone) -----------------------------------------
async def test_fork_gone(selftest_daemon, cbuild, preload):
    """Pages a child mapped and then exited: shared memory (the kernel selftest's
    buffer) was mapped into the daemon at pin time and stays reachable, as in the
    kernel; with no domain nothing was pinned and the pin after the exit is EFAULT,
    as in the kernel. Private anonymous memory is reached in place in the child's mm,
    which is gone: the kernel would still have the pinned pages (docs/selftest.md)."""
    steps = await companion_client(selftest_daemon, cbuild, preload, "selftest_fork")
    expected = {}
    for case in ("shared", "shared_no_domain", "private", "private_no_domain"):
        expected[f"{case}_child_map"] = OK
        expected[f"{case}_unmap"] = OK
    expected.update(
        {
            "shared_new_domain": OK,
            "shared_read": OK,
            "shared_write": OK,
            "shared_no_domain_new_domain": "EFAULT",  # the kernel's fork_gone without a domain
            "shared_no_domain_read": "EFAULT",
            "shared_no_domain_write": "EFAULT",
            "private_new_domain": OK,
            "private_read": "ESRCH",  # divergence: the kernel reads the pinned pages
            "private_write": "ESRCH",
            "private_no_domain_new_domain": "EFAULT",
            "private_no_domain_read": "EFAULT",
            "private_no_domain_write": "EFAULT",
        }
    )
    assert_kernel(steps, expected)
    assert fields(steps, "shared_read") == {"same": "1"}
    assert fields(steps, "shared_write") == {"seen": "1"}  # the same shared pages


# -- dma-bufs ---------------------------------------------------------------------------------------
def _dmabuf_memfds() -> int:
    """Memfds of the selftest's dma-bufs open in this process (the daemon's)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "iommufd-test-dmabuf" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


async def test_dmabuf_with_companion(selftest_daemon, cbuild, preload):
    """DMABUF_GET through the companion, IOAS_MAP_FILE of the dma-buf and
    DMABUF_REVOKE with mainline's semantics: a revoke takes the translations out of
    every domain for good, a map of a revoked dma-buf is ENODEV, the pages are no
    access's. Nothing is left once the client is gone."""
    steps = await companion_client(selftest_daemon, cbuild, preload, "selftest_dmabuf")
    assert_kernel(
        steps,
        {
            "ioas": OK,
            "mock": OK,
            "dirty_hwpt": OK,
            "dirty_on": OK,
            "get_zero": "EINVAL",
            "get_too_long": "EINVAL",  # 513 pages once rounded up
            "get_max": OK,
            "get": OK,
            "get_no_cloexec": OK,
            "map_zero": "EINVAL",
            "map_past_end": "EINVAL",
            "map_too_long": "EINVAL",
            "map": OK,
            "map_again_fixed": "EEXIST",
            "access": OK,
            "access_rw": "EINVAL",  # iopt_pages_rw_access: not for a dma-buf
            "access_pages": "EINVAL",
            "revoke_no_fd": "EBADF",
            "revoke_memfd": "EINVAL",
            "revoke_iommufd": "EINVAL",
            "revoke": OK,
            "revoked_domain": OK,
            "map_revoked": "ENODEV",
            "hwpt_after_revoke": OK,  # the revoked area is skipped, not an error
            "revoke_again": OK,
            "unrevoke": OK,
            "map_restored": OK,
            "old_area": OK,
            "unmap_old": OK,
            "map_fixed_again": OK,
            "closed": OK,
            "revoke_closed": "EBADF",
            "ioas2": OK,
            "mock2": OK,
            "map2": OK,
            "copy2": OK,
            "revoke2": OK,
            "unmap_copy": OK,
            "destroy_stdev2": OK,
            "destroy_ioas2": OK,
            "unmap_all": OK,
            "destroy_hwpt2": OK,
            "destroy_dirty_hwpt": OK,
        },
    )
    assert fields(steps, "get") == {"fd_ok": "1", "cloexec": "1"}
    assert fields(steps, "get_no_cloexec") == {"fd_ok": "1", "cloexec": "0"}
    assert fields(steps, "map")["translated"] == "0xf"
    assert fields(steps, "revoked_domain")["translated"] == "0"
    assert fields(steps, "map_restored")["translated"] == "0xf"
    assert fields(steps, "old_area")["translated"] == "0"  # revoked for good
    assert fields(steps, "map_fixed_again")["translated"] == "0xf"
    assert fields(steps, "closed")["translated"] == "0xf"  # the mapping holds the dma-buf
    await wait_until(lambda: not selftest_daemon.system.contexts)
    assert not selftest_daemon.system.pending_files.get("dmabuf")
    await wait_until(lambda: _dmabuf_memfds() == 0)


# -- vIOMMUs, vdevices, vEVENT queues --------------------------------------------------------------
VIOMMU_SETUP = {"ioas": OK, "mock": OK, "mock2": OK, "parent": OK, "paging": OK}  # selftest_viommu's first steps


async def test_viommu_with_companion(selftest_daemon, cbuild, preload):
    steps = await companion_client(selftest_daemon, cbuild, preload, "selftest_viommu")
    assert_kernel(
        steps,
        {
            **VIOMMU_SETUP,
            # IOMMU_VIOMMU_ALLOC, in mainline's order
            "viommu_flags": "EOPNOTSUPP",
            "viommu_type_default": "EOPNOTSUPP",
            "viommu_bad_dev": "ENOENT",
            "viommu_type_smmu": "EOPNOTSUPP",  # the mock has no vIOMMU of that type
            "viommu_bad_hwpt": "ENOENT",  # not a paging HWPT
            "viommu_not_parent": "EINVAL",
            "viommu_data_short": "EINVAL",
            "viommu_data_null": "EFAULT",
            "viommu": OK,
            "viommu2": OK,
            # mmap() of its region, through the companion: iommufd_fops_mmap's checks
            "viommu3": OK,
            "mmap_past_start": "ENXIO",
            "mmap_half": "ENXIO",
            "mmap_double": "ENXIO",
            "mmap_none": "ENXIO",
            "mmap_private": "EINVAL",
            "mmap_exec": "EPERM",
            "mmap": OK,
            "mmap_twice": OK,
            "mmap_destroy_busy": "EBUSY",  # a mapping holds the vIOMMU
            "mmap_child_busy": "EBUSY",  # so does a forked copy of one
            "mmap_child": OK,
            "mmap_destroy": OK,
            "mmap_gone": "ENXIO",
            "destroy_parent_busy": "EBUSY",
            # IOMMU_VDEVICE_ALLOC
            "vdev_bad_viommu": "ENOENT",
            "vdev_bad_dev": "ENOENT",
            "vdev": OK,
            "vdev_again": "EEXIST",
            "vdev_other_viommu": "EEXIST",  # one vdevice per device
            "vdev_id_taken": "EEXIST",
            "vdev2": OK,
            "destroy_viommu_busy": "EBUSY",
            # nested HWPTs on a vIOMMU
            "nest_bad_flags": "EOPNOTSUPP",
            "nest_no_data": "EOPNOTSUPP",
            "nest": OK,
            "replace_no_vdev": "ENOENT",  # mock_domain_nop_attach: no vdevice on that vIOMMU
            "destroy_nest_viommu2": OK,
            "nest_viommu": OK,
            "replace": OK,
            "destroy_nest_busy": "EBUSY",
            # IOMMU_HWPT_INVALIDATE of the vIOMMU, read back with DEV_CHECK_CACHE
            "cache_default": OK,
            "inv_empty": OK,
            "inv_empty_bad_type": "EINVAL",
            "inv_bad_type": "EINVAL",
            "inv_bad_flags": "EOPNOTSUPP",
            "inv_bad_cache_id": "EINVAL",
            "inv_bad_vdev_id": "EINVAL",
            "inv_one": OK,
            "inv_partial": "EOPNOTSUPP",
            "inv_bad_ptr": "EFAULT",
            "inv_all": OK,
            # HW queues
            "hwq_flags": "EOPNOTSUPP",
            "hwq_type_default": "EOPNOTSUPP",
            "hwq_length0": "EINVAL",
            "hwq_wraps": "EOVERFLOW",
            "hwq_bad_viommu": "ENOENT",
            "hwq_unmapped": "ENOENT",  # the internal access pins nothing there
            "hwq_map": OK,
            "hwq_map2": OK,
            "hwq_other_type": "EOPNOTSUPP",  # the mock has only IOMMU_HW_QUEUE_TYPE_SELFTEST
            "hwq_index1_first": "EIO",  # index 1 needs index 0
            "hwq_index_max": "EINVAL",
            "hwq_not_contiguous": "EFAULT",
            "hwq0": OK,
            "hwq0_again": "EEXIST",
            "hwq_unmap_pinned": "EBUSY",  # the queue's access locks the area
            "hwq_unmap_other": OK,
            "hwq1": OK,
            "hwq_destroy_busy": "EBUSY",  # queue 1 depends on queue 0
            "hwq_destroy_viommu_busy": "EBUSY",
            "hwq_destroy1": OK,
            "hwq_destroy0": OK,
            "hwq_unmap": OK,
            # vEVENT queues
            "trigger_no_queue": "EOPNOTSUPP",
            "trigger_not_attached": "ENOENT",
            "veventq_flags": "EOPNOTSUPP",
            "veventq_reserved": "EOPNOTSUPP",
            "veventq_type_default": "EOPNOTSUPP",
            "veventq_depth0": "EINVAL",
            "veventq_depth_over": "EINVAL",  # VEVENTQ_MAX_DEPTH is 1 << 19
            "veventq_depth_max": OK,
            "destroy_veventq_max": OK,
            "veventq_bad_viommu": "ENOENT",
            "veventq": OK,
            "veventq_same_type": "EEXIST",
            "veventq_other_type": OK,
            "poll_empty": OK,
            "read_empty": OK,
            "read_zero": "EINVAL",  # below a header: asked of the daemon by the companion
            "read_below_header": "EINVAL",
            "write": "EINVAL",
            "trigger": OK,
            "poll_ready": OK,
            "read_too_short": "EINVAL",  # the header fits, the event's data does not
            "read": OK,
            "poll_drained": OK,
            "trigger_a": OK,
            "trigger_b": OK,
            "trigger_c": OK,
            "trigger_d": OK,
            "read_overflow": OK,
            "trigger_e": OK,
            "trigger_f": OK,
            "trigger_g": OK,
            "trigger_h": OK,
            "read_one": OK,
            "trigger_i": OK,
            "read_rest": OK,
            "poll_wakeup": OK,
            "read_woken": OK,
            "replace_back": OK,
            "trigger_detached": "ENOENT",
            # lifetime
            "destroy_viommu_in_use": "EBUSY",
            "destroy_veventq_open": "EBUSY",
            "destroy_veventq": OK,
            "destroy_nest": OK,
            "destroy_vdev": OK,
            "destroy_vdev_again": "ENOENT",
            "destroy_veventq2": OK,
            "destroy_stdev2": OK,
            "destroy_vdev2_gone": "ENOENT",
            "destroy_viommu": OK,
            "destroy_viommu2": OK,
            "destroy_parent": OK,
        },
    )
    assert fields(steps, "viommu") == {"out_data": "0xbadbeef", "mmap_len": "8192", "mmap_off_ok": "1"}
    assert fields(steps, "mmap") == fields(steps, "mmap_twice") == {"in_data": "0x5eed"}  # the loopback page
    assert fields(steps, "mmap_child") == {"ok": "1"}
    assert not selftest_daemon.tree.root.children["iommufd-cuse"].children["mmap"].children
    assert fields(steps, "cache_default") == {"first_changed": "-1"}
    assert fields(steps, "hwq0") == fields(steps, "hwq1") == {"id_ok": "1"}
    for name in (
        "inv_empty",
        "inv_empty_bad_type",
        "inv_bad_type",
        "inv_bad_flags",
        "inv_bad_cache_id",
        "inv_bad_vdev_id",
        "inv_bad_ptr",
    ):
        assert fields(steps, name)["num"] == "0", name
    assert fields(steps, "inv_one") == {"num": "1", "mask": "2"}  # cache 1 of the device zeroed
    assert fields(steps, "inv_partial") == {"num": "2", "mask": "9"}  # caches 0 and 3, then the bad entry
    assert fields(steps, "inv_all") == {"num": "1", "mask": "15"}
    assert fields(steps, "veventq") == {"fd_ok": "1", "cloexec": "1"}
    assert fields(steps, "poll_empty") == {"revents": "0"}  # no POLLOUT: the file has no write
    assert steps["read_empty"].rc == 0
    assert fields(steps, "poll_ready") == {"revents": str(POLLIN)}
    # iommufd_vevent_header (8 bytes) + iommu_viommu_event_selftest (4 bytes)
    assert steps["read"].rc == 12
    assert fields(steps, "read") == {"flags": "0", "seq": "0", "virt_id": "0x99"}
    assert fields(steps, "poll_drained") == {"revents": "0"}
    # depth 2: two events, then one LOST_EVENTS header (no data) carrying the newest sequence
    assert steps["read_overflow"].rc == 12 + 12 + 8
    assert fields(steps, "read_overflow") == {
        "seq0": "1",
        "flags0": "0",
        "seq1": "2",
        "flags1": "0",
        "lost_flags": str(uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS),
        "lost_seq": "4",
    }
    assert steps["read_one"].rc == 12 and fields(steps, "read_one") == {"seq": "5"}
    # an event reported with room again replaces the header at the tail: 6, then 9
    assert steps["read_rest"].rc == 24
    assert fields(steps, "read_rest") == {"seq0": "6", "seq1": "9", "flags1": "0"}
    assert fields(steps, "poll_wakeup") == {"revents": str(POLLIN), "fast": "1"}
    assert steps["read_woken"].rc == 12 and fields(steps, "read_woken") == {"virt_id": "0x99"}
    assert not selftest_daemon.system.pending_files.get("veventq")


async def test_viommu_without_companion(selftest_daemon, cbuild, caplog):
    """Without the companion VEVENTQ_ALLOC is EOPNOTSUPP with a logged reason (after
    mainline's own checks); the vIOMMU and the vdevice left behind go with the context
    (the vdevice with its device, not twice)."""
    with caplog.at_level(logging.WARNING):
        steps = await client(selftest_daemon, cbuild, "selftest_viommu", "plain")
    assert_kernel(
        steps,
        {
            **VIOMMU_SETUP,
            "viommu": OK,
            "veventq": "EOPNOTSUPP",
            "mmap": "ENODEV",  # FUSE's answer for MAP_SHARED of a direct-I/O file
            "vdev": OK,
        },
    )
    assert "companion" in caplog.text
    await wait_until(lambda: not selftest_daemon.system.contexts)
    assert "still in use" not in caplog.text
    assert "failed" not in caplog.text


def test_veventq_queue_semantics():
    """iommufd_viommu_report_event / iommufd_veventq_fops_read on the object alone."""
    from types import SimpleNamespace

    from iommufd_cuse.iommufd.viommu import Veventq

    vi = SimpleNamespace(users=1, veventqs=[])
    q = Veventq(SimpleNamespace(system=SimpleNamespace()), vi, uapi.IOMMU_VEVENTQ_TYPE_SELFTEST, 1)
    assert vi.users == 2 and vi.veventqs == [q]
    hdr = uapi.iommufd_vevent_header
    q.report(b"abcd")
    q.report(b"efgh")  # lost: seq 1
    q.report(b"ijkl")  # lost again: the header now carries seq 2
    out = q.read(100)
    assert len(out) == 12 + 8
    assert hdr.unpack(out[:8]).sequence == 0 and out[8:12] == b"abcd"
    lost = hdr.unpack(out[12:20])
    assert lost.flags == uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS and lost.sequence == 2
    assert q.read(100) == b"" and not q.readable()
    q.report(b"mnop")
    q.report(b"qrst")  # lost: a header of 8 bytes after the event
    for short in (0, 7, 11):  # below a header; the first event's data does not fit
        with pytest.raises(Errno) as e:
            q.read(short)
        assert e.value.errno == errno.EINVAL
    assert q.read(12)[8:] == b"mnop"
    assert hdr.unpack(q.read(8)).flags == uapi.IOMMU_VEVENTQ_FLAG_LOST_EVENTS  # a lost header needs only 8
    q.users = 0
    q.destroy()
    assert vi.users == 1 and vi.veventqs == []
