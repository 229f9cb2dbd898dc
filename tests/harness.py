"""Test harness (imported by conftest.py and by tests): the real daemon (in this process, under trio), a real FUSE
mount in a scratch directory, and real client processes (C programs compiled
here, and Python)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from iommufd_cuse import config
from iommufd_cuse.daemon import Daemon

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CLIENTS = ROOT / "tests" / "clients"
INCLUDE = ROOT / "include"
NOBODY = 65534


def scratch_dir() -> Path:
    """A directory that non-root clients can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="icuse-", dir="/tmp"))
    d.chmod(0o755)
    return d


@pytest.fixture(scope="session")
def cbuild(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """cbuild("name") compiles tests/clients/name.c (once per session) -> binary path.
    Extra sources: cbuild("name", "other.c")."""
    out = tmp_path_factory.mktemp("cbin")
    out.chmod(0o755)
    os.chmod(out.parent, 0o755)
    os.chmod(out.parent.parent, 0o755)
    built: dict[tuple[str, ...], Path] = {}

    def build(name: str, *extra: str, cflags: tuple[str, ...] = ()) -> Path:
        key = (name, *extra, *cflags)
        if key not in built:
            # a variant (cflags such as -static) is a binary of its own
            exe = out / (name + "".join(f"_{f.strip('-').replace('=', '_')}" for f in cflags))
            srcs = [str(CLIENTS / f"{name}.c")] + [str(CLIENTS / e) for e in extra]
            subprocess.run(
                [
                    "cc",
                    "-O2",
                    "-g",
                    "-Wall",
                    "-Werror",
                    "-pthread",
                    f"-I{INCLUDE}",
                    f"-I{CLIENTS}",
                    *cflags,
                    "-o",
                    str(exe),
                    *srcs,
                ],
                check=True,
            )
            built[key] = exe
        return built[key]

    return build


@contextmanager
def built_examples(*names: str) -> Iterator[dict[str, Path]]:
    """examples/NAME.c compiled as a user would (-O2 -Wall -Wextra -Werror) into a scratch directory any user
    can enter, removed afterwards: name -> binary."""
    out = scratch_dir()
    try:
        exes = {}
        for name in names:
            exes[name] = out / name
            cmd = ["cc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{INCLUDE}", "-o", str(exes[name])]
            subprocess.run([*cmd, str(ROOT / "examples" / f"{name}.c")], check=True)
        yield exes
    finally:
        shutil.rmtree(out, ignore_errors=True)


def open_files(path: Path) -> list[str]:
    """This process's descriptors open on path."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                fds.append(fd)
        except OSError:
            pass
    return fds


def device_nodes(daemon: Daemon, n: int) -> list[Path]:
    """A daemon's /dev/iommu and /dev/vfio/devices/vfio<n>, as the examples take them."""
    return [Path(daemon.dev_dir) / "iommu", Path(daemon.dev_dir) / "vfio" / "devices" / f"vfio{n}"]


def block_pattern(first: int, count: int) -> bytes:
    """What examples/nvme.c and virtio_blk.c write: block (512 bytes) n holds n (u64), then (n % 251 + i) & 0xff."""
    table = bytes(i & 0xFF for i in range(251 + 512))
    return b"".join(struct.pack("<Q", n) + table[n % 251 : n % 251 + 504] for n in range(first, first + count))


def make_daemon(base: Path, cfg: config.Config | None = None, **kw: Any) -> Daemon:
    return Daemon(cfg or config.load(None), dev_dir=str(base / "dev"), mountpoint=str(base / "mnt"), **kw)


@asynccontextmanager
async def serving(cfg: config.Config | None = None, base: Path | None = None, **kw: Any) -> AsyncIterator[Daemon]:
    """A running daemon (cfg, or the embedded default configuration; kw: Daemon's options) with its mount and
    nodes under base (a new scratch directory if none), which is removed afterwards."""
    base = base or scratch_dir()
    try:
        async with trio.open_nursery() as nursery:
            d = make_daemon(base, cfg, **kw)
            await nursery.start(d.run)
            try:
                yield d
            finally:
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    """A running daemon with the embedded default configuration, nodes under a scratch /dev."""
    async with serving() as d:
        yield d


async def run(
    argv: list[str | os.PathLike], *, user: int | None = None, check: bool = True, timeout: float = 60, **kw
) -> subprocess.CompletedProcess:
    """Run a client process to completion while the daemon keeps serving."""
    argv = [str(a) for a in argv]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *argv]
    with trio.fail_after(timeout):
        p = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, **kw)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{argv} exited {p.returncode}\nstdout:\n{p.stdout.decode()}\nstderr:\n{p.stderr.decode()}"
        )
    return p


class Scripted:
    """A tests/clients/scripted.py process: `await c.do("op", **args)` -> reply dict."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""

    async def do(self, _op: str, **args) -> dict:
        import json

        assert self.proc.stdin is not None and self.proc.stdout is not None
        await self.proc.stdin.send_all((json.dumps({"_op": _op, **args}) + "\n").encode())
        with trio.fail_after(30):
            while b"\n" not in self._buf:
                chunk = await self.proc.stdout.receive_some()
                if not chunk:
                    raise AssertionError(f"client died during {_op}: rc={self.proc.returncode}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def ok(self, _op: str, **args) -> dict:
        r = await self.do(_op, **args)
        assert r.get("ok"), f"{_op} {args} -> {r}"
        return r

    async def call(self, method: str, **kw) -> object:
        return (await self.ok("call", method=method, **kw))["result"]

    async def exit(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()
        with trio.fail_after(10):
            await self.proc.wait()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable]:
    """scripted(user=None, caps=None) starts a scripted client process."""
    import sys

    procs: list[trio.Process] = []

    async def start(user: int | None = None, drop_caps: tuple[str, ...] = ()) -> Scripted:
        argv = [sys.executable, str(CLIENTS / "scripted.py")]
        if drop_caps:
            caps = ",".join(f"-{c}" for c in drop_caps)
            argv = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *argv]
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *argv]
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        return Scripted(proc)

    yield start
    for p in procs:
        if p.returncode is None:
            p.kill()
            await p.wait()
