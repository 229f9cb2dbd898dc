"""QEMU with a real Linux guest as the client (tests/guestkit.py): the daemon's edu handed to QEMU by fd
(`-object iommufd,fd=N -device vfio-pci,fd=M,iommufd=...`, the fds opened here), found on the guest's PCI bus,
and a DMA round trip from inside the guest (tests/clients/guest_edu.c) that goes through the IOAS QEMU fills
with guest RAM at IOVA = GPA. One boot: TCG is slow on a busy machine."""

from __future__ import annotations

import os
import shutil

import guestkit
import trio
from clientkit import parse_steps
from harness import CLIENTS, INCLUDE
from test_device_cdev import assert_released

EDU_VFIO = 0  # vfio0: the default topology's first edu


async def test_guest_sees_edu_and_dmas_through_the_ioas(daemon):
    kit = guestkit.require()
    work = guestkit.scratch()
    # opened off the loop: the daemon answering the OPEN runs on it
    iommu = await trio.to_thread.run_sync(os.open, os.path.join(daemon.dev_dir, "iommu"), os.O_RDWR)
    dev = await trio.to_thread.run_sync(
        os.open, os.path.join(daemon.dev_dir, f"vfio/devices/vfio{EDU_VFIO}"), os.O_RDWR
    )
    try:
        exe = guestkit.compile_static(CLIENTS / "guest_edu.c", work / "guest_edu", f"-I{INCLUDE}", f"-I{CLIENTS}")
        initrd = guestkit.Initramfs(kit)
        initrd.add_file("/bin/guest_edu", exe)
        initrd.script("guest_edu")
        args = ["-object", f"iommufd,id=iommufd0,fd={iommu}", "-device", f"vfio-pci,fd={dev},iommufd=iommufd0"]
        run = await guestkit.boot(initrd.build(work / "initrd"), qemu_args=args, pass_fds=[iommu, dev], memory="256M")
    finally:
        await trio.to_thread.run_sync(os.close, iommu)
        await trio.to_thread.run_sync(os.close, dev)
        shutil.rmtree(work, ignore_errors=True)
    steps = parse_steps(run.console)
    assert "FIND_EDU" in steps and steps["FIND_EDU"].outcome == "OK", run
    assert steps["COMMAND"].int("command") & 0x6 == 0x6, run
    ident = steps["IDENT"]
    assert (ident.int("ident"), ident.int("liveness")) == (0x010000ED, 0xEDCBA987), run
    rt = steps["DMA_ROUND_TRIP"]
    assert (rt.outcome, rt["same"], rt["b0"]) == ("OK", "1", "030a1118"), run
    assert run.rc == 0 and run.qemu_rc == 0, run
    # B could only be filled from the device's buffer: the pattern passed through the daemon's edu. (Its buffer
    # itself is not checked: closing the device resets it, as vfio-pci does, at a time the test cannot see.)
    vdev = daemon.system.devices[EDU_VFIO].vfio
    assert vdev.fault_count == 0, [f for f in vdev.faults]
    await assert_released(daemon)  # QEMU is gone: its IOAS, pins and the device are released
