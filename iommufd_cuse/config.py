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
"""


class ConfigError(ValueError):
    pass


@dataclass
class NodeConfig:
    mode: int
    uid: int
    gid: int


@dataclass
class Config:
    nodes: dict[str, NodeConfig] = field(default_factory=dict)
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
        mode = int(mode, 8)
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
    return Config(nodes=nodes, raw=raw)


def load(path: str | None) -> Config:
    if path is None:
        return parse(DEFAULT_TOML)
    try:
        return parse(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
