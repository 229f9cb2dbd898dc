"""The daemon as a system service: the unit file (systemd-analyze verify, and the
sandbox it declares applied to a real daemon), sd_notify readiness, STATUS=,
watchdog and STOPPING=1 (this test is the notify socket listener), the control
socket and `iommufd-cuse status`, and install/uninstall into a scratch root.

No systemd runs here (no systemd PID 1): the daemon is started as systemd would
start it, with NOTIFY_SOCKET/WATCHDOG_USEC, and the unit's sandbox is emulated
where the kernel allows it (bounding set, no_new_privs, MDWE)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from harness import NOBODY, ROOT, scratch_dir

from iommufd_cuse import config, install, service, uapi
from iommufd_cuse.client import Iommufd
from iommufd_cuse.transport.mount import fuse_umount

UNIT = ROOT / "systemd" / "iommufd-cuse.service"
EXE = Path(sys.executable).parent / "iommufd-cuse"
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
# A unit's options that would give the service its own mount namespace, in which
# the FUSE mount and the /dev links would be invisible to the host.
MOUNT_NAMESPACE_OPTIONS = {
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateNetwork",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "PrivateUsers",
    "PrivateIPC",
    "MountAPIVFS",
    "LogNamespace",
}


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def exe() -> str:
    assert EXE.exists(), f"{EXE} missing: install the package into the venv (scripts/setup.sh)"
    return str(EXE)


# -- the unit file -----------------------------------------------------------------------
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/setup.sh installs Debian's systemd"
    # verify checks that ExecStart's program exists: check the unit as install writes it.
    root = tmp_path / "root"
    install.install(str(root), command=exe())
    unit = root / install.UNIT_DIR / install.UNIT_NAME
    assert unit.read_text() == UNIT.read_text().replace(
        "ExecStart=/usr/local/bin/iommufd-cuse serve", f"ExecStart={EXE} serve"
    )
    p = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    about_unit = [ln for ln in p.stderr.splitlines() if "iommufd-cuse" in ln]
    assert p.returncode == 0, p.stderr
    assert about_unit == [], p.stderr


def test_unit_declares_the_service_contract() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] and s["ExecStart"] == ["/usr/local/bin/iommufd-cuse serve"]
    assert s["RuntimeDirectory"] == ["iommufd-cuse"] and s["RuntimeDirectoryMode"] == ["0755"]
    assert config.DEFAULT_MOUNTPOINT.startswith("/run/iommufd-cuse/")
    assert os.path.dirname(config.DEFAULT_CONTROL_SOCKET) == "/run/iommufd-cuse"
    assert not MOUNT_NAMESPACE_OPTIONS & s.keys(), "these make a private mount namespace"
    assert s.get("PrivateMounts", ["no"]) == ["no"]
    # every capability kept is explained in a comment
    caps = s["CapabilityBoundingSet"][0].split()
    assert set(caps) == {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE"}
    for cap in caps:
        assert re.search(rf"^# {cap}\s+\S", UNIT.read_text(), re.M), f"{cap} is not justified"
    # the packaged copy install uses is this file
    assert install.unit_template() == UNIT.read_text()


# -- the daemon under a notify socket ----------------------------------------------------------
@dataclass
class Message:
    t: float
    pid: int
    fields: list[str]

    def has(self, assignment: str) -> bool:
        return assignment in self.fields

    def get(self, key: str) -> str | None:
        for f in self.fields:
            if f.startswith(key + "="):
                return f[len(key) + 1 :]
        return None


class NotifyListener:
    """What systemd does with $NOTIFY_SOCKET: datagrams with the sender's credentials."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.messages: list[Message] = []

    @classmethod
    async def bind(cls, path: Path) -> NotifyListener:
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        await s.bind(str(path))
        return cls(s)

    async def receive(self) -> Message:
        data, anc, _flags, _addr = await self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:12])[0]
        m = Message(time.monotonic(), pid, data.decode().split("\n"))
        self.messages.append(m)
        return m

    async def wait_for(self, assignment: str, timeout: float = 20) -> Message:
        with trio.fail_after(timeout):
            while True:
                m = await self.receive()
                if m.has(assignment):
                    return m


@dataclass
class ServedDaemon:
    base: Path
    proc: trio.Process
    notify: NotifyListener
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def node(self) -> Path:
        return self.base / "dev" / "iommu"

    @property
    def control(self) -> Path:
        return self.base / "control.sock"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def served(
    wrapper: list[str] | None = None, env: dict[str, str] | None = None, config_text: str | None = None
) -> AsyncIterator[ServedDaemon]:
    """`iommufd-cuse serve` as a subprocess, its NOTIFY_SOCKET ours."""
    base = scratch_dir()
    notify = await NotifyListener.bind(base / "notify")
    argv = [
        *(wrapper or []),
        exe(),
        "serve",
        "--dev-dir",
        str(base / "dev"),
        "--mountpoint",
        str(base / "mnt"),
        "--control-socket",
        str(base / "control.sock"),
        "--log-level",
        "debug",
    ]
    if config_text is not None:
        (base / "config.toml").write_text(config_text)
        argv += ["--config", str(base / "config.toml")]
    full_env = {**os.environ, "NOTIFY_SOCKET": str(base / "notify"), **(env or {})}
    log = base / "daemon.log"
    with open(log, "wb") as logf:
        proc = await trio.lowlevel.open_process(argv, env=full_env, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
    d = ServedDaemon(base, proc, notify, log, full_env)
    try:
        yield d
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
            fuse_umount(str(base / "mnt"))
        notify.sock.close()
        shutil.rmtree(base, ignore_errors=True)


def mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def ask_rlimit_mode(node: Path) -> tuple[int, int]:
    """IOMMU_OPTION(RLIMIT_MODE, GET) on a fresh open of node: (rc, val64). Blocking."""
    with Iommufd.open(node) as f:
        r = f.raw(
            uapi.IOMMU_OPTION, uapi.iommu_option, option_id=uapi.IOMMU_OPTION_RLIMIT_MODE, op=uapi.IOMMU_OPTION_OP_GET
        )
        return r.rc, r.out.val64


async def stop(d: ServedDaemon) -> Message:
    d.proc.send_signal(signal.SIGTERM)
    m = await d.notify.wait_for("STOPPING=1", timeout=10)
    with trio.fail_after(15):
        await d.proc.wait()
    assert d.proc.returncode == 0, d.log_text()
    return m


async def test_ready_after_the_node_answers_then_status_watchdog_stopping() -> None:
    async with served(env={"WATCHDOG_USEC": "400000"}) as d:
        with trio.fail_after(20):
            while True:
                m = await d.notify.receive()
                if m.has("READY=1"):
                    # The moment READY=1 arrives the node is there and answers an
                    # ioctl (from a thread: this process runs no FUSE server).
                    assert os.path.exists(d.node), "READY=1 before the node exists"
                    rc, val = await trio.to_thread.run_sync(ask_rlimit_mode, d.node)
                    assert (rc, val) == (0, 0)
                    break
                assert d.proc.returncode is None, d.log_text()
        ready = m
        before = d.notify.messages[:-1]
        assert not any(x.has("READY=1") for x in before)
        assert before and before[0].get("STATUS") == "starting"
        assert re.fullmatch(r"0 contexts, \d+ devices?, 0\.0 MiB pinned", ready.get("STATUS") or ""), ready
        # systemd only accepts these from the main process (NotifyAccess=main)
        assert {x.pid for x in d.notify.messages} == {d.proc.pid}

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 200 ms
        t0 = time.monotonic()
        pings = 0
        with trio.move_on_after(1.5):
            while True:
                if (await d.notify.receive()).has("WATCHDOG=1"):
                    pings += 1
        assert pings >= 3, f"{pings} pings in {time.monotonic() - t0:.2f} s"

        # STATUS= follows the contexts
        f = await trio.to_thread.run_sync(Iommufd.open, d.node)
        try:
            with trio.fail_after(10):
                while not ((await d.notify.receive()).get("STATUS") or "").startswith("1 context,"):
                    pass
        finally:
            await trio.to_thread.run_sync(f.close)

        await stop(d)
        assert not mounted(d.base / "mnt")
        assert not os.path.lexists(d.node) and not os.path.lexists(d.base / "dev" / "vfio" / "vfio")
        assert not os.path.lexists(d.control)
        log = d.log_text()
        assert "SIGTERM: shutting down" in log and "Traceback" not in log, log


async def test_startup_failure_sends_no_ready() -> None:
    base = scratch_dir()
    try:
        (base / "dev").mkdir()
        (base / "dev" / "iommu").write_text("taken\n")
        listener = await NotifyListener.bind(base / "notify")
        p = await trio.run_process(
            [
                exe(),
                "serve",
                "--dev-dir",
                str(base / "dev"),
                "--mountpoint",
                str(base / "mnt"),
                "--control-socket",
                str(base / "control.sock"),
            ],
            env={**os.environ, "NOTIFY_SOCKET": str(base / "notify")},
            capture_stderr=True,
            check=False,
        )
        assert p.returncode == 1
        assert p.stderr.decode().splitlines()[-1].startswith("iommufd-cuse: error:"), p.stderr
        got = []
        with trio.move_on_after(0.2):
            while True:
                got.append(await listener.receive())
        assert not any(m.has("READY=1") for m in got)
        assert not mounted(base / "mnt") and not os.path.lexists(base / "control.sock")
        listener.sock.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- status, under the unit's sandbox -------------------------------------------------------------
MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(65, 1, 0, 0, 0):  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN\n"
    "    sys.exit('PR_SET_MDWE: ' + os.strerror(ctypes.get_errno()))\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def unit_sandbox() -> list[str]:
    """The unit's CapabilityBoundingSet=, NoNewPrivileges= and MemoryDenyWriteExecute=,
    applied to a command by hand (what systemd would do)."""
    s = unit_settings(UNIT.read_text())
    assert s["NoNewPrivileges"] == ["yes"] and s["MemoryDenyWriteExecute"] == ["yes"]
    caps = ",".join("+" + c.lower().removeprefix("cap_") for c in s["CapabilityBoundingSet"][0].split())
    return [
        sys.executable,
        "-c",
        MDWE_EXEC,
        "setpriv",
        "--no-new-privs",
        f"--bounding-set=-all,{caps}",
        "--inh-caps=-all",
        "--",
    ]


NOBODY_CAN_OPEN = '[nodes.iommu]\nmode = "0666"\n'


# The capabilities of the unit's bounding set, by number.
UNIT_CAPS = {"CAP_DAC_OVERRIDE": 1, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21}


def proc_status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(ln.rstrip("\n").split(":\t", 1) for ln in f if ":\t" in ln)


def own_caps() -> int:
    return int(proc_status("self")["CapEff"], 16)


def check_sandboxed(pid: int) -> None:
    """The daemon runs with the unit's bounding set (less what this machine withholds)."""
    st = proc_status(pid)
    want = sum(1 << n for n in UNIT_CAPS.values()) & own_caps()
    assert int(st["CapEff"], 16) == int(st["CapBnd"], 16) == want, st
    assert st["NoNewPrivs"] == "1"


async def start_client(
    cbuild, node: Path, as_nobody: bool = False, nodump: bool = False, device: Path | None = None
) -> tuple[trio.Process, dict[str, str]]:
    """tests/clients/status_client.c, once it holds its mappings: (process, its "ready" fields)."""
    client = cbuild("status_client")
    argv = [str(client), str(node), *(["nodump"] if nodump else []), *([f"device={device}"] if device else [])]
    if as_nobody:
        argv = [*AS_NOBODY, *argv]
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    buf = b""
    with trio.fail_after(20):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some()
            assert chunk, f"client died: {buf!r}"
            buf += chunk
    line = buf.decode().strip()
    assert line.startswith("ready "), line
    return proc, dict(kv.split("=") for kv in line.split()[1:])


async def end_client(proc: trio.Process) -> None:
    await proc.stdin.aclose()
    with trio.fail_after(10):
        await proc.wait()
    assert proc.returncode == 0


async def status(d: ServedDaemon, *args: str, user: int | None = None) -> subprocess.CompletedProcess:
    argv = [exe(), "status", "--control-socket", str(d.control), *args]
    if user is not None:
        argv = [*AS_NOBODY, *argv]
    with trio.fail_after(20):
        return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


async def status_json(d: ServedDaemon) -> dict:
    p = await status(d, "--json")
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


async def test_status_shows_client_context_areas_and_pins(cbuild) -> None:
    async with served(wrapper=unit_sandbox()) as d:
        await d.notify.wait_for("READY=1")
        st = os.stat(d.control)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        check_sandboxed(d.proc.pid)

        # non-dumpable: only CAP_SYS_PTRACE reaches its memory and descriptors
        client, info = await start_client(cbuild, d.node, nodump=True)
        pid, file_iova = int(info["pid"]), int(info["file_iova"], 16)
        try:
            # -- the table
            p = await status(d)
            text = p.stdout.decode()
            assert p.returncode == 0, p.stderr.decode()
            assert f"pid {pid} (status_client)" in text and "user root" in text, text
            assert f"command: {cbuild('status_client')} {d.node} nodump" in text, text
            assert "objects: 1 ioas" in text and "ioas 1: 2 areas, 0 domains, 0 pages pinned" in text, text
            assert re.search(r"0x0000000000100000\s+0x10000\s+rw\s+16\s+0\s+user memory of pid " + str(pid), text), text
            assert re.search(rf"{file_iova:#018x}\s+0x2000\s+r-\s+2\s+0\s+file at offset 0x0", text), text
            assert "pinned: 0 pages (0.0 MiB)" in text and "accounted: per user: none" in text, text
            assert re.search(r"^devices: none$|^devices:\n  ", text, re.M) and re.search(r"^groups:", text, re.M)

            # -- the same for tools
            js = await status_json(d)
            assert js["daemon"]["pid"] == d.proc.pid and str(d.node) in js["daemon"]["nodes"]
            (ctx,) = [c for c in js["contexts"] if c["pid"] == pid]
            assert ctx["comm"] == "status_client" and ctx["uid"] == 0 and ctx["user"] == "root"
            assert ctx["cmdline"] == [str(cbuild("status_client")), str(d.node), "nodump"]
            assert ctx["accounting"] == "user" and ctx["objects_by_kind"] == {"ioas": 1}
            (ioas,) = ctx["objects"]
            assert (ioas["type"], ioas["id"], ioas["domains"], ioas["pinned_pages"]) == ("ioas", 1, 0, 0)
            anon, memfd = ioas["areas"] if ioas["areas"][0]["iova"] == 0x100000 else ioas["areas"][::-1]
            assert anon == {
                "iova": 0x100000,
                "length": 0x10000,
                "last": 0x10FFFF,
                "prot": "rw",
                "backing": {"kind": "user", "pid": pid, "uptr": anon["backing"]["uptr"]},
                "pages": 16,
                "pinned_pages": 0,
                "accesses": 0,
            }
            assert (memfd["iova"], memfd["length"], memfd["prot"], memfd["backing"], memfd["pages"]) == (
                file_iova,
                0x2000,
                "r-",
                {"kind": "file", "offset": 0},
                2,
            )
            # Pins are taken when a domain is attached: none without a device.
            assert (ctx["pinned_pages"], js["pinned_pages"], js["pinned_mib"]) == (0, 0, 0.0)
            assert js["accounting"] == {"user": [], "mm": []}
            assert isinstance(js["devices"], list) and isinstance(js["groups"], list)
            for dev in js["devices"]:
                assert "owner" in dev
            for grp in js["groups"]:
                assert grp["owner"] == "kernel"

            # -- root only: the file mode keeps others out...
            p = await status(d, user=NOBODY)
            assert p.returncode != 0
            err = p.stderr.decode().strip()
            assert err.startswith("iommufd-cuse: error:") and "permission denied" in err, err
            assert len(err.splitlines()) == 1, err
            # ... and so does SO_PEERCRED, were the mode ever wrong
            os.chmod(d.control, 0o666)
            try:
                p = await status(d, user=NOBODY)
            finally:
                os.chmod(d.control, 0o600)
            err = p.stderr.decode().strip()
            assert p.returncode != 0 and "root only" in err, err
            assert "refused a connection" in d.log_text()
        finally:
            await end_client(client)

        with trio.fail_after(10):  # the release reaches the daemon asynchronously
            while any(c["pid"] == pid for c in (await status_json(d))["contexts"]):
                await trio.sleep(0.05)
        await stop(d)
        assert not mounted(d.base / "mnt")


async def test_sandboxed_daemon_serves_a_client_of_another_user(cbuild) -> None:
    """What CAP_DAC_OVERRIDE is kept for; a non-root client's RLIMIT_MEMLOCK is read
    without any capability."""
    async with served(wrapper=unit_sandbox(), config_text=NOBODY_CAN_OPEN) as d:
        await d.notify.wait_for("READY=1")
        check_sandboxed(d.proc.pid)
        client, info = await start_client(cbuild, d.node, as_nobody=True)
        try:
            js = await status_json(d)
            (ctx,) = [c for c in js["contexts"] if c["pid"] == int(info["pid"])]
            assert (ctx["uid"], ctx["user"]) == (NOBODY, "nobody")
            assert len(ctx["objects"][0]["areas"]) == 2
        finally:
            await end_client(client)
        await stop(d)


async def test_status_with_a_device_attached(daemon) -> None:
    """With a device attached the pins show, and devices and groups name their owner
    context and the HWPT they are attached to (in-process: collect_status directly)."""
    import mmap

    from iommufd_cuse.client import AsyncIommufd, AsyncVfioDevice

    if not getattr(daemon.system, "devices", None):
        pytest.skip("no devices in this build")
    fd = await AsyncIommufd.open(os.path.join(daemon.dev_dir, "iommu"))
    dev = await AsyncVfioDevice.open(os.path.join(daemon.dev_dir, "vfio/devices/vfio0"))
    buf = mmap.mmap(-1, 1 << 20)
    buf[:] = bytes(1 << 20)
    try:
        ioas = await fd.ioas_alloc()
        await fd.map(ioas, buf, iova=0x200000)
        await dev.bind(fd.fd)
        await dev.attach(ioas)
        st = service.add_user_names(service.collect_status(daemon))
        assert st["pinned_pages"] == 256 and st["pinned_mib"] == 1.0
        (ctx,) = st["contexts"]
        assert ctx["pid"] == os.getpid() and ctx["pinned_pages"] == 256
        by_type = {o["type"]: o for o in ctx["objects"]}
        assert set(by_type) == {"ioas", "device", "hwpt_paging"}
        (area,) = by_type["ioas"]["areas"]
        assert (area["iova"], area["pages"], area["pinned_pages"]) == (0x200000, 256, 256)
        assert by_type["ioas"]["domains"] == 1
        hwpt = by_type["hwpt_paging"]
        assert hwpt["ioas"] == by_type["ioas"]["id"]
        bdf = daemon.system.devices[0].bdf
        assert by_type["device"]["device"] == bdf
        owner = f"context 1 (pid {os.getpid()} {ctx['comm']})"
        (d0,) = [d for d in st["devices"] if d.get("bdf") == bdf]
        assert (d0["owner"], d0["domain"]) == (owner, f"hwpt {hwpt['id']} of context 1")
        (g0,) = [g for g in st["groups"] if bdf in g.get("devices", [])]
        assert (g0["owner"], g0["domain"]) == (owner, f"hwpt {hwpt['id']} of context 1")
        assert all(g["owner"] == "kernel" and g["domain"] == "default" for g in st["groups"] if g is not g0)
        text = service.format_status(st)
        assert "pinned: 256 pages (1.0 MiB)" in text and "1 device, 1 hwpt_paging, 1 ioas" in text, text
        assert service.summary(daemon).endswith(", 1.0 MiB pinned")
    finally:
        await dev.close()
        await fd.close()


def _syscall_sets() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    sets: dict[str, list[str]] = {}
    cur = None
    for line in out.splitlines():
        if line.startswith("@"):
            cur = sets.setdefault(line.strip(), [])
        elif cur is not None and line.startswith("    ") and not line.strip().startswith("#"):
            cur.append(line.strip())
    return sets


def unit_allowed_syscalls() -> set[str]:
    """SystemCallFilter= of the unit as systemd reads it: the first line's kind
    (allow list) decides; later '~' lines remove, plain ones add."""
    sets = _syscall_sets()

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(m) for m in sets[name]))

    allowed = expand("@default")  # systemd always allows it with an allow list
    for value in unit_settings(UNIT.read_text())["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set().union(*(expand(n) for n in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is not installed (scripts/setup.sh installs it)")
async def test_unit_syscall_filter_allows_what_the_daemon_calls(cbuild) -> None:
    """Every system call the sandboxed daemon makes (and its children: the
    readiness probe, the own-mount loopback) through start-up, a client that
    binds a device and gets its pages pinned, status, and shutdown."""
    base = scratch_dir()
    trace = base / "strace.txt"
    try:
        # strace inside the sandbox: systemd's own set-up (setpriv's here) is not traced
        async with served(
            wrapper=[*unit_sandbox(), "strace", "-f", "-c", "-o", str(trace)], env={"WATCHDOG_USEC": "200000"}
        ) as d:
            await d.notify.wait_for("READY=1", timeout=60)
            device = d.base / "dev" / "vfio" / "devices" / "vfio0"
            client, info = await start_client(cbuild, d.node, nodump=True, device=device if device.exists() else None)
            try:
                st = await status_json(d)
                if device.exists():  # attached to a device, every mapped page is pinned
                    assert "devid" in info and st["pinned_pages"] == 16 + 2, (info, st)
            finally:
                await end_client(client)
            main_pid = d.notify.messages[-1].pid  # the daemon under strace
            os.kill(main_pid, signal.SIGTERM)
            await d.notify.wait_for("STOPPING=1")
            with trio.fail_after(30):
                await d.proc.wait()
            assert d.proc.returncode == 0, d.log_text()
        # strace -c: "% time  seconds  usecs/call  calls  [errors]  syscall" rows, then a total
        rows = re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+\d+\s+(?:\d+\s+)?(\w+)$", trace.read_text(), re.M)
        used = set(rows) - {"total"}
        assert {"mount", "umount2", "process_vm_readv", "pidfd_getfd", "ioctl"} <= used, used
        assert used - unit_allowed_syscalls() == set()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- the control socket's command registry ----------------------------------------------------------
async def test_control_commands_registry(daemon) -> None:
    base = scratch_dir()
    listener = service.ControlListener(str(base / "control.sock"))
    calls = []

    def echo(dmn, req: dict) -> dict:
        calls.append(dmn)
        return {"echo": req.get("value")}

    async def refuse(dmn, req: dict) -> None:
        await trio.sleep(0)
        raise service.ControlError("not today")

    service.control.register("test-echo", echo)
    service.control.register("test-refuse", refuse)
    try:
        with pytest.raises(ValueError):
            service.control.register("test-echo", echo)
        listener.bind()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.serve_control, daemon, listener)
            path = str(base / "control.sock")

            def ask(req: dict) -> object:
                return service.request(path, req)

            assert await trio.to_thread.run_sync(ask, {"cmd": "test-echo", "value": [1, "x"]}) == {"echo": [1, "x"]}
            assert calls == [daemon]
            with pytest.raises(service.ControlError, match="not today"):
                await trio.to_thread.run_sync(ask, {"cmd": "test-refuse"})
            with pytest.raises(service.ControlError, match="unknown command 'nope'.*test-echo"):
                await trio.to_thread.run_sync(ask, {"cmd": "nope"})
            with pytest.raises(service.ControlError, match='"cmd"'):
                await trio.to_thread.run_sync(ask, {"command": "status"})
            assert "status" in await trio.to_thread.run_sync(ask, {"cmd": "commands"})
            st = await trio.to_thread.run_sync(ask, {"cmd": "status"})
            assert st["contexts"] == [] and st["daemon"]["mountpoint"] == daemon.mountpoint
            assert service.format_status(st)

            def raw(data: bytes) -> bytes:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(10)
                    s.connect(path)
                    s.sendall(data)
                    return s.makefile("rb").readline()

            reply = json.loads(await trio.to_thread.run_sync(raw, b"{not json\n"))
            assert reply["ok"] is False and reply["error"].startswith("bad request")
            nursery.cancel_scope.cancel()
        # a second daemon refuses the socket while this one listens...
        with pytest.raises(service.StartupError, match="in use"):
            service.ControlListener(path).bind()
        listener.close()
        assert not os.path.exists(path)
        # ... and replaces one that a killed daemon left behind
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(path)
        again = service.ControlListener(path)
        again.bind()
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        finally:
            again.close()
        assert not os.path.exists(path)
    finally:
        service.control.unregister("test-echo")
        service.control.unregister("test-refuse")
        listener.close()
        shutil.rmtree(base, ignore_errors=True)


# -- sd_notify and the watchdog variables ----------------------------------------------------------
def test_notify_to_an_abstract_socket() -> None:
    name = f"icuse-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        env = {"NOTIFY_SOCKET": "@" + name}
        n = service.Notifier.from_environ(env)
        assert n.enabled and "NOTIFY_SOCKET" not in env  # unset for anything we start
        assert n.notify("READY=1", "STATUS=x y")
        assert s.recv(100) == b"READY=1\nSTATUS=x y"
        n.close()
    assert not service.Notifier(None).notify("READY=1")
    assert not service.Notifier("vsock:2:1234").enabled  # not supported: no notification


def test_watchdog_variables() -> None:
    me = str(os.getpid())
    assert service.watchdog_usec({"WATCHDOG_USEC": "400000"}) == 400000
    assert service.watchdog_usec({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": me}) == 400000
    assert service.watchdog_usec({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None
    assert service.watchdog_usec({"WATCHDOG_USEC": "junk"}) is None
    assert service.watchdog_usec({}) is None


# -- logging -------------------------------------------------------------------------------
LOG_SCRIPT = """
import logging, sys
from iommufd_cuse.cli import setup_logging
setup_logging("debug")
log = logging.getLogger("iommufd_cuse.test")
log.debug("dbg")
log.warning("careful")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("boom")
"""


def test_logging_is_journal_friendly(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    with open(out, "wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "INVOCATION_ID": "0" * 32}
        subprocess.run([sys.executable, "-c", LOG_SCRIPT], stderr=f, env=env, check=True)
    lines = out.read_text().splitlines()
    assert lines[0] == "<7>DEBUG iommufd_cuse.test: dbg"
    assert lines[1] == "<4>WARNING iommufd_cuse.test: careful"
    assert lines[2].startswith("<3>ERROR iommufd_cuse.test: boom | Traceback") and "ZeroDivisionError" in lines[2]
    assert len(lines) == 3
    # at a terminal or in a file: timestamps, no priority prefix
    p = subprocess.run(
        [sys.executable, "-c", LOG_SCRIPT],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")},
    )
    first = p.stderr.splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ DEBUG iommufd_cuse.test: dbg$", first), first


# -- install / uninstall and the configuration path ------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe(), *args], capture_output=True, text=True, timeout=60)


def test_install_and_uninstall_in_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    unit = root / "etc/systemd/system/iommufd-cuse.service"
    cfg = root / "etc/iommufd-cuse/config.toml"
    p = cli("install", "--root", str(root))
    assert p.returncode == 0, p.stderr
    assert "systemctl daemon-reload && systemctl enable --now iommufd-cuse.service" in p.stdout
    # ExecStart is this installation's console script
    assert unit_settings(unit.read_text())["ExecStart"] == [f"{EXE.resolve()} serve"]
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert cfg.read_text() == config.installed_text()
    assert config.load(str(cfg)).nodes == config.load(None).nodes
    # again: nothing changes, an existing configuration is never overwritten
    cfg.write_text(cfg.read_text() + "# mine\n")
    p = cli("install", "--root", str(root))
    assert p.returncode == 0 and f"unchanged {unit}" in p.stdout and f"kept the existing {cfg}" in p.stdout
    assert cfg.read_text().endswith("# mine\n")
    # uninstall keeps the changed configuration
    p = cli("uninstall", "--root", str(root))
    assert p.returncode == 0, p.stderr
    assert not unit.exists() and cfg.exists() and f"kept {cfg}: it was changed" in p.stdout
    # an untouched installation goes away completely (but /etc/systemd/system stays)
    cfg.unlink()
    assert cli("install", "--root", str(root)).returncode == 0
    p = cli("uninstall", "--root", str(root))
    assert p.returncode == 0, p.stderr
    assert not unit.exists() and not cfg.parent.exists() and unit.parent.is_dir()
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "etc",
        "etc/systemd",
        "etc/systemd/system",
    ]


def test_uninstall_refuses_an_enabled_unit_and_keeps_a_foreign_one(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert cli("install", "--root", str(root)).returncode == 0
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "iommufd-cuse.service").symlink_to("/etc/systemd/system/iommufd-cuse.service")
    p = cli("uninstall", "--root", str(root))
    assert p.returncode == 1 and "systemctl disable --now iommufd-cuse.service" in p.stderr
    assert (root / "etc/systemd/system/iommufd-cuse.service").exists()
    (wants / "iommufd-cuse.service").unlink()
    unit = root / "etc/systemd/system/iommufd-cuse.service"
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restart=always"))
    p = cli("uninstall", "--root", str(root))
    assert p.returncode == 0 and unit.exists() and "not the unit install writes" in p.stdout


def test_install_command_resolution(tmp_path: Path) -> None:
    assert install.default_command(str(EXE)) == str(EXE.resolve())
    assert install.render_unit("/opt/x/bin/iommufd-cuse").count("ExecStart=/opt/x/bin/iommufd-cuse serve\n") == 1
    # not run through the console script: the console script on PATH, or python -m
    cmd = install.default_command("/somewhere/cli.py")
    assert cmd.endswith("iommufd-cuse") or cmd.endswith("-m iommufd_cuse.cli")


def test_serve_reads_the_system_configuration_only_if_it_exists(tmp_path: Path) -> None:
    system = tmp_path / "config.toml"
    assert config.serve_config_path(None, default=str(system)) is None  # the embedded default
    system.write_text(config.installed_text())
    assert config.serve_config_path(None, default=str(system)) == str(system)
    assert config.serve_config_path("/given.toml", default=str(system)) == "/given.toml"
    assert config.serve_config_path(None) in (None, config.DEFAULT_CONFIG_PATH)


def test_status_without_a_daemon_is_a_clear_error(tmp_path: Path) -> None:
    p = cli("status", "--control-socket", str(tmp_path / "none.sock"))
    assert p.returncode == 1
    assert p.stderr.startswith("iommufd-cuse: error:") and "is the daemon running" in p.stderr


async def test_set_driver_over_the_control_socket() -> None:
    """The runtime driver change: a DMA driver on a member of a group makes the group
    not viable for userspace, and is refused while the group is user-owned."""
    async with served() as d:
        await d.notify.wait_for("READY=1", timeout=20)

        async def set_driver(bdf: str, driver: str) -> subprocess.CompletedProcess:
            argv = [exe(), "set-driver", "--control-socket", str(d.control), bdf, driver]
            with trio.fail_after(20):
                return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)

        p = await set_driver("0000:00:06.1", "e1000e")
        assert p.returncode == 0, p.stderr.decode()
        assert "driver e1000e (group 6)" in p.stdout.decode()
        st = await status_json(d)
        assert {x["bdf"]: x["driver"] for x in st["devices"]}["0000:00:06.1"] == "e1000e"
        # group 6 now has a kernel DMA user: binding its other member is EPERM
        fd = await trio.to_thread.run_sync(Iommufd.open, d.base / "dev" / "iommu")
        from iommufd_cuse.client import VfioDevice

        dev = await trio.to_thread.run_sync(VfioDevice.open, d.base / "dev" / "vfio" / "devices" / "vfio2")
        try:
            r = await trio.to_thread.run_sync(
                lambda: dev.raw(uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.vfio_device_bind_iommufd, iommufd=fd.fd)
            )
            assert r.errno == errno.EPERM
            # back to no driver: the group is viable again and the bind works
            assert (await set_driver("0000:00:06.1", "none")).returncode == 0
            devid = await trio.to_thread.run_sync(dev.bind, fd.fd)
            assert devid > 0
            # while user-owned, a DMA driver on the other member is refused (EBUSY)
            p = await set_driver("0000:00:06.1", "e1000e")
            assert p.returncode == 1 and "Device or resource busy" in p.stderr.decode()
            p = await set_driver("0000:00:06.1", "pci-stub")  # a non-DMA driver is fine
            assert p.returncode == 0
            p = await set_driver("0000:09:00.0", "none")
            assert p.returncode == 1 and "no device" in p.stderr.decode()
        finally:
            await trio.to_thread.run_sync(dev.close)
            await trio.to_thread.run_sync(fd.close)
        await stop(d)
