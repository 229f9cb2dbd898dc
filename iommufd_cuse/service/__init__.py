"""Running as a system service: `serve()` runs the daemon the way `iommufd-cuse
serve` does: READY=1 once the nodes answer an ioctl (readiness.py), STATUS= kept
up to date (status.py), WATCHDOG=1 every WATCHDOG_USEC/2 (notify.py), STOPPING=1
on SIGTERM/SIGINT, and the root-only control socket (control.py).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

import trio

from ..daemon import StartupError
from .control import ControlError, ControlListener, control, request, serve_control
from .notify import Notifier, _watchdog, watchdog_usec
from .readiness import probe_node, wait_ready
from .status import add_user_names, collect_status, format_status, summary, version

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)

__all__ = [
    "ControlError",
    "ControlListener",
    "Notifier",
    "ServiceError",
    "StartupError",
    "add_user_names",
    "collect_status",
    "control",
    "format_status",
    "probe_node",
    "request",
    "serve",
    "serve_control",
    "summary",
    "version",
    "wait_ready",
    "watchdog_usec",
]


STATUS_INTERVAL = 1.0  # how often STATUS= is recomputed (sent when it changes)


class ServiceError(RuntimeError):
    """The service cannot go on; the message is one line for the operator."""


async def _status_loop(daemon: Daemon, notifier: Notifier, last: str | None = None) -> None:
    while True:
        line = summary(daemon)
        if line != last:
            notifier.notify(f"STATUS={line}")
            last = line
        await trio.sleep(STATUS_INTERVAL)


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
