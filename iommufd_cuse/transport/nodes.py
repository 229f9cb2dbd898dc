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
    opener: Opener | None = None  # None: a directory (or a symlink)
    children: dict[str, Node] = field(default_factory=dict)
    ino: int = 0
    parent: Node | None = None
    target: str | Callable[[], str] | None = None  # a symbolic link's target (or what makes it)
    size: int = 0  # st_size (a file mapped through the page cache faults only below it)
    present: Callable[[], bool] | None = None  # a node that comes and goes (None: always there)

    @property
    def is_link(self) -> bool:
        return self.target is not None

    @property
    def is_dir(self) -> bool:
        return self.opener is None and self.target is None

    @property
    def full_mode(self) -> int:
        if self.is_link:
            return P.S_IFLNK | 0o777
        return (P.S_IFDIR if self.is_dir else P.S_IFREG) | self.mode

    def link_target(self) -> str:
        return self.target() if callable(self.target) else self.target

    def visible(self) -> bool:
        return self.present is None or self.present()

    @property
    def dirent_type(self) -> int:
        return P.DT_LNK if self.is_link else P.DT_DIR if self.is_dir else P.DT_REG

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

    def add(
        self, path: str, mode: int, uid: int = 0, gid: int = 0, opener: Opener | None = None, size: int = 0
    ) -> Node:
        """Add a node at a slash-separated path, making parent directories (0755)."""
        return self._add(path, Node("", mode, uid, gid, opener, size=size))

    def add_dir(self, path: str) -> Node:
        """A directory (0755) at path, made if missing, with its parents."""
        node = self.root
        for d in path.strip("/").split("/"):
            node = node.children.get(d) or self._attach(node, Node(d, 0o755))
        return node

    def add_link(self, path: str, target: str | Callable[[], str], present: Callable[[], bool] | None = None) -> Node:
        """A symbolic link at path to target (relative targets resolve in the mount);
        with present, only while present() is true."""
        return self._add(path, Node("", 0o777, target=target, present=present))

    def add_content(self, path: str, content: Callable[[], bytes], mode: int = 0o444, size: int = 4096) -> Node:
        """A read-only file whose content is content() at each open (sysfs-like:
        stat shows size, whatever the content's length)."""
        return self.add(path, mode, 0, 0, lambda req, flags: ContentFile(content, flags), size=size)

    def _add(self, path: str, node: Node) -> Node:
        *dirs, name = path.strip("/").split("/")
        parent = self.add_dir("/".join(dirs)) if dirs else self.root
        if name in parent.children:
            raise FileExistsError(path)
        node.name = name
        return self._attach(parent, node)

    def _attach(self, parent: Node, node: Node) -> Node:
        node.ino = self._next_ino
        self._next_ino += 1
        node.parent = parent
        parent.children[node.name] = node
        self.by_ino[node.ino] = node
        return node

    def remove(self, node: Node) -> None:
        """Take a file node out (a later lookup is ENOENT, a cached one finds no inode)."""
        if node.parent is not None and node.parent.children.get(node.name) is node:
            del node.parent.children[node.name]
        self.by_ino.pop(node.ino, None)

    def files(self) -> list[Node]:
        return [n for n in self.root.walk() if n.opener is not None]


O_ACCMODE = 3


class ContentFile(FileHandle):
    """A read-only file of content made at open (a sysfs attribute): pread at any offset."""

    open_flags = P.FOPEN_DIRECT_IO

    def __init__(self, content: Callable[[], bytes], flags: int) -> None:
        if flags & O_ACCMODE != 0:
            raise Errno(errno.EACCES)  # no store for this attribute
        self.data = content()

    def read(self, req: Request, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]
