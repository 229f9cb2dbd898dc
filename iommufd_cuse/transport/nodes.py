"""The node tree the FUSE file system shows, and what an open node must provide.

The transport knows nothing of iommufd: a file node has an opener that makes a
FileHandle per open; the handle answers ioctl/read/write/poll and release.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import Errno
from . import protocol as P

if TYPE_CHECKING:
    from .server import Request

# A handler returns its answer, or an awaitable of it when it may take long:
# the server then runs it as a task of its own that an interrupt can cancel.
Answer = int | Awaitable[int]


class FileHandle:
    """One open of a file node. Subclasses override what they serve."""

    open_flags = P.FOPEN_DIRECT_IO | P.FOPEN_NONSEEKABLE

    def ioctl(self, req: Request, cmd: int, arg: int) -> Answer:
        raise Errno(errno.ENOTTY)

    def read(self, req: Request, offset: int, size: int) -> bytes | Awaitable[bytes]:
        raise Errno(errno.EINVAL)

    def write(self, req: Request, offset: int, data: bytes) -> Answer:
        raise Errno(errno.EINVAL)

    def poll(self, req: Request, events: int, kh: int | None) -> int:
        """Ready events now; when kh is given, notify the server when that changes.
        A file without a poll operation is always ready (DEFAULT_POLLMASK)."""
        return DEFAULT_POLLMASK

    def release(self) -> Awaitable[None] | None:
        return None


# POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM: what the kernel answers for files without poll
DEFAULT_POLLMASK = 0x1 | 0x4 | 0x40 | 0x100

Opener = Callable[["Request", int], FileHandle]


@dataclass(eq=False)
class Node:
    name: str
    mode: int  # permission bits only
    uid: int = 0
    gid: int = 0
    opener: Opener | None = None  # None: a directory
    children: dict[str, Node] = field(default_factory=dict)
    ino: int = 0
    parent: Node | None = None

    @property
    def is_dir(self) -> bool:
        return self.opener is None

    @property
    def full_mode(self) -> int:
        return (P.S_IFDIR if self.is_dir else P.S_IFREG) | self.mode

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children.values():
            yield from child.walk()

    def path(self) -> str:
        parts: list[str] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))


class Tree:
    """Nodes by inode number; the root is inode 1 as FUSE requires."""

    def __init__(self) -> None:
        self.root = Node("", 0o755)
        self.root.ino = 1
        self.by_ino: dict[int, Node] = {1: self.root}
        self._next_ino = 2

    def add(self, path: str, mode: int, uid: int = 0, gid: int = 0, opener: Opener | None = None) -> Node:
        """Add a node at a slash-separated path, making parent directories (0755)."""
        *dirs, name = path.strip("/").split("/")
        parent = self.root
        for d in dirs:
            parent = parent.children.get(d) or self._attach(parent, Node(d, 0o755))
        if name in parent.children:
            raise FileExistsError(path)
        return self._attach(parent, Node(name, mode, uid, gid, opener))

    def _attach(self, parent: Node, node: Node) -> Node:
        node.ino = self._next_ino
        self._next_ino += 1
        node.parent = parent
        parent.children[node.name] = node
        self.by_ino[node.ino] = node
        return node

    def files(self) -> list[Node]:
        return [n for n in self.root.walk() if not n.is_dir]
