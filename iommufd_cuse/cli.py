"""Command line: `iommufd-cuse serve [...]`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import trio

from . import config as config_mod
from .daemon import Daemon, StartupError

log = logging.getLogger("iommufd_cuse")


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps each line itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM") and not os.environ.get("INVOCATION_ID"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr)


async def _serve(daemon: Daemon) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(daemon.run)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        cfg = config_mod.load(args.config)
        daemon = Daemon(cfg, dev_dir=args.dev_dir, mountpoint=args.mountpoint)
        trio.run(_serve, daemon)
    except BaseException as e:
        why = _startup_error(e)
        if why is None:
            raise
        print(f"iommufd-cuse: error: {why}", file=sys.stderr)
        return 1
    return 0


def _startup_error(e: BaseException) -> BaseException | None:
    """The StartupError or ConfigError inside e (trio wraps errors of tasks in groups)."""
    if isinstance(e, (StartupError, config_mod.ConfigError)):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = _startup_error(sub)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iommufd-cuse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help=f"configuration file (default: the embedded one; see {config_mod.DEFAULT_CONFIG_PATH})")
    s.add_argument("--dev-dir", default="/dev", help="where the nodes appear (default /dev)")
    s.add_argument("--mountpoint", default=config_mod.DEFAULT_MOUNTPOINT, help="where the FUSE file system is mounted")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
