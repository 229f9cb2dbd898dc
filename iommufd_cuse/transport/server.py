"""The FUSE request loop: one reader under trio, one reused request buffer.

Quick requests are answered inline by the reader. A handler that returns an
awaitable runs as a task of its own, in a cancel scope that FUSE_INTERRUPT
cancels (the client then gets EINTR). Replies to requests the kernel has
already abandoned (ENOENT from the device) are dropped.
"""

from __future__ import annotations

import collections
import errno
import inspect
import logging
import os
import struct
import time

import trio

from ..errors import Errno
from . import protocol as P
from .caller import Caller
from .loopback import IDENTIFY, answer_identify
from .loopback import released as loopback_released
from .nodes import FileHandle, Node, Tree

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 1  # seconds the kernel may cache names and attributes
MAX_WRITE = 128 * 1024
BUFSIZE = MAX_WRITE + 4096  # the kernel refuses reads into less than header + max_write
MAX_QUEUED = 256  # requests read ahead of being served (a bound on the daemon's memory)


class Request:
    """One FUSE request as handlers see it."""

    __slots__ = ("unique", "opcode", "nodeid", "caller", "fh", "server")

    def __init__(
        self, unique: int, opcode: int, nodeid: int, caller: Caller, fh: int = 0, server: FuseServer | None = None
    ) -> None:
        self.unique = unique
        self.opcode = opcode
        self.nodeid = nodeid
        self.caller = caller
        self.fh = fh
        self.server = server  # the carrier it came by (its poll notifications go back the same way)


class FuseServer:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.fd = -1
        self.handles: dict[int, FileHandle] = {}
        self._next_fh = 1
        self._inflight: dict[int, tuple[trio.CancelScope, int]] = {}
        self._nursery: trio.Nursery | None = None
        self._tgids: dict[int, int] = {}  # thread id -> thread group id, for fair queues
        self.initialized = trio.Event()
        self.removed = False  # the device is being removed: ENODEV for all but what closes a file
        self.start_time = int(time.time())
        self._ops = {
            P.INIT: self._init,
            P.LOOKUP: self._lookup,
            P.FORGET: self._forget,
            P.BATCH_FORGET: self._forget,
            P.GETATTR: self._getattr,
            P.READLINK: self._readlink,
            P.SETATTR: self._setattr,
            P.OPEN: self._open,
            P.OPENDIR: self._opendir,
            P.READ: self._read,
            P.WRITE: self._write,
            P.IOCTL: self._ioctl,
            P.POLL: self._poll,
            P.FLUSH: self._flush,
            P.FSYNC: self._ok,
            P.RELEASE: self._release,
            P.READDIR: self._readdir,
            P.RELEASEDIR: self._ok,
            P.STATFS: self._statfs,
            P.ACCESS: self._ok,
            P.INTERRUPT: self._interrupt,
            P.DESTROY: self._ok,
        }

    # -- the loop -----------------------------------------------------------
    async def serve(self, fd: int) -> None:
        """Serve requests from the fuse device fd until it is unmounted or cancelled.

        Fair service: every request waiting in the kernel is read (up to
        MAX_QUEUED) into a queue of its process, and the queues are served
        round robin, one request each per round. A process with many threads
        blocked on the daemon then delays another's single request by at most
        one of its own requests, not by all of them (the kernel's queue is FIFO).

        One exception keeps a client's back-to-back calls cheap: a request of
        the thread served last, read while nothing is queued, is served at once.
        A thread has one request outstanding at a time, so it was sent after
        that one was answered and nothing waiting was ahead of it."""
        self.fd = fd
        bufs = (bytearray(BUFSIZE), bytearray(BUFSIZE))
        views = (memoryview(bufs[0]), memoryview(bufs[1]))
        readv = os.readv
        pid_at = P.IN_HEADER_PID.unpack_from
        pid_offset = P.IN_HEADER_PID_OFFSET
        queues: dict[int, collections.deque[bytes]] = {}
        queued = 0
        rounds = 0  # rounds (or requests served at once) since the last checkpoint
        last_tid = -1  # the thread whose request was served last
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    while True:
                        # Read what the kernel has, up to MAX_QUEUED, alternating two
                        # buffers: a request found alone (the common case) is served
                        # from its buffer, with no copy and no queue.
                        drained = False  # the kernel had nothing more when we last read
                        last = -1  # size of the request read last and not yet queued
                        b = 0
                        while queued < MAX_QUEUED:
                            try:
                                n = readv(fd, [bufs[b]])
                            except BlockingIOError:
                                drained = True
                                break
                            except OSError as e:
                                if e.errno in (errno.ENOENT, errno.EINTR):
                                    continue  # a request abandoned before we read it
                                if e.errno == errno.ENODEV:
                                    log.info("file system unmounted")
                                    return
                                raise
                            if last < 0 and not queued and pid_at(bufs[b], pid_offset)[0] == last_tid:
                                break  # the thread served last is back: served at once (see above)
                            if last >= 0:
                                self._enqueue(queues, views[b ^ 1][:last])
                                queued += 1
                            last = n
                            b ^= 1
                        if last < 0 and not drained and not queued:
                            # The request of the thread served last, alone in bufs[b].
                            self._dispatch(views[b][:n])
                            rounds += 1
                            if rounds >= 16:  # let spawned handlers run under a steady stream
                                rounds = 0
                                await trio.lowlevel.checkpoint()
                            continue
                        if last >= 0:
                            if not queued:
                                msg = views[b ^ 1][:last]
                                last_tid = pid_at(msg, pid_offset)[0]
                                self._dispatch(msg)  # alone: served at once
                                if drained:
                                    rounds = 0
                                    await trio.lowlevel.wait_readable(fd)
                                continue
                            self._enqueue(queues, views[b ^ 1][:last])
                            queued += 1
                        if not queued:
                            rounds = 0
                            await trio.lowlevel.wait_readable(fd)
                            continue
                        for key in list(queues):  # one round: one request of each process
                            q = queues[key]
                            msg = q.popleft()
                            queued -= 1
                            if not q:
                                del queues[key]
                            last_tid = pid_at(msg, pid_offset)[0]
                            self._dispatch(memoryview(msg))
                        rounds += 1
                        if rounds >= 16:  # let spawned handlers run under a steady stream
                            rounds = 0
                            await trio.lowlevel.checkpoint()
                        if drained and not queued:
                            rounds = 0
                            await trio.lowlevel.wait_readable(fd)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # Once every handler has unwound (none holds an object any more).
            await self._release_all()

    def _enqueue(self, queues: dict[int, collections.deque[bytes]], msg: memoryview) -> None:
        key = self._queue_key(msg)
        q = queues.get(key)
        if q is None:
            q = queues[key] = collections.deque()
        q.append(bytes(msg))

    def _queue_key(self, msg: memoryview) -> int:
        """The process (thread group) a request comes from: the header names the thread."""
        tid = P.IN_HEADER_PID.unpack_from(msg, P.IN_HEADER_PID_OFFSET)[0]
        tgid = self._tgids.get(tid)
        if tgid is None:
            if len(self._tgids) >= 4096:  # threads come and go: forget them all now and then
                self._tgids.clear()
            tgid = self._tgids[tid] = _tgid_of(tid)
        return tgid

    def _dispatch(self, msg: memoryview) -> None:
        _len, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = P.IN_HEADER.unpack_from(msg)
        body = msg[P.IN_HEADER.size :]
        op = self._ops.get(opcode)
        if op is None:
            log.debug("opcode %d not served: ENOSYS", opcode)
            self.reply_error(unique, errno.ENOSYS)
            return
        if self.removed and opcode not in P.AFTER_REMOVAL:
            self.reply_error(unique, errno.ENODEV)  # as a removed device answers its open files
            return
        req = Request(unique, opcode, nodeid, Caller(pid, uid, gid), 0, self)
        try:
            op(req, body)
        except Errno as e:
            self.reply_error(unique, e.errno)
        except Exception:
            log.exception("%s failed", P.OPCODE_NAMES.get(opcode, opcode))
            if opcode not in P.NO_REPLY:
                self.reply_error(unique, errno.EIO)

    # -- replies ------------------------------------------------------------
    def reply(self, unique: int, payload: bytes | bytearray | memoryview = b"") -> None:
        self._send(P.OUT_HEADER.pack(P.OUT_HEADER.size + len(payload), 0, unique), payload)

    def reply_error(self, unique: int, err: int) -> None:
        self._send(P.OUT_HEADER.pack(P.OUT_HEADER.size, -err, unique), b"")

    def notify_poll(self, kh: int) -> None:
        """Tell the kernel that a polled handle has changed (FUSE_NOTIFY_POLL)."""
        payload = P.NOTIFY_POLL_OUT.pack(kh)
        self._send(P.OUT_HEADER.pack(P.OUT_HEADER.size + len(payload), P.NOTIFY_POLL, 0), payload)

    def _send(self, header: bytes, payload: bytes | bytearray | memoryview) -> None:
        try:
            os.writev(self.fd, [header, payload] if payload else [header])
        except OSError as e:
            # ENOENT: the kernel abandoned the request (client interrupted or gone).
            if e.errno != errno.ENOENT:
                log.warning("reply failed: %s", e)

    def _answer(self, req: Request, result: object, pack) -> None:  # noqa: ANN001
        """Reply now, or run an awaitable answer as its own interruptible task."""
        if type(result) is not int and inspect.isawaitable(result):
            scope = trio.CancelScope()
            self._inflight[req.unique] = (scope, req.fh)
            assert self._nursery is not None
            self._nursery.start_soon(self._run, req, result, pack, scope)
        else:
            self.reply(req.unique, pack(result))

    async def _run(self, req: Request, awaitable, pack, scope: trio.CancelScope) -> None:  # noqa: ANN001
        try:
            with scope:
                try:
                    result = await awaitable
                except Errno as e:
                    self.reply_error(req.unique, e.errno)
                    return
                except Exception:
                    log.exception("%s failed", P.OPCODE_NAMES.get(req.opcode, req.opcode))
                    self.reply_error(req.unique, errno.EIO)
                    return
                self.reply(req.unique, pack(result))
            if scope.cancelled_caught:
                self.reply_error(req.unique, errno.EINTR)
        finally:
            self._inflight.pop(req.unique, None)

    # -- ops ----------------------------------------------------------------
    def _init(self, req: Request, body: memoryview) -> None:
        major, minor, max_readahead, _flags = P.INIT_IN.unpack_from(body)
        if major != P.KERNEL_VERSION:
            log.error("kernel speaks FUSE %d.%d; need %d", major, minor, P.KERNEL_VERSION)
            raise Errno(errno.EPROTO)
        self.reply(
            req.unique,
            P.INIT_OUT.pack(
                P.KERNEL_VERSION,
                min(minor, P.KERNEL_MINOR_VERSION),
                max_readahead,
                P.FUSE_BIG_WRITES | P.FUSE_MAX_PAGES,
                16,  # max_background
                12,  # congestion_threshold
                MAX_WRITE,
                1,  # time_gran
                MAX_WRITE // 4096,
                0,
                0,
                0,
                0,
            ),
        )
        self.initialized.set()

    def _node(self, nodeid: int) -> Node:
        node = self.tree.by_ino.get(nodeid)
        if node is None:
            raise Errno(errno.ENOENT)
        return node

    def _attr(self, node: Node) -> bytes:
        t = self.start_time
        nlink = 2 if node.is_dir else 1
        size = len(node.link_target().encode()) if node.is_link else node.size
        blocks = (size + 511) // 512
        return P.ATTR.pack(
            node.ino, size, blocks, t, t, t, 0, 0, 0, node.full_mode, nlink, node.uid, node.gid, 0, 4096, 0
        )

    def _lookup(self, req: Request, body: memoryview) -> None:
        name = bytes(body).split(b"\0", 1)[0].decode(errors="surrogateescape")
        child = self._node(req.nodeid).children.get(name)
        if child is None or not child.visible():
            raise Errno(errno.ENOENT)
        head = P.ENTRY_OUT_HEAD.pack(child.ino, 0, ATTR_TIMEOUT, ATTR_TIMEOUT, 0, 0)
        self.reply(req.unique, head + self._attr(child))

    def _forget(self, req: Request, body: memoryview) -> None:
        pass  # nodes are static: lookup counts need no bookkeeping

    def _getattr(self, req: Request, body: memoryview) -> None:
        node = self._node(req.nodeid)
        self.reply(req.unique, P.ATTR_OUT_HEAD.pack(ATTR_TIMEOUT, 0, 0) + self._attr(node))

    def _readlink(self, req: Request, body: memoryview) -> None:
        node = self._node(req.nodeid)
        if not node.is_link:
            raise Errno(errno.EINVAL)
        self.reply(req.unique, node.link_target().encode())

    def _setattr(self, req: Request, body: memoryview) -> None:
        # Truncation of a device node (open with O_TRUNC) is a no-op, as for a char device.
        self._getattr(req, body)

    def _open(self, req: Request, body: memoryview) -> None:
        flags, _ = P.OPEN_IN.unpack_from(body)
        node = self._node(req.nodeid)
        if node.is_dir:
            raise Errno(errno.EISDIR)
        if node.opener is None:
            raise Errno(errno.ELOOP)  # a link: the kernel follows it before OPEN
        assert node.opener is not None
        handle = node.opener(req, flags)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        self.reply(req.unique, P.OPEN_OUT.pack(fh, handle.open_flags, 0))

    def _opendir(self, req: Request, body: memoryview) -> None:
        if not self._node(req.nodeid).is_dir:
            raise Errno(errno.ENOTDIR)
        self.reply(req.unique, P.OPEN_OUT.pack(0, 0, 0))

    def _readdir(self, req: Request, body: memoryview) -> None:
        _fh, offset, size, *_ = P.READ_IN.unpack_from(body)
        node = self._node(req.nodeid)
        entries = [(node.ino, b".", P.DT_DIR), ((node.parent or node).ino, b"..", P.DT_DIR)]
        entries += [(c.ino, c.name.encode(), c.dirent_type) for c in node.children.values() if c.visible()]
        out = bytearray()
        for i, (ino, name, kind) in enumerate(entries[offset:], start=offset + 1):
            rec = P.dirent(ino, i, name, kind)
            if len(out) + len(rec) > size:
                break
            out += rec
        self.reply(req.unique, out)

    def _handle(self, fh: int) -> FileHandle:
        handle = self.handles.get(fh)
        if handle is None:
            raise Errno(errno.EBADF)
        return handle

    def _ioctl(self, req: Request, body: memoryview) -> None:
        fh, flags, cmd, arg, _in_size, _out_size = P.IOCTL_IN.unpack_from(body)
        req.fh = fh
        handle = self.handles.get(fh)  # (self._handle, inline: every ioctl comes here)
        if handle is None:
            raise Errno(errno.EBADF)
        if cmd == IDENTIFY and answer_identify(cmd, arg, req.caller.ppid, handle):
            self.reply(req.unique, _pack_ioctl(0))
            return
        result = handle.ioctl(req, cmd, arg)
        if type(result) is int:  # answered now, the common case: one write of header and result
            try:
                os.write(self.fd, _IOCTL_REPLY.pack(_IOCTL_REPLY.size, 0, req.unique, result, 0, 0, 0))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("reply failed: %s", e)
            return
        self._answer(req, result, _pack_ioctl)

    def _read(self, req: Request, body: memoryview) -> None:
        fh, offset, size, *_ = P.READ_IN.unpack_from(body)
        req.fh = fh
        self._answer(req, self._handle(fh).read(req, offset, size), bytes)

    def _write(self, req: Request, body: memoryview) -> None:
        fh, offset, size, *_ = P.WRITE_IN.unpack_from(body)
        req.fh = fh
        data = bytes(body[P.WRITE_IN.size : P.WRITE_IN.size + size])
        self._answer(req, self._handle(fh).write(req, offset, data), _pack_write)

    def _poll(self, req: Request, body: memoryview) -> None:
        fh, kh, flags, events = P.POLL_IN.unpack_from(body)
        req.fh = fh
        revents = self._handle(fh).poll(req, events, kh if flags & P.FUSE_POLL_SCHEDULE_NOTIFY else None)
        self.reply(req.unique, P.POLL_OUT.pack(revents, 0))

    def _flush(self, req: Request, body: memoryview) -> None:
        # No node needs flush, and ENOSYS makes the kernel stop sending it: then
        # closing a file of this mount never waits for the daemon, which matters
        # when the daemon itself holds such files (see loopback.py).
        self.reply_error(req.unique, errno.ENOSYS)

    def _ok(self, req: Request, body: memoryview) -> None:
        self.reply(req.unique)

    def _interrupt(self, req: Request, body: memoryview) -> None:
        (target,) = P.INTERRUPT_IN.unpack_from(body)
        entry = self._inflight.get(target)
        if entry is not None:
            log.debug("request %d interrupted", target)
            entry[0].cancel()

    def _release(self, req: Request, body: memoryview) -> None:
        fh = P.RELEASE_IN.unpack_from(body)[0]
        handle = self.handles.pop(fh, None)
        if handle is None:
            self.reply(req.unique)
            return
        loopback_released(handle)
        # Anything still running for this open is abandoned first.
        for scope, owner in list(self._inflight.values()):
            if owner == fh:
                scope.cancel()
        req.fh = fh
        self._answer(req, _maybe_await(handle.release()), lambda _: b"")

    def _statfs(self, req: Request, body: memoryview) -> None:
        self.reply(req.unique, P.STATFS_OUT.pack(0, 0, 0, len(self.tree.by_ino), 0, 4096, 255, 4096, 0))

    async def _release_all(self) -> None:
        """On shutdown, release every open so that contexts free what they hold."""
        handles, self.handles = self.handles, {}
        with trio.CancelScope(shield=True):
            # Files that hold others (a bound device holds its iommufd) go first.
            for handle in sorted(handles.values(), key=lambda h: getattr(h, "release_order", 1)):
                try:
                    await _maybe_await(handle.release())
                except Exception:
                    log.exception("release at shutdown failed")


def _tgid_of(tid: int) -> int:
    """The thread group of tid (tid itself when /proc no longer has it)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def _pack_ioctl(result: int) -> bytes:
    return _IOCTL_OK if result == 0 else P.IOCTL_OUT.pack(result, 0, 0, 0)


_IOCTL_OK = P.IOCTL_OUT.pack(0, 0, 0, 0)  # most answers
_IOCTL_REPLY = struct.Struct("<" + P.OUT_HEADER.format[1:] + P.IOCTL_OUT.format[1:])  # out header + ioctl out


def _pack_write(n: int) -> bytes:
    return P.WRITE_OUT.pack(n, 0)


async def _maybe_await(value: object) -> object:
    if inspect.isawaitable(value):
        return await value
    return value
