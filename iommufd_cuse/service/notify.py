"""sd_notify(3) written out (an AF_UNIX datagram to $NOTIFY_SOCKET, '@' for the
abstract namespace; no libsystemd) and the watchdog (sd_watchdog_enabled(3)).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

import trio

log = logging.getLogger(__name__)


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
