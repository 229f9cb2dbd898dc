"""pytest plugin: the daemon in a user's own test suite (docs/pytest.md).

Registered as the `pytest11` entry point ``iommufd_cuse``; it does nothing until a test
asks for one of its fixtures:

``iommufd_daemon`` (session)
    ``iommufd-cuse serve`` as a subprocess on private paths (nodes under a scratch
    ``--dev-dir``, its own mountpoint and control socket; one daemon per pytest-xdist
    worker), started once it has answered an ioctl (systemd's READY=1, on a notify
    socket of ours), stopped with SIGTERM at the end of the session.
``iommufd``
    A fresh :class:`~iommufd_cuse.client.Iommufd` context on that daemon, per test.
``vfio_device``
    ``vfio_device(bdf)`` opens that device's VFIO cdev (a
    :class:`~iommufd_cuse.client.VfioDevice`), closed after the test.

After a test that used ``iommufd`` or ``vfio_device`` the plugin closes what they
opened and checks the daemon's state against the one before the test: an object left
in a context, a context left open, pinned pages or a group still owned by userspace
make the test error at teardown, with the daemon's status in the message. The daemon's
log lines of a failing test are attached to its report.

Needs what the daemon needs: root and /dev/fuse.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import service
from .client import Iommufd, VfioDevice

READY_TIMEOUT = 60.0  # s: the daemon's own readiness probe allows 10 s per node
STOP_TIMEOUT = 20.0
SETTLE_TIMEOUT = 5.0  # s for the daemon to release what a closed file held
LOG_LINES = 300  # at most this many daemon log lines attached to a report
PR_SET_PDEATHSIG = 1
MNT_DETACH = 2


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("iommufd-cuse", "iommufd-cuse daemon fixtures")
    group.addoption(
        "--iommufd-config",
        metavar="FILE",
        default=None,
        help="configuration (TOML) of the iommufd_daemon fixture's daemon (default: the embedded one)",
    )
    group.addoption(
        "--iommufd-selftest",
        action="store_true",
        default=False,
        help="run the iommufd_daemon fixture's daemon in test mode (IOMMU_TEST_CMD, the mock IOMMU)",
    )
    group.addoption(
        "--iommufd-log-level",
        metavar="LEVEL",
        default="info",
        help="the daemon's --log-level (default info)",
    )


class DaemonError(RuntimeError):
    """The daemon did not start, or did not stop cleanly."""


def _daemon_command() -> list[str]:
    """The console script of this installation (beside the interpreter), else on PATH."""
    here = Path(sys.executable).parent / "iommufd-cuse"
    if here.exists():
        return [str(here)]
    found = shutil.which("iommufd-cuse")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from iommufd_cuse.cli import main; sys.exit(main())"]


def _die_with_parent() -> None:
    # A pytest killed outright takes its daemon along (SIGTERM: a clean unmount).
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class IommufdDaemon:
    """One ``iommufd-cuse serve`` subprocess on private paths under base."""

    def __init__(self, base: Path, config: str | None = None, selftest: bool = False, log_level: str = "info") -> None:
        self.base = base
        self.dev_dir = str(base / "dev")
        self.mountpoint = str(base / "mnt")
        self.control_socket = str(base / "control.sock")
        self.log_path = base / "daemon.log"
        self.config = config
        self.selftest = selftest
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        # Where the daemon sends sd_notify messages: READY=1, then STATUS= as it
        # changes; open for its whole life (else it logs a failed send), drained.
        self._notify: socket.socket | None = None

    # -- paths -------------------------------------------------------------------------
    @property
    def iommu(self) -> str:
        """The daemon's /dev/iommu."""
        return os.path.join(self.dev_dir, "iommu")

    @property
    def vfio(self) -> str:
        """The daemon's /dev/vfio/vfio (the type1 compatibility container)."""
        return os.path.join(self.dev_dir, "vfio", "vfio")

    def devices(self, model: str | None = None) -> list[str]:
        """BDFs of the emulated devices (of one model: "edu", "dma-engine")."""
        return [d["bdf"] for d in self.status()["devices"] if model is None or d.get("model") == model]

    def device_node(self, bdf: str) -> str:
        """The VFIO cdev of the device at bdf."""
        for d in self.status()["devices"]:
            if d["bdf"] == bdf:
                if "node" not in d:
                    raise LookupError(f"{bdf} has no VFIO cdev")
                return d["node"]
        raise LookupError(f"no device {bdf} in this daemon's topology (see --iommufd-config)")

    # -- state -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What `iommufd-cuse status --json` prints, asked over the control socket."""
        self._drain()
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonError(f"the daemon has exited ({self.proc.returncode}):\n{self.log_text()}")
        return service.request(self.control_socket, {"cmd": "status"})

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, start: int = 0) -> str:
        """The daemon's log (stderr) from byte offset start."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # -- life --------------------------------------------------------------------------
    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the daemon and return once it is ready (DaemonError if it is not)."""
        notify_path = str(self.base / "notify")
        self._notify = notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(notify_path)
        argv = [
            *_daemon_command(),
            "serve",
            "--dev-dir",
            self.dev_dir,
            "--mountpoint",
            self.mountpoint,
            "--control-socket",
            self.control_socket,
            "--log-level",
            self.log_level,
        ]
        if self.config:
            argv += ["--config", self.config]
        if self.selftest:
            argv.append("--selftest")
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        env.pop("WATCHDOG_USEC", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                # its own session: a ^C reaches pytest, which stops it in order
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._wait_ready(notify, timeout)
        notify.setblocking(False)
        if self.proc.poll() is not None:
            raise DaemonError(f"the daemon exited ({self.proc.returncode}) right after start-up\n{self.log_text()}")

    def _drain(self) -> None:
        if self._notify is None:
            return
        with contextlib.suppress(BlockingIOError):
            while True:
                self._notify.recv(4096)

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        notify.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                msg = notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                msg = ""
            if "READY=1" in msg.split("\n"):
                return
            if self.proc.poll() is not None:
                raise DaemonError(
                    f"`{' '.join(self.proc.args)}` exited {self.proc.returncode} before it was ready:\n"
                    + self.log_text()
                )
        self.stop(check=False)
        raise DaemonError(f"the daemon was not ready after {timeout:g} s:\n{self.log_text()}")

    def stop(self, check: bool = True) -> int | None:
        """SIGTERM and wait (SIGKILL past STOP_TIMEOUT); its exit status. With check,
        DaemonError if it did not exit 0."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                # it could not unmount: do it for it, lazily (MNT_DETACH, as fusermount -uz);
                # a failure leaves a stale mount, which the next daemon's start removes
                ctypes.CDLL(None).umount2(self.mountpoint.encode(), MNT_DETACH)
        rc = proc.returncode
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if check and rc != 0:
            raise DaemonError(f"the daemon exited {rc}:\n{self.log_text()}")
        return rc


def scratch_base() -> Path:
    """A private directory per pytest process (so per xdist worker), that clients of
    other users can traverse (pytest's own tmp_path is 0700)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    base = Path(tempfile.mkdtemp(prefix=f"iommufd-cuse-pytest-{worker}-", dir="/tmp"))
    base.chmod(0o755)
    return base


@pytest.fixture(scope="session")
def iommufd_daemon(pytestconfig: pytest.Config) -> Iterator[IommufdDaemon]:
    """The running daemon of this session (of this xdist worker)."""
    if os.geteuid() != 0:
        pytest.skip("iommufd_daemon needs root (the daemon mounts a FUSE file system)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("iommufd_daemon needs /dev/fuse")
    config = pytestconfig.getoption("iommufd_config")
    d = IommufdDaemon(
        scratch_base(),
        config=os.path.abspath(config) if config else None,
        selftest=pytestconfig.getoption("iommufd_selftest"),
        log_level=pytestconfig.getoption("iommufd_log_level"),
    )
    try:
        d.start()
        yield d
        d.stop()
    finally:
        d.stop(check=False)
        shutil.rmtree(d.base, ignore_errors=True)


# -- per test: what the fixtures opened, and the check that nothing is left ------------


def _context_key(c: dict[str, Any]) -> tuple[Any, ...]:
    return (c["pid"], c["tid"], c["opened_at"])


def _owners(st: dict[str, Any]) -> dict[Any, str]:
    return {g.get("group"): g.get("owner", "kernel") for g in st.get("groups", [])}


def _describe_object(o: dict[str, Any]) -> str:
    if o["type"] == "ioas":
        n = len(o.get("areas", []))
        return f"ioas {o['id']} ({n} area{'s' * (n != 1)}, {o.get('pinned_pages', 0)} pages pinned)"
    return f"{o['type']} {o['id']}"


def _describe_context(c: dict[str, Any]) -> str:
    return f"context {c['index']} (pid {c['pid']} {c['comm']}, tid {c['tid']})"


class LeakCheck:
    """What the fixtures of one test opened, and the daemon's state before it."""

    def __init__(self, daemon: IommufdDaemon, name: str) -> None:
        self.daemon = daemon
        self.name = name
        self.log_start = daemon.log_size()
        self.baseline = daemon.status()
        self.known = {_context_key(c) for c in self.baseline["contexts"]}
        self.contexts: list[Iommufd] = []
        self.fixture_keys: set[tuple[Any, ...]] = set()
        self.devices: list[VfioDevice] = []
        self.bdfs: set[str] = set()
        self.after: dict[str, Any] = self.baseline

    def open_context(self) -> Iommufd:
        before = {_context_key(c) for c in self.daemon.status()["contexts"]}
        ctx = Iommufd.open(self.daemon.iommu)
        self.contexts.append(ctx)
        self.fixture_keys |= {_context_key(c) for c in self.daemon.status()["contexts"]} - before
        return ctx

    def open_device(self, bdf: str) -> VfioDevice:
        dev = VfioDevice.open(self.daemon.device_node(bdf))
        self.devices.append(dev)
        self.bdfs.add(bdf)
        return dev

    def finish(self) -> None:
        """Close what the fixtures opened; pytest.fail if the test left anything."""
        for dev in reversed(self.devices):
            dev.close()
        # A device's file is released after close() returns: until the daemon has
        # processed that, its binding (an object of the context) is still there.
        st = self._settle(lambda st: not any(d.get("in_use") for d in st["devices"] if d["bdf"] in self.bdfs))
        self.after = st  # what the messages name contexts by, and show
        names = {_context_key(c): _describe_context(c) for c in st["contexts"]}
        held = {
            _context_key(c): ", ".join(_describe_object(o) for o in c["objects"])
            for c in st["contexts"]
            if _context_key(c) not in self.known and c["objects"]
        }
        problems = [
            f"the `iommufd` fixture's context still holds {objs}: destroy what the test allocates"
            for key, objs in held.items()
            if key in self.fixture_keys
        ]
        for ctx in self.contexts:
            ctx.close()
        # What closed files held goes when the daemon has processed their release.
        problems += self._left(self._settle(lambda now: not self._left(now, names, held)), names, held)
        if problems:
            text = "\n".join(f"  - {p}" for p in problems)
            pytest.fail(
                f"iommufd-cuse: {self.name} left state behind in the daemon:\n{text}\n\n"
                f"the daemon's status after the test:\n{service.format_status(st)}",
                pytrace=False,
            )

    def _settle(self, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The daemon's status once done(status), or after SETTLE_TIMEOUT."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            st = self.daemon.status()
            if done(st) or time.monotonic() > deadline:
                return st
            time.sleep(0.02)

    def _left(
        self, st: dict[str, Any], names: dict[tuple[Any, ...], str], held: dict[tuple[Any, ...], str]
    ) -> list[str]:
        """What is left in st that was not before the test (contexts named as in
        the snapshot names, with the objects they held then)."""
        left = []
        for c in st["contexts"]:
            key = _context_key(c)
            if key not in self.known:
                name = names.get(key) or _describe_context(c)
                objs = f", holding {held[key]}" if key in held else ""
                left.append(f"{name} is still open{objs}: close it")
        before = self.baseline["pinned_pages"]
        if st["pinned_pages"] > before:
            left.append(f"{st['pinned_pages']} pages are pinned ({before} before the test)")
        was, then = _owners(self.baseline), _owners(self.after)
        for group, owner in _owners(st).items():
            if owner != "kernel" and was.get(group, "kernel") == "kernel":
                left.append(f"group {group} is owned by userspace ({then.get(group, owner)}): close its devices")
        return left


_STATE = pytest.StashKey[LeakCheck]()
_LOG_START = pytest.StashKey[tuple[IommufdDaemon, int]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    # where the log of a test that uses the daemon starts (the daemon may start
    # during this setup; the leak check records its own, earlier, start)
    yield
    d = getattr(item, "funcargs", {}).get("iommufd_daemon")
    if isinstance(d, IommufdDaemon):
        item.stash[_LOG_START] = (d, d.log_size())


@pytest.fixture
def _iommufd_test(iommufd_daemon: IommufdDaemon, request: pytest.FixtureRequest) -> Iterator[LeakCheck]:
    st = LeakCheck(iommufd_daemon, request.node.nodeid)
    request.node.stash[_STATE] = st
    yield st
    st.finish()


@pytest.fixture
def iommufd(_iommufd_test: LeakCheck) -> Iommufd:
    """A fresh iommufd context (an open of the daemon's /dev/iommu) for this test."""
    return _iommufd_test.open_context()


@pytest.fixture
def vfio_device(_iommufd_test: LeakCheck) -> Callable[[str], VfioDevice]:
    """vfio_device(bdf) opens that device's VFIO cdev for this test."""
    return _iommufd_test.open_device


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    st = item.stash.get(_STATE, None)
    start = (st.daemon, st.log_start) if st is not None else item.stash.get(_LOG_START, None)
    if start is None or not report.failed:
        return
    lines = start[0].log_text(start[1]).splitlines()
    if len(lines) > LOG_LINES:
        lines = [f"({len(lines) - LOG_LINES} earlier lines not shown)", *lines[-LOG_LINES:]]
    report.sections.append(("iommufd-cuse daemon log", "\n".join(lines) or "(nothing logged)"))
