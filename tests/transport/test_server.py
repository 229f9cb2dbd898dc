"""The request loop (transport/server.py) fed through a socket pair: requests are
served round robin across the processes they come from."""

from __future__ import annotations

import os
import socket
import subprocess

import trio

from iommufd_cuse.transport import protocol as P
from iommufd_cuse.transport.nodes import Tree
from iommufd_cuse.transport.server import FuseServer


def statfs_request(unique: int, pid: int) -> bytes:
    return P.IN_HEADER.pack(P.IN_HEADER.size, P.STATFS, unique, 1, 0, 0, pid, 0, 0)


async def test_a_process_with_many_requests_waiting_does_not_starve_another():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    other = subprocess.Popen(["sleep", "30"])  # a second real process for the second queue
    try:
        os.set_blocking(ours.fileno(), False)
        # Five requests of this process are waiting before one of the other's.
        for unique in range(1, 6):
            theirs.send(statfs_request(unique, os.getpid()))
        theirs.send(statfs_request(100, other.pid))
        theirs.send(statfs_request(6, os.getpid()))
        server = FuseServer(Tree())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, ours.fileno())
            order = []
            with trio.fail_after(10):
                while len(order) < 7:
                    await trio.lowlevel.wait_readable(theirs)
                    order.append(P.OUT_HEADER.unpack_from(theirs.recv(4096))[2])
            nursery.cancel_scope.cancel()
        # The other process's request is answered second, not sixth.
        assert order == [1, 100, 2, 3, 4, 5, 6]
    finally:
        other.kill()
        other.wait()
        ours.close()
        theirs.close()
