"""The one exception every layer answers a client with: an errno.

The transport turns it into the FUSE reply's error; the iommufd core, the IOMMU
and the device models raise it. It lives apart from both so that neither
imports the other for it.
"""

from __future__ import annotations

import os


class Errno(OSError):
    """An errno answer for the client; cheap to raise on the hot path."""

    def __init__(self, code: int, why: str | None = None) -> None:
        super().__init__(code, why or os.strerror(code))
