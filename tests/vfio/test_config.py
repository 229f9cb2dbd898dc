"""PCI config space as vfio-pci presents it (drivers/vfio/pci/vfio_pci_config.c)."""

from __future__ import annotations

import pytest

from iommufd_cuse.vfio.pci import config as C
from iommufd_cuse.vfio.pci.config import ConfigAccessError, ConfigSpace
from iommufd_cuse.vfio.pci.dmaengine import DmaEngine
from iommufd_cuse.vfio.pci.edu import Edu
from iommufd_cuse.vfio.pci.model import Bar, PciFunction


class Mixed(PciFunction):
    """Every kind of BAR and capability at once."""

    vendor_id = 0xABCD
    device_id = 0x0102
    revision = 0x07
    class_code = 0x020000
    bars = [
        Bar(256, is_io=True),
        Bar(1 << 33, is_64=True, prefetchable=True),
        None,
        Bar(64 << 10, prefetchable=True),
        Bar(4096, is_64=True),
        None,
    ]
    express = True
    msi_vectors = 8
    msix_vectors = 16
    msix_bar = 4
    msix_table_offset = 0x0
    msix_pba_offset = 0x800
    intx_pin = 2


def caps(cfg: ConfigSpace) -> list[tuple[int, int]]:
    """Walk the list from 0x34 as a driver does: (id, offset) pairs."""
    assert cfg.read(C.PCI_STATUS, 2) & C.PCI_STATUS_CAP_LIST
    out = []
    pos = cfg.read(C.PCI_CAPABILITY_LIST, 1)
    while pos:
        assert pos % 4 == 0 and 0x40 <= pos < 0x100
        assert len(out) < 48, "capability list loops"
        out.append((cfg.read(pos, 1), pos))
        pos = cfg.read(pos + 1, 1)
    return out


def bar_size(cfg: ConfigSpace, index: int) -> int:
    """Size a BAR as firmware does: write all ones, read back, restore."""
    off = C.PCI_BASE_ADDRESS_0 + 4 * index
    orig = cfg.read(off, 4)
    cfg.write(off, 4, 0xFFFFFFFF)
    lo = cfg.read(off, 4)
    cfg.write(off, 4, orig)
    if lo & 1:
        return (~(lo & ~0x3) & 0xFFFFFFFF) + 1
    if lo & C.PCI_BASE_ADDRESS_MEM_TYPE_64:
        orig_hi = cfg.read(off + 4, 4)
        cfg.write(off + 4, 4, 0xFFFFFFFF)
        hi = cfg.read(off + 4, 4)
        cfg.write(off + 4, 4, orig_hi)
        return (~((hi << 32) | (lo & ~0xF)) & ((1 << 64) - 1)) + 1
    return (~(lo & ~0xF) & 0xFFFFFFFF) + 1 if lo else 0


def test_header_identity() -> None:
    cfg = ConfigSpace(Edu)
    assert cfg.size == 0x100
    assert cfg.read(0, 4) == 0x11E81234
    assert cfg.read(C.PCI_VENDOR_ID, 2) == 0x1234
    assert cfg.read(C.PCI_DEVICE_ID, 2) == 0x11E8
    assert cfg.read(C.PCI_REVISION_ID, 4) == 0x00FF0010  # class 00, subclass ff, prog-if 00, rev 0x10
    assert cfg.read(C.PCI_HEADER_TYPE, 1) == 0
    assert cfg.read(C.PCI_SUBSYSTEM_VENDOR_ID, 4) == 0x11001AF4
    assert cfg.read(C.PCI_INTERRUPT_PIN, 1) == 1
    assert cfg.read(C.PCI_COMMAND, 2) == 0
    # identity is read-only
    cfg.write(0, 4, 0)
    cfg.write(C.PCI_REVISION_ID, 4, 0xFFFFFFFF)
    cfg.write(C.PCI_HEADER_TYPE, 1, 0xFF)
    cfg.write(C.PCI_INTERRUPT_PIN, 1, 4)
    assert cfg.read(0, 4) == 0x11E81234
    assert cfg.read(C.PCI_REVISION_ID, 4) == 0x00FF0010
    assert cfg.read(C.PCI_HEADER_TYPE, 1) == 0
    assert cfg.read(C.PCI_INTERRUPT_PIN, 1) == 1


def test_express_size_and_empty_extended_list() -> None:
    cfg = ConfigSpace(DmaEngine)
    assert cfg.size == 0x1000
    assert cfg.read(0x100, 4) == 0
    cfg.write(0x100, 4, 0xFFFFFFFF)
    assert cfg.read(0x100, 4) == 0
    assert cfg.read(0xFFC, 4) == 0
    with pytest.raises(ConfigAccessError):
        cfg.read(0xFFE, 4)


def test_access_bounds() -> None:
    cfg = ConfigSpace(Edu)
    assert cfg.read_bytes(0xFC, 4) == bytes(4)
    for off, size in ((0xFD, 4), (0xFF, 2), (0x100, 1), (-1, 1)):
        with pytest.raises(ConfigAccessError):
            cfg.read(off, size)
        with pytest.raises(ConfigAccessError):
            cfg.write(off, size, 0)
    with pytest.raises(ConfigAccessError):
        cfg.read(0, 3)
    with pytest.raises(ConfigAccessError):
        cfg.read_bytes(0xF0, 0x11)


def test_command_register() -> None:
    cfg = ConfigSpace(Edu)
    seen = []
    cfg.on_command_change = lambda old, new: seen.append((old, new))
    cfg.write(C.PCI_COMMAND, 2, 0xFFFF)
    assert cfg.read(C.PCI_COMMAND, 2) == 0x0507  # I/O, memory, master, SERR#, INTx disable
    assert cfg.memory_enabled and cfg.bus_master and cfg.intx_disabled and cfg.io_enabled
    assert seen == [(0, 0x0507)]
    cfg.write(C.PCI_COMMAND, 2, 0x0507)
    assert seen == [(0, 0x0507)]  # no change, no call
    cfg.write(C.PCI_COMMAND, 1, 0x02)  # low byte only: I/O and master off
    assert cfg.read(C.PCI_COMMAND, 2) == 0x0502
    assert cfg.memory_enabled and not cfg.bus_master and cfg.intx_disabled
    cfg.write(C.PCI_COMMAND + 1, 1, 0)
    assert cfg.command == 0x0002 and not cfg.intx_disabled
    assert seen[-1] == (0x0502, 0x0002)


def test_enable_device_matches_reference() -> None:
    # shared/reference: "config: vendor=0x1234 device=0x11e8 command=0x0103", and
    # "pwrite(command|=BME) ... command now 0x0107"
    cfg = ConfigSpace(Edu)
    cfg.enable_device()
    assert cfg.read(C.PCI_COMMAND, 2) == 0x0103
    cfg.write(C.PCI_COMMAND, 2, cfg.read(C.PCI_COMMAND, 2) | C.PCI_COMMAND_MASTER)
    assert cfg.read(C.PCI_COMMAND, 2) == 0x0107


def test_status_rw1c_and_read_only_bits() -> None:
    cfg = ConfigSpace(Edu)
    assert cfg.status == C.PCI_STATUS_CAP_LIST
    cfg.write(C.PCI_STATUS, 2, 0xFFFF)  # nothing set: nothing to clear, RO bits stay
    assert cfg.status == C.PCI_STATUS_CAP_LIST
    cfg.set_status_bits(C.PCI_STATUS_REC_MASTER_ABORT | C.PCI_STATUS_SIG_SYSTEM_ERROR | C.PCI_STATUS_CAP_LIST)
    cfg.interrupt_status = True
    assert cfg.status == 0x6018
    cfg.write(C.PCI_STATUS, 2, 0)  # writing 0 clears nothing
    assert cfg.status == 0x6018
    cfg.write(C.PCI_STATUS, 2, C.PCI_STATUS_REC_MASTER_ABORT | C.PCI_STATUS_INTERRUPT | C.PCI_STATUS_CAP_LIST)
    assert cfg.status == 0x4018  # only the RW1C bit written as 1 cleared
    # a dword write over command+status: the command half is written, status RW1C
    cfg.write(C.PCI_COMMAND, 4, 0x4000_0006)
    assert cfg.command == 0x0006
    assert cfg.status == 0x0018


def test_interrupt_line_rw_pin_ro_cache_line_latency() -> None:
    edu = ConfigSpace(Edu)
    edu.write(C.PCI_INTERRUPT_LINE, 2, 0x040B)  # line 0x0b; pin byte ignored
    assert edu.read(C.PCI_INTERRUPT_LINE, 2) == 0x010B
    assert edu.interrupt_line == 0x0B
    edu.write(C.PCI_CACHE_LINE_SIZE, 2, 0x4010)
    assert edu.read(C.PCI_CACHE_LINE_SIZE, 2) == 0x4010  # conventional: latency timer RW
    edu.write(C.PCI_BIST, 1, 0xFF)
    assert edu.read(C.PCI_BIST, 1) == 0
    exp = ConfigSpace(DmaEngine)
    exp.write(C.PCI_CACHE_LINE_SIZE, 2, 0x4010)
    assert exp.read(C.PCI_CACHE_LINE_SIZE, 2) == 0x0010  # express: latency timer hardwired 0


def test_bar_sizing_32bit() -> None:
    cfg = ConfigSpace(Edu)
    off = C.PCI_BASE_ADDRESS_0
    assert cfg.read(off, 4) == 0  # 32-bit, non-prefetchable memory
    cfg.write(off, 4, 0xFFFFFFFF)
    assert cfg.read(off, 4) == 0xFFF00000
    assert bar_size(cfg, 0) == 1 << 20
    cfg.write(off, 4, 0xFEBC1234)
    assert cfg.read(off, 4) == 0xFEB00000  # address kept, low bits forced
    assert cfg.bar_address(0) == 0xFEB00000
    for i in range(1, 6):
        cfg.write(off + 4 * i, 4, 0xFFFFFFFF)
        assert cfg.read(off + 4 * i, 4) == 0, f"unused BAR{i}"
    cfg.write(C.PCI_ROM_ADDRESS, 4, 0xFFFFFFFF)
    assert cfg.read(C.PCI_ROM_ADDRESS, 4) == 0  # no expansion ROM


def test_bar_sizing_64bit() -> None:
    cfg = ConfigSpace(DmaEngine)
    lo, hi = C.PCI_BASE_ADDRESS_0, C.PCI_BASE_ADDRESS_0 + 4
    assert cfg.read(lo, 4) == 0x4  # 64-bit, non-prefetchable
    cfg.write(lo, 4, 0xFFFFFFFF)
    cfg.write(hi, 4, 0xFFFFFFFF)
    assert cfg.read(lo, 4) == 0xFFFFC004
    assert cfg.read(hi, 4) == 0xFFFFFFFF
    assert bar_size(cfg, 0) == 16 << 10
    assert bar_size(cfg, 2) == 4 << 10
    cfg.write(lo, 4, 0xFE000000)
    cfg.write(hi, 4, 0x00000012)
    assert cfg.bar_address(0) == 0x12_FE000000
    assert cfg.read(lo, 4) == 0xFE000004
    # sizing one half leaves the other alone
    cfg.write(hi, 4, 0xFFFFFFFF)
    assert cfg.read(lo, 4) == 0xFE000004


def test_bar_kinds() -> None:
    cfg = ConfigSpace(Mixed)
    base = C.PCI_BASE_ADDRESS_0
    assert [cfg.read(base + 4 * i, 4) for i in range(6)] == [0x1, 0xC, 0, 0x8, 0x4, 0]
    assert bar_size(cfg, 0) == 256
    cfg.write(base, 4, 0xFFFFFFFF)
    assert cfg.read(base, 4) == 0xFFFFFF01  # I/O: bit 0 set, bit 1 reserved
    assert bar_size(cfg, 1) == 1 << 33
    cfg.write(base + 4, 4, 0xFFFFFFFF)
    cfg.write(base + 8, 4, 0xFFFFFFFF)
    assert (cfg.read(base + 4, 4), cfg.read(base + 8, 4)) == (0x0000000C, 0xFFFFFFFF - 1)
    assert bar_size(cfg, 3) == 64 << 10
    assert bar_size(cfg, 4) == 4096


def test_bar_byte_writes() -> None:
    cfg = ConfigSpace(Edu)
    cfg.write(C.PCI_BASE_ADDRESS_0 + 3, 1, 0xFF)
    assert cfg.read(C.PCI_BASE_ADDRESS_0, 4) == 0xFF000000
    cfg.write(C.PCI_BASE_ADDRESS_0 + 2, 1, 0xFF)
    assert cfg.read(C.PCI_BASE_ADDRESS_0, 4) == 0xFFF00000
    cfg.write(C.PCI_BASE_ADDRESS_0, 2, 0xFFFF)
    assert cfg.read(C.PCI_BASE_ADDRESS_0, 4) == 0xFFF00000


def test_capability_walks() -> None:
    assert caps(ConfigSpace(Edu)) == [(C.PCI_CAP_ID_MSI, 0x40)]
    assert [c for c, _ in caps(ConfigSpace(DmaEngine))] == [C.PCI_CAP_ID_PM, C.PCI_CAP_ID_MSIX, C.PCI_CAP_ID_EXP]
    mixed = ConfigSpace(Mixed)
    walk = caps(mixed)
    assert [c for c, _ in walk] == [C.PCI_CAP_ID_PM, C.PCI_CAP_ID_MSI, C.PCI_CAP_ID_MSIX, C.PCI_CAP_ID_EXP]
    assert walk[0][1] == 0x40
    for cap_id, off in walk:
        assert mixed.cap_offset(cap_id) == off
    # the pointers are read-only
    mixed.write(C.PCI_CAPABILITY_LIST, 1, 0x80)
    mixed.write(0x41, 1, 0)
    assert caps(mixed) == walk

    class NoCaps(PciFunction):
        bars = [Bar(4096)]
        intx_pin = 0

    bare = ConfigSpace(NoCaps)
    assert bare.status & C.PCI_STATUS_CAP_LIST == 0
    assert bare.read(C.PCI_CAPABILITY_LIST, 1) == 0
    assert bare.read(C.PCI_INTERRUPT_PIN, 1) == 0


def test_msi_capability() -> None:
    notes = []
    cfg = ConfigSpace(Mixed, notify=notes.append)
    m = cfg.cap_offset(C.PCI_CAP_ID_MSI)
    flags = cfg.read(m + 2, 2)
    assert flags == C.PCI_MSI_FLAGS_64BIT | 3 << 1  # 64-bit, 8 vectors capable, off
    assert not cfg.msi_enabled and cfg.msi_vectors_enabled == 1
    cfg.write(m + 2, 2, 0xFFFF)  # everything: only enable and MME (clamped to MMC) stick
    assert cfg.read(m + 2, 2) == C.PCI_MSI_FLAGS_64BIT | 3 << 4 | 3 << 1 | 1
    assert cfg.msi_enabled and cfg.msi_vectors_enabled == 8
    assert notes == ["msi"]
    cfg.write(m + 2, 1, 0x11)  # MME 2 vectors
    assert cfg.msi_vectors_enabled == 2
    cfg.write(m + 4, 4, 0xFEE01004)
    cfg.write(m + 8, 4, 0x1)
    cfg.write(m + 12, 2, 0x4041)
    assert cfg.msi_address == 0x1_FEE01004 and cfg.msi_data == 0x4041
    assert cfg.read(m + 12, 4) == 0x4041  # bytes past the capability (0x0e, 0x0f) are not the data
    cfg.write(m + 2, 2, 0)
    assert not cfg.msi_enabled
    # the VFIO layer may keep enable to itself (vfio-pci: MSI is enabled by SET_IRQS)
    cfg.msi_enable_writable = False
    cfg.write(m + 2, 2, 1)
    assert not cfg.msi_enabled
    cfg.set_msi_enabled(True)
    assert cfg.msi_enabled
    cfg.write(m + 2, 2, 0)
    assert cfg.msi_enabled


def test_msix_capability() -> None:
    notes = []
    cfg = ConfigSpace(Mixed, notify=notes.append)
    x = cfg.cap_offset(C.PCI_CAP_ID_MSIX)
    assert cfg.read(x + 2, 2) == 15  # table size - 1, disabled, unmasked
    assert cfg.read(x + 4, 4) == 0x000 | 4  # table offset | BIR
    assert cfg.read(x + 8, 4) == 0x800 | 4  # PBA offset | BIR
    cfg.write(x + 2, 2, 0xFFFF)
    assert cfg.read(x + 2, 2) == 0xC000 | 15
    assert cfg.msix_enabled and cfg.msix_function_masked
    cfg.write(x + 3, 1, 0x80)  # unmask
    assert cfg.msix_enabled and not cfg.msix_function_masked
    assert notes == ["msix", "msix"]
    cfg.write(x + 4, 4, 0xFFFFFFFF)
    cfg.write(x + 8, 4, 0)
    assert (cfg.read(x + 4, 4), cfg.read(x + 8, 4)) == (4, 0x804)
    cfg.msix_control_writable = False
    cfg.write(x + 2, 2, 0)
    assert cfg.msix_enabled
    cfg.set_msix_enabled(False)
    assert not cfg.msix_enabled


def test_express_capability() -> None:
    flrs = []
    notes = []
    cfg = ConfigSpace(DmaEngine, notify=notes.append)
    cfg.on_flr = lambda: flrs.append(1)
    e = cfg.cap_offset(C.PCI_CAP_ID_EXP)
    assert cfg.read(e + C.PCI_EXP_FLAGS, 2) & 0xF == 2  # version 2
    assert cfg.read(e + C.PCI_EXP_FLAGS, 2) >> 4 & 0xF == 0  # endpoint
    assert cfg.read(e + C.PCI_EXP_DEVCAP, 4) & (1 << 28)  # FLR capable
    assert cfg.read(e + C.PCI_EXP_LNKSTA, 2) & 0xF == 3  # 8 GT/s
    assert cfg.read(e + C.PCI_EXP_LNKSTA, 2) >> 4 & 0x3F == 4  # x4
    ctl = e + C.PCI_EXP_DEVCTL
    cfg.write(ctl, 2, 0x7FFF)
    assert cfg.read(ctl, 2) == 0x79FF  # phantom functions and aux power stay 0
    cfg.write(ctl, 2, 0x8000 | 0x2810)  # initiate FLR
    assert cfg.read(ctl, 2) == 0x2810  # reads 0
    assert flrs == [1] and notes == ["flr"]
    cfg.write(e + C.PCI_EXP_DEVCTL2, 2, 0xFFFF)
    assert cfg.read(e + C.PCI_EXP_DEVCTL2, 2) == 0x0010
    before = cfg.read_bytes(e, C.PCI_CAP_EXP_ENDPOINT_SIZEOF_V2)
    for off in (C.PCI_EXP_DEVCAP, C.PCI_EXP_LNKCAP, C.PCI_EXP_LNKCTL, C.PCI_EXP_DEVSTA, C.PCI_EXP_LNKCAP2):
        cfg.write(e + off, 2, 0xFFFF)
    assert cfg.read_bytes(e, C.PCI_CAP_EXP_ENDPOINT_SIZEOF_V2) == before


def test_power_management() -> None:
    notes = []
    cfg = ConfigSpace(DmaEngine, notify=notes.append)
    p = cfg.cap_offset(C.PCI_CAP_ID_PM)
    assert cfg.read(p + 2, 2) == 0x0003
    ctrl = p + C.PCI_PM_CTRL
    assert cfg.read(ctrl, 2) == C.PCI_PM_CTRL_NO_SOFT_RESET and cfg.power_state == 0
    cfg.write(ctrl, 2, 3)
    assert cfg.power_state == 3 and cfg.read(ctrl, 2) == 0x000B
    cfg.write(ctrl, 2, 1)  # D1 not supported: stays D3hot
    assert cfg.power_state == 3
    cfg.write(ctrl, 2, 0xFFFC)
    assert cfg.power_state == 0 and cfg.read(ctrl, 2) == 0x0008
    assert notes == ["pm", "pm"]


def test_unaligned_accesses_are_split_as_vfio_does() -> None:
    cfg = ConfigSpace(Edu)
    assert cfg._chunks(0x01, 4) == [(0x01, 1), (0x02, 2), (0x04, 1)]
    assert cfg._chunks(0x00, 8) == [(0x00, 4), (0x04, 4)]
    assert cfg._chunks(0x03, 2) == [(0x03, 1), (0x04, 1)]
    # a piece never crosses a capability's end: edu's MSI capability is 14 bytes at 0x40
    assert cfg._chunks(0x4C, 4) == [(0x4C, 2), (0x4E, 2)]
    # nor a header/capability border
    assert cfg._chunks(0x3E, 4) == [(0x3E, 2), (0x40, 2)]
    assert cfg.read(0x01, 4) == int.from_bytes(cfg.snapshot()[1:5], "little")
    assert cfg.read(0x01, 4) == 0x0011E812
    # an unaligned write over command's high byte and status
    cfg.write(C.PCI_COMMAND + 1, 2, 0xFF04)
    assert cfg.command == 0x0400 and cfg.status == C.PCI_STATUS_CAP_LIST
    # an unaligned write across two BARs (edu: BAR0 1 MiB, BAR1 unused)
    cfg.write(0x12, 4, 0xFFFFFFFF)
    assert cfg.read(0x10, 4) == 0xFFF00000 and cfg.read(0x14, 4) == 0
    # arbitrary lengths through the byte interface
    cfg.write_bytes(0x3B, bytes([0xAA, 0x0C, 0x09]))
    assert cfg.read(C.PCI_INTERRUPT_LINE, 2) == 0x010C  # 0x3b reserved, line written, pin RO


def test_reset_to_power_on() -> None:
    notes: list[str] = []
    cfg = ConfigSpace(Mixed, notify=notes.append)
    seen = []
    cfg.on_command_change = lambda old, new: seen.append((old, new))
    power_on = cfg.snapshot()
    cfg.write(C.PCI_COMMAND, 2, 0x0406)
    cfg.write(C.PCI_BASE_ADDRESS_0 + 12, 4, 0xFFFFFFFF)
    cfg.write(C.PCI_INTERRUPT_LINE, 1, 5)
    cfg.write(cfg.cap_offset(C.PCI_CAP_ID_MSI) + 2, 2, 1)
    cfg.write(cfg.cap_offset(C.PCI_CAP_ID_MSIX) + 2, 2, 0x8000)
    cfg.write(cfg.cap_offset(C.PCI_CAP_ID_PM) + 4, 2, 3)
    assert cfg.snapshot() != power_on
    cfg.reset()
    assert cfg.snapshot() == power_on
    assert not (cfg.msi_enabled or cfg.msix_enabled or cfg.memory_enabled or cfg.bus_master)
    assert seen[-1] == (0x0406, 0)
    assert notes[-1] == "reset"


def test_multifunction_bit() -> None:
    cfg = ConfigSpace(Edu)
    cfg.set_multifunction(True)
    assert cfg.read(C.PCI_HEADER_TYPE, 1) == 0x80
    cfg.reset()
    assert cfg.read(C.PCI_HEADER_TYPE, 1) == 0x80


def test_binds_to_a_model_instance() -> None:
    class Fn(PciFunction):
        bars = [Bar(4096)]
        msi_vectors = 1

        def __init__(self) -> None:
            super().__init__(None, None, None)  # type: ignore[arg-type]
            self.seen: list[str] = []

        def config_changed(self, what: str) -> None:
            self.seen.append(what)

    fn = Fn()
    cfg = ConfigSpace(fn)
    assert fn.config is cfg
    cfg.write(C.PCI_COMMAND, 2, 2)
    assert fn.seen == ["command"]


@pytest.mark.parametrize(
    "attrs",
    [
        {"bars": [Bar(3000)]},  # not a power of two
        {"bars": [Bar(8)]},  # memory BAR under 16 bytes
        {"bars": [None, None, None, None, None, Bar(4096, is_64=True)]},  # no upper half
        {"bars": [Bar(4096, is_64=True), Bar(4096)]},  # upper half in use
        {"bars": [Bar(512, is_io=True)]},  # I/O BAR too large
        {"bars": [Bar(1 << 32)]},  # 32-bit BAR of 4 GiB
        {"bars": [Bar(4096)], "msi_vectors": 3},
        {"bars": [Bar(4096)], "msix_vectors": 4, "msix_bar": 1},  # no such BAR
        {"bars": [Bar(4096)], "msix_vectors": 4, "msix_pba_offset": 0x20},  # overlaps the table
        {"bars": [Bar(4096)], "msix_vectors": 4, "msix_pba_offset": 0x1000},  # outside the BAR
        {"bars": [Bar(4096)], "intx_pin": 5},
    ],
)
def test_inconsistent_models_are_refused(attrs: dict) -> None:
    fn = type("Bad", (PciFunction,), attrs)
    with pytest.raises(ValueError):
        ConfigSpace(fn)
