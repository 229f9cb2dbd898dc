"""Running as a system service: readiness and watchdog notification to systemd,
status reports, and the root-only control socket.

- `Notifier`: sd_notify(3) written out (an AF_UNIX datagram to $NOTIFY_SOCKET,
  '@' for the abstract namespace); no libsystemd.
- `serve()`: runs the daemon the way `iommufd-cuse serve` does: READY=1 once the
  nodes answer an ioctl (asked by a child process: a blocking call on our own
  FUSE node from the trio thread would deadlock the daemon, and from another
  thread of ours would make it unkillable, see probe_node), STATUS= kept up to
  date, WATCHDOG=1 every WATCHDOG_USEC/2, STOPPING=1 on SIGTERM/SIGINT.
- `collect_status()` / `format_status()`: what `iommufd-cuse status` shows.
- The control socket: one line of JSON in, one line of JSON out, one request
  per connection, root only (file mode 0600 and SO_PEERCRED). Commands are
  registered by name::

      from iommufd_cuse.service import ControlError, control

      def set_driver(daemon, request: dict) -> object:   # may be async
          ...                                             # raise ControlError("why")
          return {"bdf": ..., "driver": ...}              # anything JSON-able

      control.register("set-driver", set_driver)

  Request `{"cmd": "set-driver", ...}`; reply `{"ok": true, "result": ...}` or
  `{"ok": false, "error": "one line"}`. Clients use `request(path, {...})`.
"""

from __future__ import annotations

import errno
import importlib.metadata
import inspect
import json
import logging
import os
import pwd
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import trio

from . import uapi
from .daemon import StartupError
from .iommufd.io_pagetable import IOMMU_READ, IOMMU_WRITE
from .iommufd.object import ObjType
from .iommufd.pages import FilePages, UserPages
from .system import PAGE_SIZE

if TYPE_CHECKING:
    from .daemon import Daemon
    from .iommufd.object import Context

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0  # seconds for the nodes to answer the readiness ioctl
STATUS_INTERVAL = 1.0  # how often STATUS= is recomputed (sent when it changes)
REQUEST_TIMEOUT = 10.0  # for a control client to send its request line
MAX_REQUEST = 1 << 16
MIB = 1 << 20


def version() -> str:
    try:
        return importlib.metadata.version("iommufd_cuse")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


class ServiceError(RuntimeError):
    """The service cannot go on; the message is one line for the operator."""


# -- sd_notify ---------------------------------------------------------------------
class Notifier:
    """sd_notify(3): newline-separated assignments in one datagram to $NOTIFY_SOCKET."""

    def __init__(self, address: str | None) -> None:
        self.address: str | None = None
        self._sock: socket.socket | None = None
        self._failing = False
        if not address:
            return
        if address.startswith("@"):
            addr = "\0" + address[1:]  # the abstract namespace
        elif address.startswith("/"):
            addr = address
        else:
            log.warning("NOTIFY_SOCKET=%s: only AF_UNIX paths and @names are supported; not notifying", address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.address = addr

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        """From $NOTIFY_SOCKET, which is then unset (nothing we start should notify)."""
        env = os.environ if env is None else env
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send e.g. notify("READY=1", "STATUS=serving"); False if not delivered."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as e:
            if not self._failing:  # once per outage, not once per watchdog ping
                log.warning("sd_notify to %s failed: %s", self.address.replace("\0", "@"), e.strerror or e)
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_usec(env: MutableMapping[str, str] | None = None) -> int | None:
    """sd_watchdog_enabled(3): WATCHDOG_USEC if it is meant for this process.
    The variables are then unset."""
    env = os.environ if env is None else env
    usec = env.pop("WATCHDOG_USEC", None)
    pid = env.pop("WATCHDOG_PID", None)
    if not usec:
        return None
    try:
        value = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec, pid)
        return None
    return value if value > 0 else None


async def _watchdog(notifier: Notifier, usec: int) -> None:
    # The pings come from the trio loop that serves the FUSE requests: if a
    # handler ever blocks it, the pings stop and systemd restarts the daemon.
    interval = usec / 2 / 1e6
    log.info("watchdog: pinging every %.3g s", interval)
    while True:
        notifier.notify("WATCHDOG=1")
        await trio.sleep(interval)


# -- status ------------------------------------------------------------------------
def _prot(prot: int) -> str:
    return ("r" if prot & IOMMU_READ else "-") + ("w" if prot & IOMMU_WRITE else "-")


def _backing(pages: object) -> dict[str, Any]:
    if isinstance(pages, UserPages):
        # Shared file mappings are mapped by the daemon, private memory is reached
        # in place in the process (see iommufd/pages.py).
        return {"kind": "user", "pid": pages.source_tgid, "uptr": pages.uptr + pages.start_byte}
    if isinstance(pages, FilePages):
        return {"kind": "file", "offset": pages.start + pages.start_byte}
    return {"kind": type(pages).__name__}


def _area(area: Any) -> dict[str, Any]:
    return {
        "iova": area.start,
        "length": area.length,
        "last": area.last,
        "prot": _prot(area.prot),
        "backing": _backing(area.pages),
        "pages": area.num_pages,
        # Loaded into the attached domains means every page of the area is pinned.
        "pinned_pages": area.num_pages if area.filled else 0,
        "accesses": area.num_accesses,
    }


def _object(obj: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"id": obj.id, "type": obj.type.value, "users": obj.users}
    if obj.type is ObjType.IOAS:
        iopt = obj.iopt
        d["areas"] = [_area(a) for a in iopt.areas]
        d["domains"] = len(iopt.domains)
        d["iova_alignment"] = iopt.iova_alignment
        d["pinned_pages"] = sum(a["pinned_pages"] for a in d["areas"])
    ioas = getattr(obj, "ioas", None)
    if ioas is not None and hasattr(ioas, "id"):
        d["ioas"] = ioas.id
    device = getattr(obj, "device", None)
    if device is not None:
        d["device"] = getattr(device, "bdf", repr(device))
    if callable(getattr(obj, "status", None)):
        d.update(_call_status(obj))
    return d


def _context(ctx: Context, index: int, now: float) -> dict[str, Any]:
    objects = [_object(o) for o in sorted(ctx.live_objects(), key=lambda o: o.id)]
    kinds: dict[str, int] = {}
    for o in objects:
        kinds[o["type"]] = kinds.get(o["type"], 0) + 1
    pages = {}
    for obj in ctx.live_objects():
        if obj.type is ObjType.IOAS:
            for a in obj.iopt.areas:
                pages[id(a.pages)] = a.pages
    return {
        "index": index,
        "pid": ctx.opener_pid,
        "tid": ctx.opener_tid,
        "uid": ctx.opener_uid,
        "comm": ctx.opener_comm,
        "cmdline": ctx.opener_cmdline,
        "age_s": round(now - ctx.opened_at, 1),
        "accounting": ctx.account_mode.name.lower(),
        "objects_by_kind": kinds,
        "objects": objects,
        "pinned_pages": sum(getattr(p, "npinned", 0) for p in pages.values()),
    }


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def add_user_names(st: dict[str, Any]) -> dict[str, Any]:
    """Fill in "user" next to each "uid". Name service lookups may block (LDAP,
    sssd): the daemon runs this in a worker thread, after the snapshot."""
    for item in [*st["contexts"], *st["accounting"]["user"]]:
        item["user"] = _user_name(item["uid"])
    return st


def _call_status(thing: Any) -> dict[str, Any]:
    try:
        d = thing.status()
        return dict(d) if isinstance(d, Mapping) else {"status": d}
    except Exception as e:  # a status report never takes the daemon down
        log.exception("status() of %r failed", thing)
        return {"error": f"status failed: {e}"}


def _members(system: Any, name: str) -> list[Any]:
    """system.devices / system.groups, as a list or a dict, or absent."""
    things = getattr(system, name, None) or []
    return list(things.values()) if isinstance(things, Mapping) else list(things)


def _owner_name(owner: Any, contexts: dict[int, dict[str, Any]]) -> str:
    if owner is None:
        return "kernel"
    c = contexts.get(id(owner))
    if c is not None:
        return f"context {c['index']} (pid {c['pid']} {c['comm']})"
    return str(owner)


def _domain_name(group: Any, domains: dict[int, str]) -> str | None:
    dom = getattr(group, "domain", None)
    if dom is None:
        return None
    if dom is getattr(group, "default_domain", None):
        return "default"
    if dom is getattr(group, "blocking_domain", None):
        return "blocking"
    return domains.get(id(dom))


def _member(thing: Any, contexts: dict[int, dict[str, Any]], domains: dict[int, str]) -> dict[str, Any]:
    d = _call_status(thing) if callable(getattr(thing, "status", None)) else {"name": repr(thing)}
    # Who owns the DMA and what translates it: a group's, or for a device its group's.
    group = thing if hasattr(thing, "owner") else getattr(thing, "group", None)
    if group is not None and hasattr(group, "owner"):
        d["owner"] = _owner_name(group.owner, contexts)
        name = _domain_name(group, domains)
        if name is not None:
            d["domain"] = name
    return d


def collect_status(daemon: Daemon) -> dict[str, Any]:
    """A snapshot of the daemon, built without awaiting (so it is consistent) and
    without touching client memory, FUSE or the name service (so it cannot block
    the daemon); add_user_names() completes it."""
    system = daemon.system
    now = time.time()
    ctxs = sorted(system.contexts, key=lambda c: (c.opened_at, c.opener_pid))
    contexts = [_context(c, i + 1, now) for i, c in enumerate(ctxs)]
    by_id = {id(c): d for c, d in zip(ctxs, contexts, strict=True)}
    # Domains that iommufd objects (HWPTs) wrap, to name what a group is attached to.
    domains = {
        id(o.domain): f"hwpt {o.id} of context {d['index']}"
        for c, d in zip(ctxs, contexts, strict=True)
        for o in c.live_objects()
        if getattr(o, "domain", None) is not None
    }
    pinned = system.pinned_pages()
    acct = system.accounting
    return {
        "daemon": {
            "version": version(),
            "pid": os.getpid(),
            "uptime_s": round(now - daemon.server.start_time, 1),
            "mountpoint": daemon.mountpoint,
            "nodes": [daemon.link_path(n.path()) for n in daemon.tree.files()],
        },
        "pinned_pages": pinned,
        "pinned_mib": round(pinned * PAGE_SIZE / MIB, 3),
        "accounting": {
            "user": [{"uid": u, "pages": n} for u, n in sorted(acct.user.items())],
            "mm": [{"pid": p, "pages": n} for p, n in sorted(acct.mm.items())],
        },
        "contexts": contexts,
        "devices": [_member(d, by_id, domains) for d in _members(system, "devices")],
        "groups": [_member(g, by_id, domains) for g in _members(system, "groups")],
    }


def summary(daemon: Daemon) -> str:
    """The one line for systemd's STATUS=."""
    system = daemon.system
    n = len(system.contexts)
    d = len(_members(system, "devices"))
    mib = system.pinned_pages() * PAGE_SIZE / MIB
    return f"{n} context{'s' * (n != 1)}, {d} device{'s' * (d != 1)}, {mib:.1f} MiB pinned"


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v) or "-"
    return str(v)


def _fmt_fields(d: Mapping[str, Any], skip: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{k} {_fmt_value(v)}" for k, v in d.items() if k not in skip)


def _fmt_backing(b: Mapping[str, Any]) -> str:
    if b.get("kind") == "user":
        return f"user memory of pid {b.get('pid')} at {b.get('uptr', 0):#x}"
    if b.get("kind") == "file":
        return f"file at offset {b.get('offset', 0):#x}"
    return str(b.get("kind"))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def format_status(st: Mapping[str, Any]) -> str:
    """The readable table of `iommufd-cuse status`."""
    out: list[str] = []
    d = st["daemon"]
    out.append(f"iommufd-cuse {d['version']}: pid {d['pid']}, up {_duration(d['uptime_s'])}")
    out.append(f"nodes: {', '.join(d['nodes'])} (mounted at {d['mountpoint']})")
    out.append(f"pinned: {st['pinned_pages']} pages ({st['pinned_mib']:.1f} MiB)")
    acct = st["accounting"]
    users = ", ".join(f"{a.get('user', a['uid'])} {a['pages']} pages" for a in acct["user"]) or "none"
    procs = ", ".join(f"pid {a['pid']} {a['pages']} pages" for a in acct["mm"]) or "none"
    out.append(f"accounted: per user: {users}; per process: {procs}")

    out.append("")
    if not st["contexts"]:
        out.append("contexts: none")
    for c in st["contexts"]:
        out.append(
            f"context {c['index']}: pid {c['pid']} ({c['comm']}), tid {c['tid']}, user {c.get('user', c['uid'])}, "
            f"open {_duration(c['age_s'])}, accounting {c['accounting']}, {c['pinned_pages']} pages pinned"
        )
        out.append(f"  command: {' '.join(c['cmdline']) or '?'}")
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(c["objects_by_kind"].items())) or "none"
        out.append(f"  objects: {kinds}")
        for o in c["objects"]:
            if o["type"] == "ioas":
                out.append(
                    f"  ioas {o['id']}: {_plural(len(o['areas']), 'area')}, "
                    f"{_plural(o['domains'], 'domain')}, {o['pinned_pages']} pages pinned, "
                    f"users {o['users']}"
                )
                if o["areas"]:
                    out.append(f"    {'IOVA':<18}  {'LENGTH':>12}  PROT  {'PAGES':>7}  {'PINNED':>7}  BACKING")
                for a in o["areas"]:
                    out.append(
                        f"    {a['iova']:#018x}  {a['length']:#12x}  {a['prot']:<4}  {a['pages']:>7}  "
                        f"{a['pinned_pages']:>7}  {_fmt_backing(a['backing'])}"
                    )
            else:
                out.append(f"  {o['type']} {o['id']}: {_fmt_fields(o, ('id', 'type'))}")

    out.append("")
    for name, key in (("devices", "devices"), ("groups", "groups")):
        items = st.get(key) or []
        if not items:
            out.append(f"{name}: none")
            continue
        out.append(f"{name}:")
        for it in items:
            out.append(f"  {_fmt_fields(it)}")
    return "\n".join(out)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


async def _status_loop(daemon: Daemon, notifier: Notifier, last: str | None = None) -> None:
    while True:
        line = summary(daemon)
        if line != last:
            notifier.notify(f"STATUS={line}")
            last = line
        await trio.sleep(STATUS_INTERVAL)


# -- the control socket -------------------------------------------------------------
class ControlError(Exception):
    """A command's refusal: its message goes back to the client as the error."""


Handler = Callable[["Daemon", dict], Any]


class ControlCommands:
    """The registry of control-socket commands: name -> handler(daemon, request)."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler, *, replace: bool = False) -> None:
        if name in self._handlers and not replace:
            raise ValueError(f"control command {name!r} is already registered")
        self._handlers[name] = handler

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    async def dispatch(self, daemon: Daemon, request: Any) -> dict[str, Any]:
        """The reply to one request (never raises but for cancellation)."""
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
        name = request["cmd"]
        handler = self._handlers.get(name)
        if handler is None:
            return {"ok": False, "error": f"unknown command {name!r} (known: {', '.join(self.names())})"}
        try:
            result = handler(daemon, request)
            if inspect.isawaitable(result):
                result = await result
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:
            log.exception("control command %s failed", name)
            return {"ok": False, "error": f"{name} failed: {type(e).__name__}: {e}"}
        return {"ok": True, "result": result}


async def _status_command(daemon: Daemon, request: dict) -> dict[str, Any]:
    return await trio.to_thread.run_sync(add_user_names, collect_status(daemon))


def _set_driver_command(daemon: Daemon, request: dict) -> dict[str, Any]:
    """Bind a device to another driver, with the kernel's group-ownership rules:
    a DMA-capable driver on a member of a user-owned group is refused (EBUSY)."""
    bdf, driver = request.get("bdf"), request.get("driver")
    if not isinstance(bdf, str) or not isinstance(driver, str) or not driver:
        raise ControlError('set-driver needs "bdf" and "driver" strings')
    dev = next((d for d in daemon.system.devices if d.bdf == bdf), None)
    if dev is None:
        raise ControlError(f"no device {bdf}")
    try:
        dev.bind_driver(driver)
    except OSError as e:
        raise ControlError(f"{bdf}: {driver}: {os.strerror(e.errno)}") from None
    return {"bdf": bdf, "driver": dev.driver, "group": dev.group.id}


control = ControlCommands()
control.register("status", _status_command)
control.register("set-driver", _set_driver_command)
control.register("commands", lambda daemon, request: control.names())


class ControlListener:
    """The listening socket: created 0600 root:root, removed at close if still ours."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None

    def bind(self) -> None:
        path = self.path
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        self._remove_stale()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # The socket inode's mode is what bind() gives the file (less the
            # umask): 0600 from the start, no window in which others connect.
            os.fchmod(s.fileno(), 0o600)
            s.bind(path)
            os.chmod(path, 0o600)
            st = os.lstat(path)
            if st.st_uid != 0 or st.st_gid != 0:
                os.chown(path, 0, 0)
            s.listen(16)
        except OSError as e:
            s.close()
            raise StartupError(f"control socket {path}: {e.strerror or e}") from None
        self._sock = s
        self._ino = (st.st_dev, st.st_ino)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"control socket {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1)
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.warning("removing the stale control socket %s", self.path)
            os.unlink(self.path)
            return
        except OSError as e:
            raise StartupError(f"control socket {self.path}: {e.strerror or e}") from None
        finally:
            probe.close()
        raise StartupError(f"control socket {self.path} is in use (another daemon?)")

    def trio_socket(self) -> trio.socket.SocketType:
        assert self._sock is not None
        return trio.socket.from_stdlib_socket(self._sock)

    def close(self) -> None:
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)
        except OSError:
            pass


def _peer_uid(sock: trio.socket.SocketType) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


async def serve_control(daemon: Daemon, listener: ControlListener) -> None:
    sock = listener.trio_socket()
    log.info("control socket %s", listener.path)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await sock.accept()
            nursery.start_soon(_control_connection, daemon, conn)


async def _control_connection(daemon: Daemon, conn: trio.socket.SocketType) -> None:
    stream = trio.SocketStream(conn)
    async with stream:
        try:
            pid, uid = _peer_uid(conn)
            line = await _read_request(stream)
            if uid != 0:
                # (its request was read, unparsed, so that it gets this answer)
                log.warning("control socket: refused a connection from pid %d (uid %d): root only", pid, uid)
                reply: dict[str, Any] | None = {
                    "ok": False,
                    "error": "permission denied: the control socket is for root only",
                }
            else:
                reply = await _answer(daemon, line)
            if reply is None:
                return
            await stream.send_all((json.dumps(reply, default=str) + "\n").encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("control connection: %s", e)


async def _read_request(stream: trio.SocketStream) -> bytes:
    """The first line (without the newline), or what came before EOF or the timeout."""
    buf = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\n" not in buf and len(buf) <= MAX_REQUEST:
            chunk = await stream.receive_some(MAX_REQUEST)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n", 1)[0]


async def _answer(daemon: Daemon, line: bytes) -> dict[str, Any] | None:
    if len(line) > MAX_REQUEST:
        return {"ok": False, "error": "request too long"}
    if not line.strip():
        return None  # nothing asked (a probe, or a timeout)
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        return {"ok": False, "error": f"bad request: {e}"}
    return await control.dispatch(daemon, request)


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> Any:
    """Ask the daemon at path; the command's result, or ControlError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise ControlError(f"{path}: no such socket (is the daemon running? see --control-socket)") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (the control socket is for root only)") from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: connection refused (the daemon is not running)") from None
        try:
            s.sendall((json.dumps(req) + "\n").encode())
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before reading all of it: the answer is queued
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ControlError(f"{path}: no answer in {timeout:g} s") from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    finally:
        s.close()
    if not data:
        raise ControlError(f"{path}: the daemon closed the connection without an answer")
    try:
        reply = json.loads(data)
    except ValueError as e:
        raise ControlError(f"{path}: bad answer: {e}") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error") or "failed")
    return reply.get("result")


# -- readiness ------------------------------------------------------------------------
# The iommufd nodes and what IOMMU_OPTION(RLIMIT_MODE, GET) answers on each.
_PROBES = {"iommu": 0, "vfio/vfio": 1}

# The probe runs in a child process, not in a thread of the daemon: a thread
# with a request pending on the daemon's own mount cannot die (the kernel waits
# for an answer only the daemon could give, and keeps /dev/fuse open until every
# thread has exited), so a daemon SIGKILLed during start-up would hang in D
# state for good. A child just gets ENOTCONN when the daemon dies.
_PROBE_CHILD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
buf = bytearray.fromhex(sys.argv[3])
rc = fcntl.ioctl(fd, int(sys.argv[2]), buf, True)
os.close(fd)
print(rc, buf.hex())
"""


async def probe_node(path: str, expect: int | None = None) -> None:
    """Open path and ask IOMMU_OPTION(RLIMIT_MODE, GET) from a child process: it
    must return 0 (and val64 = expect). OSError if not; TooSlowError past READY_TIMEOUT."""
    st = uapi.iommu_option
    arg = st.pack(st.new(size=st.SIZE, option_id=uapi.IOMMU_OPTION_RLIMIT_MODE, op=uapi.IOMMU_OPTION_OP_GET))
    argv = [sys.executable, "-I", "-S", "-c", _PROBE_CHILD, path, str(uapi.IOMMU_OPTION), arg.hex()]
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        with trio.fail_after(READY_TIMEOUT):
            out = await _read_all(proc.stdout)
            err = await _read_all(proc.stderr)
            await proc.wait()
    finally:
        if proc.returncode is None:
            # Not waited for: if it is stuck on our node, it goes with the mount.
            proc.kill()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                await stream.aclose()
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise OSError(errno.EIO, lines[-1] if lines else f"the probe exited {proc.returncode}")
    rc, data = out.decode().split()
    if int(rc) != 0:
        raise OSError(errno.EIO, f"IOMMU_OPTION returned {rc}")
    got = st.unpack(bytes.fromhex(data)).val64
    if expect is not None and got != expect:
        raise OSError(errno.EIO, f"IOMMU_OPTION answered {got}, expected {expect}")


async def _read_all(stream: trio.abc.ReceiveStream | None) -> bytes:
    data = b""
    if stream is not None:
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def wait_ready(daemon: Daemon) -> None:
    """Return once every iommufd node answers an ioctl through its link."""
    files = {n.path() for n in daemon.tree.files()}
    for node, expect in _PROBES.items():
        if node not in files:
            continue
        path = daemon.link_path(node)
        try:
            await probe_node(path, expect)
        except trio.TooSlowError:
            raise StartupError(f"{path} does not answer ioctls (no reply in {READY_TIMEOUT:g} s)") from None
        except OSError as e:
            raise StartupError(f"{path} does not answer ioctls: {e.strerror or e}") from None


# -- the service -----------------------------------------------------------------------
async def _stop_on_signals(
    scope: trio.CancelScope, notifier: Notifier, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:  # noqa: ANN001
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            notifier.notify("STOPPING=1", "STATUS=stopping")
            scope.cancel()
            return


async def _run_daemon(daemon: Daemon, notifier: Notifier, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
    await daemon.run(task_status=task_status)
    # run() only returns when the file system went away under it (not on cancel).
    notifier.notify("STOPPING=1", "STATUS=the file system was unmounted")
    raise ServiceError(f"the file system at {daemon.mountpoint} was unmounted under the daemon")


async def serve(daemon: Daemon, control_socket: str | None, env: MutableMapping[str, str] | None = None) -> None:
    """Run daemon as a service until SIGTERM/SIGINT (then return) or a failure (raise)."""
    env = os.environ if env is None else env
    notifier = Notifier.from_environ(env)
    wd = watchdog_usec(env)
    listener = ControlListener(control_socket) if control_socket else None
    notifier.notify("STATUS=starting")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_stop_on_signals, nursery.cancel_scope, notifier)
            if wd:
                nursery.start_soon(_watchdog, notifier, wd)
            await nursery.start(_run_daemon, daemon, notifier)
            if listener is not None:
                listener.bind()
                nursery.start_soon(serve_control, daemon, listener)
            await wait_ready(daemon)
            line = summary(daemon)
            log.info("ready: %s", line)
            notifier.notify("READY=1", f"STATUS={line}")
            nursery.start_soon(_status_loop, daemon, notifier, line)
    finally:
        if listener is not None:
            listener.close()
        notifier.close()
