"""dma-engine: the project's descriptor-ring copy engine (a PCI Express function).

A driver puts 32-byte descriptors in a ring in its own memory; the engine
fetches them by DMA through the IOMMU, copies src -> dst (device-internal copy,
off the event loop), writes a status back into the descriptor and signals
completion on MSI-X vector 0. Any DMA the IOMMU refuses halts the engine with
an error, is recorded in a fault log the driver reads through BAR0, and is
signalled on MSI-X vector 1. docs/dma-engine.md is the driver writer's manual;
the constants below are its register map.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .config import ConfigSpace
from .model import Bar, DmaFault, DmaPort, IrqSink, QueuedWork, RegisterFunction

log = logging.getLogger(__name__)

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

# BAR0 registers (32-bit, little-endian)
REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_CAPS = 0x008
REG_CONTROL = 0x010
REG_STATUS = 0x014
REG_INT_STATUS = 0x018
REG_RING_BASE_LO = 0x020
REG_RING_BASE_HI = 0x024
REG_RING_SIZE = 0x028
REG_HEAD = 0x030
REG_TAIL = 0x034
REG_COMPLETED = 0x038
REG_FAULT_COUNT = 0x040
REG_FAULT_CTRL = 0x044
FAULT_LOG_BASE = 0x1000
FAULT_RECORD_SIZE = 32

MAGIC = 0x45414D44  # "DMAE" in memory order
VERSION = 0x00010000  # 1.0
MAX_RING_LOG2 = 16
DESC_SIZE = 32
FAULT_LOG_ENTRIES = 16
MSIX_VECTORS = 2
CAPS = MAX_RING_LOG2 | DESC_SIZE << 8 | FAULT_LOG_ENTRIES << 16 | MSIX_VECTORS << 24

CTL_ENABLE = 1 << 0
CTL_DONE_IRQ = 1 << 1
CTL_FAULT_IRQ = 1 << 2
CTL_RESET = 1 << 31
CTL_WRITABLE = CTL_ENABLE | CTL_DONE_IRQ | CTL_FAULT_IRQ

ST_BUSY = 1 << 0
ST_HALTED = 1 << 1  # RW1C
ST_ERROR_SHIFT = 8

INT_DONE = 1 << 0
INT_FAULT = 1 << 1

FAULT_CTRL_CLEAR = 1 << 0

VEC_DONE = 0
VEC_FAULT = 1

# Descriptor: src u64, dst u64, len u32, flags u32, status u32, cookie u32
DESC = struct.Struct("<QQIIII")
DESC_STATUS_OFFSET = 0x18
DESC_IRQ = 1 << 0
DESC_CHAIN = 1 << 1
DESC_FLAGS_KNOWN = DESC_IRQ | DESC_CHAIN
DESC_ST_DONE = 1 << 0
DESC_ST_ERROR = 1 << 1
FETCH_BYTES = 4096  # descriptors are fetched at most a ring page at a time
MERGE_MAX = 16 << 20  # bytes one copy may cover for contiguous descriptors of a chain
THREAD_MIN = 2 << 20  # a batch moving more than this runs in a worker thread

# Where in the work a fault happened (fault record INFO bits 7:4, descriptor status bits 23:16)
SRC_FETCH = 0  # reading the descriptor
SRC_READ = 1  # reading the source buffer
SRC_WRITE = 2  # writing the destination buffer
SRC_WRITEBACK = 3  # writing the status back into the descriptor
SRC_CONFIG = 4  # the ring registers (no DMA)

# Reason codes (STATUS bits 15:8, fault record INFO bits 15:8, descriptor status bits 15:8)
ERR_NO_TRANSLATION = 0x01
ERR_PERMISSION = 0x02
ERR_BLOCKED = 0x03
ERR_BUS_MASTER = 0x04
ERR_MEMORY = 0x05
ERR_BAD_DESCRIPTOR = 0x10
ERR_BAD_RING = 0x11
ERR_OTHER = 0xFF


def fault_reason_code(reason: str) -> int:
    """Reason code of a DmaFault, from the words the DmaPort uses."""
    r = reason.lower()
    if "bus master" in r:
        return ERR_BUS_MASTER
    if "block" in r:
        return ERR_BLOCKED
    if "translation" in r or "unmapped" in r or "not mapped" in r:
        return ERR_NO_TRANSLATION
    if "permission" in r:
        return ERR_PERMISSION
    if "pinned" in r or "owner" in r or "gone" in r:
        return ERR_MEMORY
    return ERR_OTHER


@dataclass
class _Batch:
    """Descriptors fetched together: ring index and IOVA of the first, and for
    which generation of work."""

    gen: int
    index: int
    desc_iova: int
    descs: list[tuple[int, ...]]


_STOPPED = object()  # a batch left part done: the work was forgotten or the engine disabled


def _locate(descs: list[tuple[int, ...]], i: int, j: int, f: DmaFault) -> tuple[int, DmaFault, int]:
    """(descriptor, fault, where) of a fault in the piece of descriptors i..j-1:
    the descriptor holding the first faulting address."""
    off = (f.iova - (descs[i][1] if f.write else descs[i][0])) & U64
    k = i
    while k < j - 1 and off >= descs[k][2]:
        off -= descs[k][2]
        k += 1
    return k, f, SRC_WRITE if f.write else SRC_READ


class _Halt(Exception):
    """The engine stops on the current descriptor."""

    def __init__(self, code: int, source: int, iova: int, write: bool) -> None:
        super().__init__(code, source, iova, write)
        self.code = code
        self.source = source
        self.iova = iova
        self.write = write


class DmaEngine(QueuedWork, RegisterFunction):
    vendor_id = 0x1DE5  # a test id, not registered to this project: see docs/dma-engine.md
    device_id = 0x0001
    revision = 0x01
    class_code = 0x088000  # base system peripheral, other
    subsystem_vendor_id = 0x1DE5
    subsystem_id = 0x0001
    bars = [Bar(16 << 10, is_64=True), None, Bar(4 << 10, is_64=True), None, None, None]
    express = True
    msi_vectors = 0
    msix_vectors = MSIX_VECTORS
    msix_bar = 2
    msix_table_offset = 0x000
    msix_pba_offset = 0x800
    intx_pin = 1
    flr = True

    def __init__(self, dma: DmaPort, irq: IrqSink, spawn: Callable[[Callable[[], Awaitable[None]]], None]) -> None:
        super().__init__(dma, irq, spawn)
        self.faults: list[DmaFault] = []  # every DmaFault the engine met (the newest 256)
        self.fault_total = 0  # how many, since the model was made
        self.config = ConfigSpace(self)
        self._power_on()

    def _power_on(self) -> None:
        self.control = 0
        self.halted = False
        self.error = 0
        self.int_status = 0
        self.ring_base = 0
        self.ring_size = 0
        self.head = 0
        self.tail = 0
        self.completed = 0
        self.fault_count = 0
        self.fault_log: list[tuple[int, int, int, int] | None] = [None] * FAULT_LOG_ENTRIES
        self.msix_pending = 0

    # -- state ------------------------------------------------------------------------
    @property
    def ring_valid(self) -> bool:
        n = self.ring_size
        return 2 <= n <= 1 << MAX_RING_LOG2 and not n & (n - 1)

    @property
    def status(self) -> int:
        # BUSY: working for the current generation, or with work to start once the
        # task of a forgotten one (a copy in flight at a reset) has returned
        busy = self._active and (self._active_gen == self._gen or self._has_work())
        st = (ST_BUSY if busy else 0) | (ST_HALTED if self.halted else 0)
        return st | self.error << ST_ERROR_SHIFT

    def _has_work(self) -> bool:
        return bool(self.control & CTL_ENABLE) and not self.halted and self.ring_valid and self.head != self.tail

    # -- interrupts ---------------------------------------------------------------------
    def _update_intx(self) -> None:
        self._drive_intx(self.int_status != 0 and not self.config.msix_enabled)

    def _signal(self, bit: int, vector: int) -> None:
        self.int_status |= bit
        if self.config.msix_enabled:
            self._msix_signal(vector)
        self._update_intx()

    def config_changed(self, what: str) -> None:
        if what == "flr":
            self.reset()
            return
        self._msix_config_changed(what)
        self._update_intx()

    # -- faults ---------------------------------------------------------------------------
    def _record(self, code: int, source: int, iova: int, write: bool, index: int) -> None:
        slot = self.fault_count % FAULT_LOG_ENTRIES
        info = (1 if write else 0) | (source & 0xF) << 4 | code << 8
        self.fault_count = min(self.fault_count + 1, U32)
        self.fault_log[slot] = (iova & U64, index & U32, info, self.fault_count)

    def _halt(self, h: _Halt, index: int) -> None:
        self._record(h.code, h.source, h.iova, h.write, index)
        self.halted = True
        self.error = h.code
        log.warning(
            "dma-engine: halted at descriptor %d: %s at iova %#x (code %#x)",
            index,
            ("fetch", "read", "write", "write-back", "config")[h.source],
            h.iova,
            h.code,
        )
        if self.control & CTL_FAULT_IRQ:
            self._signal(INT_FAULT, VEC_FAULT)

    def _fault(self, f: DmaFault, source: int) -> _Halt:
        self.fault_total += 1
        self._keep_fault(f)
        return _Halt(fault_reason_code(f.reason), source, f.iova, f.write)

    # -- the engine -----------------------------------------------------------------------
    def _failed(self) -> None:
        self._halt(_Halt(ERR_OTHER, SRC_FETCH, 0, False), self.head)

    async def _process(self, gen: int) -> None:
        """Work through the ring from HEAD until it is empty, the engine is
        disabled or halted, or the work is forgotten (gen moved on).

        Descriptors are fetched a batch at a time: from HEAD up to TAIL, the
        end of the ring or the end of the 4 KiB ring page, whichever is first
        (one read; a page is mapped, or not, as a whole, so a fetch fault is
        still taken on the descriptor at HEAD). Consecutive descriptors of a
        chain that continue each other's source and destination are copied as
        one piece of up to MERGE_MAX bytes: the bytes move in the same order,
        a fault still stops the copy at its first faulting address and is
        charged to the descriptor that holds it, and HEAD, STATUS, COMPLETED
        and interrupts come out as if the descriptors had been done one by one.

        A batch that moves more than THREAD_MIN bytes runs in a worker thread
        (with the port's copy_sync): its pieces are
        copied back to back there, each piece's STATUS written right after its
        data, and the completions (HEAD, COMPLETED, interrupt) are handed to the
        event loop as they happen. Smaller batches run on the event loop.
        """
        while True:
            await trio.lowlevel.checkpoint()  # fair to the event loop between batches
            if gen != self._gen or not self._has_work():
                return
            index, size = self.head, self.ring_size
            desc_iova = (self.ring_base + index * DESC_SIZE) & U64
            count = min(
                (self.tail - index) % size,
                size - index,
                (FETCH_BYTES - desc_iova % FETCH_BYTES) // DESC_SIZE,
            )
            try:
                raw = self.dma.read(desc_iova, count * DESC_SIZE)
            except DmaFault as f:
                self._stop(self._fault(f, SRC_FETCH), index, desc_iova)
                return
            b = _Batch(gen, index, desc_iova, list(DESC.iter_unpack(raw)))
            pieces, valid = self._plan(b.descs)
            if sum(p[2] for p in pieces) > THREAD_MIN:
                token = trio.lowlevel.current_trio_token()
                # the completions it posts run before this task resumes (run_sync_soon is FIFO)
                result = await trio.to_thread.run_sync(self._run_in_thread, b, pieces, self.dma.copy_sync, token)
            else:
                result = await self._run_on_loop(b, pieces)
            if gen != self._gen:
                return
            if result is _STOPPED:
                continue  # disabled part way: the loop above ends the task
            if result is not None:  # (descriptor, fault, where) that halts the engine
                k, f, where = result
                self.head = (index + k) % size
                self._stop(self._fault(f, where), index + k, desc_iova + k * DESC_SIZE)
                return
            if valid < count:
                k = valid  # HEAD is on it: the pieces before it completed
                iova = desc_iova + k * DESC_SIZE
                self._stop(_Halt(ERR_BAD_DESCRIPTOR, SRC_FETCH, iova, False), index + k, iova)
                return

    async def _run_on_loop(self, b: _Batch, pieces: list[tuple[int, int, int]]) -> object:
        for n, (i, j, total) in enumerate(pieces):
            if n:
                await trio.lowlevel.checkpoint()
                if b.gen != self._gen or not self._has_work():
                    return _STOPPED
            if total:
                try:
                    await self.dma.copy(b.descs[i][0], b.descs[i][1], total)
                except DmaFault as f:
                    return _STOPPED if b.gen != self._gen else _locate(b.descs, i, j, f)
            if b.gen != self._gen:
                return _STOPPED
            fault = self._write_done(b, j)
            if fault is not None:
                return fault
            self._complete(b, j)
        return None

    def _run_in_thread(
        self,
        b: _Batch,
        pieces: list[tuple[int, int, int]],
        copy_sync: Callable[[int, int, int], None],
        token: trio.lowlevel.TrioToken,
    ) -> object:
        """_run_on_loop in a worker thread: it stops between pieces when the work
        is forgotten or the engine disabled; model state changes go to the loop."""
        for n, (i, j, total) in enumerate(pieces):
            if n and (b.gen != self._gen or not self.control & CTL_ENABLE):
                return _STOPPED
            if total:
                try:
                    copy_sync(b.descs[i][0], b.descs[i][1], total)
                except DmaFault as f:
                    return _locate(b.descs, i, j, f)
            if b.gen != self._gen:
                return _STOPPED
            fault = self._write_done(b, j)
            if fault is not None:
                return fault
            token.run_sync_soon(self._complete_soon, b, j)
        return None

    def _write_done(self, b: _Batch, j: int) -> tuple[int, DmaFault, int] | None:
        """STATUS DONE into the last descriptor of a transfer (piece ending at j)."""
        if b.descs[j - 1][3] & DESC_CHAIN:
            return None
        try:
            status_iova = b.desc_iova + (j - 1) * DESC_SIZE + DESC_STATUS_OFFSET
            self.dma.write(status_iova, DESC_ST_DONE.to_bytes(4, "little"))
        except DmaFault as f:
            return j - 1, f, SRC_WRITEBACK
        return None

    def _complete(self, b: _Batch, j: int) -> None:
        """The piece ending at descriptor j is done: HEAD past it, and for the end
        of a transfer the completion count and interrupt."""
        if b.gen != self._gen:
            return
        self.head = (b.index + j) % self.ring_size
        flags = b.descs[j - 1][3]
        if not flags & DESC_CHAIN:
            self.completed = (self.completed + 1) & U32
            if flags & DESC_IRQ and self.control & CTL_DONE_IRQ:
                self._signal(INT_DONE, VEC_DONE)

    def _complete_soon(self, b: _Batch, j: int) -> None:
        try:  # a run_sync_soon callback must not raise
            self._complete(b, j)
        except Exception:
            log.exception("dma-engine: completion failed")

    @classmethod
    def _plan(cls, descs: list[tuple[int, ...]]) -> tuple[list[tuple[int, int, int]], int]:
        """The pieces (first, end, bytes) of the valid descriptors at the start of
        a batch, and how many those are (the next one, if any, is invalid)."""
        pieces = []
        i = 0
        while i < len(descs):
            j, total = cls._group(descs, i)
            if j < 0:
                break
            pieces.append((i, j, total))
            i = j
        return pieces, i

    @staticmethod
    def _group(descs: list[tuple[int, ...]], i: int) -> tuple[int, int]:
        """(end, bytes) of the work starting at descriptor i: i alone, or with
        the chain descriptors after it that continue its ranges contiguously
        (never overlapping source and destination, at most MERGE_MAX bytes).
        end is -1 if descriptor i is invalid; an invalid one ends a group."""

        def valid(d: tuple[int, ...]) -> bool:
            src, dst, length, flags = d[0], d[1], d[2], d[3]
            in_range = src + length <= U64 + 1 and dst + length <= U64 + 1
            return not flags & ~DESC_FLAGS_KNOWN and in_range

        first = descs[i]
        if not valid(first):
            return -1, 0
        src, dst = first[0], first[1]
        j, total, flags = i + 1, first[2], first[3]
        while flags & DESC_CHAIN and j < len(descs):
            d = descs[j]
            contiguous = d[0] == src + total and d[1] == dst + total
            if not valid(d) or not contiguous or total + d[2] > MERGE_MAX:
                break
            total += d[2]
            flags = d[3]
            j += 1
        if j > i + 1 and src < dst + total and dst < src + total:
            return i + 1, first[2]  # overlapping ranges: one descriptor at a time
        return j, total

    def _stop(self, h: _Halt, index: int, desc_iova: int) -> None:
        """Halt on descriptor index; its STATUS gets the error when the device can write it."""
        if h.source != SRC_FETCH or h.code == ERR_BAD_DESCRIPTOR:
            status = DESC_ST_ERROR | h.code << 8 | h.source << 16
            try:  # best effort: the driver may find the reason in the descriptor too
                self.dma.write((desc_iova + DESC_STATUS_OFFSET) & U64, status.to_bytes(4, "little"))
            except DmaFault as f:
                log.info("dma-engine: error status not written back: %s", f)
        self._halt(h, index % self.ring_size if self.ring_size else index)

    # -- MMIO (RegisterFunction splits the accesses) -------------------------------------
    def _read32(self, bar: int, off: int) -> int:
        if bar == self.msix_bar:
            return self._msix_read32(off)
        if bar != 0:
            return U32
        if off >= FAULT_LOG_BASE:
            return self._read_fault_log(off - FAULT_LOG_BASE)
        regs = {
            REG_MAGIC: MAGIC,
            REG_VERSION: VERSION,
            REG_CAPS: CAPS,
            REG_CONTROL: self.control,
            REG_STATUS: self.status,
            REG_INT_STATUS: self.int_status,
            REG_RING_BASE_LO: self.ring_base & U32,
            REG_RING_BASE_HI: self.ring_base >> 32,
            REG_RING_SIZE: self.ring_size,
            REG_HEAD: self.head,
            REG_TAIL: self.tail,
            REG_COMPLETED: self.completed,
            REG_FAULT_COUNT: self.fault_count,
        }
        return regs.get(off, 0)

    def _read_fault_log(self, off: int) -> int:
        slot, field = divmod(off, FAULT_RECORD_SIZE)
        if slot >= FAULT_LOG_ENTRIES or self.fault_log[slot] is None:
            return 0
        iova, index, info, seq = self.fault_log[slot]  # type: ignore[misc]
        return {0x00: iova & U32, 0x04: iova >> 32, 0x08: index, 0x0C: info, 0x10: seq}.get(field, 0)

    def _write32(self, bar: int, off: int, value: int) -> None:
        if bar != 0:
            return  # MSI-X table writes are dropped (the host owns it); the PBA is read-only
        if off == REG_CONTROL:
            self._write_control(value)
        elif off == REG_STATUS:
            if value & ST_HALTED and self.halted:
                self.halted = False
                self.error = 0
                if self.control & CTL_ENABLE and not self.ring_valid:
                    self._halt(_Halt(ERR_BAD_RING, SRC_CONFIG, self.ring_base, False), self.head)
                    return
                self._kick()
        elif off == REG_INT_STATUS:
            self.int_status &= ~value
            self._update_intx()
        elif off in (REG_RING_BASE_LO, REG_RING_BASE_HI, REG_RING_SIZE):
            if self.control & CTL_ENABLE:
                return  # the ring is fixed while the engine is enabled
            if off == REG_RING_BASE_LO:
                self.ring_base = (self.ring_base & ~U32) | (value & ~(DESC_SIZE - 1))
            elif off == REG_RING_BASE_HI:
                self.ring_base = (self.ring_base & U32) | value << 32
            else:
                self.ring_size = value
            self._forget_work()
            self.head = self.tail = 0
        elif off == REG_TAIL:
            self.tail = value % self.ring_size if self.ring_valid else value & 0xFFFF
            self._kick()
        elif off == REG_FAULT_CTRL:
            if value & FAULT_CTRL_CLEAR:
                self.fault_count = 0
                self.fault_log = [None] * FAULT_LOG_ENTRIES

    def _write_control(self, value: int) -> None:
        if value & CTL_RESET:
            self.reset()
            return
        was_enabled = self.control & CTL_ENABLE
        self.control = value & CTL_WRITABLE
        if not self.control & CTL_ENABLE:
            if was_enabled:  # disabling clears an error halt
                self.halted = False
                self.error = 0
            return
        if not was_enabled and not self.ring_valid:
            self._halt(_Halt(ERR_BAD_RING, SRC_CONFIG, self.ring_base, False), self.head)
            return
        self._kick()

    # -- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel the engine task; the engine is left disabled, its registers kept."""
        self._forget_work()
        self.control &= ~CTL_ENABLE

    def reset(self) -> None:
        """Function-level reset: engine stopped, every register and the fault log at power-on values."""
        self._forget_work()
        self._power_on()
        self._update_intx()
