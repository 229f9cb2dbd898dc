"""The sysfs view in the daemon's mount (iommufd_cuse/sysfs.py), read by a client
process as VFIO clients read /sys."""

from __future__ import annotations

import json
import sys

import trio
from harness import run

READER = r"""
import json, os, sys
sys_ = os.path.join(sys.argv[1], "sys")
dev = os.path.join(sys_, "bus/pci/devices", sys.argv[2])
def cat(p):
    with open(os.path.join(dev, p), "rb") as f:
        return f.read().decode(errors="replace")
out = {a: cat(a) for a in ("vendor", "device", "subsystem_vendor", "subsystem_device", "class",
                           "numa_node", "resource", "modalias", "uevent", "irq")}
out["config_len"] = len(open(os.path.join(dev, "config"), "rb").read())
out["config_size"] = os.stat(os.path.join(dev, "config")).st_size
out["iommu_group"] = os.readlink(os.path.join(dev, "iommu_group"))
out["driver"] = os.readlink(os.path.join(dev, "driver")) if os.path.lexists(os.path.join(dev, "driver")) else None
out["vfio_dev"] = sorted(os.listdir(os.path.join(dev, "vfio-dev"))) if os.path.exists(os.path.join(dev, "vfio-dev")) else None
if out["vfio_dev"]:
    out["vfio_dev_dev"] = cat(f"vfio-dev/{out['vfio_dev'][0]}/dev")
out["cap"] = cat("iommu/intel-iommu/cap")
out["realpath"] = os.path.relpath(os.path.realpath(dev), sys_)
g = os.path.basename(out["iommu_group"])
out["group_devices"] = sorted(os.listdir(os.path.join(sys_, "kernel/iommu_groups", g, "devices")))
out["reserved"] = open(os.path.join(sys_, "kernel/iommu_groups", g, "reserved_regions")).read()
out["modules"] = sorted(os.listdir(os.path.join(sys_, "module")))
out["noiommu"] = open(os.path.join(sys_, "module/vfio/parameters/enable_unsafe_noiommu_mode")).read()
out["bound"] = sorted(os.listdir(os.path.join(sys_, "bus/pci/drivers/vfio-pci")))
try:
    open(os.path.join(dev, "vendor"), "w")
except OSError as e:
    out["write_errno"] = e.errno
print(json.dumps(out))
"""


async def read_view(daemon, bdf: str) -> dict:  # noqa: ANN001
    p = await run([sys.executable, "-c", READER, daemon.mountpoint, bdf])
    return json.loads(p.stdout)


async def test_edu_as_sysfs_shows_it(daemon):
    v = await read_view(daemon, "0000:00:04.0")
    assert (v["vendor"], v["device"], v["class"]) == ("0x1234\n", "0x11e8\n", "0x00ff00\n")
    assert (v["subsystem_vendor"], v["subsystem_device"]) == ("0x1af4\n", "0x1100\n")
    assert v["numa_node"] == "-1\n"
    lines = v["resource"].splitlines()
    assert len(lines) == 13
    start, end, flags = (int(x, 16) for x in lines[0].split())
    assert end - start + 1 == 1 << 20 and flags & 0x200  # BAR0: 1 MiB memory
    assert all(line == " ".join(["0x" + "0" * 16] * 3) for line in lines[1:])
    assert v["modalias"].startswith("pci:v00001234d000011E8sv00001AF4sd00001100bc00scFFi00")
    assert "DRIVER=vfio-pci" in v["uevent"] and "PCI_SLOT_NAME=0000:00:04.0" in v["uevent"]
    assert v["config_len"] == v["config_size"] == 256  # root: the whole space
    assert v["iommu_group"] == "../../../kernel/iommu_groups/4"
    assert v["driver"] == "../../../bus/pci/drivers/vfio-pci"
    assert v["vfio_dev"] == ["vfio0"] and v["vfio_dev_dev"] == "0:0\n"  # no char device (no CUSE)
    assert int(v["cap"], 16) == daemon.config.iommus[0].cap_reg
    assert v["realpath"] == "devices/pci0000:00/0000:00:04.0"
    assert v["group_devices"] == ["0000:00:04.0"]
    assert v["reserved"] == "0x00000000fee00000 0x00000000feefffff msi\n"
    assert {"vfio", "vfio_pci"} <= set(v["modules"])
    assert v["noiommu"] == "N\n"
    bound = ["0000:00:04.0", "0000:00:05.0", "0000:00:06.0", "0000:00:06.1", "0000:00:07.0", "0000:00:08.0"]
    assert v["bound"] == [*bound, "module"]
    assert v["write_errno"] == 13  # EACCES: no store


async def test_the_virtio_blk_disk_as_sysfs_shows_it(daemon):
    v = await read_view(daemon, "0000:00:08.0")
    assert (v["vendor"], v["device"], v["class"]) == ("0x1af4\n", "0x1042\n", "0x018000\n")
    assert v["modalias"].startswith("pci:v00001AF4d00001042sv00001DE5sd00000040bc01sc80i00")
    assert v["iommu_group"] == "../../../kernel/iommu_groups/8" and v["group_devices"] == ["0000:00:08.0"]
    assert v["vfio_dev"] == ["vfio5"] and v["driver"] == "../../../bus/pci/drivers/vfio-pci"
    assert v["config_len"] == 4096  # PCI Express


async def test_the_nvme_controller_as_sysfs_shows_it(daemon):
    v = await read_view(daemon, "0000:00:07.0")
    assert (v["vendor"], v["device"], v["class"]) == ("0x1de5\n", "0x0002\n", "0x010802\n")
    assert v["iommu_group"] == "../../../kernel/iommu_groups/7" and v["group_devices"] == ["0000:00:07.0"]
    assert v["vfio_dev"] == ["vfio4"] and v["driver"] == "../../../bus/pci/drivers/vfio-pci"
    assert v["config_len"] == 4096  # PCI Express


async def test_group_of_two_and_driver_change(daemon):
    v = await read_view(daemon, "0000:00:06.1")
    assert v["group_devices"] == ["0000:00:06.0", "0000:00:06.1"]
    dev = next(d for d in daemon.system.devices if d.bdf == "0000:00:06.1")
    dev.bind_driver("none")
    with trio.fail_after(10):  # names are cached by the kernel for a second
        while (v := await read_view(daemon, "0000:00:06.1"))["driver"] is not None or v["vfio_dev"] is not None:
            await trio.sleep(0.3)
    assert "0000:00:06.1" not in v["bound"]
    dev.bind_driver("e1000e")
    with trio.fail_after(10):
        while (v := await read_view(daemon, "0000:00:06.1"))["driver"] is None:
            await trio.sleep(0.3)
    assert v["driver"] == "../../../bus/pci/drivers/e1000e"
    dev.bind_driver("vfio-pci")
