"""virtio-blk: a virtio 1.2 block device on PCI (non-transitional: 1af4:1042, class 01:80:00).

What Linux's virtio_pci and virtio_blk drivers, DPDK's and SPDK's virtio drivers use of
it: the virtio PCI capabilities (common, notify, ISR and device configuration, all in
BAR4), the feature handshake (FEATURES_OK refused for a feature not offered or without
VERSION_1), split virtqueues with indirect descriptors, one or more request queues (MQ),
MSI-X (a configuration vector and one per queue; BAR1 holds the table) and INTx with the
ISR; requests IN, OUT, FLUSH, GET_ID and WRITE_ZEROES on a disk of 512-byte sectors.

The device reaches memory only through its DmaPort. A request whose data the IOMMU
refuses completes with VIRTIO_BLK_S_IOERR (the port records the fault); a ring or
descriptor table it cannot read or write, or a malformed descriptor chain, puts the
device in DEVICE_NEEDS_RESET with a configuration interrupt, as QEMU's virtio_error does.
A request moves at most SEG_MAX * SIZE_MAX bytes (what the device configuration
advertises); batches moving much in few pieces run in a worker thread, the rest on the event
loop a slice at a time (chains followed, copies made). docs/virtio-blk.md has the rest.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass

import trio

from .blockstore import LBA, BlockStore
from .config import ConfigSpace
from .model import Bar, DmaFault, DmaPort, IrqSink, QueuedWork, RegisterFunction

log = logging.getLogger(__name__)

U16, U32 = 0xFFFF, (1 << 32) - 1

# Device status (virtio 1.2, 2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 0x40, 0x80
DRIVER_BITS = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED

# Feature bits
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_MQ, F_WRITE_ZEROES = 1, 2, 5, 6, 9, 12, 14
F_INDIRECT_DESC, F_VERSION_1, F_ACCESS_PLATFORM = 28, 32, 33

# The virtio PCI capabilities (4.1.4): cfg_type, and where each structure is in BAR4
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
PCI_CFG_BAR, PCI_CFG_OFFSET, PCI_CFG_LENGTH, PCI_CFG_DATA = 4, 8, 12, 16  # in struct virtio_pci_cfg_cap
CAPS_BAR = 4
COMMON_AT, ISR_AT, DEVICE_AT, NOTIFY_AT = 0x0000, 0x1000, 0x2000, 0x3000
STRUCT_SPAN = 0x1000
NOTIFY_MULTIPLIER = 4  # queue n's notification address: NOTIFY_AT + n * 4

# struct virtio_pci_common_cfg
DFSELECT, DF, GFSELECT, GF = 0x00, 0x04, 0x08, 0x0C
MSIX_CONFIG, NUM_QUEUES, STATUS, CONFIG_GENERATION = 0x10, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
Q_DESC, Q_DRIVER, Q_DEVICE = 0x20, 0x28, 0x30
COMMON_SIZE = 0x38
DEVICE_CONFIG_SIZE = 0x3C  # struct virtio_blk_config up to write_zeroes_may_unmap and its padding
NO_VECTOR = 0xFFFF
ISR_QUEUE, ISR_CONFIG = 1, 2

# Split virtqueues (2.7)
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4
AVAIL_NO_INTERRUPT = 1
QUEUE_SIZE_MAX = 256
INDIRECT_MAX = 1024  # descriptors in one indirect table (16 KiB)

# The block device (5.2)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_WRITE_ZEROES = 0, 1, 4, 8, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
HEADER = struct.Struct("<IIQ")  # type, reserved, sector
WRITE_ZEROES_SEG = struct.Struct("<QII")  # sector, num_sectors, flags
WZ_FLAG_UNMAP = 1
ID_BYTES = 20
SIZE_MAX = 64 << 10  # the largest data segment
SEG_MAX = 64  # data segments in one request
REQUEST_MAX = SIZE_MAX * SEG_MAX
WRITE_ZEROES_MAX = 32768  # sectors in one WRITE_ZEROES (16 MiB)
QUEUES_MAX = 16
FETCH_MAX = 64  # requests taken from one queue per turn
DESC_BUDGET = 2048  # descriptors followed per turn, whatever the chains' lengths (the loop's time is everyone's)
THREAD_MIN = 2 << 20  # a batch moving more than this in at most THREAD_PIECES pieces runs in a worker thread
THREAD_PIECES = SEG_MAX  # (more, each with Python around its copy, would hold the GIL the loop waits for)
# The rest runs on the event loop, a slice at a time (a checkpoint between two):
LOOP_SLICE = 64  # descriptors followed
LOOP_COPIES = 4  # DMA copies made (each a few microseconds, however short) ...
LOOP_BYTES = 128 << 10  # ... or bytes moved; a longer piece is copied in parts of this size

SERIAL_DEFAULT = "ICUSE-VBLK0001"


class ChainError(Exception):
    """A descriptor chain the device cannot follow: it needs a reset."""


@dataclass
class VirtQueue:
    index: int
    size: int = QUEUE_SIZE_MAX
    vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0  # the available ring
    device: int = 0  # the used ring
    last_avail: int = 0  # the next available entry the device takes (free-running, 16 bits)
    used_idx: int = 0  # the next used entry the device writes (free-running, 16 bits)


@dataclass
class Request:
    queue: VirtQueue
    head: int
    readable: list[tuple[int, int]]  # (iova, length), device-readable, in chain order: buffers that follow
    writable: list[tuple[int, int]]  # each other in IOVA as one, none empty; device-writable
    type: int = -1
    sector: int = 0
    status: int = S_OK
    written: int = 0  # bytes the device wrote into writable buffers (the used element's len)
    fault: DmaFault | None = None  # writing the status byte faulted: the device needs a reset
    in_len: int = 0  # bytes of the device-readable buffers
    out_len: int = 0  # bytes of the device-writable buffers
    descs: int = 0  # descriptors of the chain (an indirect one not counted)
    any_writable: bool = False  # a device-writable descriptor, even an empty one


# A request's work a step at a time: each DMA copy yields the bytes it moved; the value is the status.
Steps = Generator[int, None, int]


def _pieces(segs: list[tuple[int, int]], start: int, length: int) -> Iterator[tuple[int, int]]:
    """The pieces of bytes [start, start + length) of a buffer made of segs: one per run of buffers that
    follow each other in IOVA (one copy for what a driver split into segments of SIZE_MAX), each given
    as soon as the next buffer does not continue it."""
    cur: tuple[int, int] | None = None
    pos = 0
    for iova, n in segs:
        lo, hi = max(start, pos), min(start + length, pos + n)
        if lo < hi:
            at = iova + lo - pos
            if cur and cur[0] + cur[1] == at:
                cur = (cur[0], cur[1] + hi - lo)
            else:
                if cur:
                    yield cur
                cur = (at, hi - lo)
        pos += n
        if pos >= start + length:
            break
    if cur:
        yield cur


def _stream(segs: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """_pieces as a list."""
    return list(_pieces(segs, start, length))


class VirtioBlk(QueuedWork, RegisterFunction):
    vendor_id = 0x1AF4  # virtio
    device_id = 0x1042  # 0x1040 + 2 (block): a non-transitional device
    revision = 0x01  # non-transitional devices have revision 1 or more
    class_code = 0x018000  # mass storage, other
    subsystem_vendor_id = 0x1DE5  # the project's test vendor id (docs/dma-engine.md)
    subsystem_id = 0x0040  # non-transitional: 0x40 or more
    bars = [None, Bar(4 << 10), None, None, Bar(16 << 10, is_64=True, prefetchable=True), None]
    express = True
    msi_vectors = 0
    msix_bar = 1
    msix_table_offset = 0x000
    msix_pba_offset = 0x800
    intx_pin = 1
    flr = True

    def __init__(
        self,
        dma: DmaPort,
        irq: IrqSink,
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        *,
        size: int | None = None,
        backing: str | None = None,
        serial: str = SERIAL_DEFAULT,
        read_only: bool = False,
        num_queues: int = 2,
    ) -> None:
        super().__init__(dma, irq, spawn)
        num_queues = int(num_queues)
        if not 1 <= num_queues <= QUEUES_MAX:
            raise ValueError(f"num_queues {num_queues}: 1 to {QUEUES_MAX}")
        self.serial = str(serial).encode("ascii", "replace")[:ID_BYTES]
        self.read_only = bool(read_only)
        self.num_queues = num_queues
        # instance attributes the config space is built from
        self.msix_vectors = num_queues + 1
        self.vendor_caps = self._capabilities()
        self.features = (
            1 << F_VERSION_1
            | 1 << F_ACCESS_PLATFORM
            | 1 << F_SIZE_MAX
            | 1 << F_SEG_MAX
            | 1 << F_BLK_SIZE
            | 1 << F_FLUSH
            | 1 << F_MQ
            | 1 << F_WRITE_ZEROES
            | 1 << F_INDIRECT_DESC
            | (1 << F_RO if self.read_only else 0)
        )
        self.disk = BlockStore(None if size is None else int(size), backing)
        self.faults: list[DmaFault] = []
        self.fault_count = 0
        self.requests = 0
        self.errors = 0
        self.sectors_read = self.sectors_written = 0
        self._notified = False  # a queue was notified (or the device started) since the worker's last look
        self.config = ConfigSpace(self)
        self._pci_cfg = self.config.vendor_cap_offsets[-1]
        self.config.on_vendor_read = self._pci_cfg_read
        self.config.on_vendor_write = self._pci_cfg_write
        self._power_on()

    @staticmethod
    def _capabilities() -> list[bytes | tuple[bytes, bytes]]:
        """The bodies of the vendor capabilities (struct virtio_pci_cap after cap_vndr and cap_next)."""

        def cap(cfg_type: int, offset: int, length: int, extra: bytes = b"", bar: int = CAPS_BAR) -> bytes:
            return struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra

        # the PCI configuration access capability: bar, offset, length and the data window are the driver's
        window = cap(CAP_PCI_CFG, 0, 0, bytes(4), bar=0)
        writable = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        return [
            cap(CAP_COMMON, COMMON_AT, COMMON_SIZE),
            cap(CAP_ISR, ISR_AT, 1),
            cap(CAP_DEVICE, DEVICE_AT, DEVICE_CONFIG_SIZE),
            cap(CAP_NOTIFY, NOTIFY_AT, STRUCT_SPAN, struct.pack("<I", NOTIFY_MULTIPLIER)),
            (window, writable),
        ]

    # -- the PCI configuration access capability (4.1.4.9) -----------------------------
    def _pci_cfg_window(self) -> tuple[int, int, int] | None:
        """(bar, offset, length) the driver set, if it is an access the device makes."""
        bar, offset, length = struct.unpack("<B3xII", self.config.get_bytes(self._pci_cfg + PCI_CFG_BAR, 12))
        if length not in (1, 2, 4) or offset % length or bar > 5 or self.bars[bar] is None:
            return None
        return bar, offset, length

    def _touches_data(self, offset: int, count: int) -> bool:
        data = self._pci_cfg + PCI_CFG_DATA
        return offset < data + 4 and data < offset + count

    def _pci_cfg_read(self, offset: int, count: int) -> None:
        window = self._pci_cfg_window()
        if window and self._touches_data(offset, count):
            bar, off, length = window
            value = self.mmio_read(bar, off, length) if off + length <= self.bars[bar].size else 0
            self.config.put_bytes(self._pci_cfg + PCI_CFG_DATA, value.to_bytes(length, "little"))

    def _pci_cfg_write(self, offset: int, count: int) -> None:
        window = self._pci_cfg_window()
        if window and self._touches_data(offset, count):
            bar, off, length = window
            if off + length <= self.bars[bar].size:
                data = self.config.get_bytes(self._pci_cfg + PCI_CFG_DATA, length)
                self.mmio_write(bar, off, length, int.from_bytes(data, "little"))

    # -- state -----------------------------------------------------------------------
    def _power_on(self) -> None:
        self.msix_pending = 0
        self._device_reset()

    def _device_reset(self) -> None:
        """Device status 0: queues, features and interrupts back to their reset values."""
        self._forget_work()
        self._notified = False
        self.device_status = 0
        self.isr = 0
        self.dfselect = self.gfselect = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.qselect = 0
        self.queues = [VirtQueue(i) for i in range(self.num_queues)]
        self._update_intx()

    def _negotiated(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    def _ready(self) -> bool:
        return bool(self.device_status & DRIVER_OK) and not self.device_status & (DEVICE_NEEDS_RESET | FAILED)

    def _has_work(self) -> bool:
        return self._notified and self._ready()

    def _notify(self) -> None:
        self._notified = True
        self._kick()

    def _failed(self) -> None:
        self._needs_reset("internal error")

    def _needs_reset(self, why: str) -> None:
        if self.device_status & DEVICE_NEEDS_RESET:
            return
        log.warning("virtio-blk: device needs reset: %s", why)
        self.device_status |= DEVICE_NEEDS_RESET
        self._forget_work()
        self._config_interrupt()

    # -- interrupts --------------------------------------------------------------------
    def _update_intx(self) -> None:
        self._drive_intx(bool(self.isr) and not self.config.msix_enabled)

    def _vector(self, vector: int, isr_bit: int) -> None:
        if self.config.msix_enabled:
            if vector != NO_VECTOR:
                self._msix_signal(vector)
        else:
            self.isr |= isr_bit
            self._update_intx()

    def _config_interrupt(self) -> None:
        # the configuration bit is set with MSI-X too, before the vector (4.1.4.5.1)
        self.isr |= ISR_CONFIG
        self._vector(self.config_vector, ISR_CONFIG)

    def config_changed(self, what: str) -> None:
        if what == "flr":
            self.reset()
            return
        self._msix_config_changed(what)
        if what == "command":
            self._notify()  # bus mastering back on: look at the rings again
        self._update_intx()

    # -- registers ------------------------------------------------------------------------
    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        ones = (1 << 8 * size) - 1
        if bar == self.msix_bar:
            if size == 8:
                return self._msix_read32(offset) | self._msix_read32(offset + 4) << 32
            return self._msix_read32(offset & ~3) >> 8 * (offset & 3) & ones
        if bar != CAPS_BAR:
            return ones
        if COMMON_AT <= offset < COMMON_AT + STRUCT_SPAN:
            image = self._common_image()
        elif ISR_AT <= offset < ISR_AT + STRUCT_SPAN:
            if offset != ISR_AT:
                return 0
            value, self.isr = self.isr, 0  # reading the ISR acknowledges it
            self._update_intx()
            return value
        elif DEVICE_AT <= offset < DEVICE_AT + STRUCT_SPAN:
            image = self._device_config()
        else:
            return 0  # notification addresses read 0
        off = offset % STRUCT_SPAN
        return int.from_bytes(image[off : off + size].ljust(size, b"\0"), "little")

    def _common_image(self) -> bytes:
        q = self.queues[self.qselect] if self.qselect < self.num_queues else None
        df = self.features >> 32 * self.dfselect & U32 if self.dfselect < 2 else 0
        gf = self.driver_features >> 32 * self.gfselect & U32 if self.gfselect < 2 else 0
        return struct.pack(
            "<IIIIHHBBHHHHHQQQ",
            self.dfselect,
            df,
            self.gfselect,
            gf,
            self.config_vector,
            self.num_queues,
            self.device_status,
            0,  # config_generation: the configuration never changes while the device runs
            self.qselect,
            q.size if q else 0,
            q.vector if q else NO_VECTOR,
            int(q.enabled) if q else 0,
            q.index if q else 0,  # queue_notify_off
            q.desc if q else 0,
            q.driver if q else 0,
            q.device if q else 0,
        )

    def _device_config(self) -> bytes:
        """struct virtio_blk_config."""
        b = bytearray(DEVICE_CONFIG_SIZE)
        struct.pack_into("<QII", b, 0, self.disk.blocks, SIZE_MAX, SEG_MAX)  # capacity, size_max, seg_max
        struct.pack_into("<I", b, 0x14, LBA)  # blk_size (geometry at 0x10 not offered)
        struct.pack_into("<H", b, 0x22, self.num_queues)  # num_queues
        # max_discard_sectors, max_discard_seg, discard_sector_alignment (0x24..0x2f): no discard
        struct.pack_into("<II", b, 0x30, WRITE_ZEROES_MAX, 1)  # max_write_zeroes_sectors, _seg
        return bytes(b)  # write_zeroes_may_unmap (0x38) 0

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != CAPS_BAR:
            return  # the MSI-X table is the host's; the PBA is read-only
        if NOTIFY_AT <= offset < NOTIFY_AT + STRUCT_SPAN:
            index, rem = divmod(offset - NOTIFY_AT, NOTIFY_MULTIPLIER)
            if rem == 0 and size in (2, 4) and index < self.num_queues:
                self._notify()
            return
        if COMMON_AT <= offset < COMMON_AT + COMMON_SIZE:
            self._common_write(offset - COMMON_AT, size, value)
        # the ISR is read-only; device configuration fields are read-only (no CONFIG_WCE)

    def _common_write(self, off: int, size: int, value: int) -> None:
        if size == 8 and off in (Q_DESC, Q_DRIVER, Q_DEVICE):
            self._common_write(off, 4, value & U32)
            self._common_write(off + 4, 4, value >> 32)
            return
        q = self.queues[self.qselect] if self.qselect < self.num_queues else None
        if (off, size) == (DFSELECT, 4):
            self.dfselect = value
        elif (off, size) == (GFSELECT, 4):
            self.gfselect = value
        elif (off, size) == (GF, 4):
            if self.gfselect < 2 and not self.device_status & FEATURES_OK:
                shift = 32 * self.gfselect
                self.driver_features = self.driver_features & ~(U32 << shift) | value << shift
        elif (off, size) == (MSIX_CONFIG, 2):
            self.config_vector = value if value < self.msix_vectors else NO_VECTOR
        elif (off, size) == (STATUS, 1):
            self._write_status(value)
        elif (off, size) == (Q_SELECT, 2):
            self.qselect = value
        elif q is None or q.enabled:
            return  # a queue that is not there, or live: its fields do not change
        elif (off, size) == (Q_SIZE, 2):
            if value and not value & (value - 1) and value <= QUEUE_SIZE_MAX:
                q.size = value
            else:
                log.info(
                    "virtio-blk: queue %d size %d refused (a power of two up to %d)", q.index, value, QUEUE_SIZE_MAX
                )
        elif (off, size) == (Q_MSIX, 2):
            q.vector = value if value < self.msix_vectors else NO_VECTOR
        elif (off, size) == (Q_ENABLE, 2):
            if value == 1:
                self._enable_queue(q)
        elif off in (Q_DESC, Q_DESC + 4, Q_DRIVER, Q_DRIVER + 4, Q_DEVICE, Q_DEVICE + 4) and size == 4:
            name = {Q_DESC: "desc", Q_DRIVER: "driver", Q_DEVICE: "device"}[off & ~7]
            cur = getattr(q, name)
            cur = cur & ~U32 | value if off % 8 == 0 else cur & U32 | value << 32
            setattr(q, name, cur)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._device_reset()
            return
        old = self.device_status
        new = value & DRIVER_BITS | old & DEVICE_NEEDS_RESET
        if new & FEATURES_OK and not old & FEATURES_OK:
            extra = self.driver_features & ~self.features
            if extra or not self._negotiated(F_VERSION_1):
                why = f"features {extra:#x} not offered" if extra else "no VERSION_1"
                log.info("virtio-blk: FEATURES_OK refused: %s", why)
                new &= ~FEATURES_OK
        if new & DRIVER_OK and not new & FEATURES_OK:
            new &= ~DRIVER_OK  # a device without negotiated features does not run
        self.device_status = new
        if new & DRIVER_OK and not old & DRIVER_OK:
            log.info("virtio-blk: driver ready (features %#x)", self.driver_features)
            self._notify()  # buffers made available before DRIVER_OK are looked at now

    def _enable_queue(self, q: VirtQueue) -> None:
        if q.desc % 16 or q.driver % 2 or q.device % 4:
            self._needs_reset(f"queue {q.index}: misaligned rings")
            return
        q.enabled = True
        q.last_avail = q.used_idx = 0

    # -- the worker ------------------------------------------------------------------------
    async def _process(self, gen: int) -> None:
        while self._notified and gen == self._gen and self._ready():
            self._notified = False  # a notification from here on is seen by the next pass
            for q in self.queues:
                if not q.enabled:
                    continue
                try:
                    reqs = await self._take(q)
                except DmaFault as f:
                    self._note_fault(f)
                    self._needs_reset(f"queue {q.index}: {f}")
                    return
                except ChainError as e:
                    self._needs_reset(f"queue {q.index}: {e}")
                    return
                if not reqs:
                    continue
                self._notified = True  # there may be more past this batch
                # Long copies in few pieces go to a worker thread (the GIL released through them);
                # the rest runs on the loop a few copies at a time. Not a batch of many short pieces
                # in the thread: up to DESC_BUDGET 512-byte copies, the Python around each one holding
                # the GIL, would keep the loop waiting for it.
                pieces = sum(len(r.readable) + len(r.writable) for r in reqs)
                if (pieces <= THREAD_PIECES and sum(r.in_len + r.out_len for r in reqs) > THREAD_MIN) or (
                    self.disk.fd >= 0 and any(r.type in (T_FLUSH, T_WRITE_ZEROES) for r in reqs)
                ):
                    await trio.to_thread.run_sync(self._run, reqs, gen)
                else:
                    await self._run_on_loop(reqs, gen)
                if gen != self._gen:
                    return  # reset meanwhile: the queue is gone
                self._complete(q, reqs)
                if gen != self._gen:
                    return
                await trio.lowlevel.checkpoint()  # fair to the event loop between batches

    def _note_fault(self, f: DmaFault) -> None:
        self.fault_count += 1
        self._keep_fault(f)

    def _u16(self, iova: int) -> int:
        return int.from_bytes(self.dma.read(iova, 2), "little")

    async def _take(self, q: VirtQueue) -> list[Request]:
        """The requests made available on q since the last look (at most FETCH_MAX, their chains
        DESC_BUDGET descriptors), with a checkpoint every LOOP_SLICE descriptors followed."""
        avail_idx = self._u16(q.driver + 2)
        pending = (avail_idx - q.last_avail) & U16
        if pending > q.size:
            raise ChainError(f"available index {avail_idx} is {pending} entries ahead of {q.last_avail}")
        n = min(pending, FETCH_MAX)
        if not n:
            return []
        ring = self.dma.read(q.driver + 4, 2 * q.size)
        table = self.dma.read(q.desc, 16 * q.size)
        reqs: list[Request] = []
        walked = 0
        while len(reqs) < n and walked < DESC_BUDGET:
            slot = (q.last_avail + len(reqs)) % q.size
            head = int.from_bytes(ring[2 * slot : 2 * slot + 2], "little")
            req = await self._chain(q, head, table, walked)
            reqs.append(req)
            walked += req.descs
        q.last_avail = (q.last_avail + len(reqs)) & U16
        return reqs

    async def _chain(self, q: VirtQueue, head: int, table: bytes, walked: int) -> Request:
        """Follows the descriptor chain at head (with an indirect table, if any), walked descriptors
        into the turn. A reset while it waits at a checkpoint cancels it (QueuedWork)."""
        if head >= q.size:
            raise ChainError(f"head {head} past the queue size {q.size}")
        req = Request(q, head, [], [])
        descs, count, i, indirect = table, q.size, head, False
        steps = 0  # descriptors followed in the current table: more than it holds is a loop
        while True:
            steps += 1
            if steps > count:
                raise ChainError("a descriptor chain that loops")
            walked += 1  # a chain of up to 1280 descriptors (256, then an indirect 1024) is not followed in one go
            if walked % LOOP_SLICE == 0:
                await trio.lowlevel.checkpoint()
            addr, length, flags, nxt = DESC.unpack_from(descs, 16 * i)
            if flags & DESC_INDIRECT:
                # zero or more direct descriptors may come before it (2.7.5.3.2), none after, none inside
                if indirect or flags & DESC_NEXT:
                    raise ChainError("an indirect descriptor with NEXT, or inside an indirect table")
                if length % 16 or not 16 <= length <= 16 * INDIRECT_MAX:
                    raise ChainError(f"indirect table of {length} bytes")
                descs, count, i, indirect = self.dma.read(addr, length), length // 16, 0, True
                steps = 0  # the table's own bound from here on (up to INDIRECT_MAX, not the queue's size)
                continue
            if flags & DESC_WRITE:
                segs = req.writable
                req.out_len += length
                req.any_writable = True
            elif req.any_writable:
                raise ChainError("a device-readable descriptor after a device-writable one")
            else:
                segs = req.readable
                req.in_len += length
            req.descs += 1
            if length:  # a buffer that continues the last one is one with it: one copy, and no walk per buffer
                if segs and segs[-1][0] + segs[-1][1] == addr:
                    segs[-1] = (segs[-1][0], segs[-1][1] + length)
                else:
                    segs.append((addr, length))
            if not flags & DESC_NEXT:
                return req
            if nxt >= count:
                raise ChainError(f"next {nxt} past the table of {count}")
            i = nxt

    # -- requests -------------------------------------------------------------------------------
    def _read_stream(self, segs: list[tuple[int, int]], start: int, length: int) -> bytes:
        return b"".join(self.dma.read(a, n) for a, n in _stream(segs, start, length))

    def _write_stream(self, segs: list[tuple[int, int]], start: int, data: bytes) -> None:
        pos = 0
        for iova, n in _stream(segs, start, len(data)):
            self.dma.write(iova, data[pos : pos + n])
            pos += n

    def _steps(self, reqs: list[Request], gen: int, part: int) -> Iterator[int]:
        """Each request's work, data and status byte, a DMA copy (of at most part bytes) at a time:
        the bytes it moved; a reset meanwhile (gen moved on) forgets the rest of the batch."""
        for r in reqs:
            if gen != self._gen:
                return
            try:
                r.status = yield from self._request(r, part)
            except DmaFault as f:
                self._note_fault(f)
                r.status = S_IOERR
            self._put_status(r)
            yield 1

    def _run(self, reqs: list[Request], gen: int) -> None:
        """The batch at once (in a worker thread)."""
        for _ in self._steps(reqs, gen, REQUEST_MAX):
            pass

    async def _run_on_loop(self, reqs: list[Request], gen: int) -> None:
        """The batch on the event loop, with a checkpoint every LOOP_COPIES copies or LOOP_BYTES bytes."""
        copies = moved = 0
        steps = self._steps(reqs, gen, LOOP_BYTES)
        try:
            for n in steps:
                copies += 1
                moved += n
                if copies >= LOOP_COPIES or moved >= LOOP_BYTES:
                    copies = moved = 0
                    await trio.lowlevel.checkpoint()
        finally:
            steps.close()  # cancelled at a checkpoint (a reset): its frames let go of the disk's views

    def _put_status(self, r: Request) -> None:
        """The status byte: the last device-writable byte of the chain (none: the chain has no room for it)."""
        if not r.writable:
            return
        iova, n = r.writable[-1]
        try:
            self.dma.write(iova + n - 1, bytes([r.status]))
        except DmaFault as f:
            r.fault = f
            return
        r.written += 1

    def _request(self, r: Request, part: int) -> Steps:
        if r.in_len < HEADER.size or r.out_len < 1:
            log.info("virtio-blk: request without a header or a status byte")
            return S_IOERR
        r.type, _, r.sector = HEADER.unpack(self._read_stream(r.readable, 0, HEADER.size))
        yield HEADER.size
        data_in, data_out = r.in_len - HEADER.size, r.out_len - 1  # driver -> device, device -> driver
        if r.type == T_IN:
            return (yield from self._data(r, r.writable, 0, data_out, part, to_host=True))
        if r.type == T_OUT:
            if self.read_only:
                return S_IOERR
            return (yield from self._data(r, r.readable, HEADER.size, data_in, part, to_host=False))
        if r.type == T_FLUSH:
            try:
                self.disk.flush()
            except OSError as e:
                log.warning("virtio-blk: flush: %s", e)
                return S_IOERR
            return S_OK
        if r.type == T_GET_ID:
            ident = self.serial.ljust(ID_BYTES, b"\0")[: min(ID_BYTES, data_out)]
            self._write_stream(r.writable, 0, ident)
            r.written = len(ident)
            return S_OK
        if r.type == T_WRITE_ZEROES:
            return self._write_zeroes(r, data_in)
        log.info("virtio-blk: request type %d not supported", r.type)
        return S_UNSUPP

    def _data(
        self, r: Request, segs: list[tuple[int, int]], start: int, length: int, part: int, *, to_host: bool
    ) -> Steps:
        if length % LBA or length > REQUEST_MAX:
            log.info("virtio-blk: %d data bytes (a multiple of %d up to %d)", length, LBA, REQUEST_MAX)
            return S_IOERR
        if r.sector + length // LBA > self.disk.blocks:
            return S_IOERR
        pos = r.sector * LBA
        for iova, n in _pieces(segs, start, length):
            for at in range(0, n, part):
                k = min(n - at, part)
                self.dma.transfer(iova + at, self.disk.view[pos : pos + k], to_host)
                pos += k
                if to_host:
                    r.written += k
                yield k
        if to_host:
            self.sectors_read += length // LBA
        else:
            self.sectors_written += length // LBA
        return S_OK

    def _write_zeroes(self, r: Request, data_in: int) -> int:
        if data_in != WRITE_ZEROES_SEG.size:  # max_write_zeroes_seg is 1
            return S_IOERR
        sector, count, flags = WRITE_ZEROES_SEG.unpack(self._read_stream(r.readable, HEADER.size, data_in))
        if flags & ~WZ_FLAG_UNMAP:
            return S_UNSUPP
        if self.read_only or count > WRITE_ZEROES_MAX or sector + count > self.disk.blocks:
            return S_IOERR
        self.disk.zero(sector * LBA, count * LBA)
        self.sectors_written += count
        return S_OK

    def _complete(self, q: VirtQueue, reqs: list[Request]) -> None:
        """The used elements (one write, two where the ring wraps) and the used index; then the
        interrupt. The status bytes were written with each request's data (_steps)."""
        try:
            for r in reqs:
                self.requests += 1
                self.errors += r.status != S_OK
                if r.fault is not None:
                    raise r.fault
            elems = b"".join(struct.pack("<II", r.head, r.written) for r in reqs)
            slot = q.used_idx % q.size
            first = min(len(reqs), q.size - slot)
            self.dma.write(q.device + 4 + 8 * slot, elems[: 8 * first])
            if first < len(reqs):
                self.dma.write(q.device + 4, elems[8 * first :])
            q.used_idx = (q.used_idx + len(reqs)) & U16
            self.dma.write(q.device + 2, struct.pack("<H", q.used_idx))
            no_interrupt = self._u16(q.driver) & AVAIL_NO_INTERRUPT
        except DmaFault as f:
            self._note_fault(f)
            self._needs_reset(f"queue {q.index}: completing: {f}")
            return
        if not no_interrupt:
            self._vector(q.vector, ISR_QUEUE)

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._forget_work()

    def reset(self) -> None:
        """Function-level reset: every register at its power-on value; the disk's data stays."""
        self._power_on()

    def close(self) -> None:
        self._forget_work()
        self.disk.close()

    def status(self) -> dict:
        return {
            "device_status": self.device_status,
            "needs_reset": bool(self.device_status & DEVICE_NEEDS_RESET),
            "features": self.driver_features,
            "queues_enabled": sum(q.enabled for q in self.queues),
            "requests": self.requests,
            "errors": self.errors,
            "dma_faults": self.fault_count,
            "capacity_bytes": self.disk.size,
        }
