"""Daemon configuration: a TOML file, or the embedded default."""

from __future__ import annotations

import grp
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/iommufd-cuse/config.toml"
DEFAULT_MOUNTPOINT = "/run/iommufd-cuse/mnt"
DEFAULT_CONTROL_SOCKET = "/run/iommufd-cuse/control.sock"

DEFAULT_TOML = """\
# The embedded default configuration of iommufd-cuse.

[nodes.iommu]          # /dev/iommu, as the kernel's misc device: root:root 0660
mode = "0660"
owner = "root"
group = "root"

[nodes.vfio]           # /dev/vfio/vfio, the type1 compatibility node: 0666
mode = "0666"
owner = "root"
group = "root"

# An emulated Intel VT-d IOMMU as a real one reports itself (48-bit, 4K/2M/1G
# pages, the x86 MSI window reserved).
[[iommu]]
name = "vtd0"
hw_info_type = "intel_vtd"
vtd_flags = 0x1
cap_reg = 0xd2008c222f0606
ecap_reg = 0xf00f4a
pgsize_bitmap = 0x40201000
aperture = [0x0, 0xffffffffffff]
reserved = [[0xfee00000, 0xfeefffff]]
dirty_tracking = false
nest_parent = false

# Devices: vfio-pci bound (user-assignable) unless driver says otherwise:
# "vfio-pci", "none" (no driver), "pci-stub" (no DMA), or the name of a
# DMA-capable kernel driver (e.g. "e1000e"). Each group is the unit of isolation.
[[device]]
bdf = "0000:00:04.0"
model = "edu"
iommu = "vtd0"
group = 4

[[device]]
bdf = "0000:00:05.0"
model = "dma-engine"
iommu = "vtd0"
group = 5

[[device]]                # a group of two: both functions must go to one owner
bdf = "0000:00:06.0"
model = "edu"
iommu = "vtd0"
group = 6

[[device]]
bdf = "0000:00:06.1"
model = "edu"
iommu = "vtd0"
group = 6

[[device]]                # an NVMe controller: one namespace of 1 GiB sparse anonymous memory
bdf = "0000:00:07.0"      # (size = bytes, backing = "FILE", serial = "...", model_name = "...")
model = "nvme"
iommu = "vtd0"
group = 7

[[device]]                # a virtio-blk disk (virtio 1.2, 1af4:1042): 1 GiB of sparse anonymous memory
bdf = "0000:00:08.0"      # (size, backing = "FILE", serial = "...", read_only, num_queues = 1..16)
model = "virtio-blk"
iommu = "vtd0"
group = 8
"""


class ConfigError(ValueError):
    pass


@dataclass
class NodeConfig:
    mode: int
    uid: int
    gid: int


HW_INFO_TYPES = {"none": 0, "intel_vtd": 1, "arm_smmuv3": 2, "amd": 4}
DEVICE_DEFAULT_NODE = {"mode": "0660", "owner": "root", "group": "root"}


@dataclass
class IommuConfig:
    name: str
    hw_info_type: int = 0
    vtd_flags: int = 0
    cap_reg: int = 0
    ecap_reg: int = 0
    pgsize_bitmap: int = 0x40201000
    aperture: tuple[int, int] = (0, (1 << 48) - 1)
    reserved: list[tuple[int, int]] = field(default_factory=list)
    dirty_tracking: bool = False
    nest_parent: bool = False


@dataclass
class DeviceConfig:
    bdf: str
    model: str
    iommu: str
    group: int
    driver: str = "vfio-pci"
    node: NodeConfig = field(default_factory=lambda: NodeConfig(0o660, 0, 0))
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    nodes: dict[str, NodeConfig] = field(default_factory=dict)
    iommus: list[IommuConfig] = field(default_factory=list)
    devices: list[DeviceConfig] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


def _uid(v: Any) -> int:
    if isinstance(v, int):
        return v
    try:
        return pwd.getpwnam(v).pw_uid
    except KeyError:
        raise ConfigError(f"unknown user {v!r}") from None


def _gid(v: Any) -> int:
    if isinstance(v, int):
        return v
    try:
        return grp.getgrnam(v).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {v!r}") from None


def node_config(d: dict[str, Any], default_mode: int = 0o660) -> NodeConfig:
    mode = d.get("mode", default_mode)
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise ConfigError(f'bad mode {mode!r}: an octal string like "0660"') from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"bad mode {oct(mode)}")
    return NodeConfig(mode, _uid(d.get("owner", 0)), _gid(d.get("group", 0)))


def parse(text: str) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(e)) from None
    defaults = tomllib.loads(DEFAULT_TOML)
    nodes_raw = {**defaults["nodes"], **raw.get("nodes", {})}
    nodes = {
        "iommu": node_config(nodes_raw["iommu"], 0o660),
        "vfio": node_config(nodes_raw["vfio"], 0o666),
    }
    iommus = [_iommu(d) for d in raw.get("iommu", defaults["iommu"])]
    names = {i.name for i in iommus}
    devices = [_device(d, names) for d in raw.get("device", defaults["device"] if "iommu" not in raw else [])]
    bdfs = [d.bdf for d in devices]
    if len(set(bdfs)) != len(bdfs):
        raise ConfigError("duplicate device bdf")
    return Config(nodes=nodes, iommus=iommus, devices=devices, raw=raw)


def _range(v: Any) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) and v[0] <= v[1]):
        raise ConfigError(f"bad range {v!r}: want [first, last]")
    return v[0], v[1]


def _iommu(d: dict[str, Any]) -> IommuConfig:
    t = d.get("hw_info_type", "none")
    if isinstance(t, str):
        if t not in HW_INFO_TYPES:
            raise ConfigError(f"unknown hw_info_type {t!r} (one of {', '.join(HW_INFO_TYPES)})")
        t = HW_INFO_TYPES[t]
    pg = d.get("pgsize_bitmap", 0x40201000)
    if pg & 0xFFF or pg & -pg != 0x1000:
        raise ConfigError(f"pgsize_bitmap {pg:#x}: the smallest page must be 4 KiB")
    return IommuConfig(
        name=d["name"],
        hw_info_type=t,
        vtd_flags=d.get("vtd_flags", 0),
        cap_reg=d.get("cap_reg", 0),
        ecap_reg=d.get("ecap_reg", 0),
        pgsize_bitmap=pg,
        aperture=_range(d.get("aperture", [0, (1 << 48) - 1])),
        reserved=[_range(r) for r in d.get("reserved", [])],
        dirty_tracking=bool(d.get("dirty_tracking", False)),
        nest_parent=bool(d.get("nest_parent", False)),
    )


def _device(d: dict[str, Any], iommus: set[str]) -> DeviceConfig:
    try:
        bdf, model, iommu, group = d["bdf"], d["model"], d["iommu"], d["group"]
    except KeyError as e:
        raise ConfigError(f"device needs {e.args[0]}") from None
    if iommu not in iommus:
        raise ConfigError(f"device {bdf}: unknown iommu {iommu!r}")
    known = {"bdf", "model", "iommu", "group", "driver", "node"}
    return DeviceConfig(
        bdf=bdf,
        model=model,
        iommu=iommu,
        group=int(group),
        driver=d.get("driver", "vfio-pci"),
        node=node_config({**DEVICE_DEFAULT_NODE, **d.get("node", {})}),
        options={k: v for k, v in d.items() if k not in known},
    )


def serve_config_path(path: str | None, default: str = DEFAULT_CONFIG_PATH) -> str | None:
    """The file `serve` reads: the one given, else the system one if it exists,
    else None (the embedded default)."""
    if path is not None:
        return path
    return default if Path(default).exists() else None


def installed_text() -> str:
    """What `iommufd-cuse install` writes to DEFAULT_CONFIG_PATH: the embedded default."""
    body = DEFAULT_TOML.split("\n", 1)[1]  # without the "embedded default" title
    return (
        f"# {DEFAULT_CONFIG_PATH}: configuration of iommufd-cuse, read by `iommufd-cuse serve`\n"
        "# (restart the service after a change). Written by `iommufd-cuse install`;\n"
        "# `iommufd-cuse uninstall` keeps it once changed.\n" + body
    )


def load(path: str | None) -> Config:
    if path is None:
        return parse(DEFAULT_TOML)
    try:
        return parse(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
