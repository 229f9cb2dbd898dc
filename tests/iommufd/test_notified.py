"""Files handed back by seccomp user notification (`iommufd-cuse run`): a static C client
and a Python client (no companion either) get a device file and a fault queue's file
and use them; files not ours get the kernel's answers; a caller killed between the
notification and the answer leaves nothing."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from clientkit import parse_steps
from harness import NOBODY, run, scratch_dir

from iommufd_cuse.iommufd import companion
from iommufd_cuse.iommufd.fault import FaultFile
from iommufd_cuse.transport import usernotif
from iommufd_cuse.vfio.group import GroupDeviceFile

EXE = Path(sys.executable).parent / "iommufd-cuse"
BDF, GROUP = "0000:00:04.0", "4"


@pytest.fixture(scope="session")
def static_client(cbuild) -> Path:  # noqa: ANN001
    return cbuild("handed_back", cflags=("-static",))


def in_run(daemon, *argv):  # noqa: ANN001, ANN201
    return [EXE, "run", "--no-companion", "--mountpoint", daemon.mountpoint, "--", *argv]


def outcome(steps, name):  # noqa: ANN001, ANN201
    return steps[name].rc, steps[name].errno


async def nothing_left(daemon) -> None:  # noqa: ANN001
    """Every context, group owner, handed-back file and token of the client is gone
    (releases are asynchronous: wait for them)."""
    system = daemon.system
    with trio.fail_after(10):
        while (
            system.contexts
            or any(g.owner is not None or g.vfio.opened_file is not None for g in system.groups.values())
            or any(isinstance(h, (GroupDeviceFile, FaultFile)) for h in daemon.server.handles.values())
        ):
            await trio.sleep(0.02)
    assert not any(system.pending_files.values())


def check_handed_back(s) -> None:  # noqa: ANN001
    """The steps of handed_back.c, whichever way its files came."""
    assert s["get_device_fd"].rc >= 3
    assert s["device_cloexec"]["set"] == "1"
    assert outcome(s, "device_info") == (0, 0) and s["device_info"]["regions"] == "9"
    assert s["edu_id"]["id"] == "0x10000ed"
    assert outcome(s, "fault_alloc") == (0, 0) and int(s["fault_alloc"]["fd"]) >= 3
    assert s["fault_cloexec"]["set"] == "1"
    assert s["fault_poll"]["revents"] == hex(0x4)  # POLLOUT only: no fault queued
    assert outcome(s, "fault_read_empty") == (0, 0)
    assert outcome(s, "fault_read_partial") == (-1, errno.ESPIPE)  # not whole records, as the kernel
    assert outcome(s, "fault_destroy_open") == (-1, errno.EBUSY)  # the file holds the fault
    assert outcome(s, "fault_destroy_closed") == (0, 0)
    assert outcome(s, "fault_alloc_bad_flags") == (-1, errno.EOPNOTSUPP)
    assert outcome(s, "fault_alloc_bad_pointer") == (-1, errno.EFAULT)
    # not files of ours: what the kernel answers for them
    assert outcome(s, "fault_alloc_devnull") == (-1, errno.ENOTTY)
    assert outcome(s, "fault_alloc_bad_fd") == (-1, errno.EBADF)
    assert outcome(s, "get_device_fd_devnull") == (-1, errno.ENOTTY)
    assert outcome(s, "get_device_fd_on_iommufd") == (-1, errno.ENOTTY)


async def test_static_client_gets_and_uses_handed_back_files(daemon, static_client):
    # Through a shell that forks: the filter is inherited by children.
    p = await run(in_run(daemon, "sh", "-c", '"$0" "$@"; exit $?', static_client, "/dev", GROUP, BDF))
    check_handed_back(parse_steps(p.stdout))
    await nothing_left(daemon)


async def test_same_answers_through_the_companion(daemon, cbuild):
    """The dynamic build with the companion, outside run: the same handler and hand_back()."""
    exe = cbuild("handed_back")
    out = await run([EXE, "companion"])
    env = dict(os.environ, LD_PRELOAD=out.stdout.decode().strip())
    p = await run([exe, daemon.dev_dir, GROUP, BDF], env=env)
    check_handed_back(parse_steps(p.stdout))
    await nothing_left(daemon)


async def test_without_run_or_companion_eopnotsupp_logged(daemon, static_client, caplog):
    caplog.set_level(logging.WARNING)
    p = await run([static_client, daemon.dev_dir, GROUP, BDF], check=False)
    s = parse_steps(p.stdout)
    assert outcome(s, "get_device_fd") == (-1, errno.EOPNOTSUPP)
    msg = next(r.getMessage() for r in caplog.records if "VFIO_GROUP_GET_DEVICE_FD" in r.getMessage())
    assert "LD_PRELOAD" in msg and "iommufd-cuse run" in msg
    await nothing_left(daemon)


async def test_no_new_privs_and_filter_under_run(daemon):
    p = await run(in_run(daemon, "grep", "-E", "^(NoNewPrivs|Seccomp):", "/proc/self/status"))
    fields = dict(line.split(":\t") for line in p.stdout.decode().splitlines())
    assert fields == {"NoNewPrivs": "1", "Seccomp": "2"}
    p = await run(
        [EXE, "run", "--no-seccomp", "--mountpoint", daemon.mountpoint, "--", "grep", "Seccomp:", "/proc/self/status"]
    )
    assert p.stdout.decode().split() == ["Seccomp:", "0"]


async def test_setuid_cmd_runs_without_its_privilege(daemon):
    """no_new_privs: a set-uid CMD keeps the caller's ids under the filter (documented)."""
    base = scratch_dir()
    try:
        exe = base / "id"
        shutil.copy("/usr/bin/id", exe)
        os.chown(exe, NOBODY, NOBODY)
        exe.chmod(0o4755)
        p = await run([EXE, "run", "--no-seccomp", "--mountpoint", daemon.mountpoint, "--", exe, "-u"])
        assert p.stdout.decode().strip() == str(NOBODY)  # the set-uid bit works without the filter
        p = await run(in_run(daemon, exe, "-u"))
        assert p.stdout.decode().strip() == "0"
    finally:
        shutil.rmtree(base)


PY_CLIENT = textwrap.dedent(
    """
    import fcntl, os, struct, sys
    from iommufd_cuse import uapi as u
    group, bdf = sys.argv[1], sys.argv[2]
    c = os.open("/dev/vfio/vfio", os.O_RDWR)
    g = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    fcntl.ioctl(g, u.VFIO_GROUP_SET_CONTAINER, struct.pack("i", c))
    fcntl.ioctl(c, u.VFIO_SET_IOMMU, 3)  # VFIO_TYPE1v2_IOMMU
    dev = fcntl.ioctl(g, u.VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\\0"), True)
    print("device", struct.unpack("I", os.pread(dev, 4, 0))[0])
    iommufd = os.open("/dev/iommu", os.O_RDWR)
    buf = bytearray(struct.pack("4I", 16, 0, 0, 0))
    fcntl.ioctl(iommufd, u.IOMMU_FAULT_QUEUE_ALLOC, buf, True)
    size, flags, fault_id, q = struct.unpack("4I", buf)
    print("fault", fault_id, os.read(q, u.iommu_hwpt_pgfault.SIZE) == b"", os.get_inheritable(q))
    """
)


async def test_python_client_without_preload(daemon):
    p = await run(in_run(daemon, sys.executable, "-c", PY_CLIENT, GROUP, BDF))
    lines = p.stdout.decode().splitlines()
    assert lines[0] == f"device {0x010000ED}"
    assert lines[1].split()[0] == "fault" and lines[1].split()[2:] == ["True", "False"]
    await nothing_left(daemon)


def kill_caller(caller) -> None:  # noqa: ANN001
    os.kill(caller.tgid, signal.SIGKILL)


async def wait_gone(caller) -> None:  # noqa: ANN001
    with trio.fail_after(10):
        while caller.listener.id_valid(caller.notif_id):
            await trio.sleep(0.01)


@pytest.mark.parametrize("kind", ["vfio-device", "fault"])
@pytest.mark.parametrize("when", ["before_claim", "before_addfd"])
async def test_caller_killed_between_notification_and_answer(daemon, static_client, monkeypatch, when, kind):
    """The caller dies while the daemon serves its notified GET_DEVICE_FD (or, later,
    FAULT_QUEUE_ALLOC): before the daemon acts (the token), or after the file was claimed
    and before it is installed (ADDFD fails: the daemon's copy is the last, and its
    release closes the device, or drops the queue)."""
    callers = []
    deliver = companion.SeccompCarrier.deliver
    addfd = usernotif.Listener.addfd

    async def deliver_after_kill(self, file_cls, system, obj, caller, returns_fd):  # noqa: ANN001, ANN202
        if file_cls.kind == kind:
            callers.append(caller)
            if when == "before_claim":
                kill_caller(caller)
                await wait_gone(caller)
        return await deliver(self, file_cls, system, obj, caller, returns_fd)

    def addfd_after_kill(self, notif_id, srcfd, send, cloexec=True):  # noqa: ANN001, ANN202
        if when == "before_addfd" and callers:
            kill_caller(callers[0])
            while self.id_valid(notif_id):
                os.sched_yield()
        return addfd(self, notif_id, srcfd, send, cloexec)

    monkeypatch.setattr(companion.SeccompCarrier, "deliver", deliver_after_kill)
    monkeypatch.setattr(usernotif.Listener, "addfd", addfd_after_kill)
    p = await run(in_run(daemon, static_client, "/dev", GROUP, BDF), check=False)
    assert p.returncode == -signal.SIGKILL
    assert len(callers) == 1
    steps = parse_steps(p.stdout)
    if kind == "vfio-device":
        assert "get_device_fd" not in steps
    else:
        assert steps["get_device_fd"].rc >= 3 and "fault_alloc" not in steps
    await nothing_left(daemon)
