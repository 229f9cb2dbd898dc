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


async def test_legacy_group_path_under_run(daemon):
    """(a): QEMU finds the group from sysfs and takes the container path."""
    kit = guestkit.require()
    work = guestkit.scratch()
    try:
        exe = guestkit.compile_static(CLIENTS / "guest_edu.c", work / "guest_edu", f"-I{INCLUDE}", f"-I{CLIENTS}")
        initrd = guestkit.Initramfs(kit)
        initrd.add_file("/bin/guest_edu", exe)
        initrd.script("guest_edu")
        run = await guestkit.boot(
            initrd.build(work / "initrd"),
            qemu_args=["-device", f"vfio-pci,host={EDU_BDF}"],
            memory="256M",
            wrapper=[str(EXE), "run", "--mountpoint", daemon.mountpoint, "--"],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    check_round_trip(run)
    vdev = daemon.system.devices[0].vfio
    assert vdev.fault_count == 0, vdev.faults
    await assert_released(daemon)
