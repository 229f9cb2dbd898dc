"""The selftest object (struct selftest_obj: a mock device bound to the context)
and one IOMMU_TEST_CMD in flight, which every op takes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ...errors import Errno
from .. import device as device_mod
from ..object import Context, Object, ObjType, Ucmd
from ..viommu import remove_vdev
from .mock import MockDev, mock_dev_destroy
from .pasid import _pasid_detach

log = logging.getLogger(__name__)


# -- the selftest object ---------------------------------------------------------------------
class SelftestObj(Object):
    """struct selftest_obj (TYPE_IDEV): a mock device bound to the context. Destroying
    it detaches and unbinds the device, then removes the device."""

    type = ObjType.SELFTEST

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.idev: device_mod.Idev | None = None
        self.mdev: MockDev | None = None

    @property
    def device(self) -> MockDev | None:  # for `iommufd-cuse status`
        return self.mdev

    def destroy(self) -> None:
        if self.idev is not None:
            for pasid in list(self.idev.igroup.pasids):
                _pasid_detach(self.idev, pasid)
            _unbind(self.idev)
            self.idev = None
        if self.mdev is not None:
            mock_dev_destroy(self.mdev)
            self.mdev = None

    def abort(self) -> None:
        """Creation failed: the handler has undone what it set up."""


def _unbind(idev: device_mod.Idev) -> None:
    """iommufd_device_unbind without awaiting (from a destroy)."""
    remove_vdev(idev)
    device_mod.detach_sync(idev)
    idev.users -= 1
    if idev.ctx.closed or idev.id not in idev.ctx.objects:
        return
    try:
        idev.ctx.remove(idev.id)
    except Errno:
        # Some call in flight still holds it: the context's release takes it.
        log.warning("mock device %r still in use at unbind", idev)


def _get_selftest_obj(ctx: Context, obj_id: int) -> SelftestObj:
    return ctx.get(obj_id, ObjType.SELFTEST)


# -- one test command ----------------------------------------------------------------------------
@dataclass
class SelftestCall:
    """An IOMMU_TEST_CMD in flight: the ucmd and the op's union member (arg)."""

    ucmd: Ucmd
    op: int
    id: int
    arg: Any
    struct: Any

    @property
    def ctx(self) -> Context:
        return self.ucmd.ctx

    @property
    def system(self) -> Any:
        return self.ucmd.ctx.system

    def respond(self) -> None:
        """iommufd_ucmd_respond(ucmd, sizeof(*cmd)): the whole struct goes back."""
        cmd = self.ucmd.cmd
        data = self.struct.pack(self.arg)
        cmd.data = data + bytes(cmd.data[len(data) :])
        self.ucmd.respond()
