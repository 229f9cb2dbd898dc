"""Files a FUSE server hands back: through the companion library, or through the
seccomp user notification of `iommufd-cuse run` (SeccompCarrier; notified.py).

Some commands answer with a new file descriptor in the caller (IOMMU_TEST_OP_CREATE_ACCESS,
IOMMU_FAULT_QUEUE_ALLOC, IOMMU_VEVENTQ_ALLOC), which a FUSE server cannot create.
With the companion (tools/iommufd_selftest_preload.c, LD_PRELOAD) in the caller, the
command carries COMPANION_MAGIC; the daemon then answers with a token (never an fd
number) instead of the descriptor, and the companion opens the object's node in the
same mount and claims the token on that file (CLAIM), putting the new fd in the
answer. A token is claimed once, by the process that created the object, and a file
holds one object (else EINVAL). Every semantic stays in the daemon. Without the
companion (or run): EOPNOTSUPP. See docs/selftest.md, "Files handed back".

This module holds what the three have in common: the per-System registry of
unclaimed tokens, token issue, the claim ioctl (HandedFile) and the lookup of the
object behind a descriptor the daemon fetched from its caller.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, ClassVar, NoReturn

from .. import uapi
from ..errors import Errno
from ..transport.loopback import identify, identify_callers_fd, known_callers_fd, opener
from ..transport.mount import fd_inode, fd_on_our_mount
from ..transport.nodes import FileHandle

COMPANION_MAGIC = 0x49435553  # "ICUS"
TOKEN_BASE = 0x40000000  # tokens are never fd numbers
CLAIM = uapi._IO(uapi.IOMMUFD_TYPE, 0xE0)  # on an object's node, arg: the token
# On a vEVENT queue's file: what read(fd, buf, 0) answers. FUSE never sends a read of
# 0 bytes (it answers 0 itself), so the companion asks with this instead.
ZERO_READ = uapi._IO(uapi.IOMMUFD_TYPE, 0xE1)
# VFIO_GROUP_GET_DEVICE_FD as the companion sends it: the same name argument, the
# answer a token instead of a descriptor (the group's own number has no field to mark).
GROUP_GET_DEVICE_TOKEN = uapi._IO(uapi.VFIO_TYPE, 0xE3)


def refuse_without_companion(log: logging.Logger, command: str, what: str) -> NoReturn:
    """A command whose answer is a new file, called with no way to hand it back:
    EOPNOTSUPP, logged with the ways there are."""
    log.warning(
        "%s: %s is a new file descriptor in the caller, which a FUSE server cannot create; "
        "preload the companion library (LD_PRELOAD=$(iommufd-cuse companion) CMD) or run the "
        'client under `iommufd-cuse run` (docs/selftest.md, "Files handed back"): EOPNOTSUPP',
        command,
        what,
    )
    raise Errno(errno.EOPNOTSUPP)


class Carrier:
    """A way a new file reaches the caller. The companion's: the call answers a token,
    which the companion claims on the file's node (HandedFile). SeccompCarrier (the user
    notification of `iommufd-cuse run`) claims it itself and answers with what it installed.
    Every carrier goes through hand_back(), so the semantics stay in one place."""

    async def deliver(self, file_cls: type[HandedFile], system: Any, obj: Any, caller: Any, returns_fd: bool) -> int:
        return file_cls.issue(system, obj, caller.tgid)


COMPANION = Carrier()


class SeccompCarrier(Carrier):
    """A call notified to the daemon by the seccomp filter of `iommufd-cuse run`
    (transport/usernotif.py): the token is claimed, on the file's node, by a child of
    the daemon acting for the caller (a thread of the daemon must never wait on its own
    mount), and the claimed file is installed in the caller with SECCOMP_IOCTL_NOTIF_ADDFD:
    as the call's answer in the same step when the answer is the descriptor
    (returns_fd), else before the handler writes its number into the caller's struct."""

    def __init__(self) -> None:
        self.replied = False  # the call was answered by ADDFD_FLAG_SEND

    async def deliver(self, file_cls: type[HandedFile], system: Any, obj: Any, caller: Any, returns_fd: bool) -> int:
        pending = file_cls.pending(system)
        token = file_cls.issue(system, obj, caller.tgid)
        try:
            caller.check()  # nothing is made for a caller that is gone
            pending[token] = (obj, opener.child_pid())  # the daemon's child claims it, for the caller
            fd = await opener.open_ioctl(os.path.join(system.mountpoint, file_cls.node), CLAIM, token)
        finally:
            pending.pop(token, None)
        try:
            # ENOENT if the caller died since: the daemon's copy is then the last, and
            # closing it releases the file and what it holds.
            newfd = caller.listener.addfd(caller.notif_id, fd, send=returns_fd)
        finally:
            os.close(fd)
        self.replied = returns_fd
        return newfd


def carrier_of(caller: Any, marked: bool) -> Carrier | None:
    """How a call's new file reaches its caller: the companion when the call carries its
    mark, a notified call's own carrier, or none."""
    if marked:
        return COMPANION
    return getattr(caller, "carrier", None)


async def hand_back(
    file_cls: type[HandedFile],
    system: Any,
    obj: Any,
    caller: Any,
    carrier: Carrier | None,
    log: logging.Logger,
    command: str,
    what: str,
    returns_fd: bool = False,
) -> int:
    """The one path by which a call answers with a new file: obj's file of kind
    file_cls through carrier (None: the call came by no carrier: EOPNOTSUPP, logged).
    Returns what the call answers (the companion's token, or the installed descriptor);
    returns_fd: that is the call's return value, not a field of its struct."""
    if carrier is None:
        refuse_without_companion(log, command, what)
    return await carrier.deliver(file_cls, system, obj, caller, returns_fd)


class Pending(dict):
    """token -> (object, tgid of its creator): objects whose file is not claimed yet."""

    def pop_obj(self, obj: Any) -> None:
        for token, (o, _tgid) in list(self.items()):
            if o is obj:
                del self[token]


class HandedFile(FileHandle):
    """An open of an object's node: the file of one object once claimed. Subclasses
    name their kind, the key of their registry, token sequence and (for lookup) node
    inode in System.pending_files, System.file_seqs and System.node_inos."""

    kind: ClassVar[str]
    node: ClassVar[str]  # its node's path in the mount

    def __init__(self, system: Any) -> None:
        self.system = system
        self.obj: Any = None

    # -- the registry (per System) ----------------------------------------------------
    @classmethod
    def pending(cls, system: Any) -> Pending:
        pending = system.pending_files.get(cls.kind)
        if pending is None:
            pending = system.pending_files[cls.kind] = Pending()
        return pending

    @classmethod
    def issue(cls, system: Any, obj: Any, tgid: int) -> int:
        """A new token for obj, claimable by the process tgid."""
        seq = system.file_seqs.get(cls.kind, 0) + 1
        system.file_seqs[cls.kind] = seq
        token = TOKEN_BASE + seq % TOKEN_BASE
        cls.pending(system)[token] = (obj, tgid)
        return token

    @classmethod
    def forget(cls, system: Any, obj: Any) -> None:
        """obj's tokens go unclaimed (its context closes, or it ends)."""
        cls.pending(system).pop_obj(obj)

    # -- the claim ----------------------------------------------------------------------
    def ioctl(self, req: Any, cmd: int, arg: int) -> int:
        if cmd == CLAIM:
            pending = self.pending(self.system)
            entry = pending.get(arg)
            if entry is None or entry[1] != req.caller.tgid or self.obj is not None:
                raise Errno(errno.EINVAL)
            del pending[arg]
            self.claimed(entry[0])
            return 0
        raise Errno(errno.ENOTTY)

    def claimed(self, obj: Any) -> None:
        """The file now holds obj, and obj's context (iommufd_ctx_get)."""
        self.obj, obj.file = obj, self
        self.ctx = obj.ctx
        self.ctx.hold_file()

    def release(self) -> None:
        ctx, self.ctx = getattr(self, "ctx", None), None
        self.on_release()
        if ctx is not None:
            ctx.drop_file()

    def on_release(self) -> None:
        """What closing the file does to its object (subclasses)."""

    # -- the object behind a caller's descriptor -----------------------------------------
    @classmethod
    def lookup_known(cls, caller: Any, fd: int) -> Any:
        """The object whose file the caller has as fd, if that file is known already
        (see loopback.known_callers_fd): at once, with no task; None if not known."""
        fh = known_callers_fd(caller, fd)
        if fh is None:
            return None
        if not isinstance(fh, cls) or fh.obj is None:
            raise Errno(errno.EBADFD)
        return fh.obj

    @classmethod
    async def lookup(cls, system: Any, caller: Any, fd: int) -> Any:
        """The object whose file the caller has as fd; EBADFD for no fd, a file that
        is not of this node, or one that holds no object."""
        ino = system.node_inos.get(cls.kind)
        try:
            fh = await identify_callers_fd(
                caller, fd, lambda dup: ino is not None and fd_on_our_mount(dup) and fd_inode(dup) == ino
            )
        except Errno:
            raise Errno(errno.EBADFD) from None
        if not isinstance(fh, cls) or fh.obj is None:
            raise Errno(errno.EBADFD)
        return fh.obj

    @classmethod
    async def of_dup(cls, system: Any, dup: int) -> Any:
        """The object of the file dup (the daemon's own descriptor) if it is a claimed
        file of this node, else None."""
        ino = system.node_inos.get(cls.kind)
        if ino is None or not fd_on_our_mount(dup) or fd_inode(dup) != ino:
            return None
        fh = await identify(dup)
        return fh.obj if isinstance(fh, cls) else None
