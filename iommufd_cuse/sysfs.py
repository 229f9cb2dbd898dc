"""The sysfs view of the emulated topology, under sys/ in the daemon's mount, laid out
as the kernel's (drivers/pci/pci-sysfs.c, drivers/iommu/iommu.c's iommu_groups,
drivers/vfio/device_cdev.c's vfio-dev, intel-iommu's sysfs), with what VFIO clients
read: QEMU (iommu_group, vfio-dev/vfioN/dev), DPDK (vendor, device, subsystem_*,
class, numa_node, resource, driver, iommu_group, iommu/intel-iommu/cap,
/sys/module/vfio*), libvfn, lspci (config, resource, irq, modalias) and
dpdk-devbind.py. Values come from the device models and the configuration, read
at each open; the driver links follow `set-driver`.

  sys/devices/pci0000:00/<BDF>/...          a function's attributes
  sys/bus/pci/devices/<BDF>                 -> ../../../devices/pci0000:00/<BDF>
  sys/bus/pci/drivers/<driver>/<BDF>        -> the function, while bound to it
  sys/kernel/iommu_groups/<N>/devices/<BDF> -> the function; type, reserved_regions
  sys/devices/virtual/iommu/<name>/         an IOMMU (intel-iommu/{cap,ecap,...})
  sys/class/iommu/<name>                    -> ../../devices/virtual/iommu/<name>
  sys/module/{vfio,vfio_pci,vfio_iommufd,iommufd}/

Functions without SR-IOV have no sriov_* or max_vfs files, as in the kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import uapi
from .iommu.core import VFIO_DRIVER
from .transport.caller import CAP_SYS_ADMIN
from .transport.nodes import ContentFile

if TYPE_CHECKING:
    from .iommu.core import Device, Group, Iommu
    from .system import System
    from .transport.nodes import Node, Tree

ROOT = "sys"
# struct resource flags as /sys/.../resource prints them (include/linux/ioport.h)
IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_SIZEALIGN = 0x40000
IORESOURCE_MEM_64 = 0x100000
PCI_NUM_RESOURCE_LINES = 13  # 6 BARs, the ROM, 6 IOV BARs (a type 0 function)
MODULES = {
    # the modules a kernel serving these nodes has loaded, and the parameters clients read
    "vfio": {"enable_unsafe_noiommu_mode": "N"},
    "vfio_pci": {},
    "vfio_pci_core": {},
    "iommufd": {},
}


def _text(fn: Callable[[], str]) -> Callable[[], bytes]:
    return lambda: (fn() + "\n").encode()


def iommu_sysfs_name(system: System, iommu: Iommu) -> str:
    """The name the kernel gives an IOMMU's sysfs device: dmarN for VT-d (ordered as
    configured), the configured name otherwise."""
    if iommu.cfg.hw_info_type == uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD:
        vtd = [i for i in system.iommus.values() if i.cfg.hw_info_type == uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD]
        return f"dmar{vtd.index(iommu)}"
    return iommu.name


def _pci_root(bdf: str) -> str:
    return f"pci{bdf[:7]}"  # domain:bus


def device_dir(dev: Device) -> str:
    return f"devices/{_pci_root(dev.bdf)}/{dev.bdf}"


def build(tree: Tree, system: System, cdev_nodes: dict[int, Node], rdev: Callable[[Node], int]) -> None:
    """Add the view to tree. cdev_nodes: device index -> its vfio/devices/vfioN node;
    rdev(node): the device number a client sees on it (0 where it is no char device)."""
    for name, params in MODULES.items():
        tree.add_content(f"{ROOT}/module/{name}/initstate", _text(lambda: "live"))
        for p, v in params.items():
            tree.add_content(f"{ROOT}/module/{name}/parameters/{p}", _text(lambda v=v: v), mode=0o644)
    for iommu in system.iommus.values():
        _add_iommu(tree, system, iommu)
    # directories for the drivers of the configuration, vfio-pci and pci-stub (a driver
    # named later with set-driver gets a link to a directory that is not there)
    drivers = {d.driver for d in system.devices} | {VFIO_DRIVER, "pci-stub"}
    for drv in sorted(drivers - {"none"}):
        tree.add_dir(f"{ROOT}/bus/pci/drivers/{drv}")
    tree.add_link(f"{ROOT}/bus/pci/drivers/{VFIO_DRIVER}/module", "../../../../module/vfio_pci")
    for gid in sorted(system.groups):
        _add_group(tree, system, system.groups[gid])
    for i, dev in enumerate(system.devices):
        _add_device(tree, system, dev, i, cdev_nodes[i], rdev, drivers - {"none"})


def _add_iommu(tree: Tree, system: System, iommu: Iommu) -> None:
    name = iommu_sysfs_name(system, iommu)
    base = f"{ROOT}/devices/virtual/iommu/{name}"
    tree.add_dir(base)
    tree.add_link(f"{ROOT}/class/iommu/{name}", f"../../devices/virtual/iommu/{name}")
    c = iommu.cfg
    if c.hw_info_type == uapi.IOMMU_HW_INFO_TYPE_INTEL_VTD:
        # drivers/iommu/intel/iommu.c: hex without 0x; DPDK reads cap for the address width
        tree.add_content(f"{base}/intel-iommu/cap", _text(lambda: f"{c.cap_reg:x}"))
        tree.add_content(f"{base}/intel-iommu/ecap", _text(lambda: f"{c.ecap_reg:x}"))
        tree.add_content(f"{base}/intel-iommu/version", _text(lambda: "1:0"))


def _add_group(tree: Tree, system: System, group: Group) -> None:
    base = f"{ROOT}/kernel/iommu_groups/{group.id}"
    tree.add_dir(f"{base}/devices")
    for dev in group.devices:
        tree.add_link(f"{base}/devices/{dev.bdf}", f"../../../../{device_dir(dev)}")

    def reserved() -> str:
        return "".join(f"0x{a:016x} 0x{b:016x} msi\n" for a, b in group.iommu.cfg.reserved)

    tree.add_content(f"{base}/reserved_regions", lambda: reserved().encode())
    # the default domain's type: translating (DMA) unless a user owns the group
    tree.add_content(f"{base}/type", _text(lambda: "DMA"))


def _add_device(
    tree: Tree, system: System, dev: Device, index: int, cdev: Node, rdev: Callable[[Node], int], drivers: set[str]
) -> None:
    base = f"{ROOT}/{device_dir(dev)}"
    up = "../../.."  # from base to sys/
    cfg = dev.vfio.config

    def reg(off: int, size: int) -> int:
        return int.from_bytes(cfg.read_bytes(off, size), "little")

    for attr, off, size, width in (
        ("vendor", 0x00, 2, 4),
        ("device", 0x02, 2, 4),
        ("subsystem_vendor", 0x2C, 2, 4),
        ("subsystem_device", 0x2E, 2, 4),
        ("revision", 0x08, 1, 2),
    ):
        tree.add_content(
            f"{base}/{attr}", _text(lambda off=off, size=size, width=width: f"0x{reg(off, size):0{width}x}")
        )
    tree.add_content(f"{base}/class", _text(lambda: f"0x{reg(0x09, 3):06x}"))
    tree.add_content(f"{base}/numa_node", _text(lambda: "-1"))  # NUMA_NO_NODE: the models have no node
    tree.add_content(f"{base}/irq", _text(lambda: str(cfg.interrupt_line)))
    tree.add_content(f"{base}/enable", _text(lambda: "1" if dev.vfio.in_use else "0"), mode=0o644)
    tree.add_content(f"{base}/local_cpulist", _text(lambda: f"0-{os.cpu_count() - 1}"))

    def modalias() -> str:
        return f"pci:v{reg(0, 2):08X}d{reg(2, 2):08X}sv{reg(0x2C, 2):08X}sd{reg(0x2E, 2):08X}bc{reg(0x0B, 1):02X}sc{reg(0x0A, 1):02X}i{reg(0x09, 1):02X}"

    tree.add_content(f"{base}/modalias", _text(modalias))

    def uevent() -> str:
        lines = [f"DRIVER={dev.driver}"] if dev.driver != "none" else []
        lines += [
            f"PCI_CLASS={reg(0x09, 3):X}",
            f"PCI_ID={reg(0, 2):04X}:{reg(2, 2):04X}",
            f"PCI_SUBSYS_ID={reg(0x2C, 2):04X}:{reg(0x2E, 2):04X}",
            f"PCI_SLOT_NAME={dev.bdf}",
            f"MODALIAS={modalias()}",
        ]
        return "\n".join(lines)

    tree.add_content(f"{base}/uevent", _text(uevent), mode=0o644)

    def resource() -> bytes:
        lines = []
        for i in range(PCI_NUM_RESOURCE_LINES):
            bar = cfg.bars[i] if i < 6 else None
            if bar is None:
                lines.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
                continue
            start = cfg.bar_address(i)
            flags = IORESOURCE_SIZEALIGN | (IORESOURCE_IO if bar.is_io else IORESOURCE_MEM)
            flags |= (IORESOURCE_MEM_64 if bar.is_64 else 0) | (IORESOURCE_PREFETCH if bar.prefetchable else 0)
            lines.append(f"0x{start:016x} 0x{start + bar.size - 1:016x} 0x{flags:016x}")
        return ("\n".join(lines) + "\n").encode()

    tree.add_content(f"{base}/resource", resource)
    # config: the whole space for CAP_SYS_ADMIN, the standard header (64 bytes) for
    # others, as pci_read_config().
    tree.add(
        f"{base}/config",
        0o644,
        opener=lambda req, flags: _config_file(cfg, req, flags),
        size=cfg.size,
    )
    tree.add_link(f"{base}/iommu_group", f"{up}/kernel/iommu_groups/{dev.group.id}")
    tree.add_link(f"{base}/iommu", f"../../virtual/iommu/{iommu_sysfs_name(system, dev.iommu)}")
    tree.add_link(f"{base}/subsystem", f"{up}/bus/pci")
    tree.add_link(f"{base}/driver", lambda: f"{up}/bus/pci/drivers/{dev.driver}", present=lambda: dev.driver != "none")
    for drv in drivers:
        tree.add_link(
            f"{ROOT}/bus/pci/drivers/{drv}/{dev.bdf}",
            f"../../../../{device_dir(dev)}",
            present=lambda drv=drv: dev.driver == drv,
        )
    tree.add_link(f"{ROOT}/bus/pci/devices/{dev.bdf}", f"../../../{device_dir(dev)}")
    # vfio-dev/vfioN: the device cdev, while vfio-pci drives the function
    name = cdev.name
    vfio_dev = tree.add_dir(f"{base}/vfio-dev")
    vfio_dev.present = lambda: dev.driver == VFIO_DRIVER
    tree.add_content(f"{base}/vfio-dev/{name}/dev", _text(lambda: f"{os.major(rdev(cdev))}:{os.minor(rdev(cdev))}"))
    tree.add_content(
        f"{base}/vfio-dev/{name}/uevent",
        _text(lambda: f"MAJOR={os.major(rdev(cdev))}\nMINOR={os.minor(rdev(cdev))}\nDEVNAME=vfio/devices/{name}"),
    )


def _config_file(cfg, req, flags: int) -> ContentFile:  # noqa: ANN001
    size = cfg.size if req.caller.capable(CAP_SYS_ADMIN) else 64
    return ContentFile(lambda: cfg.read_bytes(0, size), flags)
