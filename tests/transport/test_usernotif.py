"""transport/usernotif.py against the kernel: a real process under the filter, the
daemon's side of the listener (notified only the listed ioctl commands, continue,
answer, ADDFD, id validity once the caller is gone)."""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from iommufd_cuse.errors import Errno
from iommufd_cuse.transport import usernotif

NOTIFIED = 0xC0DE3B01  # any ioctl numbers: the filter knows nothing of iommufd
OTHER = 0xC0DE3B02

CHILD = textwrap.dedent(
    """
    import fcntl, os, socket, sys
    from iommufd_cuse.transport import usernotif
    sock = socket.socket(fileno=int(sys.argv[1]))
    listener = usernotif.install_filter([int(sys.argv[2])], zero_reads=True)
    socket.send_fds(sock, [b"l"], [listener])
    os.close(listener)
    fd = os.open("/dev/null", os.O_RDONLY)
    for line in sys.stdin:
        what, n = line.split()
        cmd = int(n)
        try:
            rc = len(os.read(fd, cmd)) if what == "read" else fcntl.ioctl(fd, cmd, 0)
        except OSError as e:
            rc = -e.errno
        if rc > 2:
            rc = "fd " + os.readlink(f"/proc/self/fd/{rc}")
        print(rc, flush=True)
    """
)


@pytest.fixture
def child():  # noqa: ANN201
    ours, theirs = socket.socketpair()
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(theirs.fileno()), str(NOTIFIED)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    listener = usernotif.Listener(fds[0])
    assert usernotif.is_listener(listener.fd)
    yield p, listener
    p.kill()
    p.wait()
    listener.close()
    ours.close()


def call(p, cmd: int, what: str = "ioctl") -> None:  # noqa: ANN001
    p.stdin.write(f"{what} {cmd}\n")
    p.stdin.flush()


def notification(listener: usernotif.Listener) -> usernotif.Notification:
    assert select.select([listener.fd], [], [], 10)[0]
    n = listener.recv()
    assert n is not None
    return n


def test_only_the_listed_commands_are_notified(child):
    p, listener = child
    call(p, OTHER)  # not listed: the kernel answers at once (ENOTTY for /dev/null)
    assert p.stdout.readline().strip() == str(-errno.ENOTTY)
    call(p, NOTIFIED)
    n = notification(listener)
    assert (n.nr, n.args[1] & 0xFFFFFFFF) == (listener.nr_ioctl, NOTIFIED)
    listener.cont(n.id)  # continued: the kernel's own answer
    assert p.stdout.readline().strip() == str(-errno.ENOTTY)
    call(p, NOTIFIED)
    n = notification(listener)
    listener.fail(n.id, errno.EOPNOTSUPP)
    assert p.stdout.readline().strip() == str(-errno.EOPNOTSUPP)


def test_reads_of_zero_bytes_are_notified_and_no_other(child):
    p, listener = child
    call(p, 1, "read")  # read(fd, buf, 1): not notified, /dev/null answers 0 bytes
    assert p.stdout.readline().strip() == "0"
    call(p, 0, "read")
    n = notification(listener)
    assert (n.nr, n.args[2]) == (listener.nr_read, 0)
    listener.fail(n.id, errno.EINVAL)
    assert p.stdout.readline().strip() == str(-errno.EINVAL)


def test_addfd_send_answers_with_the_new_descriptor(child, tmp_path):
    p, listener = child
    call(p, NOTIFIED)
    n = notification(listener)
    src = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        listener.addfd(n.id, src, send=True)
    finally:
        os.close(src)
    assert p.stdout.readline().strip() == f"fd {tmp_path}"


def test_a_dead_caller_invalidates_its_notification(child):
    p, listener = child
    call(p, NOTIFIED)
    n = notification(listener)
    caller = usernotif.NotifiedCaller(listener, n)
    assert listener.id_valid(n.id)
    caller.check()
    assert caller.tgid == p.pid
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not listener.id_valid(n.id)
    with pytest.raises(Errno) as e:
        caller.check()
    assert e.value.errno == errno.ESRCH
    src = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(Errno) as e:
            listener.addfd(n.id, src, send=True)
        assert e.value.errno == errno.ENOENT  # nothing installed in a process that is gone
    finally:
        os.close(src)
    listener.cont(n.id)  # no one to answer: no error
    # every process of the filter is gone: the listener hangs up
    assert _hup(listener.fd)


def _hup(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(1000))


def test_filter_program_shape():
    prog = usernotif.build_filter([NOTIFIED, NOTIFIED | 1 << 32, OTHER])
    assert len(prog) == 8 * (5 + 2 + 2)  # two distinct commands: the high word is not the kernel's
    with pytest.raises(ValueError):
        usernotif.build_filter([])
