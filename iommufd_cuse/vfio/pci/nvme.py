"""nvme: an NVMe 1.4 controller with one namespace (a PCI Express function, class 01:08:02).

As far as Linux's nvme driver, nvme-cli, SPDK and libvfn use a controller:
BAR0 registers (CAP, VS, INTMS/INTMC, CC/CSTS with enable, reset and shutdown,
AQA/ASQ/ACQ, doorbells with a stride of 4), MSI-X (a vector per completion
queue; BAR4 holds the table) and INTx; admin commands Identify (controller,
namespace, active namespace list, namespace identification descriptors),
Set/Get Features, Create/Delete I/O SQ/CQ, Get Log Page (error, SMART, firmware
slot), Asynchronous Event Request (held until an event), Abort; I/O commands
Read, Write, Flush, Write Zeroes on a namespace of 512-byte LBAs.

Data moves in C (icuse_dma_prp_batch): PRP1/PRP2 and the PRP lists are walked
and the data copied through the IOMMU, a batch of commands per call, in a
worker thread when the batch moves much. A DMA fault is recorded by the device
(the DmaPort) and completes the command with Data Transfer Error; a fault on a
queue itself (fetching a command, posting a completion) is a controller fatal
status (CSTS.CFS), as on QEMU's controller. docs/nvme.md has the details.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from .blockstore import LBA, PAGE, BlockStore
from .config import ConfigSpace
from .model import Bar, DmaFault, DmaPort, IrqSink, QueuedWork, RegisterFunction

log = logging.getLogger(__name__)

U32 = (1 << 32) - 1

# BAR0 registers
REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
DOORBELLS = 0x1000
DSTRD = 0  # doorbell stride 4 << DSTRD

MAX_QUEUES = 16  # I/O queue pairs
MQES = 1023  # largest queue: 1024 entries (0-based)
MSIX_VECTORS = MAX_QUEUES + 1
TIMEOUT_500MS = 20  # CAP.TO: 10 s to become ready (units of 500 ms)
MPSMIN, MPSMAX = 0, 4  # memory pages of 4 KiB .. 64 KiB
MDTS = 8  # largest transfer: 2^8 minimum pages = 1 MiB
MAX_XFER = PAGE << MDTS
CAP = (
    MQES
    | 1 << 16  # CQR: queues must be physically contiguous
    | TIMEOUT_500MS << 24
    | DSTRD << 32
    | 1 << 37  # CSS: the NVM command set
    | MPSMIN << 48
    | MPSMAX << 52
)
VERSION = 0x00010400  # 1.4.0

CC_EN = 1 << 0
CC_CSS_SHIFT, CC_MPS_SHIFT, CC_AMS_SHIFT, CC_SHN_SHIFT = 4, 7, 11, 14
CC_IOSQES_SHIFT, CC_IOCQES_SHIFT = 16, 20
CC_WRITABLE = 0x00FFFFF1
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_CMPLT = 2 << 2

SQE_SIZE, CQE_SIZE = 64, 16
SQE = struct.Struct("<IIQQQQIIIIII")  # cdw0, nsid, cdw2-3, mptr, prp1, prp2, cdw10-15
FETCH_MAX = 64  # commands fetched from one queue per turn
THREAD_MIN = 2 << 20  # a batch moving more than this runs in a worker thread (as the DmaPort's copies)

# Status: (SCT << 8 | SC); DNR added where a retry cannot help
SC_SUCCESS = 0x000
SC_INVALID_OPCODE = 0x001
SC_INVALID_FIELD = 0x002
SC_DATA_TRANSFER_ERROR = 0x004
SC_INTERNAL = 0x006
SC_INVALID_NS = 0x00B
SC_CMD_SEQ_ERROR = 0x00C
SC_PRP_OFFSET_INVALID = 0x013
SC_LBA_RANGE = 0x080
SC_CQ_INVALID = 0x100
SC_QID_INVALID = 0x101
SC_QUEUE_SIZE = 0x102
SC_AER_LIMIT = 0x105
SC_INVALID_VECTOR = 0x108
SC_INVALID_LOG_PAGE = 0x109
SC_INVALID_QUEUE_DELETION = 0x10C
SC_FEATURE_NOT_SAVEABLE = 0x10D
DNR = 1 << 14  # in the 15-bit status field (CQE DW3 bits 31:17)

# Admin opcodes
ADM_DELETE_SQ, ADM_CREATE_SQ, ADM_GET_LOG_PAGE = 0x00, 0x01, 0x02
ADM_DELETE_CQ, ADM_CREATE_CQ, ADM_IDENTIFY = 0x04, 0x05, 0x06
ADM_ABORT, ADM_SET_FEATURES, ADM_GET_FEATURES, ADM_AER = 0x08, 0x09, 0x0A, 0x0C
# NVM opcodes
IO_FLUSH, IO_WRITE, IO_READ, IO_WRITE_ZEROES = 0x00, 0x01, 0x02, 0x08

# Features
FEAT_ARBITRATION, FEAT_POWER_MGMT, FEAT_TEMP_THRESH, FEAT_ERR_RECOVERY = 0x01, 0x02, 0x04, 0x05
FEAT_VOLATILE_WC, FEAT_NUM_QUEUES, FEAT_IRQ_COALESCE, FEAT_IRQ_CONFIG = 0x06, 0x07, 0x08, 0x09
FEAT_WRITE_ATOMIC, FEAT_ASYNC_EVENT = 0x0A, 0x0B
TEMPERATURE_K = 0x0141  # 321 K, what the SMART log and the threshold defaults go by
WCTEMP, CCTEMP = 0x0157, 0x0175  # 343 K, 373 K

# Logs
LOG_ERROR, LOG_SMART, LOG_FW_SLOT = 0x01, 0x02, 0x03
ERROR_LOG_ENTRIES = 64
AERL = 3  # up to 4 outstanding Asynchronous Event Requests
ACL = 3
# Asynchronous events: type 0 (error status), log page 01h
AE_INVALID_DOORBELL, AE_INVALID_DOORBELL_VALUE = 0x00, 0x01

SN_DEFAULT = "ICUSE0001"
MN_DEFAULT = "iommufd-cuse NVMe"
FIRMWARE = "1.0"


def _ascii(s: str, n: int) -> bytes:
    b = s.encode("ascii", "replace")[:n]
    return b + b" " * (n - len(b))


class Status(Exception):
    """A command completes with this status."""

    def __init__(self, sc: int, dnr: bool = True) -> None:
        super().__init__(sc)
        self.sc = sc | (DNR if dnr and sc != SC_DATA_TRANSFER_ERROR else 0)


@dataclass
class SubQueue:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0


@dataclass
class CompQueue:
    qid: int
    base: int
    size: int
    iv: int
    ien: bool
    head: int = 0  # what the host consumed (its doorbell)
    tail: int = 0  # where the next entry goes
    phase: int = 1
    sqs: set[int] = field(default_factory=set)

    def room(self) -> int:
        return self.size - 1 - (self.tail - self.head) % self.size


@dataclass
class Io:
    """An I/O command, validated, as the batch runs it."""

    sq: SubQueue
    cid: int
    opcode: int
    slba: int = 0
    nlb: int = 0  # blocks
    prp1: int = 0
    prp2: int = 0
    status: int = SC_SUCCESS


class Nvme(QueuedWork, RegisterFunction):
    vendor_id = 0x1DE5  # the test vendor id of docs/dma-engine.md: Linux binds by class, with no quirks
    device_id = 0x0002
    revision = 0x01
    class_code = 0x010802  # mass storage, non-volatile memory, NVM Express
    subsystem_vendor_id = 0x1DE5
    subsystem_id = 0x0002
    bars = [Bar(16 << 10, is_64=True), None, None, None, Bar(4 << 10, is_64=True), None]
    express = True
    msi_vectors = 0
    msix_vectors = MSIX_VECTORS
    msix_bar = 4
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
        serial: str = SN_DEFAULT,
        model_name: str = MN_DEFAULT,
    ) -> None:
        super().__init__(dma, irq, spawn)
        self.ns = BlockStore(None if size is None else int(size), backing)
        self.serial = str(serial)
        self.model_name = str(model_name)
        self.faults: list[DmaFault] = []
        self.fault_count = 0
        self.commands = 0
        self.blocks_read = self.blocks_written = 0
        self.reads = self.writes = 0
        self.power_cycles = 1
        self.config = ConfigSpace(self)
        self._power_on()

    # -- state -----------------------------------------------------------------------
    def _power_on(self) -> None:
        self.cc = 0
        self.csts = 0
        self.intms = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.msix_pending = 0
        self._controller_reset()

    def _controller_reset(self) -> None:
        """CC.EN 1 -> 0: queues gone, features and AERs dropped; AQA/ASQ/ACQ kept."""
        self._forget_work()
        self.sqs: dict[int, SubQueue] = {}
        self.cqs: dict[int, CompQueue] = {}
        self.aers: list[int] = []  # command ids of held Asynchronous Event Requests
        self.events: list[int] = []  # error status events (their information) waiting for an AER
        self.events_masked = False  # one was reported: the next wait until the host reads the error log
        self.errors: list[bytes] = []  # error log entries, newest last
        self.error_count = 0
        self.features = {
            FEAT_ARBITRATION: 0,
            FEAT_POWER_MGMT: 0,
            FEAT_ERR_RECOVERY: 0,
            FEAT_VOLATILE_WC: 1,
            FEAT_IRQ_COALESCE: 0,
            FEAT_WRITE_ATOMIC: 0,
            FEAT_ASYNC_EVENT: 0,
        }
        self.thresholds = {(0, 0): WCTEMP, (0, 1): 0}  # (sensor, over 0 / under 1)
        self.irq_config: dict[int, int] = {}
        self.nq = (MAX_QUEUES - 1, MAX_QUEUES - 1)  # I/O SQs, CQs allowed (0-based)
        self.nq_set = False
        self.shutdown = False
        self._update_intx()

    @property
    def page_size(self) -> int:
        return PAGE << (self.cc >> CC_MPS_SHIFT & 0xF)

    def _ready(self) -> bool:
        return bool(self.csts & CSTS_RDY) and not self.csts & CSTS_CFS and not self.shutdown

    def _has_work(self) -> bool:
        if not self._ready():
            return False
        if self.events and not self.events_masked and self.aers and 0 in self.cqs and self.cqs[0].room():
            return True
        return any(sq.head != sq.tail and self.cqs[sq.cqid].room() for sq in self.sqs.values())

    # -- interrupts ----------------------------------------------------------------------
    def _update_intx(self) -> None:
        """Pin-based: pending while a CQ with interrupts on holds entries the host has not consumed."""
        cqs = getattr(self, "cqs", {})
        pending = not self.config.msix_enabled and any(cq.ien and cq.head != cq.tail for cq in cqs.values())
        self._drive_intx(pending and not self.intms & 1)

    def _interrupt(self, cq: CompQueue) -> None:
        if not cq.ien:
            return
        if self.config.msix_enabled:
            self._msix_signal(cq.iv)
        else:
            self._update_intx()

    def config_changed(self, what: str) -> None:
        if what == "flr":
            self.reset()
            return
        self._msix_config_changed(what)
        if what == "command":
            self._kick()  # bus mastering back on: a queue that faulted stays failed, others go on
        self._update_intx()

    # -- faults --------------------------------------------------------------------------
    def _note_fault(self, f: DmaFault) -> None:
        self.fault_count += 1
        self._keep_fault(f)

    def _fatal(self, why: str) -> None:
        log.warning("nvme: controller fatal status: %s", why)
        self.csts |= CSTS_CFS
        self._forget_work()

    # -- MMIO (RegisterFunction splits the accesses) ---------------------------------------
    def _read32(self, bar: int, off: int) -> int:
        if bar == self.msix_bar:
            return self._msix_read32(off)
        if bar != 0:
            return U32
        regs = {
            REG_CAP: CAP & U32,
            REG_CAP + 4: CAP >> 32,
            REG_VS: VERSION,
            REG_INTMS: self.intms,
            REG_INTMC: self.intms,
            REG_CC: self.cc,
            REG_CSTS: self.csts,
            REG_AQA: self.aqa,
            REG_ASQ: self.asq & U32,
            REG_ASQ + 4: self.asq >> 32,
            REG_ACQ: self.acq & U32,
            REG_ACQ + 4: self.acq >> 32,
        }
        return regs.get(off, 0)  # doorbells read 0, other registers are reserved

    def _write32(self, bar: int, offset: int, value: int) -> None:
        if bar != 0:
            return  # the MSI-X table is the host's; the PBA is read-only
        if offset >= DOORBELLS:
            self._doorbell((offset - DOORBELLS) // (4 << DSTRD), value)
        elif offset == REG_CC:
            self._write_cc(value)
        elif offset == REG_INTMS:
            self.intms |= value
            self._update_intx()
        elif offset == REG_INTMC:
            self.intms &= ~value
            self._update_intx()
        elif offset == REG_AQA:
            self.aqa = value & 0x0FFF0FFF
        elif offset in (REG_ASQ, REG_ASQ + 4, REG_ACQ, REG_ACQ + 4):
            name = "asq" if offset < REG_ACQ else "acq"
            cur = getattr(self, name)
            if offset % 8:
                cur = (cur & U32) | value << 32
            else:
                cur = (cur & ~U32) | (value & ~0xFFF)
            setattr(self, name, cur)
        # NSSR: no NVM subsystem reset (CAP.NSSRS 0): writes ignored

    def _write_cc(self, value: int) -> None:
        old, self.cc = self.cc, value & CC_WRITABLE
        if old & CC_EN and not self.cc & CC_EN:
            self._controller_reset()
            self.csts = 0
            return
        if not old & CC_EN and self.cc & CC_EN:
            self._enable()
        shn = self.cc >> CC_SHN_SHIFT & 3
        if self.cc & CC_EN and shn and not self.shutdown:
            # Shutdown notification: nothing is in flight across it (commands run
            # to completion as they are fetched), so it completes at once.
            self.shutdown = True
            self._forget_work()
            self.csts |= CSTS_SHST_CMPLT
            log.info("nvme: shutdown (%s)", "normal" if shn == 1 else "abrupt")

    def _enable(self) -> None:
        mps = self.cc >> CC_MPS_SHIFT & 0xF
        css = self.cc >> CC_CSS_SHIFT & 7
        asqs, acqs = (self.aqa & 0xFFF) + 1, (self.aqa >> 16 & 0xFFF) + 1
        why = None
        if not MPSMIN <= mps <= MPSMAX:
            why = f"CC.MPS {mps} outside {MPSMIN}..{MPSMAX}"
        elif css != 0:
            why = f"CC.CSS {css}: only the NVM command set"
        elif self.cc >> CC_AMS_SHIFT & 7:
            why = "CC.AMS: only round robin"
        elif asqs < 2 or acqs < 2:
            why = f"AQA {self.aqa:#x}: admin queues need at least 2 entries"
        if why:
            self._fatal(f"enable refused: {why}")
            return
        self.csts = CSTS_RDY
        self.sqs[0] = SubQueue(0, self.asq, asqs, 0)
        self.cqs[0] = CompQueue(0, self.acq, acqs, 0, True, sqs={0})
        log.info("nvme: enabled (admin queues %d/%d, %d-byte pages)", asqs, acqs, self.page_size)

    def _doorbell(self, index: int, value: int) -> None:
        qid, is_cq = divmod(index, 2)
        q: SubQueue | CompQueue | None = (self.cqs if is_cq else self.sqs).get(qid)
        if not self.csts & CSTS_RDY:
            return
        if q is None:
            self._event(AE_INVALID_DOORBELL)
            return
        if value >= q.size or (is_cq and (value - q.head) % q.size > (q.tail - q.head) % q.size):
            self._event(AE_INVALID_DOORBELL_VALUE)
            return
        if is_cq:
            q.head = value
            self._update_intx()
        else:
            q.tail = value
        self._kick()

    # -- events ----------------------------------------------------------------------------
    def _event(self, info: int) -> None:
        """An error status event (type 0, log page 01h). Once one is reported, events of
        its type wait until the host reads that log (the specification's masking)."""
        log.info("nvme: asynchronous event: error status %#x", info)
        if info not in self.events:
            self.events.append(info)
        self._kick()

    # -- the worker ------------------------------------------------------------------------
    def _failed(self) -> None:
        self._fatal("internal error")

    async def _process(self, gen: int) -> None:
        first = True
        while gen == self._gen and self._ready():
            if not first:  # fair to the event loop between rounds (a new task has just been scheduled)
                await trio.lowlevel.checkpoint()
                if gen != self._gen or not self._ready():
                    return
            first = False
            self._post_events()
            busy = False
            for qid in sorted(self.sqs):  # the admin queue first, then round robin by id
                sq = self.sqs.get(qid)
                if sq is None or sq.head == sq.tail:
                    continue
                cq = self.cqs[sq.cqid]
                n = min((sq.tail - sq.head) % sq.size, sq.size - sq.head, cq.room(), FETCH_MAX)
                if n <= 0:
                    continue
                busy = True
                try:
                    raw = self.dma.read(sq.base + sq.head * SQE_SIZE, n * SQE_SIZE)
                except DmaFault as f:
                    self._note_fault(f)
                    self._fatal(f"fetching from SQ {qid}: {f}")
                    return
                cmds = list(SQE.iter_unpack(raw))
                if qid == 0:
                    await self._admin_batch(gen, sq, cmds)
                else:
                    await self._io_batch(gen, sq, cmds)
                if gen != self._gen or not self._ready():
                    return
            # nothing more to do: end here rather than yield a scheduler round only to find that out (a
            # doorbell meanwhile kicks a new worker; a round per command otherwise)
            if not busy or not self._has_work():
                return

    def _post(self, sq: SubQueue, entries: list[tuple[int, int, int]]) -> bool:
        """Completions (cid, status, dw0) of commands fetched from sq, in order; then the interrupt."""
        cq = self.cqs.get(sq.cqid)
        if cq is None:
            return False
        out = []
        for cid, status, dw0 in entries:
            if status:
                self._log_error(sq.qid, cid, status)
            out.append((cq.tail, struct.pack("<IIHHHH", dw0 & U32, 0, sq.head, sq.qid, cid, cq.phase | status << 1)))
            cq.tail += 1
            if cq.tail == cq.size:
                cq.tail = 0
                cq.phase ^= 1
        # contiguous slots in one write each
        i = 0
        while i < len(out):
            j = i + 1
            while j < len(out) and out[j][0] == out[j - 1][0] + 1:
                j += 1
            try:
                self.dma.write(cq.base + out[i][0] * CQE_SIZE, b"".join(e for _, e in out[i:j]))
            except DmaFault as f:
                self._note_fault(f)
                self._fatal(f"posting to CQ {cq.qid}: {f}")
                return False
            i = j
        self.commands += len(entries)
        self._interrupt(cq)
        return True

    def _log_error(self, sqid: int, cid: int, status: int) -> None:
        self.error_count += 1
        entry = struct.pack("<QHHHHQIB", self.error_count, sqid, cid, status << 1, 0xFFFF, 0, 0, 0)
        self.errors.append(entry.ljust(64, b"\0"))
        del self.errors[:-ERROR_LOG_ENTRIES]

    def _post_events(self) -> None:
        if self.events and not self.events_masked and self.aers and self.cqs[0].room():
            info = self.events.pop(0)
            cid = self.aers.pop(0)
            self.events_masked = True
            self._post(self.sqs[0], [(cid, SC_SUCCESS, 0 | info << 8 | LOG_ERROR << 16)])

    # -- data ----------------------------------------------------------------------------
    def _transfer(self, xfers: list[tuple[int, int, memoryview, bool]]) -> list[int]:
        """DMA through PRPs: the status of each transfer."""
        results = self.dma.prp_batch(self.page_size, xfers)
        out = []
        for r in results:
            if isinstance(r, DmaFault):
                self._note_fault(r)
                out.append(SC_DATA_TRANSFER_ERROR)
            elif r == -errno.EINVAL:
                out.append(SC_PRP_OFFSET_INVALID | DNR)
            else:
                out.append(SC_SUCCESS)
        return out

    def _to_host(self, data: bytes, prp1: int, prp2: int, length: int) -> int:
        buf = bytearray(length)
        buf[: min(len(data), length)] = data[:length]
        return self._transfer([(prp1, prp2, memoryview(buf), True)])[0]

    # -- admin commands ------------------------------------------------------------------
    async def _admin_batch(self, gen: int, sq: SubQueue, cmds: list[tuple[int, ...]]) -> None:
        for c in cmds:
            sq.head = (sq.head + 1) % sq.size
            cid = c[0] >> 16
            try:
                done = self._admin(c, cid)
            except Status as s:
                done = (s.sc, 0)
            if gen != self._gen:
                return
            if done is not None and not self._post(sq, [(cid, done[0], done[1])]):
                return

    def _admin(self, c: tuple[int, ...], cid: int) -> tuple[int, int] | None:
        cdw0, nsid, _, _, prp1, prp2, d10, d11, d12, d13, d14, d15 = c
        opcode = cdw0 & 0xFF
        if cdw0 >> 8 & 3 or cdw0 >> 14 & 3:
            raise Status(SC_INVALID_FIELD)  # fused commands, SGLs: not supported
        if opcode == ADM_IDENTIFY:
            return self._identify(nsid, d10, d11, prp1, prp2), 0
        if opcode == ADM_GET_LOG_PAGE:
            return self._get_log_page(nsid, d10, d11, d12, d13, prp1, prp2), 0
        if opcode == ADM_SET_FEATURES:
            return SC_SUCCESS, self._set_features(d10, d11)
        if opcode == ADM_GET_FEATURES:
            return SC_SUCCESS, self._get_features(d10, d11)
        if opcode == ADM_CREATE_CQ:
            return self._create_cq(d10, d11, prp1), 0
        if opcode == ADM_CREATE_SQ:
            return self._create_sq(d10, d11, prp1), 0
        if opcode == ADM_DELETE_SQ:
            return self._delete_sq(d10 & 0xFFFF), 0
        if opcode == ADM_DELETE_CQ:
            return self._delete_cq(d10 & 0xFFFF), 0
        if opcode == ADM_ABORT:
            return SC_SUCCESS, 1  # bit 0: not aborted (every command but an AER has already completed)
        if opcode == ADM_AER:
            if len(self.aers) > AERL:
                raise Status(SC_AER_LIMIT)
            self.aers.append(cid)
            return None  # held until an event
        log.info("nvme: admin opcode %#x not supported", opcode)
        raise Status(SC_INVALID_OPCODE)

    def _identify(self, nsid: int, d10: int, d11: int, prp1: int, prp2: int) -> int:
        cns = d10 & 0xFF
        if cns == 0x00:  # namespace
            if nsid != 1:
                raise Status(SC_INVALID_NS)
            data = self._id_ns()
        elif cns == 0x01:
            data = self._id_ctrl()
        elif cns == 0x02:  # active namespace ids above nsid
            if nsid >= 0xFFFFFFFE:
                raise Status(SC_INVALID_NS)
            data = struct.pack("<I", 1) if nsid < 1 else b""
        elif cns == 0x03:  # namespace identification descriptors
            if nsid != 1:
                raise Status(SC_INVALID_NS)
            data = b"".join(struct.pack("<BBH", t, len(v), 0) + v for t, v in self._ns_ids())
        else:
            log.info("nvme: identify CNS %#x not supported (an NVMe 1.4 controller)", cns)
            raise Status(SC_INVALID_FIELD)
        return self._to_host(data, prp1, prp2, PAGE)

    def _ns_ids(self) -> list[tuple[int, bytes]]:
        h = hashlib.sha256((self.serial + "\0" + self.model_name).encode()).digest()
        eui64, nguid = h[:8], h[8:24]
        uuid = bytearray(h[24:32] + hashlib.sha256(h).digest()[:8])
        uuid[6] = uuid[6] & 0x0F | 0x40  # a version 4 (random-looking) UUID, stable per serial
        uuid[8] = uuid[8] & 0x3F | 0x80
        return [(1, eui64), (2, nguid), (3, bytes(uuid))]

    def _id_ctrl(self) -> bytes:
        d = bytearray(PAGE)
        struct.pack_into("<HH", d, 0, self.vendor_id, self.subsystem_vendor_id)
        d[4:24] = _ascii(self.serial, 20)
        d[24:64] = _ascii(self.model_name, 40)
        d[64:72] = _ascii(FIRMWARE, 8)
        d[72] = 6  # RAB
        d[73:76] = b"\x00\x54\x52"  # IEEE OUI (QEMU's, little-endian)
        d[77] = MDTS
        struct.pack_into("<HII", d, 78, 0, VERSION, 0)  # CNTLID, VER, RTD3R
        struct.pack_into("<I", d, 88, 1_000_000)  # RTD3E: 1 s
        d[111] = 1  # CNTRLTYPE: I/O controller
        struct.pack_into("<HBBBBBB", d, 256, 0, ACL, AERL, 0x03, 0x04, ERROR_LOG_ENTRIES - 1, 0)
        # ^ OACS none; FRMW slot 1 read-only, 1 slot; LPA extended data (offsets); ELPE; NPSS 0
        struct.pack_into("<HH", d, 266, WCTEMP, CCTEMP)
        d[512], d[513] = 0x66, 0x44  # SQES, CQES: 64 and 16 bytes
        struct.pack_into("<HIHHBB", d, 514, 0, 1, 1 << 3, 0, 0, 0x07)
        # ^ MAXCMD, NN 1, ONCS Write Zeroes, FUSES none, FNA none, VWC present + broadcast flush
        subnqn = f"nqn.2026-12.io.iommufd-cuse:nvme:{self.serial}".encode()[:255]
        d[768 : 768 + len(subnqn)] = subnqn
        struct.pack_into("<HBBII", d, 2048, 2500, 0, 0, 0, 0)  # PSD0: 25 W, operational
        return bytes(d)

    def _id_ns(self) -> bytes:
        d = bytearray(PAGE)
        n = self.ns.blocks
        struct.pack_into("<QQQBBB", d, 0, n, n, n, 0, 0, 0)  # NSZE, NCAP, NUSE, NSFEAT, NLBAF 0, FLBAS 0
        ids = dict(self._ns_ids())
        d[104:120] = ids[2]
        d[120:128] = ids[1]
        struct.pack_into("<I", d, 128, 9 << 16)  # LBAF0: 512-byte data, no metadata
        return bytes(d)

    def _get_log_page(self, nsid: int, d10: int, d11: int, d12: int, d13: int, prp1: int, prp2: int) -> int:
        lid, rae = d10 & 0xFF, bool(d10 >> 15 & 1)
        length = ((d10 >> 16 | (d11 & 0xFFFF) << 16) + 1) * 4
        offset = d12 | d13 << 32
        if length > MAX_XFER or offset % 4:
            raise Status(SC_INVALID_FIELD)
        if lid == LOG_ERROR:
            data = b"".join(reversed(self.errors))
            if not rae:
                self.events_masked = False  # the next error event may be reported
        elif lid == LOG_SMART:
            if nsid not in (0, 1, 0xFFFFFFFF):
                raise Status(SC_INVALID_FIELD)
            data = self._smart()
        elif lid == LOG_FW_SLOT:
            data = bytes([1]) + bytes(7) + _ascii(FIRMWARE, 8)
            data = data.ljust(512, b"\0")
        else:
            log.info("nvme: log page %#x not supported", lid)
            raise Status(SC_INVALID_LOG_PAGE)
        size = {LOG_ERROR: ERROR_LOG_ENTRIES * 64, LOG_SMART: 512, LOG_FW_SLOT: 512}[lid]
        if offset >= size:
            raise Status(SC_INVALID_FIELD)
        data = data.ljust(size, b"\0")[offset : offset + length]
        return self._to_host(data, prp1, prp2, length)

    def _smart(self) -> bytes:
        d = bytearray(512)
        d[0] = 0  # no critical warning
        struct.pack_into("<HBBB", d, 1, TEMPERATURE_K, 100, 10, 0)  # temperature, spare, threshold, used

        def u128(off: int, v: int) -> None:
            d[off : off + 16] = v.to_bytes(16, "little")

        u128(32, -(-self.blocks_read // 1000))  # data units (1000 x 512 bytes)
        u128(48, -(-self.blocks_written // 1000))
        u128(64, self.reads)
        u128(80, self.writes)
        u128(112, self.power_cycles)
        u128(176, self.error_count)
        return bytes(d)

    def _set_features(self, d10: int, d11: int) -> int:
        fid = d10 & 0xFF
        if d10 >> 31:
            raise Status(SC_FEATURE_NOT_SAVEABLE)
        if fid == FEAT_NUM_QUEUES:
            nsqr, ncqr = d11 & 0xFFFF, d11 >> 16
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                raise Status(SC_INVALID_FIELD)
            if any(q for q in self.sqs if q) or any(q for q in self.cqs if q):
                raise Status(SC_CMD_SEQ_ERROR)
            self.nq = (min(nsqr, MAX_QUEUES - 1), min(ncqr, MAX_QUEUES - 1))
            self.nq_set = True
            return self.nq[0] | self.nq[1] << 16
        if fid == FEAT_TEMP_THRESH:
            sel, th = d11 >> 16 & 0xF, d11 >> 20 & 3
            if sel not in (0, 0xF) or th > 1:
                raise Status(SC_INVALID_FIELD)
            self.thresholds[(0, th)] = d11 & 0xFFFF
            return 0
        if fid == FEAT_POWER_MGMT and d11 & 0x1F:
            raise Status(SC_INVALID_FIELD)  # one power state
        if fid == FEAT_IRQ_CONFIG:
            if d11 & 0xFFFF >= MSIX_VECTORS:
                raise Status(SC_INVALID_FIELD)
            self.irq_config[d11 & 0xFFFF] = d11 & 0x1FFFF
            return 0
        if fid not in self.features:
            log.info("nvme: feature %#x not supported", fid)
            raise Status(SC_INVALID_FIELD)
        self.features[fid] = d11 & (1 if fid == FEAT_VOLATILE_WC else U32)
        return 0

    def _get_features(self, d10: int, d11: int) -> int:
        fid, sel = d10 & 0xFF, d10 >> 8 & 7
        known = set(self.features) | {FEAT_NUM_QUEUES, FEAT_TEMP_THRESH, FEAT_IRQ_CONFIG}
        if fid not in known or sel > 3:
            raise Status(SC_INVALID_FIELD)
        if sel == 3:
            return 1 << 2  # supported capabilities: changeable, not saveable, not namespace specific
        default = sel != 0  # "saved" of a feature that cannot be saved is its default
        if fid == FEAT_NUM_QUEUES:
            nq = (MAX_QUEUES - 1, MAX_QUEUES - 1) if default else self.nq
            return nq[0] | nq[1] << 16
        if fid == FEAT_TEMP_THRESH:
            th = d11 >> 20 & 3
            if d11 >> 16 & 0xF or th > 1:
                raise Status(SC_INVALID_FIELD)
            value = (WCTEMP if th == 0 else 0) if default else self.thresholds[(0, th)]
            return value | th << 20
        if fid == FEAT_IRQ_CONFIG:
            iv = d11 & 0xFFFF
            if iv >= MSIX_VECTORS:
                raise Status(SC_INVALID_FIELD)
            return iv if default else self.irq_config.get(iv, iv)
        return (1 if fid == FEAT_VOLATILE_WC else 0) if default else self.features[fid]

    def _create_cq(self, d10: int, d11: int, base: int) -> int:
        qid, qsize = d10 & 0xFFFF, (d10 >> 16) + 1
        pc, ien, iv = d11 & 1, bool(d11 >> 1 & 1), d11 >> 16
        if qid == 0 or qid > self.nq[1] + 1 or qid in self.cqs:
            raise Status(SC_QID_INVALID)
        if qsize < 2 or qsize > MQES + 1:
            raise Status(SC_QUEUE_SIZE)
        if not pc:
            raise Status(SC_INVALID_FIELD)  # CAP.CQR: physically contiguous queues only
        if base & (self.page_size - 1):
            raise Status(SC_PRP_OFFSET_INVALID)
        if iv >= MSIX_VECTORS:
            raise Status(SC_INVALID_VECTOR)
        if self.cc >> CC_IOCQES_SHIFT & 0xF != 4:
            raise Status(SC_INVALID_FIELD)  # CC.IOCQES must say 16-byte entries
        self.cqs[qid] = CompQueue(qid, base, qsize, iv, ien)
        return SC_SUCCESS

    def _create_sq(self, d10: int, d11: int, base: int) -> int:
        qid, qsize = d10 & 0xFFFF, (d10 >> 16) + 1
        pc, cqid = d11 & 1, d11 >> 16
        if qid == 0 or qid > self.nq[0] + 1 or qid in self.sqs:
            raise Status(SC_QID_INVALID)
        if cqid == 0 or cqid not in self.cqs:
            raise Status(SC_CQ_INVALID)
        if qsize < 2 or qsize > MQES + 1:
            raise Status(SC_QUEUE_SIZE)
        if not pc:
            raise Status(SC_INVALID_FIELD)
        if base & (self.page_size - 1):
            raise Status(SC_PRP_OFFSET_INVALID)
        if self.cc >> CC_IOSQES_SHIFT & 0xF != 6:
            raise Status(SC_INVALID_FIELD)  # CC.IOSQES must say 64-byte entries
        self.sqs[qid] = SubQueue(qid, base, qsize, cqid)
        self.cqs[cqid].sqs.add(qid)
        return SC_SUCCESS

    def _delete_sq(self, qid: int) -> int:
        if qid == 0 or qid not in self.sqs:
            raise Status(SC_QID_INVALID)
        sq = self.sqs.pop(qid)
        self.cqs[sq.cqid].sqs.discard(qid)
        return SC_SUCCESS

    def _delete_cq(self, qid: int) -> int:
        if qid == 0 or qid not in self.cqs:
            raise Status(SC_QID_INVALID)
        if self.cqs[qid].sqs:
            raise Status(SC_INVALID_QUEUE_DELETION)
        del self.cqs[qid]
        self._update_intx()
        return SC_SUCCESS

    # -- I/O commands ------------------------------------------------------------------------
    def _parse_io(self, sq: SubQueue, c: tuple[int, ...]) -> Io:
        cdw0, nsid, _, _, prp1, prp2, d10, d11, d12 = c[:9]
        io = Io(sq, cdw0 >> 16, cdw0 & 0xFF, prp1=prp1, prp2=prp2)
        if cdw0 >> 8 & 3 or cdw0 >> 14 & 3:
            io.status = SC_INVALID_FIELD | DNR  # fused commands, SGLs: not supported
        elif io.opcode == IO_FLUSH:
            if nsid not in (1, 0xFFFFFFFF):
                io.status = SC_INVALID_NS | DNR
        elif io.opcode in (IO_READ, IO_WRITE, IO_WRITE_ZEROES):
            io.slba, io.nlb = d10 | d11 << 32, (d12 & 0xFFFF) + 1
            if nsid != 1:
                io.status = SC_INVALID_NS | DNR
            elif io.slba + io.nlb > self.ns.blocks:
                io.status = SC_LBA_RANGE | DNR
            elif io.opcode != IO_WRITE_ZEROES and io.nlb * LBA > MAX_XFER:
                io.status = SC_INVALID_FIELD | DNR
        else:
            log.info("nvme: I/O opcode %#x not supported", io.opcode)
            io.status = SC_INVALID_OPCODE | DNR
        return io

    def _run_ios(self, ios: list[Io]) -> None:
        """Move the data of a batch (on the loop or in a worker thread)."""
        xfers, which = [], []
        view = self.ns.view
        for io in ios:
            if io.status:
                continue
            if io.opcode in (IO_READ, IO_WRITE):
                start = io.slba * LBA
                xfers.append((io.prp1, io.prp2, view[start : start + io.nlb * LBA], io.opcode == IO_READ))
                which.append(io)
            elif io.opcode == IO_WRITE_ZEROES:
                self.ns.zero(io.slba * LBA, io.nlb * LBA)
            elif io.opcode == IO_FLUSH:
                try:
                    self.ns.flush()
                except OSError as e:
                    log.warning("nvme: flush: %s", e)
                    io.status = SC_INTERNAL
        if xfers:
            for io, st in zip(which, self._transfer(xfers), strict=True):
                io.status = st

    async def _io_batch(self, gen: int, sq: SubQueue, cmds: list[tuple[int, ...]]) -> None:
        ios = [self._parse_io(sq, c) for c in cmds]
        heavy = sum(io.nlb * LBA for io in ios if not io.status) > THREAD_MIN
        heavy = heavy or any(io.opcode == IO_FLUSH and self.ns.fd >= 0 for io in ios)
        if heavy:
            await trio.to_thread.run_sync(self._run_ios, ios)
        else:
            self._run_ios(ios)
        if gen != self._gen:
            return  # reset meanwhile: the queue is gone
        for io in ios:
            if io.status:
                continue
            if io.opcode == IO_READ:
                self.reads += 1
                self.blocks_read += io.nlb
            elif io.opcode in (IO_WRITE, IO_WRITE_ZEROES):
                self.writes += 1
                self.blocks_written += io.nlb
        sq.head = (sq.head + len(ios)) % sq.size
        self._post(sq, [(io.cid, io.status, 0) for io in ios])

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        """The device is closed or unbound: no more work (reset() follows)."""
        self._forget_work()

    def reset(self) -> None:
        """Function-level reset: every register at its power-on value; the namespace's data stays."""
        self._power_on()

    def close(self) -> None:
        self._forget_work()
        self.ns.close()

    def status(self) -> dict:
        return {
            "ready": bool(self.csts & CSTS_RDY),
            "fatal": bool(self.csts & CSTS_CFS),
            "io_queues": len(self.sqs) - (1 if 0 in self.sqs else 0),
            "commands": self.commands,
            "dma_faults": self.fault_count,
            "namespace_bytes": self.ns.size,
        }
