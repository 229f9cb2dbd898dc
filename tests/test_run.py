"""`iommufd-cuse run`: an unmodified client in a private mount namespace that has the
daemon's /dev nodes and sysfs view at the real paths; nothing outside changes."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from clientkit import parse_steps
from harness import run

EXE = Path(sys.executable).parent / "iommufd-cuse"


def host_view() -> dict:
    """What run must leave alone: /dev, the sysfs directories it overlays, and the
    mounts at or under /dev and /sys."""

    def links(d: str) -> dict:
        return {n: os.readlink(os.path.join(d, n)) for n in sorted(os.listdir(d))}

    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f if line.split()[4].startswith(("/dev", "/sys")))
    return {
        "dev": sorted(os.listdir("/dev")),
        "vfio": os.path.lexists("/dev/vfio"),
        "iommu": os.path.lexists("/dev/iommu"),
        "pci": links("/sys/bus/pci/devices"),
        "module": sorted(os.listdir("/sys/module")),
        "groups": sorted(os.listdir("/sys/kernel/iommu_groups")),
        "mounts": mounts,
    }


async def in_run(daemon, *argv, check: bool = True):  # noqa: ANN001, ANN201
    return await run([EXE, "run", "--mountpoint", daemon.mountpoint, "--", *argv], check=check)


async def test_exit_status_and_host_unchanged(daemon):
    before = host_view()
    p = await in_run(daemon, "sh", "-c", "test -e /dev/iommu && test -e /dev/vfio/4 && exit 7", check=False)
    assert p.returncode == 7, p.stderr
    p = await run([EXE, "run", "--mountpoint", daemon.mountpoint, "/nonexistent/cmd"], check=False)
    assert p.returncode == 1 and b"/nonexistent/cmd" in p.stderr
    assert host_view() == before


async def test_refused_without_a_daemon(tmp_path):
    p = await run([EXE, "run", "--mountpoint", str(tmp_path), "--", "true"], check=False)
    assert p.returncode == 1 and b"no iommufd-cuse daemon" in p.stderr


async def test_sysfs_readers_see_the_emulated_devices(daemon):
    before = host_view()
    p = await in_run(daemon, "ls", "-l", "/sys/bus/pci/devices/0000:00:04.0/iommu_group")
    assert p.stdout.decode().rstrip().endswith("iommu_group -> ../../../kernel/iommu_groups/4")
    p = await in_run(daemon, "readlink", "-f", "/sys/bus/pci/devices/0000:00:04.0")
    assert p.stdout.decode().strip() == f"{daemon.mountpoint}/sys/devices/pci0000:00/0000:00:04.0"
    if shutil.which("lspci"):
        out = (await in_run(daemon, "lspci", "-nnk")).stdout.decode()
        for slot, ids in (
            ("00:04.0", "1234:11e8"),
            ("00:05.0", "1de5:0001"),
            ("00:06.1", "1234:11e8"),
            ("00:08.0", "1af4:1042"),
        ):
            block = out.split(f"\n{slot} ", 1)[1].split("\n0", 1)[0] if f"\n{slot} " in out else out
            assert f"[{ids}]" in block and "Kernel driver in use: vfio-pci" in block, out
    if shutil.which("dpdk-devbind.py"):
        # devbind lists the kinds DPDK has drivers for: of the emulated devices, the virtio-blk disk (edu,
        # the DMA engine and NVMe are none of them, on a real kernel too), bound to vfio-pci and so in the
        # section of devices a DPDK application can take
        p = await in_run(daemon, "dpdk-devbind.py", "--status")
        assert b"Traceback" not in p.stderr
        out = p.stdout.decode()
        usable = out.split("devices using DPDK-compatible driver", 1)
        assert len(usable) == 2, out
        section = usable[1].split("\n\n", 1)[0]
        assert "0000:00:08.0 'Virtio 1.0 block device 1042' drv=vfio-pci" in section, out
        outside = (await run(["dpdk-devbind.py", "--status"])).stdout.decode()
        assert "0000:00:08.0 'Virtio 1.0 block device 1042' drv=vfio-pci" not in outside
        if "drv=" in outside:  # a host device with a kernel driver: in run, vfio-pci is loaded (/sys/module)
            assert "unused=vfio-pci" in out and "unused=vfio-pci" not in outside
    assert host_view() == before


@pytest.mark.parametrize("bdf,group,other", [("0000:00:04.0", "4", "0000:00:05.0")])
async def test_legacy_group_client_at_the_real_paths(daemon, cbuild, bdf, group, other):
    """The group client at /dev, with the companion that run preloads."""
    exe = cbuild("vfio_group")
    p = await in_run(daemon, exe, "/dev", group, bdf, other, "/dev/vfio/devices/vfio0")
    s = parse_steps(p.stdout)
    assert s["get_device_fd"].rc >= 0
    assert s["edu_dma"]["same"] == "1"
    assert s["unset_container"].rc == 0
