"""The FUSE side of the daemon, end to end: the node tree a user sees (readdir, stat,
permissions), file operations other than ioctl, and the daemon's life cycle as an
operator runs it (`iommufd-cuse serve`: SIGTERM, a taken node path, a crashed run).

Filesystem calls on the in-process daemon's mount run in worker threads: the daemon
answers on this test's trio loop, which must keep running meanwhile.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from clientkit import NOBODY, config_daemon, mismatches, parse_steps
from harness import run, scratch_dir

OTHER = 65533  # a uid/gid that owns nothing


def node(daemon, name: str = "iommu") -> Path:
    return Path(daemon.dev_dir) / name


# -- what the mount shows -------------------------------------------------------------------


async def test_readdir_lists_the_nodes(daemon) -> None:
    """Every directory of the mount lists exactly the daemon's nodes in it."""
    mnt = Path(daemon.mountpoint)
    assert {"iommu", "vfio"} <= set(await trio.to_thread.run_sync(os.listdir, mnt))
    assert "vfio" in await trio.to_thread.run_sync(os.listdir, mnt / "vfio")
    for n in daemon.tree.root.walk():
        if not n.is_dir:
            continue
        d = mnt / n.path()
        listed = await trio.to_thread.run_sync(
            lambda d=d: {e.name: e.is_dir(follow_symlinks=False) for e in os.scandir(d)}
        )
        assert listed == {c.name: c.is_dir for c in n.children.values() if c.visible()}, d


async def test_links_point_into_the_mount(daemon) -> None:
    files = [n.path() for n in daemon.dev_nodes()]
    assert {"iommu", "vfio/vfio"} <= set(files)
    for name in files:
        link = node(daemon, name)
        assert link.is_symlink()
        assert os.readlink(link) == os.path.join(daemon.mountpoint, name)


async def test_stat_shows_default_mode_and_owner(daemon) -> None:
    st = await trio.to_thread.run_sync(os.stat, node(daemon))
    assert stat.S_ISREG(st.st_mode)  # a FUSE file cannot be a working char device
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, 0)  # the kernel's misc device
    st = await trio.to_thread.run_sync(os.stat, node(daemon, "vfio/vfio"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o666, 0, 0)
    st = await trio.to_thread.run_sync(os.stat, daemon.mountpoint)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755


async def test_stat_shows_configured_mode_and_owner() -> None:
    toml = (
        f'[nodes.iommu]\nmode = "0640"\nowner = {NOBODY}\ngroup = {OTHER}\n'
        f'[nodes.vfio]\nmode = "0604"\nowner = "root"\ngroup = {NOBODY}\n'
    )
    async with config_daemon(toml) as d:
        st = await trio.to_thread.run_sync(os.stat, node(d))
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, NOBODY, OTHER)
        st = await trio.to_thread.run_sync(os.stat, node(d, "vfio/vfio"))
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o604, 0, NOBODY)


# -- who may open /dev/iommu ---------------------------------------------------------------


def _toml(mode: str, owner: int = 0, group: int = 0) -> str:
    return f'[nodes.iommu]\nmode = "{mode}"\nowner = {owner}\ngroup = {group}\n'


PERMISSIONS = [
    # (config, user (uid = gid), open mode, outcome): the kernel's DAC rules
    (None, NOBODY, "open_rdwr", "EACCES"),  # root:root 0660
    (None, 0, "open_rdwr", "OK"),
    (_toml("0666"), NOBODY, "open_rdwr", "OK"),
    (_toml("0660", 0, NOBODY), NOBODY, "open_rdwr", "OK"),  # by group
    (_toml("0660", 0, NOBODY), OTHER, "open_rdwr", "EACCES"),
    (_toml("0600", NOBODY, NOBODY), NOBODY, "open_rdwr", "OK"),  # by owner
    (_toml("0600", NOBODY, NOBODY), OTHER, "open_rdwr", "EACCES"),
    (_toml("0606", NOBODY, NOBODY), NOBODY, "open_rdwr", "OK"),
    (_toml("0066", NOBODY, OTHER), NOBODY, "open_rdwr", "EACCES"),  # the owner's bits decide
    (_toml("0640", 0, NOBODY), NOBODY, "open_rdonly", "OK"),
    (_toml("0640", 0, NOBODY), NOBODY, "open_rdwr", "EACCES"),
    (_toml("0640", 0, NOBODY), NOBODY, "open_wronly", "EACCES"),
    (_toml("0000"), 0, "open_rdwr", "OK"),  # root overrides DAC (CAP_DAC_OVERRIDE)
]


@pytest.mark.parametrize("toml, user, scenario, outcome", PERMISSIONS)
async def test_open_permissions(cbuild, toml: str | None, user: int, scenario: str, outcome: str) -> None:
    exe = cbuild("iommufd_rules")
    async with config_daemon(toml or "") as d:
        p = await run([exe, node(d), scenario], user=None if user == 0 else user)
    steps = parse_steps(p.stdout)
    assert steps["open"].outcome == outcome
    if outcome == "OK":
        # whatever the open mode, ioctl works (iommufd checks no f_mode)
        assert steps["alloc"].outcome == "OK" and steps["alloc"]["id"] == "1"


# -- file operations other than ioctl ------------------------------------------------------


async def test_read_write_are_einval(daemon, cbuild) -> None:
    """iommufd has no read or write: the kernel answers EINVAL."""
    p = await run([cbuild("iommufd_rules"), node(daemon), "fileops"])
    steps = parse_steps(p.stdout)
    problems = mismatches(
        steps,
        {
            "read": "EINVAL",
            "write": "EINVAL",
            "lseek": "ESPIPE",  # no llseek either
            "mmap_shared": "ENODEV",
            "alloc_after_fileops": "OK",
        },
    )
    assert not problems, "\n".join(problems)
    # Known divergences of FUSE itself, which the daemon never sees and cannot change:
    # read() of 0 bytes returns 0 (kernel: EINVAL), pread/pwrite are ESPIPE on a
    # nonseekable FUSE file (kernel: EINVAL), and a MAP_PRIVATE mmap succeeds on a
    # direct-io file (kernel: ENODEV).


async def test_poll_on_iommu_is_always_ready(daemon, cbuild) -> None:
    """iommufd has no poll: the kernel's poll() reports the default mask at once
    (POLLIN|POLLOUT|POLLRDNORM|POLLWRNORM), so a client that polls it never blocks."""
    p = await run([cbuild("iommufd_rules"), node(daemon), "fileops"])
    s = parse_steps(p.stdout)["poll"]
    want = select.POLLIN | select.POLLOUT
    assert (s.rc, int(s["revents"], 0)) == (1, want), (
        f"DAEMON BUG: poll() on /dev/iommu gave rc={s.rc} revents={s['revents']}, the kernel gives "
        f"rc=1 revents={want:#x}: FileHandle.poll returns 0 (never ready) for files that have no poll"
    )


# -- the daemon as an operator runs it --------------------------------------------------------


def _daemon_cmd(base: Path) -> list[str]:
    exe = Path(sys.executable).parent / "iommufd-cuse"
    prog = [str(exe)] if exe.exists() else [sys.executable, "-m", "iommufd_cuse.cli"]
    return [*prog, "serve", "--dev-dir", str(base / "dev"), "--mountpoint", str(base / "mnt"), "--log-level", "warning"]


STARTED: list[subprocess.Popen] = []  # daemons of the running test, reaped by the `base` fixture


def _start(base: Path) -> subprocess.Popen:
    """`iommufd-cuse serve` on base/dev and base/mnt, told to sd_notify base/notify.sock."""
    (base / "dev").mkdir(exist_ok=True)  # like /dev, it exists before the daemon
    sock_path = base / "notify.sock"
    if not sock_path.exists():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        _NOTIFY[base] = sock
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
    proc = subprocess.Popen(_daemon_cmd(base), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    STARTED.append(proc)
    return proc


_NOTIFY: dict[Path, socket.socket] = {}


def _wait_ready(base: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    """Serving, and done starting up (READY=1, when the daemon speaks sd_notify)."""
    _wait_serving(base, proc, timeout)
    sock = _NOTIFY[base]
    sock.settimeout(5)
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
    except TimeoutError:
        pass  # a daemon that does not notify: serving is all we can know


def _fuse_connections(pid: int) -> set[str]:
    """The FUSE connection ids of the /dev/fuse fds a process holds (from fdinfo)."""
    conns = set()
    for fdinfo in Path(f"/proc/{pid}").glob("task/*/fdinfo/*"):
        try:
            for line in fdinfo.read_text().splitlines():
                if line.startswith("fuse_connection:"):
                    conns.add(line.split()[1])
        except OSError:
            pass
    return conns


def _kill_and_reap(proc: subprocess.Popen, timeout: float = 5) -> bool:
    """SIGKILL proc and wait for it; True if it died. A daemon stuck in a request on its own
    mount cannot die: its connection is then aborted (fusectl) so that it does not stay."""
    conns = _fuse_connections(proc.pid)
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        fusectl = Path("/sys/fs/fuse/connections")
        if not any(fusectl.iterdir()):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(fusectl)], check=False)
        for c in conns | _fuse_connections(proc.pid):
            try:
                (fusectl / c / "abort").write_text("1")
            except OSError:
                pass
        proc.wait(timeout=10)
        return False


def _mounted(mnt: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


def _wait_serving(base: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    link = base / "dev" / "iommu"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited {proc.returncode}: {proc.communicate()[1]}"
        try:
            # an open reaches the daemon (a stat may be answered from the kernel's cache)
            os.close(os.open(link, os.O_RDONLY))
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError("daemon did not come up")


def _client(cbuild, base: Path, scenario: str = "ids") -> dict:
    p = subprocess.run(
        [str(cbuild("iommufd_rules")), str(base / "dev" / "iommu"), scenario], capture_output=True, timeout=20
    )
    assert p.returncode == 0, p.stderr
    return parse_steps(p.stdout)


@pytest.fixture
def base():
    d = scratch_dir()
    yield d
    while STARTED:
        _kill_and_reap(STARTED.pop())
    sock = _NOTIFY.pop(d, None)
    if sock is not None:
        sock.close()
    mnt = d / "mnt"
    if _mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(cbuild, base: Path, signum: int) -> None:
    proc = _start(base)
    try:
        _wait_ready(base, proc)
        assert _client(cbuild, base)["alloc_a"].outcome == "OK"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not _mounted(base / "mnt")
    assert os.listdir(base / "dev") == []  # the links and the vfio/ directory it made are gone


def test_sigterm_with_a_client_in_the_middle(cbuild, base: Path) -> None:
    """A client looping on ioctls does not keep the daemon from stopping; its next
    ioctl fails, and once it is gone nothing is left mounted."""
    proc = _start(base)
    client = None
    try:
        _wait_ready(base, proc)
        client = subprocess.Popen(
            [str(cbuild("iommufd_rules")), str(base / "dev" / "iommu"), "loop"], stdout=subprocess.PIPE, text=True
        )
        for line in client.stdout:
            if line.startswith("STEP looping"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        out, _ = client.communicate(timeout=15)
        assert client.returncode == 3, out  # it saw its ioctl fail
        assert "STEP lost" in out
    finally:
        for p in (proc, client):
            if p is not None and p.poll() is None:
                p.kill()
    assert not _mounted(base / "mnt")
    assert os.listdir(base / "dev") == []


def test_node_path_taken_by_a_regular_file(base: Path) -> None:
    dev = base / "dev"
    dev.mkdir(exist_ok=True)
    taken = dev / "iommu"
    taken.write_text("not ours\n")
    proc = _start(base)
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err  # one line that says what is wrong
    assert errors[0].startswith("iommufd-cuse: error:") and str(taken) in errors[0], err
    assert taken.read_text() == "not ours\n"  # left alone
    assert not _mounted(base / "mnt")


@pytest.mark.parametrize("restart_after", [1.5, 0.1], ids=["after-1.5s", "at-once"])
def test_stale_mount_and_link_of_a_killed_daemon_are_cleaned(cbuild, base: Path, restart_after: float) -> None:
    """A crashed daemon leaves a dead mount and its links; the next start removes them and
    serves. "at-once" is how systemd restarts a failed unit (RestartSec defaults to 100 ms)."""
    proc = _start(base)
    _wait_ready(base, proc)
    assert _kill_and_reap(proc), "the SIGKILLed daemon did not die (see test_sigkill_during_startup)"
    # what SIGKILL leaves: a dead mount (ENOTCONN) and the links into it
    assert _mounted(base / "mnt")
    assert (base / "dev" / "iommu").is_symlink()
    with pytest.raises(OSError) as e:
        os.open(base / "dev" / "iommu", os.O_RDWR).close()
    assert e.value.errno == errno.ENOTCONN

    time.sleep(restart_after)
    proc = _start(base)
    try:
        try:
            _wait_ready(base, proc)
        except AssertionError as e:
            raise AssertionError(
                "DAEMON BUG: the next start does not clean up the dead mount. Daemon.check_and_clean() "
                "calls os.makedirs(mountpoint, exist_ok=True) first, which raises FileExistsError on a "
                "dead FUSE mount (isdir() gets ENOTCONN); within the attribute timeout (1 s) os.stat() "
                f"is answered from the kernel's cache and the dead mount is taken for a live one. {e}"
            ) from None
        assert _client(cbuild, base)["alloc_a"].outcome == "OK"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not _mounted(base / "mnt")
    assert os.listdir(base / "dev") == []


def test_sigkill_during_startup(base: Path) -> None:
    """SIGKILL, whenever it comes, ends the daemon. (A daemon that makes FUSE requests on its
    own mount cannot die while one of them is pending: the thread waits for an answer only
    the dead main thread could give, and the connection is not aborted before every thread
    has closed /dev/fuse. The kernel then keeps the process in D state for good.)"""
    stuck = []
    for attempt in range(1, 6):
        proc = _start(base)
        link = base / "dev" / "iommu"
        deadline = time.monotonic() + 20
        while not link.is_symlink() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0002)
        time.sleep(attempt * 0.001)  # into the start-up work that follows the links
        STARTED.remove(proc)
        if not _kill_and_reap(proc, timeout=1.5):
            stuck.append(attempt)
        if _mounted(base / "mnt"):
            subprocess.run(["umount", "-l", str(base / "mnt")], check=False)
        for leftover in (link, base / "dev" / "vfio"):
            if leftover.is_symlink():
                leftover.unlink()
            elif leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
    assert not stuck, (
        f"DAEMON BUG: SIGKILLed during start-up (attempts {stuck}), the daemon stayed in D state until "
        "its FUSE connection was aborted: service.wait_ready() runs probe_node() -- open/ioctl/close "
        "of its own node -- in a worker thread of the daemon process itself"
    )
