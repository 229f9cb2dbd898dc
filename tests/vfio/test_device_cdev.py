"""The VFIO device cdev end to end (drivers/vfio/device_cdev.c, vfio_main.c,
vfio_pci_core.c, vfio_pci_intrs.c, drivers/iommu/iommufd/device.c): QEMU's iommufd
start-up sequence as a C client (tests/clients/qemu_startup.c) on every device model
of the default topology, the kernel's errnos for bad input, DMA that follows the
attachment (blocked before attach and after detach, only mapped IOVAs with the right
permission, the new table after a replace), and what closing or killing a client
leaves behind (nothing).

Expected values are the real kernel's (shared/reference/, and mainline where the
reference has no answer). Ownership of groups across contexts: tests/iommu/test_core.py.
"""

from __future__ import annotations

import errno as E
import mmap
import os
import signal
import subprocess
import threading
from collections.abc import Callable

import pytest
import trio
from clientkit import Step, mismatches, parse_steps

from iommufd_cuse import uapi
from iommufd_cuse.client import AsyncIommufd, AsyncVfioDevice
from iommufd_cuse.vfio.pci import edu as EDU

# (tests/conftest.py's helpers cannot be imported from here: tests/vfio/conftest.py
# takes the module name; its fixtures, `daemon`, `cbuild` and `scripted`, are available.)

BAR0, CONFIG = 0, uapi.VFIO_PCI_CONFIG_REGION_INDEX
R = uapi.IOMMU_IOAS_MAP_READABLE
RW_IOVA, RO_IOVA, OTHER_IOVA = 0x400000, 0x800000, 0x900000
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)
TO_RAM = EDU.DMA_CMD_TO_RAM
CLIENT_TIMEOUT = 30


# -- helpers -------------------------------------------------------------------------------
def assert_outcomes(steps: dict[str, Step], expected: dict[str, str]) -> None:
    problems = mismatches(steps, expected)
    assert not problems, "answers differ from the kernel's:\n" + "\n".join(problems)


def node(daemon, name: str) -> str:
    return os.path.join(daemon.dev_dir, name)


def vfio(daemon, n: int) -> str:
    return node(daemon, f"vfio/devices/vfio{n}")


async def client(daemon, cbuild, dev: int, scenario: str) -> dict[str, Step]:
    exe = cbuild("qemu_startup")
    argv = [str(exe), node(daemon, "iommu"), vfio(daemon, dev), scenario]
    with trio.fail_after(CLIENT_TIMEOUT):
        p = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert p.returncode == 0, f"{argv} exited {p.returncode}\n{p.stdout.decode()}\n{p.stderr.decode()}"
    return parse_steps(p.stdout)


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll on the trio loop (the daemon keeps serving): FUSE sends RELEASE only after
    the client's close() or exit, so what a release undoes is seen a moment later."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
    assert predicate(), f"{what}: still not so after {timeout} s"


def released(daemon) -> bool:
    """Nothing of any client is left: no context, no pin, no charge, every group back
    with the kernel in its default domain, every device closed."""
    s = daemon.system
    return (
        not s.contexts
        and s.pinned_pages() == 0
        and not s.accounting.user
        and not s.accounting.mm
        and all(g.owner is None and g.owner_cnt == 0 and g.domain is g.default_domain for g in s.groups.values())
        and all(not d.vfio.in_use for d in s.devices)
    )


def state(daemon) -> str:
    s = daemon.system
    return (
        f"contexts={len(s.contexts)} pinned={s.pinned_pages()} accounting={dict(s.accounting.user)}/"
        f"{dict(s.accounting.mm)} groups={[g.status() for g in s.groups.values()]} "
        f"in_use={[d.vfio.in_use for d in s.devices]}"
    )


async def assert_released(daemon) -> None:
    await wait_until(lambda: released(daemon), f"everything released ({state(daemon)})")


def anon(size: int, fill: int = 0) -> mmap.mmap:
    m = mmap.mmap(-1, size)
    m[:] = bytes([fill]) * size
    return m


async def expect_errno(err: int, coro) -> None:
    with pytest.raises(OSError) as e:
        await coro
    assert e.value.errno == err, f"got {E.errorcode.get(e.value.errno)}, want {E.errorcode[err]}"


async def hwpt_alloc(fd: AsyncIommufd, dev_id: int, pt_id: int, flags: int = 0) -> int:
    return (
        await fd.call(uapi.IOMMU_HWPT_ALLOC, uapi.iommu_hwpt_alloc, flags=flags, dev_id=dev_id, pt_id=pt_id)
    ).out_hwpt_id


class Edu:
    """Driving one edu function from the test (its calls run in worker threads)."""

    def __init__(self, daemon, n: int, dev: AsyncVfioDevice) -> None:
        self.dev = dev
        self.vdev = daemon.system.devices[n].vfio
        self.group = daemon.system.devices[n].group

    async def bus_master(self) -> None:
        cmd = await self.dev.pread(CONFIG, 4, 2)
        await self.dev.pwrite(CONFIG, 4, 2, cmd | 0x4)

    async def load_buffer(self, data: bytes) -> None:
        """Put data in the device's buffer through BAR0 (no DMA)."""
        n = await trio.to_thread.run_sync(os.pwrite, self.dev.fd, data, EDU.BUF_START)
        assert n == len(data)

    async def buffer(self, length: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.dev.fd, length, EDU.BUF_START)

    async def dma(self, src: int, dst: int, count: int, cmd: int) -> int:
        for reg, val in ((EDU.REG_DMA_SRC, src), (EDU.REG_DMA_DST, dst), (EDU.REG_DMA_COUNT, count)):
            await self.dev.pwrite(BAR0, reg, 8, val)
        await self.dev.pwrite(BAR0, EDU.REG_DMA_CMD, 8, cmd | EDU.DMA_CMD_START)
        return await self.dev.pread(BAR0, EDU.REG_DMA_CMD, 8)

    async def to_ram(self, iova: int, data: bytes) -> int:
        """edu buffer (loaded with data) -> RAM at iova; the number of new faults."""
        await self.load_buffer(data)
        before = self.vdev.fault_count
        assert await self.dma(EDU.BUF_START, iova, len(data), TO_RAM) & EDU.DMA_CMD_START == 0
        return self.vdev.fault_count - before

    async def from_ram(self, iova: int, length: int) -> tuple[int, bytes]:
        """RAM at iova -> edu buffer; (new faults, the buffer)."""
        await self.load_buffer(bytes(length))
        before = self.vdev.fault_count
        await self.dma(iova, EDU.BUF_START, length, 0)
        return self.vdev.fault_count - before, await self.buffer(length)

    @property
    def last_fault(self):  # noqa: ANN201
        return self.vdev.faults[-1]


def pattern(n: int, seed: int = 3) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- 1. QEMU's start-up sequence ---------------------------------------------------------------
EDU_REGIONS = {0: (0x3, 0x100000), CONFIG: (0x3, 0x100)}  # index -> (flags, size); others absent
ENGINE_REGIONS = {0: (0x3, 0x4000), 2: (0x3, 0x1000), CONFIG: (0x3, 0x1000)}


def _expect_common(steps: dict[str, Step], daemon) -> None:
    assert_outcomes(
        steps,
        {
            "open_cdev": "OK",
            "BIND_IOMMUFD": "OK",
            "IOAS_ALLOC": "OK",
            "GET_HW_INFO": "OK",
            "HWPT_ALLOC": "OK",
            "ATTACH_IOMMUFD_PT": "OK",
            "IOVA_RANGES_0": "EMSGSIZE",
            "IOVA_RANGES_N": "OK",
            "MAP_A": "OK",
            "MAP_B": "OK",
            "MAP_C_RO": "OK",
            "MAP_D": "OK",
            "MAP_E_AUTO": "OK",
            "GET_INFO": "OK",
            "CONFIG_READ_ALL": "OK",
            "CONFIG_IDS": "OK",
            "SET_IRQS_EVENTFD": "OK",
            "SET_IRQS_DISABLE": "OK",
            "UNMAP_ALL": "OK",
            "DETACH_IOMMUFD_PT": "OK",
            "DESTROY_HWPT": "OK",
            "DESTROY_IOAS": "OK",
            "CLOSE_DEVICE": "OK",
            "CLOSE_IOMMUFD": "OK",
        },
    )
    # ids from 1, lowest free, in the order the objects were made
    assert (
        steps["BIND_IOMMUFD"].int("out_devid"),
        steps["IOAS_ALLOC"].int("out_ioas_id"),
        steps["HWPT_ALLOC"].int("out_hwpt_id"),
        steps["ATTACH_IOMMUFD_PT"].int("pt_id"),
    ) == (1, 2, 3, 3)
    # VT-d hw info as the reference and the configuration say; the rest of the buffer zeroed
    vtd = daemon.config.iommus[0]
    hw = steps["GET_HW_INFO"]
    assert (hw.int("out_data_type"), hw.int("data_len"), hw.int("out_capabilities"), hw.int("out_max_pasid_log2")) == (
        1,
        24,
        0x8,
        0,
    )
    assert (hw.int("vtd_flags"), hw.int("cap_reg"), hw.int("ecap_reg")) == (0x1, vtd.cap_reg, vtd.ecap_reg)
    assert (vtd.cap_reg, vtd.ecap_reg) == (0xD2008C222F0606, 0xF00F4A)
    assert hw["tail_zero"] == "1"
    # the IOVA ranges of an IOAS with a VT-d device attached: the MSI window is a hole
    assert (steps["IOVA_RANGES_0"].int("num_iovas"), steps["IOVA_RANGES_0"].int("out_iova_alignment")) == (2, 0x1000)
    rng = steps["IOVA_RANGES_N"]
    assert (rng.int("num_iovas"), rng.int("out_iova_alignment")) == (2, 0x1000)
    assert rng["ranges"] == "0-0xfedfffff,0xfef00000-0xffffffffffff"
    assert [steps[f"MAP_{x}"].int("iova") for x in ("A", "B", "C_RO", "D")] == [0x400000, 0x600000, 0x800000, 1 << 32]
    auto = steps["MAP_E_AUTO"].int("iova")
    assert auto % 0x1000 == 0 and not (MSI_WINDOW[0] <= auto + 0xFFFF and auto <= MSI_WINDOW[1])
    assert not any(
        lo <= auto < hi or lo < auto + 0x10000 <= hi
        for lo, hi in ((0x400000, 0x700000), (0x800000, 0x801000), (1 << 32, (1 << 32) + 0x10000))
    )
    info = steps["GET_INFO"]
    assert (info.int("num_regions"), info.int("num_irqs"), info.int("cap_offset")) == (9, 5, 0)
    assert steps["CONFIG_READ_ALL"].int("n") == 256
    # teardown unmapped everything that was mapped: 2M + 1M + 4K + 64K + 64K
    assert steps["UNMAP_ALL"].int("length") == 0x321000


def _expect_regions(steps: dict[str, Step], regions: dict[int, tuple[int, int]]) -> None:
    # VGA: no emulated device is a VGA device, so vfio-pci's answer is EINVAL
    s = steps[f"REGION_INFO[{uapi.VFIO_PCI_VGA_REGION_INDEX}]"]
    assert s.outcome == "EINVAL", s
    for i in range(uapi.VFIO_PCI_VGA_REGION_INDEX):
        s = steps[f"REGION_INFO[{i}]"]
        flags, size = regions.get(i, (0, 0))
        # MMIO is trapped, never mapped: no VFIO_REGION_INFO_FLAG_MMAP (0x4), unlike the reference
        assert (s.outcome, s.int("flags"), s.int("size"), s.int("offset"), s.int("cap_offset")) == (
            "OK",
            flags,
            size,
            i << 40,
            0,
        ), s


@pytest.mark.parametrize("n", [0, 2], ids=["vfio0", "vfio2-group-of-two"])
async def test_qemu_startup_edu(daemon, cbuild, n):
    steps = await client(daemon, cbuild, n, "startup")
    _expect_common(steps, daemon)
    assert steps["GET_INFO"].int("flags") == uapi.VFIO_DEVICE_FLAGS_PCI  # 0x2: edu has no reset method
    _expect_regions(steps, EDU_REGIONS)
    ids = steps["CONFIG_IDS"]
    assert (ids.int("vendor"), ids.int("device"), ids.int("command")) == (0x1234, 0x11E8, 0x0103)
    irq = {i: steps[f"IRQ_INFO[{i}]"] for i in range(5)}
    assert (irq[0].int("flags"), irq[0].int("count")) == (0x7, 1)  # INTx: eventfd, maskable, automasked
    assert (irq[1].int("flags"), irq[1].int("count")) == (0x9, 1)  # MSI: eventfd, noresize
    assert irq[2].int("count") == 0 and irq[2].int("flags") & uapi.VFIO_IRQ_INFO_EVENTFD
    assert irq[3].outcome == "EINVAL"  # ERR: edu is not PCI Express
    assert (irq[4].int("flags"), irq[4].int("count")) == (0x9, 1)
    assert steps["SET_IRQS_EVENTFD"].int("index") == 1
    assert steps["IRQ_NOT_YET"]["readable"] == "0"
    # the reference's edu checks and DMA round trip, with the MSI on the eventfd
    regs = steps["EDU_REGS"]
    assert (regs.int("ident"), regs.int("liveness")) == (0x010000ED, 0xEDCBA987)
    assert (steps["EDU_DMA_NO_BME"].int("cmd"), steps["EDU_DMA_NO_BME"]["untouched"]) == (TO_RAM, "1")
    assert steps["SET_BUS_MASTER"].int("command") == 0x0107
    assert steps["EDU_DMA_TO_DEV"].int("cmd") == 0
    rt = steps["EDU_DMA_TO_RAM"]
    assert (rt.int("cmd"), rt["same"], rt["first"]) == (0x6, "1", "030a1118")
    assert (rt["irq"], rt.int("eventfd_count")) == ("1", 1), "the MSI did not arrive on the eventfd"
    assert (steps["EDU_IRQ_ACK"].int("status"), steps["EDU_IRQ_ACK"].int("after")) == (EDU.DMA_IRQ, 0)
    assert steps["EDU_DMA_ANON"]["same"] == "1"  # through private anonymous memory too
    assert steps["EDU_DMA_READ_ONLY"]["untouched"] == "1"  # a device write to a read-only page
    assert steps["EDU_DMA_FROM_READ_ONLY"].int("buf") == 0x5A5A5A5A  # a device read of it works
    assert steps["RESET"].outcome == "EINVAL"  # no reset method: VFIO_DEVICE_RESET is EINVAL
    # the refused DMAs are faults the device recorded, with their reasons
    vdev = daemon.system.devices[n].vfio
    reasons = [(f.iova, f.write, f.reason) for f in vdev.faults]
    assert (0x500000, True, "bus master disabled") in reasons
    assert (0x800000, True, "no permission") in reasons
    assert (0x8000000, True, "no translation") in reasons
    assert vdev.fault_count == 3
    await assert_released(daemon)


async def test_qemu_startup_dma_engine(daemon, cbuild):
    steps = await client(daemon, cbuild, 1, "startup")
    _expect_common(steps, daemon)
    # a function with FLR: GET_INFO offers VFIO_DEVICE_FLAGS_RESET and RESET works
    assert steps["GET_INFO"].int("flags") == uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET
    assert steps["RESET"].outcome == "OK"
    _expect_regions(steps, ENGINE_REGIONS)
    ids = steps["CONFIG_IDS"]
    assert (ids.int("vendor"), ids.int("device"), ids.int("command")) == (0x1DE5, 0x0001, 0x0103)
    irq = {i: steps[f"IRQ_INFO[{i}]"] for i in range(5)}
    assert all(s.outcome == "OK" for s in irq.values())  # ERR too: a PCI Express function
    assert (irq[0].int("flags"), irq[0].int("count")) == (0x7, 1)
    assert (irq[1].int("flags"), irq[1].int("count")) == (0x9, 0)  # no MSI
    assert irq[2].int("count") == 2 and irq[2].int("flags") & uapi.VFIO_IRQ_INFO_EVENTFD
    assert (irq[3].int("flags"), irq[3].int("count")) == (0x9, 1)
    assert (irq[4].int("flags"), irq[4].int("count")) == (0x9, 1)
    assert steps["SET_IRQS_EVENTFD"].int("index") == 2  # MSI-X, the engine's interrupts
    assert "EDU_REGS" not in steps
    await assert_released(daemon)


# -- 4. bad input -------------------------------------------------------------------------------------
ERRORS = {
    # no access before bind: ioctls, read and write (vfio_main.c, device_cdev.c)
    **{
        f"unbound:{x}": "EINVAL"
        for x in (
            "GET_INFO",
            "GET_REGION_INFO",
            "GET_IRQ_INFO",
            "SET_IRQS",
            "RESET",
            "ATTACH",
            "DETACH",
            "pread_config",
            "pwrite_bar0",
            "pread_bar0",
            "still_GET_INFO",
        )
    },
    # VFIO_DEVICE_BIND_IOMMUFD
    "bind:argsz_below_min": "EINVAL",
    "bind:argsz_0": "EINVAL",
    "bind:unknown_flag": "EINVAL",
    "bind:negative_fd": "EINVAL",
    "bind:eventfd": "EBADFD",  # iommufd_ctx_from_fd: not an iommufd file
    "bind:pipe": "EBADFD",
    "bind:device_fd": "EBADFD",  # a file of the daemon's own mount, but not /dev/iommu
    "bind:closed_fd": "EBADF",
    "bind:ok": "OK",
    "bind:again": "EINVAL",  # one device cannot be bound twice
    "bind:again_bad_fd": "EINVAL",  # ... checked before the fd
    "bind:second_open": "EINVAL",  # vfio_df_open: the cdev has no shared opens
    "second_open:GET_INFO": "EINVAL",
    "bind:second_open_other_ctx": "EINVAL",
    # GET_INFO / GET_REGION_INFO / GET_IRQ_INFO
    "GET_INFO:argsz_below_min": "EINVAL",
    "GET_INFO:argsz_min": "OK",
    "REGION_INFO:argsz_below_min": "EINVAL",
    "REGION_INFO:index_9": "EINVAL",
    "REGION_INFO:index_1000": "EINVAL",
    "REGION_INFO:index_max": "EINVAL",
    "IRQ_INFO:argsz_below_min": "EINVAL",
    "IRQ_INFO:index_5": "EINVAL",
    "IRQ_INFO:index_max": "EINVAL",
    "IRQ_INFO:ERR": "EINVAL",
    # region access (vfio_pci_rw, vfio_pci_bar_rw, vfio_config_do_rw)
    "pread:empty_region_1": "EINVAL",
    "pread:region_9": "EINVAL",
    "pread:bar0_past_end": "EINVAL",
    "pwrite:bar0_past_end": "EINVAL",
    "pread:config_past_end": "EFAULT",
    # VFIO_DEVICE_SET_IRQS (vfio_set_irqs_validate_and_prepare, vfio_pci_set_irqs_ioctl)
    "SET_IRQS:argsz_below_min": "EINVAL",
    "SET_IRQS:unknown_flag": "EINVAL",
    "SET_IRQS:index_5": "EINVAL",
    "SET_IRQS:start_past": "EINVAL",
    "SET_IRQS:count_past": "EINVAL",
    "SET_IRQS:start_past_count0": "EINVAL",
    "SET_IRQS:count_overflow": "EINVAL",
    "SET_IRQS:no_data_type": "EINVAL",
    "SET_IRQS:two_data_types": "EINVAL",
    "SET_IRQS:data_short": "EINVAL",
    "SET_IRQS:ERR_index": "EINVAL",
    "SET_IRQS:ERR_count0": "EINVAL",
    "SET_IRQS:no_action": "ENOTTY",
    "SET_IRQS:two_actions": "ENOTTY",
    "SET_IRQS:MSI_mask": "ENOTTY",
    "SET_IRQS:not_eventfd": "EINVAL",  # eventfd_ctx_fdget
    "SET_IRQS:closed_fd": "EBADF",
    "SET_IRQS:ok": "OK",
    "SET_IRQS:INTx_while_MSI": "EINVAL",
    "SET_IRQS:disable": "OK",
    "RESET:edu": "EINVAL",
    # IOMMU_HWPT_ALLOC
    "HWPT_ALLOC:size_below_min": "EINVAL",
    "HWPT_ALLOC:unknown_flag": "EOPNOTSUPP",
    "HWPT_ALLOC:dirty_tracking": "EOPNOTSUPP",  # the default VT-d has no dirty tracking
    "HWPT_ALLOC:bad_dev_id": "ENOENT",
    "HWPT_ALLOC:dev_id_is_ioas": "ENOENT",
    "HWPT_ALLOC:bad_pt_id": "EINVAL",  # mainline: an unknown pt_id is EINVAL
    "HWPT_ALLOC:pt_id_is_device": "EINVAL",
    "HWPT_ALLOC:reserved": "EOPNOTSUPP",
    "HWPT_ALLOC:ok": "OK",
    # IOMMU_GET_HW_INFO
    "GET_HW_INFO:size_below_min": "EINVAL",
    "GET_HW_INFO:reserved": "EOPNOTSUPP",
    "GET_HW_INFO:unknown_flag": "EOPNOTSUPP",
    "GET_HW_INFO:bad_dev_id": "ENOENT",
    "GET_HW_INFO:dev_id_is_ioas": "ENOENT",
    "GET_HW_INFO:data_len_0": "OK",
    # VFIO_DEVICE_ATTACH_IOMMUFD_PT / DETACH
    "ATTACH:argsz_4": "EINVAL",  # as the reference
    "ATTACH:argsz_below_min": "EINVAL",
    "ATTACH:unknown_flag": "EINVAL",
    "ATTACH:bad_pt_id": "ENOENT",  # as the reference
    "ATTACH:pt_id_is_device": "EINVAL",
    "DETACH:not_attached": "OK",
    "ATTACH:hwpt": "OK",
    # IOMMU_DESTROY of what is in use
    "DESTROY:device": "EBUSY",  # as the reference
    "DESTROY:attached_hwpt": "EBUSY",
    "DESTROY:ioas_with_hwpt": "EBUSY",  # as the reference (a HWPT holds it)
    "ATTACH:replace_ioas2": "OK",
    "DESTROY:ioas2_in_use": "EBUSY",
    "DESTROY:hwpt_after_replace": "OK",
    "DESTROY:ioas_after_replace": "OK",
    "DETACH:argsz_4": "EINVAL",
    "DETACH:argsz_below_min": "EINVAL",
    "DETACH:unknown_flag": "EINVAL",
    "DETACH:ok": "OK",
    "DETACH:again": "OK",  # as the reference
    "DESTROY:auto_hwpt_gone": "ENOENT",  # the automatic HWPT went with its last device
    "DESTROY:ioas2_after_detach": "OK",
    "DESTROY:device_after_detach": "EBUSY",  # the device file still holds it
    "DESTROY:device_after_close": "ENOENT",
}


async def test_bad_input_errnos(daemon, cbuild):
    steps = await client(daemon, cbuild, 0, "errors")
    assert_outcomes(steps, ERRORS)
    assert set(steps) == set(ERRORS), set(steps) ^ set(ERRORS)
    assert steps["bind:ok"].int("out_devid") == 1
    assert steps["GET_INFO:argsz_min"].int("flags") == uapi.VFIO_DEVICE_FLAGS_PCI
    hw = steps["GET_HW_INFO:data_len_0"]
    assert (hw.int("data_len"), hw.int("out_data_type")) == (24, 1)  # the size the data would need
    assert steps["ATTACH:replace_ioas2"].int("pt_id") != steps["HWPT_ALLOC:ok"].int("out_hwpt_id")
    await assert_released(daemon)


async def test_ioctl_on_unbound_file_of_bound_device(daemon):
    """Another open of a device bound elsewhere gets no access either (EINVAL), and
    closing it changes nothing for the bound one."""
    fd = await AsyncIommufd.open(node(daemon, "iommu"))
    dev = await AsyncVfioDevice.open(vfio(daemon, 0))
    other = await AsyncVfioDevice.open(vfio(daemon, 0))
    await dev.bind(fd.fd)
    r = await other.raw(uapi.VFIO_DEVICE_GET_INFO, uapi.vfio_device_info)
    assert (r.rc, r.errno) == (-1, E.EINVAL)
    with pytest.raises(OSError) as e:
        await trio.to_thread.run_sync(os.pread, other.fd, 4, CONFIG << 40)
    assert e.value.errno == E.EINVAL
    await other.close()
    await trio.sleep(0.05)
    assert daemon.system.devices[0].vfio.in_use
    r = await dev.raw(uapi.VFIO_DEVICE_GET_INFO, uapi.vfio_device_info)
    assert r.rc == 0 and r.out.flags == uapi.VFIO_DEVICE_FLAGS_PCI
    await dev.close()
    await fd.close()
    await assert_released(daemon)


async def test_bind_does_not_stat_the_iommufd_on_the_event_loop(daemon, monkeypatch):
    """fstat() of a file of the daemon's own mount from its event loop sends GETATTR to
    that very loop once the attribute cache (1 s) has expired, and the daemon waits for
    itself forever: a client that opened /dev/iommu more than a second before BIND (as
    QEMU does) hung the daemon. BIND identifies the iommufd without it."""
    from iommufd_cuse.transport.mount import fd_on_our_mount

    real_fstat = os.fstat

    def fstat(fd, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if threading.current_thread() is threading.main_thread() and fd_on_our_mount(fd):
            raise AssertionError("fstat() of a file of the daemon's own mount on the event loop")
        return real_fstat(fd, *args, **kw)

    monkeypatch.setattr(os, "fstat", fstat)
    fd = await AsyncIommufd.open(node(daemon, "iommu"))
    dev = await AsyncVfioDevice.open(vfio(daemon, 0))
    r = await dev.raw(uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.vfio_device_bind_iommufd, iommufd=dev.fd)
    assert (r.rc, r.errno) == (-1, E.EBADFD)  # a file of the mount, not an iommufd
    assert await dev.bind(fd.fd) == 1
    await dev.close()
    await fd.close()
    await assert_released(daemon)


# -- 3. DMA follows the attachment ----------------------------------------------------------
async def test_dma_blocked_until_attach_then_follows_the_table(daemon):
    fd = await AsyncIommufd.open(node(daemon, "iommu"))
    dev = await AsyncVfioDevice.open(vfio(daemon, 0))
    devid = await dev.bind(fd.fd)
    await expect_errno(E.EBUSY, fd.destroy(devid))  # the device file holds it
    edu = Edu(daemon, 0, dev)
    ctx = next(iter(daemon.system.contexts))
    # bound: the group is the context's, in the blocking domain
    assert edu.group.owner is ctx and edu.group.domain is edu.group.blocking_domain
    ioas = await fd.ioas_alloc()
    ram, ro = anon(1 << 20), anon(0x1000, fill=0x5A)
    await fd.map(ioas, ram, iova=RW_IOVA)
    await fd.map(ioas, ro, iova=RO_IOVA, flags=R)
    await edu.bus_master()
    data = pattern(256)

    # bound, not attached: every access faults, memory untouched
    assert await edu.to_ram(RW_IOVA, data) == 1
    assert edu.last_fault.reason.startswith("DMA blocked") and edu.last_fault.write
    assert ram[:256] == bytes(256)
    assert (await edu.from_ram(RO_IOVA, 16))[0] == 1

    # attached (to the IOAS: an automatic HWPT): mapped IOVAs work, as mapped
    hwpt = await dev.attach(ioas)
    assert edu.group.domain is ctx.get(hwpt).domain
    assert await edu.to_ram(RW_IOVA + 0x1000, data) == 0
    assert ram[0x1000:0x1100] == data
    assert await edu.from_ram(RO_IOVA, 16) == (0, bytes([0x5A]) * 16)  # reading a read-only page
    assert await edu.to_ram(RO_IOVA, data) == 1  # writing it: a permission fault
    assert (edu.last_fault.iova, edu.last_fault.write, edu.last_fault.reason) == (RO_IOVA, True, "no permission")
    assert ro[:] == bytes([0x5A]) * 0x1000
    assert await edu.to_ram(OTHER_IOVA, data) == 1  # nothing mapped there
    assert (edu.last_fault.iova, edu.last_fault.reason) == (OTHER_IOVA, "no translation")
    assert await edu.to_ram(RW_IOVA + (1 << 20) - 0x80, data) == 1  # runs off the end of the mapping
    assert edu.last_fault.iova == RW_IOVA + (1 << 20)
    # unmapped while attached: gone from the device's view at once
    await fd.unmap(ioas, RW_IOVA, 1 << 20)
    ram[:] = bytes(1 << 20)
    assert await edu.to_ram(RW_IOVA + 0x1000, data) == 1 and ram[0x1000:0x1100] == bytes(256)
    await fd.map(ioas, ram, iova=RW_IOVA)

    # detached: blocked again
    await dev.detach()
    assert edu.group.domain is edu.group.blocking_domain
    assert await edu.to_ram(RW_IOVA + 0x2000, data) == 1
    assert edu.last_fault.reason.startswith("DMA blocked")
    assert ram[0x2000:0x2100] == bytes(256)
    await expect_errno(E.ENOENT, fd.destroy(hwpt))  # the automatic HWPT went with the detach

    await dev.close()
    await fd.close()
    await assert_released(daemon)


async def test_replace_switches_to_the_new_table(daemon):
    fd = await AsyncIommufd.open(node(daemon, "iommu"))
    dev = await AsyncVfioDevice.open(vfio(daemon, 0))
    devid = await dev.bind(fd.fd)
    edu = Edu(daemon, 0, dev)
    ctx = next(iter(daemon.system.contexts))
    ioas1, ioas2 = await fd.ioas_alloc(), await fd.ioas_alloc()
    one, two = anon(0x10000), anon(0x10000)
    await fd.map(ioas1, one, iova=RW_IOVA)
    await fd.map(ioas2, two, iova=RW_IOVA)  # the same IOVA, other memory
    await edu.bus_master()

    auto1 = await dev.attach(ioas1)
    assert await edu.to_ram(RW_IOVA, b"first") == 0
    assert one[:5] == b"first" and two[:5] == bytes(5)

    # replace by a HWPT of the other IOAS while attached: the new table is used
    hwpt2 = await hwpt_alloc(fd, devid, ioas2)
    assert await dev.attach(hwpt2) == hwpt2
    assert edu.group.domain is ctx.get(hwpt2).domain
    assert await edu.to_ram(RW_IOVA + 8, b"second") == 0
    assert two[8:14] == b"second" and one[8:14] == bytes(6)
    await expect_errno(E.ENOENT, fd.destroy(auto1))  # the old automatic HWPT is gone
    await expect_errno(E.EBUSY, fd.destroy(hwpt2))  # the new one is attached
    await expect_errno(E.EBUSY, fd.destroy(ioas2))
    # the reserved IOVA (MSI window) moved with the attachment
    assert (await fd.iova_ranges(ioas1))[0] == [(0, (1 << 64) - 1)]
    assert (await fd.iova_ranges(ioas2))[0] == [(0, MSI_WINDOW[0] - 1), (MSI_WINDOW[1] + 1, (1 << 48) - 1)]
    # replacing by the attached HWPT changes nothing
    assert await dev.attach(hwpt2) == hwpt2

    # and back to the first IOAS (a new automatic HWPT): hwpt2 is free to go
    auto3 = await dev.attach(ioas1)
    assert auto3 != hwpt2 and ctx.get(auto3).auto_domain  # (it may reuse auto1's free id)
    assert await edu.to_ram(RW_IOVA + 16, b"third") == 0
    assert one[16:21] == b"third" and two[16:21] == bytes(5)
    await fd.destroy(hwpt2)
    await fd.destroy(ioas2)

    # a failed replace (an unknown id) leaves the attachment as it was
    await expect_errno(E.ENOENT, dev.attach(999))
    await expect_errno(E.EINVAL, dev.attach(devid))
    assert await edu.to_ram(RW_IOVA + 24, b"still") == 0 and one[24:29] == b"still"

    await dev.close()
    await fd.close()
    await assert_released(daemon)


async def test_group_of_two_shares_one_attachment(daemon):
    """vfio2 and vfio3 share group 6: bound to one context they have one domain; a
    device joins the group's HWPT or nothing (EINVAL), a replace moves both, and the
    group is blocked again when its last attached device detaches."""
    fd = await AsyncIommufd.open(node(daemon, "iommu"))
    d2, d3 = await AsyncVfioDevice.open(vfio(daemon, 2)), await AsyncVfioDevice.open(vfio(daemon, 3))
    id2, id3 = await d2.bind(fd.fd), await d3.bind(fd.fd)
    e2, e3 = Edu(daemon, 2, d2), Edu(daemon, 3, d3)
    group = e2.group
    assert group is e3.group and group.owner_cnt == 2
    ctx = next(iter(daemon.system.contexts))
    ioas1, ioas2 = await fd.ioas_alloc(), await fd.ioas_alloc()
    one, two = anon(0x10000), anon(0x10000)
    await fd.map(ioas1, one, iova=RW_IOVA)
    await fd.map(ioas2, two, iova=RW_IOVA)
    hwpt1, hwpt2 = await hwpt_alloc(fd, id2, ioas1), await hwpt_alloc(fd, id3, ioas2)
    await e2.bus_master()
    await e3.bus_master()

    # only vfio2 attached: the whole group (and so vfio3's DMA) goes through hwpt1
    await d2.attach(hwpt1)
    assert group.domain is ctx.get(hwpt1).domain
    await expect_errno(E.EINVAL, d3.attach(hwpt2))  # another HWPT than the group's
    await expect_errno(E.EINVAL, d3.attach(ioas2))
    # detaching vfio2 while vfio3 is bound but not attached: blocked
    await d2.detach()
    assert group.domain is group.blocking_domain
    assert await e3.to_ram(RW_IOVA, b"blocked") == 1 and one[:7] == bytes(7)

    await d2.attach(hwpt1)
    assert await d3.attach(hwpt1) == hwpt1  # joining the group's HWPT
    await expect_errno(E.EBUSY, fd.destroy(hwpt1))
    assert await e3.to_ram(RW_IOVA, b"three") == 0 and one[:5] == b"three"

    # a replace through either device moves the group
    assert await d3.attach(hwpt2) == hwpt2
    assert group.domain is ctx.get(hwpt2).domain
    assert await e2.to_ram(RW_IOVA + 8, b"two") == 0 and two[8:11] == b"two" and one[8:11] == bytes(3)
    await fd.destroy(hwpt1)  # no device holds it any more

    # the group stays attached until its last attached device detaches
    await d3.detach()
    assert group.domain is ctx.get(hwpt2).domain
    assert await e3.to_ram(RW_IOVA + 16, b"shared") == 0 and two[16:22] == b"shared"
    await d3.detach()  # not attached: nothing happens
    assert group.domain is ctx.get(hwpt2).domain
    await d2.detach()
    assert group.domain is group.blocking_domain
    assert await e2.to_ram(RW_IOVA + 24, b"gone") == 1 and two[24:28] == bytes(4)
    await fd.destroy(hwpt2)

    # the group is the context's until both files are closed
    await d2.close()
    await wait_until(lambda: group.owner_cnt == 1, "vfio2 unbound")
    assert group.owner is ctx and group.domain is group.blocking_domain
    await d3.close()
    await fd.close()
    await assert_released(daemon)


# -- 5. nothing is left behind ---------------------------------------------------------------
async def test_close_in_any_order_releases_everything(daemon):
    """The iommufd closed first: the device file keeps its context alive (as the
    kernel's reference on the iommufd file) until it is closed too."""
    fd = await AsyncIommufd.open(node(daemon, "iommu"))
    dev = await AsyncVfioDevice.open(vfio(daemon, 1))
    await dev.bind(fd.fd)
    ioas = await fd.ioas_alloc()
    buf = anon(1 << 20)
    await fd.map(ioas, buf, iova=RW_IOVA)
    await dev.attach(ioas)
    assert daemon.system.pinned_pages() == 256
    await fd.close()
    await trio.sleep(0.1)
    (ctx,) = daemon.system.contexts
    assert not ctx.closed and daemon.system.pinned_pages() == 256
    r = await dev.raw(uapi.VFIO_DEVICE_GET_INFO, uapi.vfio_device_info)
    assert r.rc == 0  # still bound, still usable
    await dev.close()
    await assert_released(daemon)


async def test_killed_client_leaves_nothing(daemon, scripted):
    """A client killed with a device bound, attached and mapped (memfd and private
    memory pinned, an MSI eventfd set), and a second device of a group of two bound:
    no context, no pin, no charge, every group back with the kernel."""
    c = await scripted()
    fdnum = (await c.ok("open", path=node(daemon, "iommu")))["fdnum"]
    await c.ok("open_device", path=vfio(daemon, 0), name="dev0")
    await c.ok("open_device", path=vfio(daemon, 2), name="dev2")
    dev0 = await c.call("bind", fd="dev0", iommufd=fdnum)
    await c.call("bind", fd="dev2", iommufd=fdnum)
    ioas = await c.call("ioas_alloc")
    hwpt = await c.call("raw", cmd=uapi.IOMMU_HWPT_ALLOC, struct_name="iommu_hwpt_alloc", dev_id=dev0, pt_id=ioas)
    assert hwpt == {"rc": 0, "errno_": 0}
    await c.call("attach", fd="dev0", pt_id=ioas)
    await c.call("attach", fd="dev2", pt_id=ioas)
    await c.ok("mmap", name="m", size=1 << 20, kind="memfd")
    await c.ok("mmap", name="a", size=1 << 20)
    await c.call("map", ioas=ioas, buf="m", length=1 << 20, iova=RW_IOVA)
    await c.call("map", ioas=ioas, buf="a", length=1 << 20, iova=RW_IOVA + (2 << 20))
    s = daemon.system
    assert len(s.contexts) == 1 and s.pinned_pages() == 512
    assert s.groups[4].owner is not None and s.groups[6].owner_cnt == 1
    assert s.groups[4].domain is not s.groups[4].default_domain
    c.proc.send_signal(signal.SIGKILL)
    await c.proc.wait()
    await assert_released(daemon)
    # and the groups are anyone's again
    fd = await AsyncIommufd.open(node(daemon, "iommu"))
    dev = await AsyncVfioDevice.open(vfio(daemon, 0))
    assert await dev.bind(fd.fd) == 1
    await dev.close()
    await fd.close()
    await assert_released(daemon)


@pytest.mark.parametrize("n", [0, 1], ids=["edu", "dma-engine"])
async def test_killed_c_client_with_everything_set_up(daemon, cbuild, n):
    """The start-up client killed once it has bound, attached a HWPT, mapped five
    ranges and set an MSI eventfd."""
    exe = cbuild("qemu_startup")
    proc = await trio.lowlevel.open_process(
        [str(exe), node(daemon, "iommu"), vfio(daemon, n), "hold"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = b""
        with trio.fail_after(CLIENT_TIMEOUT):
            while b"STEP HOLD " not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, out.decode()
                out += chunk
        s = daemon.system
        assert len(s.contexts) == 1 and s.pinned_pages() == 0x321000 // 0x1000
        assert s.devices[n].vfio.in_use and s.devices[n].vfio.irqs.type is not None
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    steps = parse_steps(out)
    assert steps["SET_IRQS_EVENTFD"].outcome == "OK"
    await assert_released(daemon)
    assert daemon.system.devices[n].vfio.irqs.type is None
