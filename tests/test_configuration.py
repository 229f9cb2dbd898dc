"""The configuration: the embedded default, the README's copy of it, and bad files."""

from __future__ import annotations

import re

import pytest
from harness import ROOT

from iommufd_cuse import config


def test_readme_shows_the_embedded_default():
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert config.DEFAULT_TOML in blocks


def test_default_topology_has_every_ownership_case():
    cfg = config.load(None)
    groups: dict[int, list[str]] = {}
    for d in cfg.devices:
        groups.setdefault(d.group, []).append(d.bdf)
    alone = [g for g, ds in groups.items() if len(ds) == 1]
    shared = [g for g, ds in groups.items() if len(ds) >= 2]
    assert len(alone) >= 2 and shared
    (vtd,) = cfg.iommus
    assert vtd.hw_info_type == 1 and (0xFEE00000, 0xFEEFFFFF) in vtd.reserved
    assert cfg.nodes["iommu"].mode == 0o660 and cfg.nodes["vfio"].mode == 0o666


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[[iommu]]\nname='a'\n[[device]]\nbdf='0:0:0.0'\nmodel='edu'\niommu='b'\ngroup=1\n", "unknown iommu"),
        ("[[iommu]]\nname='a'\naperture=[5,1]\n", "bad range"),
        ("[[iommu]]\nname='a'\npgsize_bitmap=0x200000\n", "4 KiB"),
        ("[[iommu]]\nname='a'\nhw_info_type='sparc'\n", "hw_info_type"),
        ("[nodes.iommu]\nmode='0999'\n", "bad mode"),
        ("[nodes.iommu]\nowner='no-such-user-here'\n", "unknown user"),
        (
            "[[iommu]]\nname='a'\n[[device]]\nbdf='x'\nmodel='edu'\niommu='a'\ngroup=1\n"
            "[[device]]\nbdf='x'\nmodel='edu'\niommu='a'\ngroup=2\n",
            "duplicate",
        ),
        ("[[iommu]]\nname='a'\n[[device]]\nmodel='edu'\niommu='a'\ngroup=1\n", "needs bdf"),
        ("this is = = not toml", ""),
    ],
)
def test_bad_configuration_is_refused(text, why):
    with pytest.raises(config.ConfigError) as e:
        config.parse(text)
    assert why in str(e.value)
