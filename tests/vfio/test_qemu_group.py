"""QEMU with a real Linux guest through the paths real deployments take (issue 14):
(a) `iommufd-cuse run -- qemu ... -device vfio-pci,host=BDF`: QEMU's legacy path (sysfs,
/dev/vfio/<group>, /dev/vfio/vfio, SET_CONTAINER, MAP_DMA, GET_DEVICE_FD) at the real paths
of run's namespace; (b) `-object iommufd,fd=N` with descriptors opened in another mount
namespace (`unshare -m`) and passed to QEMU; (c) a guest vIOMMU (intel-iommu, caching
mode) with a guest-side VFIO driver that maps its own IOVAs, and a DMA after its unmap
recorded as a fault. The guest programs run the daemon's edu from inside."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import guestkit
from clientkit import parse_steps
from harness import CLIENTS, INCLUDE
from test_device_cdev import assert_released

EXE = Path(sys.executable).parent / "iommufd-cuse"
EDU_BDF = "0000:00:04.0"


def check_round_trip(run) -> None:  # noqa: ANN001
    steps = parse_steps(run.console)
    assert "FIND_EDU" in steps and steps["FIND_EDU"].outcome == "OK", run
    ident = steps["IDENT"]
    assert (ident.int("ident"), ident.int("liveness")) == (0x010000ED, 0xEDCBA987), run
    rt = steps["DMA_ROUND_TRIP"]
    assert (rt.outcome, rt["same"], rt["b0"]) == ("OK", "1", "030a1118"), run
    assert run.rc == 0 and run.qemu_rc == 0, run


async def boot_with(program: str, qemu_args: list[str], wrapper: list[str], modules=(), cmdline: str = ""):  # noqa: ANN001, ANN201
    """Boot a guest whose init runs the static tests/clients/<program>.c, QEMU under wrapper."""
    kit = guestkit.require()
    work = guestkit.scratch()
    try:
        exe = guestkit.compile_static(CLIENTS / f"{program}.c", work / program, f"-I{INCLUDE}", f"-I{CLIENTS}")
        initrd = guestkit.Initramfs(kit)
        if modules:
            initrd.add_modules(*modules)
        initrd.add_file(f"/bin/{program}", exe)
        initrd.script(program)
        return await guestkit.boot(
            initrd.build(work / "initrd"), qemu_args=qemu_args, memory="256M", cmdline=cmdline, wrapper=wrapper
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def under_run(daemon) -> list[str]:  # noqa: ANN001
    return [str(EXE), "run", "--mountpoint", daemon.mountpoint, "--"]


async def test_legacy_group_path_under_run(daemon):
    """(a): QEMU finds the group from sysfs and takes the container path."""
    run = await boot_with("guest_edu", ["-device", f"vfio-pci,host={EDU_BDF}"], under_run(daemon))
    check_round_trip(run)
    vdev = daemon.system.devices[0].vfio
    assert vdev.fault_count == 0, vdev.faults
    await assert_released(daemon)


async def test_iommufd_fds_from_another_mount_namespace(daemon):
    """(b): /dev/iommu and the cdev opened in another mount namespace (its own copy
    of the daemon's mount, another mount id), passed to QEMU by fd."""
    opener = 'exec 3<>"$0/iommu" 4<>"$0/vfio/devices/vfio0"; shift; exec "$@"'
    run = await boot_with(
        "guest_edu",
        ["-object", "iommufd,id=iommufd0,fd=3", "-device", "vfio-pci,fd=4,iommufd=iommufd0"],
        ["unshare", "-m", "--propagation", "private", "sh", "-c", opener, daemon.mountpoint, "--"],
    )
    check_round_trip(run)
    assert daemon.system.devices[0].vfio.fault_count == 0
    await assert_released(daemon)


async def test_guest_viommu_and_a_guest_vfio_driver(daemon):
    """(c): a guest vIOMMU; the guest's own VFIO driver chooses its IOVAs, and its DMA
    after an unmap is a fault the daemon records, at that IOVA."""
    run = await boot_with(
        "guest_vfio_edu",
        ["-device", "intel-iommu,caching-mode=on", "-device", f"vfio-pci,host={EDU_BDF}"],
        under_run(daemon),
        modules=("vfio-pci", "vfio_iommu_type1"),
        cmdline="intel_iommu=on",
    )
    steps = parse_steps(run.console)
    for name in ("FIND_EDU", "BIND_VFIO_PCI", "OPEN", "SET_CONTAINER", "SET_IOMMU", "GET_DEVICE_FD", "MAP_DMA"):
        assert name in steps and steps[name].outcome == "OK", run
    assert steps["IDENT"].int("ident") == 0x010000ED, run
    assert steps["DMA_ROUND_TRIP"]["same"] == "1", run
    assert steps["UNMAP_DMA"].outcome == "OK", run
    assert steps["DMA_AFTER_UNMAP"]["unchanged"] == "1", run
    assert run.rc == 0 and run.qemu_rc == 0, run
    vdev = daemon.system.devices[0].vfio
    iova = int(steps["DMA_AFTER_UNMAP"]["iova"], 16)
    assert vdev.fault_count >= 1 and any(f.iova == iova and f.write for f in vdev.faults), vdev.faults
    await assert_released(daemon)
