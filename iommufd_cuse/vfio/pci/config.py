"""PCI configuration space of an emulated function, as vfio-pci shows it to userspace.

The layout is built from the model's class attributes (ids, class code, bars,
express, msi_vectors, msix_*, intx_pin): a type 0 header, a capability list
from 0x40 (power management, MSI, MSI-X, PCI Express, whichever apply) and, for
PCI Express, 4 KiB with an empty extended capability list at 0x100.

Accesses follow drivers/vfio/pci/vfio_pci_config.c: any offset and length
inside the space is allowed; it is cut into naturally aligned pieces of 4, 2
or 1 bytes that never cross a dword or the end of a capability, and each piece
is applied through per-byte write masks. Read-only bits ignore writes, RW1C
bits clear where a 1 is written, and BARs keep only their address bits (so an
all-ones write reads back the size mask with the type bits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .model import Bar

log = logging.getLogger(__name__)

# include/uapi/linux/pci_regs.h
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_STD_HEADER_SIZEOF = 0x40
PCI_CFG_SPACE_SIZE = 0x100
PCI_CFG_SPACE_EXP_SIZE = 0x1000

PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_INTX_DISABLE = 0x0400

PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010
PCI_STATUS_PARITY = 0x0100  # master data parity error
PCI_STATUS_SIG_TARGET_ABORT = 0x0800
PCI_STATUS_REC_TARGET_ABORT = 0x1000
PCI_STATUS_REC_MASTER_ABORT = 0x2000
PCI_STATUS_SIG_SYSTEM_ERROR = 0x4000
PCI_STATUS_DETECTED_PARITY = 0x8000
STATUS_RW1C = (
    PCI_STATUS_PARITY
    | PCI_STATUS_SIG_TARGET_ABORT
    | PCI_STATUS_REC_TARGET_ABORT
    | PCI_STATUS_REC_MASTER_ABORT
    | PCI_STATUS_SIG_SYSTEM_ERROR
    | PCI_STATUS_DETECTED_PARITY
)

PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08

PCI_CAP_LIST_ID = 0
PCI_CAP_LIST_NEXT = 1
PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

PCI_PM_PMC = 2
PCI_PM_CTRL = 4
PCI_PM_CTRL_STATE_MASK = 0x0003
PCI_PM_CTRL_NO_SOFT_RESET = 0x0008
PCI_PM_SIZEOF = 8

PCI_MSI_FLAGS = 2
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_QMASK = 0x000E
PCI_MSI_FLAGS_QSIZE = 0x0070
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_ADDRESS_LO = 4
PCI_MSI_ADDRESS_HI = 8
PCI_MSI_DATA_64 = 12
PCI_MSI_64_SIZEOF = 14  # 64-bit, no per-vector masking

PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_CAP_MSIX_SIZEOF = 12
PCI_MSIX_ENTRY_SIZE = 16

PCI_EXP_FLAGS = 2
PCI_EXP_DEVCAP = 4
PCI_EXP_DEVCTL = 8
PCI_EXP_DEVCTL_PHANTOM = 0x0200
PCI_EXP_DEVCTL_AUX_PME = 0x0400
PCI_EXP_DEVCTL_BCR_FLR = 0x8000
PCI_EXP_DEVSTA = 10
PCI_EXP_LNKCAP = 12
PCI_EXP_LNKCTL = 16
PCI_EXP_LNKSTA = 18
PCI_EXP_DEVCAP2 = 36
PCI_EXP_DEVCTL2 = 40
PCI_EXP_LNKCAP2 = 44
PCI_EXP_LNKCTL2 = 48
PCI_CAP_EXP_ENDPOINT_SIZEOF_V2 = 0x3C

# What the emulated functions report in their PCI Express capability: a v2
# endpoint on an 8 GT/s x4 link, 256-byte max payload, FLR capable.
EXP_FLAGS = 0x0002  # version 2, type 0 (PCI Express endpoint)
EXP_DEVCAP = 0x10008FE1  # MPS 256, ext tag, L0s/L1 no limit, role-based errors, FLR
EXP_DEVCTL = 0x2810  # relaxed ordering, no snoop, MRRS 512, MPS 128
EXP_DEVCTL_WRITABLE = 0xFFFF & ~(PCI_EXP_DEVCTL_PHANTOM | PCI_EXP_DEVCTL_AUX_PME)
EXP_LNKCAP = 0x00000043  # 8 GT/s, x4, no ASPM, port 0
EXP_LNKSTA = 0x1043  # 8 GT/s, x4, slot clock
EXP_DEVCAP2 = 0x00000010  # completion timeout disable supported
EXP_DEVCTL2_WRITABLE = 0x0010
EXP_LNKCAP2 = 0x0000000E  # 2.5, 5 and 8 GT/s
EXP_LNKCTL2 = 0x0003  # target 8 GT/s

# Writable command bits (what QEMU's emulated functions implement; vfio-pci
# passes every command bit through to the function).
COMMAND_WRITABLE = (
    PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE
)
# What the reference (real 7.3.4 kernel, QEMU edu on vfio-pci) read back from
# the command register once vfio-pci had enabled the device.
COMMAND_ENABLED = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_SERR

_UNASSIGNED = -1
_BASIC = 0


class ConfigAccessError(ValueError):
    """An access outside the config space (vfio-pci answers EFAULT)."""


class ConfigSpace:
    """The config space of one function.

    `fn` is a PciFunction instance (or class) whose attributes describe the
    function. When it is an instance, the new config space binds itself as
    `fn.config` and calls `fn.config_changed(what)` (if the model has it) after
    a change the model must react to; `what` is "command", "msi", "msix",
    "pm", "flr" or "reset".
    """

    def __init__(self, fn: Any, *, notify: Callable[[str], None] | None = None) -> None:
        self.express = bool(getattr(fn, "express", False))
        self.size = PCI_CFG_SPACE_EXP_SIZE if self.express else PCI_CFG_SPACE_SIZE
        self.msi_vectors = int(getattr(fn, "msi_vectors", 0))
        self.msix_vectors = int(getattr(fn, "msix_vectors", 0))
        self.intx_pin = int(getattr(fn, "intx_pin", 0))
        self.bars: list[Bar | None] = list(getattr(fn, "bars", []) or [])
        self.bars += [None] * (6 - len(self.bars))
        if len(self.bars) != 6:
            raise ValueError("a type 0 header has six BARs")

        # The hooks: the VFIO layer's, and the model's.
        self.on_command_change: Callable[[int, int], None] | None = None
        self.on_flr: Callable[[], None] | None = None
        if notify is None and not isinstance(fn, type):
            notify = getattr(fn, "config_changed", None)
        self._notify = notify
        # vfio-pci enables MSI/MSI-X through VFIO_DEVICE_SET_IRQS, not through
        # these bits: the VFIO layer may make them read-only to the user and
        # drive them with set_msi_enabled()/set_msix_enabled().
        self.msi_enable_writable = True
        self.msix_control_writable = True
        # A model's registers inside its vendor capabilities: on_vendor_read(offset, count) runs
        # before a read that reaches one (to fill it in), on_vendor_write(offset, count) after a
        # write to one.
        self.vendor_cap_offsets: list[int] = []
        self.on_vendor_read: Callable[[int, int], None] | None = None
        self.on_vendor_write: Callable[[int, int], None] | None = None

        self._cfg = bytearray(self.size)
        self._wmask = bytearray(self.size)
        self._w1c = bytearray(self.size)
        self._region = [_UNASSIGNED] * self.size  # per byte: _BASIC, a capability's offset, or unassigned
        self._caps: dict[int, int] = {}
        self._build(fn)
        self._power_on = bytes(self._cfg)
        if not isinstance(fn, type):
            try:
                fn.config = self
            except AttributeError:
                pass

    # -- layout ---------------------------------------------------------------------
    def _set(self, off: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        self._cfg[off : off + size] = value.to_bytes(size, "little")
        self._wmask[off : off + size] = wmask.to_bytes(size, "little")
        self._w1c[off : off + size] = w1c.to_bytes(size, "little")

    def _build(self, fn: Any) -> None:
        self._region[:PCI_STD_HEADER_SIZEOF] = [_BASIC] * PCI_STD_HEADER_SIZEOF
        self._set(PCI_VENDOR_ID, 2, int(getattr(fn, "vendor_id", 0)))
        self._set(PCI_DEVICE_ID, 2, int(getattr(fn, "device_id", 0)))
        self._set(PCI_COMMAND, 2, 0, COMMAND_WRITABLE)
        self._set(PCI_STATUS, 2, 0, 0, STATUS_RW1C)
        self._set(PCI_REVISION_ID, 1, int(getattr(fn, "revision", 0)))
        self._set(PCI_CLASS_PROG, 3, int(getattr(fn, "class_code", 0)))
        self._set(PCI_CACHE_LINE_SIZE, 1, 0, 0xFF)
        # The latency timer does not apply to PCI Express (hardwired 0).
        self._set(PCI_LATENCY_TIMER, 1, 0, 0 if self.express else 0xFF)
        self._set(PCI_HEADER_TYPE, 1, 0)
        self._build_bars()
        self._set(PCI_SUBSYSTEM_VENDOR_ID, 2, int(getattr(fn, "subsystem_vendor_id", 0)))
        self._set(PCI_SUBSYSTEM_ID, 2, int(getattr(fn, "subsystem_id", 0)))
        self._set(PCI_ROM_ADDRESS, 4, 0)  # no expansion ROM: reads 0, writes dropped
        self._set(PCI_INTERRUPT_LINE, 1, 0, 0xFF)
        if not 0 <= self.intx_pin <= 4:
            raise ValueError(f"interrupt pin {self.intx_pin}")
        self._set(PCI_INTERRUPT_PIN, 1, self.intx_pin)

        caps: list[tuple[int, int, Callable[[int], None]]] = []
        if getattr(fn, "pm_capability", self.express):
            caps.append((PCI_CAP_ID_PM, PCI_PM_SIZEOF, self._build_pm))
        if self.msi_vectors:
            if self.msi_vectors & (self.msi_vectors - 1) or self.msi_vectors > 32:
                raise ValueError(f"MSI vectors must be a power of two up to 32, not {self.msi_vectors}")
            caps.append((PCI_CAP_ID_MSI, PCI_MSI_64_SIZEOF, self._build_msi))
        if self.msix_vectors:
            self._check_msix(fn)
            caps.append((PCI_CAP_ID_MSIX, PCI_CAP_MSIX_SIZEOF, lambda off: self._build_msix(off, fn)))
        if self.express:
            caps.append((PCI_CAP_ID_EXP, PCI_CAP_EXP_ENDPOINT_SIZEOF_V2, self._build_exp))
        # Vendor-specific capabilities (virtio's structures): the bytes after the id and next
        # pointer, the first of them the capability's length as the vendor defines it; read-only,
        # or (body, write mask) where the vendor's registers are writable (vfio-pci passes them
        # through raw).
        for cap in getattr(fn, "vendor_caps", ()):
            body, wmask = (cap, b"") if isinstance(cap, bytes) else cap
            caps.append((PCI_CAP_ID_VNDR, 2 + len(body), lambda off, b=body, m=wmask: self._build_vendor(off, b, m)))
        pos = PCI_STD_HEADER_SIZEOF
        prev = PCI_CAPABILITY_LIST
        for cap_id, length, build in caps:
            self._cfg[prev] = pos
            self._set(pos + PCI_CAP_LIST_ID, 1, cap_id)
            self._set(pos + PCI_CAP_LIST_NEXT, 1, 0)
            self._region[pos : pos + length] = [pos] * length
            self._caps.setdefault(cap_id, pos)  # the first of an id (vendor capabilities may repeat)
            build(pos)
            prev = pos + PCI_CAP_LIST_NEXT
            pos = (pos + length + 3) & ~3
        if pos > PCI_CFG_SPACE_SIZE:
            raise ValueError("capabilities overflow the config space")
        if caps:
            self._cfg[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        # Express: the extended list at 0x100 is empty (header 0), as vfio-pci
        # shows a function without extended capabilities.

    def _build_bars(self) -> None:
        i = 0
        while i < 6:
            bar = self.bars[i]
            off = PCI_BASE_ADDRESS_0 + 4 * i
            if bar is None:
                self._set(off, 4, 0)
                i += 1
                continue
            size = bar.size
            if size <= 0 or size & (size - 1):
                raise ValueError(f"BAR{i} size {size:#x} is not a power of two")
            if bar.is_io:
                if size < 4 or size > 256 or bar.is_64 or bar.prefetchable:
                    raise ValueError(f"BAR{i}: an I/O BAR is 4..256 bytes, 32-bit, not prefetchable")
                self._set(off, 4, PCI_BASE_ADDRESS_SPACE_IO, ~(size - 1) & 0xFFFFFFFF)
                i += 1
                continue
            if size < 16:
                raise ValueError(f"BAR{i}: a memory BAR is at least 16 bytes")
            flags = (PCI_BASE_ADDRESS_MEM_TYPE_64 if bar.is_64 else 0) | (
                PCI_BASE_ADDRESS_MEM_PREFETCH if bar.prefetchable else 0
            )
            mask = ~(size - 1) & ((1 << 64) - 1)
            if not bar.is_64 and size > 1 << 31:
                raise ValueError(f"BAR{i}: a 32-bit BAR of {size:#x} bytes")
            self._set(off, 4, flags, mask & 0xFFFFFFF0)
            if bar.is_64:
                if i == 5 or self.bars[i + 1] is not None:
                    raise ValueError(f"BAR{i} is 64-bit: BAR{i + 1} must be None (its upper half)")
                self._set(off + 4, 4, 0, mask >> 32)
                i += 2
            else:
                i += 1

    def _check_msix(self, fn: Any) -> None:
        n = self.msix_vectors
        bir = int(getattr(fn, "msix_bar", 0))
        table = int(getattr(fn, "msix_table_offset", 0))
        pba = int(getattr(fn, "msix_pba_offset", 0))
        if not 1 <= n <= 2048:
            raise ValueError(f"MSI-X vectors {n}")
        bar = self.bars[bir] if 0 <= bir < 6 else None
        if bar is None or bar.is_io:
            raise ValueError(f"MSI-X BAR{bir} is not a memory BAR")
        t_end, p_end = table + n * PCI_MSIX_ENTRY_SIZE, pba + 8 * ((n + 63) // 64)
        if table % 8 or pba % 8 or t_end > bar.size or p_end > bar.size or (table < p_end and pba < t_end):
            raise ValueError("MSI-X table/PBA misplaced")

    def _build_pm(self, off: int) -> None:
        self._set(off + PCI_PM_PMC, 2, 0x0003)  # version 3; no D1/D2, no PME
        self._set(off + PCI_PM_CTRL, 2, PCI_PM_CTRL_NO_SOFT_RESET, PCI_PM_CTRL_STATE_MASK)
        self._set(off + 6, 2, 0)

    def _build_msi(self, off: int) -> None:
        mmc = self.msi_vectors.bit_length() - 1
        self._set(off + PCI_MSI_FLAGS, 2, PCI_MSI_FLAGS_64BIT | mmc << 1, PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        self._set(off + PCI_MSI_ADDRESS_LO, 4, 0, 0xFFFFFFFF)
        self._set(off + PCI_MSI_ADDRESS_HI, 4, 0, 0xFFFFFFFF)
        self._set(off + PCI_MSI_DATA_64, 2, 0, 0xFFFF)

    def _build_msix(self, off: int, fn: Any) -> None:
        bir = int(getattr(fn, "msix_bar", 0))
        self._set(off + PCI_MSIX_FLAGS, 2, self.msix_vectors - 1, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        self._set(off + PCI_MSIX_TABLE, 4, int(getattr(fn, "msix_table_offset", 0)) | bir)
        self._set(off + PCI_MSIX_PBA, 4, int(getattr(fn, "msix_pba_offset", 0)) | bir)

    def _build_vendor(self, off: int, body: bytes, wmask: bytes) -> None:
        self._cfg[off + 2 : off + 2 + len(body)] = body
        self._wmask[off + 2 : off + 2 + len(wmask)] = wmask
        self.vendor_cap_offsets.append(off)

    def _build_exp(self, off: int) -> None:
        self._set(off + PCI_EXP_FLAGS, 2, EXP_FLAGS)
        self._set(off + PCI_EXP_DEVCAP, 4, EXP_DEVCAP)
        self._set(off + PCI_EXP_DEVCTL, 2, EXP_DEVCTL, EXP_DEVCTL_WRITABLE)
        self._set(off + PCI_EXP_LNKCAP, 4, EXP_LNKCAP)
        self._set(off + PCI_EXP_LNKSTA, 2, EXP_LNKSTA)
        self._set(off + PCI_EXP_DEVCAP2, 4, EXP_DEVCAP2)
        self._set(off + PCI_EXP_DEVCTL2, 2, 0, EXP_DEVCTL2_WRITABLE)
        self._set(off + PCI_EXP_LNKCAP2, 4, EXP_LNKCAP2)
        self._set(off + PCI_EXP_LNKCTL2, 2, EXP_LNKCTL2)

    # -- access ---------------------------------------------------------------------
    def _chunks(self, pos: int, count: int) -> list[tuple[int, int]]:
        """The pieces vfio-pci cuts an access into (vfio_config_do_rw)."""
        if pos < 0 or count < 0 or pos + count > self.size:
            raise ConfigAccessError(f"config access [{pos:#x}, +{count:#x}) outside {self.size:#x} bytes")
        out = []
        end = pos + count
        while pos < end:
            n = 1
            while (pos + n) % 4 and pos + n < end and self._region[pos + n] == self._region[pos]:
                n += 1
            if n >= 4 and pos % 4 == 0:
                n = 4
            elif n >= 2 and pos % 2 == 0:
                n = 2
            else:
                n = 1
            out.append((pos, n))
            pos += n
        return out

    def read_bytes(self, offset: int, count: int) -> bytes:
        """pread of the config region: any offset and length inside it."""
        self._chunks(offset, count)
        if self.on_vendor_read is not None and any(
            offset < cap + self._cfg[cap + 2] and cap < offset + count for cap in self.vendor_cap_offsets
        ):
            self.on_vendor_read(offset, count)
        return bytes(self._cfg[offset : offset + count])

    def write_bytes(self, offset: int, data: bytes) -> None:
        """pwrite of the config region, applied piece by piece as vfio-pci does."""
        pos = 0
        for off, n in self._chunks(offset, len(data)):
            self._write_piece(off, n, int.from_bytes(data[pos : pos + n], "little"))
            pos += n

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4):
            raise ConfigAccessError(f"config read of {size} bytes")
        return int.from_bytes(self.read_bytes(offset, size), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            raise ConfigAccessError(f"config write of {size} bytes")
        self.write_bytes(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _get(self, off: int, size: int) -> int:
        return int.from_bytes(self._cfg[off : off + size], "little")

    def _put(self, off: int, size: int, value: int) -> None:
        self._cfg[off : off + size] = value.to_bytes(size, "little")

    def _write_piece(self, pos: int, n: int, value: int) -> None:
        old = self._get(pos, n)
        wmask = int.from_bytes(self._wmask[pos : pos + n], "little")
        w1c = int.from_bytes(self._w1c[pos : pos + n], "little")
        if not wmask and not w1c:
            return
        new = ((old & ~wmask) | (value & wmask)) & ~(value & w1c)
        region = self._region[pos]
        cmd_old = self.command
        msi_old = self._msi_flags()
        msix_old = self._msix_flags()
        pm_old = self.power_state
        self._put(pos, n, new)

        def touches(off: int, size: int) -> bool:
            return pos < off + size and off < pos + n

        if region == _BASIC and touches(PCI_COMMAND, 2):
            cmd_new = self.command
            if cmd_new != cmd_old:
                if self.on_command_change is not None:
                    self.on_command_change(cmd_old, cmd_new)
                self._tell("command")
        elif region == self._caps.get(PCI_CAP_ID_MSI) and pos <= region + PCI_MSI_FLAGS < pos + n + 1:
            # vfio_msi_config_write: fix up the flags after any write reaching them
            flags = self._msi_flags()
            if not self.msi_enable_writable:
                flags = (flags & ~PCI_MSI_FLAGS_ENABLE) | (msi_old & PCI_MSI_FLAGS_ENABLE)
            qmax = (flags & PCI_MSI_FLAGS_QMASK) >> 1
            if (flags & PCI_MSI_FLAGS_QSIZE) >> 4 > qmax:
                flags = (flags & ~PCI_MSI_FLAGS_QSIZE) | qmax << 4
            self._put(region + PCI_MSI_FLAGS, 2, flags)
            if flags != msi_old:
                self._tell("msi")
        elif region == self._caps.get(PCI_CAP_ID_MSIX) and touches(region + PCI_MSIX_FLAGS, 2):
            if not self.msix_control_writable:
                self._put(region + PCI_MSIX_FLAGS, 2, msix_old)
            elif self._msix_flags() != msix_old:
                self._tell("msix")
        elif region == self._caps.get(PCI_CAP_ID_PM) and touches(region + PCI_PM_CTRL, 2):
            ctrl_at = region + PCI_PM_CTRL
            ctrl = self._get(ctrl_at, 2)
            state = ctrl & PCI_PM_CTRL_STATE_MASK
            if state in (1, 2):  # D1/D2 not supported: the state stays
                self._put(ctrl_at, 2, (ctrl & ~PCI_PM_CTRL_STATE_MASK) | pm_old)
            elif state != pm_old:
                self._tell("pm")
        elif region in self.vendor_cap_offsets:
            if self.on_vendor_write is not None:
                self.on_vendor_write(pos, n)
        elif region == self._caps.get(PCI_CAP_ID_EXP) and touches(region + PCI_EXP_DEVCTL, 2):
            ctl_at = region + PCI_EXP_DEVCTL
            ctl = self._get(ctl_at, 2)
            if ctl & PCI_EXP_DEVCTL_BCR_FLR:
                # Initiate Function Level Reset: always reads 0.
                self._put(ctl_at, 2, ctl & ~PCI_EXP_DEVCTL_BCR_FLR)
                if self.on_flr is not None:
                    self.on_flr()
                self._tell("flr")

    def _tell(self, what: str) -> None:
        if self._notify is not None:
            self._notify(what)

    # -- state ----------------------------------------------------------------------
    def reset(self) -> None:
        """Back to power-on values (a conventional reset: command 0, MSI/MSI-X off, BARs 0)."""
        old = self.command
        self._cfg[:] = self._power_on
        if old and self.on_command_change is not None:
            self.on_command_change(old, 0)
        self._tell("reset")

    def enable_device(self) -> None:
        """What the kernel's pci_enable_device leaves when vfio-pci opens the
        device: decoding on. The reference machine read 0x0103 (I/O, memory,
        SERR#) from an opened edu's command register; this sets the same bits."""
        self.write(PCI_COMMAND, 2, self.command | COMMAND_ENABLED)

    def snapshot(self) -> bytes:
        return bytes(self._cfg)

    def restore(self, snap: bytes) -> None:
        """Put a snapshot back (pci_restore_state around a function reset)."""
        self._cfg[:] = snap

    def get_bytes(self, offset: int, count: int) -> bytes:
        """The bytes as they are, for the function itself (no access rules, no hooks)."""
        return bytes(self._cfg[offset : offset + count])

    def put_bytes(self, offset: int, data: bytes) -> None:
        """The function sets bytes of its own registers (a vendor capability's)."""
        self._cfg[offset : offset + len(data)] = data

    def cap_offset(self, cap_id: int) -> int | None:
        return self._caps.get(cap_id)

    def set_multifunction(self, on: bool) -> None:
        """Header type bit 7: the slot has more than one function."""
        value = 0x80 if on else 0
        self._cfg[PCI_HEADER_TYPE] = value
        power_on = bytearray(self._power_on)
        power_on[PCI_HEADER_TYPE] = value
        self._power_on = bytes(power_on)

    @property
    def command(self) -> int:
        return self._get(PCI_COMMAND, 2)

    @property
    def status(self) -> int:
        return self._get(PCI_STATUS, 2)

    def set_status_bits(self, bits: int) -> None:
        """The function sets error bits in the status register (cleared by writing 1s)."""
        self._put(PCI_STATUS, 2, self.status | (bits & STATUS_RW1C))

    @property
    def interrupt_status(self) -> bool:
        return bool(self.status & PCI_STATUS_INTERRUPT)

    @interrupt_status.setter
    def interrupt_status(self, pending: bool) -> None:
        """The function's INTx state (status bit 3), set whether or not INTx is disabled."""
        st = self.status & ~PCI_STATUS_INTERRUPT
        self._put(PCI_STATUS, 2, st | (PCI_STATUS_INTERRUPT if pending else 0))

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_MEMORY)

    @property
    def io_enabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_IO)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & PCI_COMMAND_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_INTX_DISABLE)

    @property
    def interrupt_line(self) -> int:
        return self._cfg[PCI_INTERRUPT_LINE]

    def bar_address(self, index: int) -> int:
        """The address programmed in BAR index (both halves of a 64-bit BAR), type bits removed."""
        bar = self.bars[index]
        if bar is None:
            return 0
        off = PCI_BASE_ADDRESS_0 + 4 * index
        lo = self._get(off, 4)
        lo &= ~0x3 if bar.is_io else ~0xF
        return lo | (self._get(off + 4, 4) << 32 if bar.is_64 else 0)

    # MSI
    def _msi_flags(self) -> int:
        off = self._caps.get(PCI_CAP_ID_MSI)
        return 0 if off is None else self._get(off + PCI_MSI_FLAGS, 2)

    @property
    def msi_enabled(self) -> bool:
        return bool(self._msi_flags() & PCI_MSI_FLAGS_ENABLE)

    def set_msi_enabled(self, on: bool) -> None:
        off = self._caps.get(PCI_CAP_ID_MSI)
        if off is None or on == self.msi_enabled:
            return
        self._put(off + PCI_MSI_FLAGS, 2, self._msi_flags() ^ PCI_MSI_FLAGS_ENABLE)
        self._tell("msi")

    @property
    def msi_vectors_enabled(self) -> int:
        """Vectors granted by multiple-message enable (1, 2, 4, ... 32)."""
        return 1 << ((self._msi_flags() & PCI_MSI_FLAGS_QSIZE) >> 4)

    @property
    def msi_address(self) -> int:
        off = self._caps.get(PCI_CAP_ID_MSI)
        if off is None:
            return 0
        return self._get(off + PCI_MSI_ADDRESS_LO, 4) | self._get(off + PCI_MSI_ADDRESS_HI, 4) << 32

    @property
    def msi_data(self) -> int:
        off = self._caps.get(PCI_CAP_ID_MSI)
        return 0 if off is None else self._get(off + PCI_MSI_DATA_64, 2)

    # MSI-X
    def _msix_flags(self) -> int:
        off = self._caps.get(PCI_CAP_ID_MSIX)
        return 0 if off is None else self._get(off + PCI_MSIX_FLAGS, 2)

    @property
    def msix_enabled(self) -> bool:
        return bool(self._msix_flags() & PCI_MSIX_FLAGS_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self._msix_flags() & PCI_MSIX_FLAGS_MASKALL)

    def set_msix_enabled(self, on: bool, masked: bool | None = None) -> None:
        off = self._caps.get(PCI_CAP_ID_MSIX)
        if off is None:
            return
        flags = self._msix_flags()
        new = (flags & ~PCI_MSIX_FLAGS_ENABLE) | (PCI_MSIX_FLAGS_ENABLE if on else 0)
        if masked is not None:
            new = (new & ~PCI_MSIX_FLAGS_MASKALL) | (PCI_MSIX_FLAGS_MASKALL if masked else 0)
        if new != flags:
            self._put(off + PCI_MSIX_FLAGS, 2, new)
            self._tell("msix")

    # Power management
    @property
    def power_state(self) -> int:
        """0 (D0) or 3 (D3hot); 0 without a PM capability."""
        off = self._caps.get(PCI_CAP_ID_PM)
        return 0 if off is None else self._get(off + PCI_PM_CTRL, 2) & PCI_PM_CTRL_STATE_MASK
