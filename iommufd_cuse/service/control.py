"""The root-only control socket: one line of JSON in, one line of JSON out, one
request per connection, root only (file mode 0600 and SO_PEERCRED). Commands are
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

import inspect
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..daemon import StartupError
from .status import add_user_names, collect_status

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)


REQUEST_TIMEOUT = 10.0  # for a control client to send its request line

MAX_REQUEST = 1 << 16


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
