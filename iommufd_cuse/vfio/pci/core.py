"""vfio-pci for emulated functions (drivers/vfio/pci/vfio_pci_core.c, vfio_pci_intrs.c,
vfio_pci_rdwr.c): device info, regions at index << 40, interrupts on eventfds,
reset, and the DMA port through the group's current IOMMU domain."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable

import trio

from ... import uapi
from ...errors import Errno
from ...iommu.core import Device
from ...iommu.domain import IoFault, PagingDomain, dma_copy
from ...system import System
from ...transport.caller import Caller
from .config import ConfigAccessError, ConfigSpace
from .dmaengine import DmaEngine
from .edu import Edu
from .model import DmaFault, PciFunction
from .nvme import Nvme
from .virtio_blk import VirtioBlk

log = logging.getLogger(__name__)

REGION_SHIFT = 40
NUM_REGIONS = 9  # BAR0-5, ROM, CONFIG, VGA
NUM_IRQS = 5  # INTx, MSI, MSI-X, ERR, REQ
CONFIG = uapi.VFIO_PCI_CONFIG_REGION_INDEX
ROM = uapi.VFIO_PCI_ROM_REGION_INDEX
INTX, MSI, MSIX, ERR, REQ = range(5)
DMA_CHUNK = 1 << 21  # a DMA runs off the event loop above this size


def _models() -> dict[str, type[PciFunction]]:
    return {"edu": Edu, "dma-engine": DmaEngine, "nvme": Nvme, "virtio-blk": VirtioBlk}


class GroupDmaPort:
    """The DmaPort of a vfio-pci device: through its group's domain, gated by bus mastering."""

    def __init__(self, vdev: VfioPciDevice) -> None:
        self.vdev = vdev

    def _domain(self, iova: int, write: bool) -> PagingDomain:
        vdev = self.vdev
        if not vdev.config.bus_master:
            raise self._fault(iova, write, "bus master disabled")
        dom = vdev.device.group.domain
        if not isinstance(dom, PagingDomain) or dom is vdev.device.group.default_domain:
            raise self._fault(iova, write, "DMA blocked (no paging domain attached)")
        return dom

    def _fault(self, iova: int, write: bool, reason: str) -> DmaFault:
        f = DmaFault(iova, write, reason)
        self.vdev.record_fault(f)
        return f

    def _rw(self, iova: int, buf: bytearray | memoryview, write: bool) -> None:
        dom = self._domain(iova, write)
        try:
            dom.dma_rw(self.vdev.system.store, iova, buf, write)
        except IoFault as f:
            raise self._fault(f.iova, f.write, f.reason) from None

    def read(self, iova: int, length: int) -> bytes:
        buf = bytearray(length)
        self._rw(iova, buf, False)
        return bytes(buf)

    def write(self, iova: int, data: bytes) -> None:
        self._rw(iova, bytearray(data), True)

    def transfer(self, iova: int, buf: memoryview, to_host: bool) -> None:
        """Between host memory at iova and a device-side buffer, without a copy in between."""
        self._rw(iova, buf, to_host)

    def prp_batch(self, page_size: int, xfers: list[tuple[int, int, memoryview, bool]]) -> list[int | DmaFault]:
        """NVMe data transfers (prp1, prp2, device-side buffer, to_host), walked and
        copied in C in one call: per transfer 0, -EINVAL (a PRP offset the rules
        forbid) or the DmaFault (recorded). Safe from a worker thread."""
        if not xfers:
            return []
        try:
            dom = self._domain(xfers[0][0], bool(xfers[0][3]))
        except DmaFault as f:
            return [f] * len(xfers)
        out: list[int | DmaFault] = []
        for r in dom.dma_prp_batch(self.vdev.system.store, page_size, xfers):
            out.append(self._fault(r.iova, r.write, r.reason) if isinstance(r, IoFault) else r)
        return out

    def _copy_piece(self, src_iova: int, dst_iova: int, n: int) -> None:
        # the domain is looked up for every piece: it may change in between (replace/detach)
        src = self._domain(src_iova, False)
        dst = self._domain(dst_iova, True)
        try:
            dma_copy(self.vdev.system.store, src, src_iova, dst, dst_iova, n)
        except IoFault as f:
            raise self._fault(f.iova, f.write, f.reason) from None

    async def copy(self, src_iova: int, dst_iova: int, length: int) -> None:
        """Device-internal copy: small ones on the event loop, longer ones in a
        worker thread, DMA_CHUNK * 16 bytes per call."""
        done = 0
        while done < length:
            n = min(length - done, DMA_CHUNK * 16)
            if n > DMA_CHUNK:
                await trio.to_thread.run_sync(self._copy_piece, src_iova + done, dst_iova + done, n)
            else:
                self._copy_piece(src_iova + done, dst_iova + done, n)
            done += n

    def copy_sync(self, src_iova: int, dst_iova: int, length: int) -> None:
        """copy() for a device that is already off the event loop (in a worker thread)."""
        done = 0
        while done < length:
            n = min(length - done, DMA_CHUNK * 16)
            self._copy_piece(src_iova + done, dst_iova + done, n)
            done += n


class Irqs:
    """Interrupt state of one device as vfio-pci keeps it; the model's IrqSink."""

    def __init__(self, vdev: VfioPciDevice) -> None:
        self.vdev = vdev
        self.type: int | None = None  # INTX, MSI or MSIX while enabled
        self.triggers: dict[int, list[int]] = {i: [] for i in range(NUM_IRQS)}  # index -> eventfds (-1: none)
        self.intx_masked = False
        self.intx_pending = False

    # -- IrqSink ----------------------------------------------------------------
    def set_intx(self, asserted: bool) -> None:
        if not asserted:
            self.intx_pending = False
            return
        if self.type != INTX or self.vdev.config.intx_disabled:
            self.intx_pending = True
            return
        if self.intx_masked:
            self.intx_pending = True
            return
        # vfio-pci masks the line when it fires; the user unmasks (AUTOMASKED).
        self.intx_masked = True
        self._signal(INTX, 0)

    def msi(self, vector: int) -> None:
        if self.type in (MSI, MSIX):
            self._signal(self.type, vector)

    def _signal(self, index: int, vector: int) -> None:
        fds = self.triggers[index]
        if vector < len(fds) and fds[vector] >= 0:
            try:
                os.write(fds[vector], (1).to_bytes(8, "little"))
            except OSError as e:
                log.warning("%s: signalling eventfd failed: %s", self.vdev.device.bdf, e)

    # -- SET_IRQS -------------------------------------------------------------------
    def count(self, index: int) -> int:
        m = self.vdev.model
        if index == INTX:
            return 1 if m.intx_pin else 0
        if index == MSI:
            return m.msi_vectors
        if index == MSIX:
            return m.msix_vectors
        if index == ERR:
            return 1 if m.express else 0
        if index == REQ:
            return 1
        return 0

    def _set_fds(self, index: int, start: int, fds: list[int], caller: Caller) -> None:
        cur = self.triggers[index]
        need = start + len(fds)
        if len(cur) < need:
            cur.extend([-1] * (need - len(cur)))
        fetched = []
        try:
            for fd in fds:
                fetched.append(caller.fetch_fd(fd) if fd >= 0 else -1)
                if fetched[-1] >= 0 and not _is_eventfd(fetched[-1]):
                    raise Errno(errno.EINVAL)
        except BaseException:
            for f in fetched:
                if f >= 0:
                    os.close(f)
            raise
        for i, fd in enumerate(fetched):
            if cur[start + i] >= 0:
                os.close(cur[start + i])
            cur[start + i] = fd

    def _disable(self, index: int) -> None:
        for fd in self.triggers[index]:
            if fd >= 0:
                os.close(fd)
        self.triggers[index] = []
        if self.type == index:
            self.type = None
            if index == INTX:
                self.intx_masked = False
            else:
                self._enable_msi(index, False)

    def _enable_msi(self, index: int, on: bool) -> None:
        """vfio-pci programs the device's MSI/MSI-X capability when SET_IRQS enables them."""
        config = self.vdev.config
        if index == MSI:
            config.set_msi_enabled(on)
        else:
            config.set_msix_enabled(on, masked=False if on else None)

    def disable_all(self) -> None:
        for index in range(NUM_IRQS):
            self._disable(index)
        self.type = None

    def set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes, caller: Caller) -> None:
        dtype = flags & uapi.VFIO_IRQ_SET_DATA_TYPE_MASK
        action = flags & uapi.VFIO_IRQ_SET_ACTION_TYPE_MASK
        if index == INTX:
            if action == uapi.VFIO_IRQ_SET_ACTION_MASK:
                return self._intx_mask(True, start, count, dtype, data)
            if action == uapi.VFIO_IRQ_SET_ACTION_UNMASK:
                return self._intx_mask(False, start, count, dtype, data)
            return self._intx_trigger(start, count, dtype, data, caller)
        if index in (MSI, MSIX):
            if action != uapi.VFIO_IRQ_SET_ACTION_TRIGGER:
                raise Errno(errno.ENOTTY)
            return self._msi_trigger(index, start, count, dtype, data, caller)
        if index in (ERR, REQ):
            if action != uapi.VFIO_IRQ_SET_ACTION_TRIGGER or (index == ERR and not self.vdev.model.express):
                raise Errno(errno.ENOTTY)
            return self._ctx_trigger(index, start, count, dtype, data, caller)
        raise Errno(errno.ENOTTY)

    def _intx_mask(self, mask: bool, start: int, count: int, dtype: int, data: bytes) -> None:
        if self.type != INTX or start != 0 or count != 1:
            raise Errno(errno.EINVAL)
        if dtype == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            raise Errno(errno.EINVAL)  # (unmask-by-eventfd needs irqfd plumbing: not emulated)
        if dtype == uapi.VFIO_IRQ_SET_DATA_BOOL and not data[0]:
            return
        self.intx_masked = mask
        if not mask and self.intx_pending:
            self.set_intx(True)

    def _intx_trigger(self, start: int, count: int, dtype: int, data: bytes, caller: Caller) -> None:
        if self.type == INTX and count == 0 and dtype == uapi.VFIO_IRQ_SET_DATA_NONE:
            self._disable(INTX)
            return
        if self.type not in (None, INTX) or start != 0 or count != 1:
            raise Errno(errno.EINVAL)
        if dtype == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            fd = int.from_bytes(data[:4], "little", signed=True)
            if fd < 0 and self.type != INTX:
                return
            self._set_fds(INTX, 0, [fd], caller)
            self.type = INTX
            return
        if self.type != INTX:
            raise Errno(errno.EINVAL)
        if dtype == uapi.VFIO_IRQ_SET_DATA_NONE or data[0]:
            self._signal(INTX, 0)

    def _msi_trigger(self, index: int, start: int, count: int, dtype: int, data: bytes, caller: Caller) -> None:
        if self.type == index and count == 0 and dtype == uapi.VFIO_IRQ_SET_DATA_NONE:
            self._disable(index)
            return
        if self.type not in (None, index):
            raise Errno(errno.EINVAL)
        if dtype == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            fds = [int.from_bytes(data[i : i + 4], "little", signed=True) for i in range(0, 4 * count, 4)]
            if self.type is None:
                self.triggers[index] = []
            self._set_fds(index, start, fds, caller)
            if self.type is None:
                self._enable_msi(index, True)
            self.type = index
            return
        if self.type != index:
            raise Errno(errno.EINVAL)
        for i in range(start, start + count):
            if dtype == uapi.VFIO_IRQ_SET_DATA_NONE or data[i - start]:
                self._signal(index, i)

    def _ctx_trigger(self, index: int, start: int, count: int, dtype: int, data: bytes, caller: Caller) -> None:
        if start != 0 or count > 1:
            raise Errno(errno.EINVAL)
        if dtype == uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            if count == 0:
                raise Errno(errno.EINVAL)
            fd = int.from_bytes(data[:4], "little", signed=True)
            if fd < 0:
                self._disable(index)
            else:
                self._set_fds(index, 0, [fd], caller)
            return
        if count == 0:
            raise Errno(errno.EINVAL)
        if dtype == uapi.VFIO_IRQ_SET_DATA_NONE or data[0]:
            self._signal(index, 0)


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class VfioPciDevice:
    """The vfio-pci side of one emulated function."""

    def __init__(
        self, system: System, device: Device, nursery_spawn: Callable[[Callable[[], Awaitable[None]]], None]
    ) -> None:
        self.system = system
        self.device = device
        self.dma = GroupDmaPort(self)
        self.irqs = Irqs(self)
        model_cls = _models().get(device.cfg.model)
        if model_cls is None:
            raise ValueError(f"{device.bdf}: unknown device model {device.cfg.model!r}")
        try:
            self.model: PciFunction = model_cls(self.dma, self.irqs, nursery_spawn, **device.cfg.options)
        except (TypeError, ValueError) as e:  # an option the model does not take, or a bad value
            raise ValueError(f"{device.bdf}: model {device.cfg.model}: {e}") from None
        self.config: ConfigSpace = self.model.config
        # vfio-pci owns the MSI/MSI-X enables: SET_IRQS sets them, user writes are dropped.
        self.config.msix_control_writable = False
        self.config.msi_enable_writable = False
        self.faults: list[DmaFault] = []
        self.fault_count = 0
        self.in_use = False  # bound through a cdev
        device.vfio = self

    @property
    def reset_works(self) -> bool:
        return bool(getattr(self.model, "flr", False))

    @property
    def ats(self) -> bool:
        return False

    def record_fault(self, f: DmaFault) -> None:
        self.fault_count += 1
        self.faults.append(f)
        del self.faults[:-64]
        log.warning("%s: %s", self.device.bdf, f)

    # -- open/close (vfio_pci_core_enable/disable) ---------------------------------------
    def enable(self) -> None:
        self.in_use = True
        self.config.enable_device()

    def disable(self) -> None:
        self.model.stop()
        self.irqs.disable_all()
        self.model.reset()
        self.config.reset()
        self.in_use = False

    def reset(self) -> None:
        """VFIO_DEVICE_RESET: a function-level reset; the config space is saved and
        restored around it (pci_try_reset_function), so BARs, command and MSI survive."""
        if not self.reset_works:
            raise Errno(errno.EINVAL)
        snap = self.config.snapshot()
        self.model.stop()
        self.model.reset()
        self.config.restore(snap)
        self.irqs.intx_masked = False

    # -- info ---------------------------------------------------------------------------
    def region_info(self, index: int) -> tuple[int, int]:
        """(flags, size) of a region; EINVAL for an index past the regions, and for the
        VGA region (no emulated device is a VGA device: vfio-pci's !has_vga)."""
        rw = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
        if index == CONFIG:
            return rw, self.config.size
        if index < 6:
            bar = self.model.bars[index] if index < len(self.model.bars) else None
            # MMIO is trapped, never mapped: no VFIO_REGION_INFO_FLAG_MMAP.
            return (rw, bar.size) if bar is not None else (0, 0)
        if index == ROM:
            return 0, 0
        raise Errno(errno.EINVAL)

    # -- region access ------------------------------------------------------------------
    def rw(self, offset: int, data: bytes | None, size: int) -> bytes | int:
        """pread (data None) or pwrite at offset = index << 40 | addr."""
        index, addr = offset >> REGION_SHIFT, offset & ((1 << REGION_SHIFT) - 1)
        flags, rsize = self.region_info(index) if index < NUM_REGIONS else (0, 0)
        if not flags:
            raise Errno(errno.EINVAL)
        if index == CONFIG:
            # vfio_config_do_rw: an access not wholly inside config space is EFAULT
            if size and addr + size > rsize:
                raise Errno(errno.EFAULT)
            n = size
            try:
                if data is None:
                    return self.config.read_bytes(addr, n)
                self.config.write_bytes(addr, data[:n])
            except ConfigAccessError:
                raise Errno(errno.EFAULT) from None
            return n
        if addr >= rsize:
            raise Errno(errno.EINVAL)  # vfio_pci_bar_rw: starts past the BAR
        n = min(size, rsize - addr)
        if not self.config.memory_enabled:
            raise Errno(errno.EIO)
        model = self.model
        hole = self._msix_hole(index)
        if data is None:
            out = bytearray()
            for o, s in _split(addr, n):
                v = (1 << 8 * s) - 1 if hole and hole[0] <= o < hole[1] else model.mmio_read(index, o, s)
                out += v.to_bytes(s, "little")
            return bytes(out)
        pos = 0
        for o, s in _split(addr, n):
            if not (hole and hole[0] <= o < hole[1]):  # the MSI-X table is vfio's: writes dropped
                model.mmio_write(index, o, s, int.from_bytes(data[pos : pos + s], "little"))
            pos += s
        return n

    def _msix_hole(self, index: int) -> tuple[int, int] | None:
        m = self.model
        if not m.msix_vectors or index != m.msix_bar:
            return None
        return m.msix_table_offset, m.msix_table_offset + 16 * m.msix_vectors

    def status(self) -> dict:
        dom = self.device.group.domain
        st = {"in_use": self.in_use, "dma_faults": self.fault_count, "domain": repr(dom)}
        model_status = getattr(self.model, "status", None)
        if callable(model_status):
            st["model"] = model_status()
        return st


def _split(addr: int, n: int) -> list[tuple[int, int]]:
    """Naturally aligned accesses of 8, 4, 2 or 1 bytes covering [addr, addr+n), as vfio-pci issues them."""
    out = []
    end = addr + n
    while addr < end:
        for s in (8, 4, 2, 1):
            if addr % s == 0 and addr + s <= end:
                out.append((addr, s))
                addr += s
                break
    return out
