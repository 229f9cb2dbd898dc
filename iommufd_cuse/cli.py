"""Command line: `iommufd-cuse serve | status | install | uninstall`."""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys

import trio

from . import config as config_mod
from . import install, service
from . import run as run_mod
from .daemon import Daemon, StartupError

log = logging.getLogger("iommufd_cuse")

# syslog priorities, which journald reads from a "<N>" prefix of each line.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected ($JOURNAL_STREAM is
    "device:inode" of it; children that inherit the variable have another stderr)."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _Formatter(logging.Formatter):
    """One line per event under systemd (a traceback's lines joined with " | "),
    with the level as a "<N>" priority prefix when stderr is the journal."""

    def __init__(self, fmt: str, one_line: bool, journal: bool) -> None:
        super().__init__(fmt)
        self.one_line = one_line
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        s = super().format(record)
        if self.one_line:
            s = s.replace("\n", " | ")
        if self.journal:
            s = f"<{_PRIORITY.get(record.levelno, 6)}>{s}"
        return s


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps each line itself, and reads the level
    # from the prefix; a line is an entry, so a traceback is kept on one line.
    journal = stderr_is_journal()
    systemd = journal or bool(os.environ.get("INVOCATION_ID"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not systemd:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt, one_line=systemd, journal=journal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def _error(message: object) -> None:
    """The one line an operator sees when a command fails."""
    prefix = "<3>" if stderr_is_journal() else ""
    print(f"{prefix}iommufd-cuse: error: {message}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    control_socket = args.control_socket
    if control_socket is None:  # beside the mountpoint: /run/iommufd-cuse/control.sock
        control_socket = os.path.join(os.path.dirname(os.path.abspath(args.mountpoint)), "control.sock")
    try:
        path = config_mod.serve_config_path(args.config)
        log.debug("configuration: %s", path or "the embedded default")
        cfg = config_mod.load(path)
        daemon = Daemon(
            cfg, dev_dir=args.dev_dir, mountpoint=args.mountpoint, selftest=args.selftest, backend=args.backend
        )
        trio.run(service.serve, daemon, control_socket or None)
    except BaseException as e:
        why = _startup_error(e)
        if why is not None:
            _error(why)
            return 1
        if isinstance(e, Exception):
            log.critical("the daemon failed", exc_info=e)
            return 1
        raise
    return 0


def _startup_error(e: BaseException) -> BaseException | None:
    """The StartupError, ConfigError or ServiceError inside e (trio wraps errors
    of tasks in groups)."""
    if isinstance(e, (StartupError, config_mod.ConfigError, service.ServiceError)):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = _startup_error(sub)
            if found is not None:
                return found
    return None


def cmd_status(args: argparse.Namespace) -> int:
    try:
        st = service.request(args.control_socket, {"cmd": "status"})
    except service.ControlError as e:
        _error(e)
        return 1
    print(json.dumps(st, indent=2) if args.json else service.format_status(st))
    return 0


def cmd_set_driver(args: argparse.Namespace) -> int:
    try:
        r = service.request(args.control_socket, {"cmd": "set-driver", "bdf": args.bdf, "driver": args.driver})
    except service.ControlError as e:
        _error(e)
        return 1
    print(f"{r['bdf']}: driver {r['driver']} (group {r['group']})")
    return 0


def companion_path() -> str:
    """The LD_PRELOAD companion of the test mode, built with the package."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "libiommufd_selftest_preload*.so")))
    if not found:
        raise FileNotFoundError("the companion library was not built with this package")
    return found[0]


def cmd_companion(args: argparse.Namespace) -> int:
    try:
        print(companion_path())
    except FileNotFoundError as e:
        _error(e)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        _error("run: no command")
        return 2
    companion = None
    if not args.no_companion:
        try:
            companion = companion_path()
        except FileNotFoundError as e:
            _error(e)
            return 1
    try:
        run_mod.run(args.mountpoint, argv, companion, seccomp=not args.no_seccomp)
    except run_mod.RunError as e:
        _error(f"run: {e}")
        return 1
    return 1  # not reached: run() execs the command


def cmd_install(args: argparse.Namespace) -> int:
    try:
        done = install.install(args.root)
    except OSError as e:
        _error(f"{e.filename or ''}: {e.strerror or e}")
        return 1
    print("\n".join(done))
    where = "" if os.path.abspath(args.root) == "/" else f" (on the system rooted at {args.root})"
    print(f"next{where}: systemctl daemon-reload && systemctl enable --now {install.UNIT_NAME}")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    links = install.enabled_links(args.root)
    if links and not args.force:
        _error(
            f"{install.UNIT_NAME} is still enabled ({', '.join(map(str, links))}): "
            f"run `systemctl disable --now {install.UNIT_NAME}` first (or use --force)"
        )
        return 1
    try:
        done = install.uninstall(args.root)
    except OSError as e:
        _error(f"{e.filename or ''}: {e.strerror or e}")
        return 1
    print("\n".join(done))
    print("next: systemctl daemon-reload")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iommufd-cuse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument(
        "--config",
        help=f"configuration file (default: {config_mod.DEFAULT_CONFIG_PATH} if it exists, else the embedded one)",
    )
    s.add_argument("--dev-dir", default="/dev", help="where the nodes appear (default /dev)")
    s.add_argument("--mountpoint", default=config_mod.DEFAULT_MOUNTPOINT, help="where the FUSE file system is mounted")
    s.add_argument(
        "--control-socket",
        help=f"the root-only control socket (default: control.sock beside the mountpoint, "
        f"{config_mod.DEFAULT_CONTROL_SOCKET}; '' for none)",
    )
    s.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cuse", "fuse"],
        help="character devices by CUSE, or files of a FUSE mount linked from the dev dir; "
        "auto (the default): CUSE when /dev/cuse can be opened",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument(
        "--selftest",
        action="store_true",
        help="test mode: serve IOMMU_TEST_CMD and the mock IOMMU (CONFIG_IOMMUFD_TEST); never in production",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="show what the running daemon serves (root only)")
    s.add_argument("--control-socket", default=config_mod.DEFAULT_CONTROL_SOCKET, help="the daemon's control socket")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser(
        "set-driver",
        help="bind an emulated device to another driver: vfio-pci, none, pci-stub, or a DMA driver's name (root only)",
    )
    s.add_argument("bdf", help="the device, e.g. 0000:00:06.1")
    s.add_argument("driver")
    s.add_argument("--control-socket", default=config_mod.DEFAULT_CONTROL_SOCKET, help="the daemon's control socket")
    s.set_defaults(func=cmd_set_driver)

    s = sub.add_parser(
        "companion",
        help="print the path of the LD_PRELOAD library that lets unmodified selftest clients "
        "receive access fds (see docs/selftest.md)",
    )
    s.set_defaults(func=cmd_companion)

    s = sub.add_parser(
        "run",
        help="run CMD in a private mount namespace where /dev/iommu, /dev/vfio/... and the sysfs paths of the "
        "emulated devices are the daemon's, with the companion preloaded and files handed back to every binary by "
        "seccomp user notification (root only; CMD runs with no_new_privs: a set-uid CMD gets no privilege)",
    )
    s.add_argument("--mountpoint", default=config_mod.DEFAULT_MOUNTPOINT, help="the daemon's mountpoint")
    s.add_argument("--no-companion", action="store_true", help="do not preload the companion library")
    s.add_argument(
        "--no-seccomp",
        action="store_true",
        help="no seccomp filter: files the daemon hands back then reach only binaries the companion is preloaded in",
    )
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="[--] CMD ARGS")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("install", help="install the systemd unit and the default configuration")
    s.add_argument("--root", default="/", help="install under this directory (default /)")
    s.set_defaults(func=cmd_install)

    s = sub.add_parser("uninstall", help="remove what install wrote (a changed configuration stays)")
    s.add_argument("--root", default="/", help="the directory install used (default /)")
    s.add_argument("--force", action="store_true", help="even if the unit is still enabled")
    s.set_defaults(func=cmd_uninstall)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
