"""Group DMA ownership (drivers/iommu/iommu.c as the DMA-ownership series left it in
mainline; iommufd/device.c; vfio device_cdev.c), between real client processes over
the device cdevs of the default topology: vfio0 (group 4), vfio1 (group 5), and
vfio2 + vfio3 sharing group 6.

The errnos are mainline's: claiming a group owned by another context, or with a
member on a DMA-capable kernel driver, is EPERM (iommu_device_claim_dma_owner; the
issue text said EBUSY, see README "Ownership errnos"); a DMA driver binding to a
member of a user-owned group is EBUSY (iommu_device_use_default_domain); a device
already bound through another open of its cdev is EINVAL (vfio_df_open).
"""

from __future__ import annotations

import errno as E
import os
import signal
from collections.abc import Callable

import pytest
import trio

from iommufd_cuse.config import IommuConfig
from iommufd_cuse.errors import Errno
from iommufd_cuse.iommu.core import Group, Iommu

GROUP6 = 6  # vfio2 (0000:00:06.0) and vfio3 (0000:00:06.1)


def node(daemon, name: str) -> str:
    return os.path.join(daemon.dev_dir, name)


def vfio(daemon, n: int) -> str:
    return node(daemon, f"vfio/devices/vfio{n}")


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """FUSE sends RELEASE after close() or exit returned: poll for its effects."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
    assert predicate(), f"{what}: still not so after {timeout} s"


def with_kernel(group: Group) -> bool:
    """The group is back with the kernel: no owner, no claim, its default domain."""
    return group.owner is None and group.owner_cnt == 0 and group.domain is group.default_domain


class Client:
    """A scripted client process with one iommufd (its context) and device files."""

    def __init__(self, daemon, proc) -> None:  # noqa: ANN001
        self.daemon = daemon
        self.c = proc
        self.iommufd = -1

    @classmethod
    async def start(cls, daemon, scripted) -> Client:  # noqa: ANN001
        self = cls(daemon, await scripted())
        self.iommufd = (await self.c.ok("open", path=node(daemon, "iommu")))["fdnum"]
        return self

    @property
    def ctx(self):  # noqa: ANN201
        """This client's context in the daemon (the one whose opener is this process)."""
        (ctx,) = [x for x in self.daemon.system.contexts if x.opener_pid == self.c.proc.pid]
        return ctx

    async def open(self, n: int, name: str | None = None) -> str:
        name = name or f"vfio{n}"
        await self.c.ok("open_device", path=vfio(self.daemon, n), name=name)
        return name

    async def bind(self, name: str, iommufd: int | None = None) -> int | str:
        """The device id, or the errno's name."""
        r = await self.c.do("call", method="bind", fd=name, iommufd=self.iommufd if iommufd is None else iommufd)
        return r["result"] if r.get("ok") else E.errorcode[r["errno"]]

    async def open_bind(self, n: int) -> int | str:
        return await self.bind(await self.open(n))

    async def close(self, name: str) -> None:
        await self.c.ok("close", name=name)


@pytest.fixture
async def two(daemon, scripted):
    return await Client.start(daemon, scripted), await Client.start(daemon, scripted)


# -- across contexts ---------------------------------------------------------------------------
async def test_group_owned_by_another_context_is_eperm(daemon, two):
    a, b = two
    g6 = daemon.system.groups[GROUP6]
    assert with_kernel(g6)
    assert await a.open_bind(2) == 1
    assert g6.owner is a.ctx and g6.owner_cnt == 1 and g6.domain is g6.blocking_domain
    # the other function of the group, from the other context: EPERM
    assert await b.open_bind(3) == "EPERM"
    assert g6.owner is a.ctx and g6.owner_cnt == 1
    # a group of its own is fine for b
    assert await b.open_bind(0) == 1
    assert daemon.system.groups[4].owner is b.ctx
    # the owner may bind the group's other function too
    assert await a.open_bind(3) == 2
    assert g6.owner_cnt == 2


async def test_device_bound_once(daemon, two):
    """Binding a device bound through another open of its cdev is EINVAL, from the
    same context or another; binding twice on one file is EINVAL."""
    a, b = two
    assert await a.open_bind(0) == 1
    assert await a.bind("vfio0") == "EINVAL"  # the same file again
    await a.open(0, "again")
    assert await a.bind("again") == "EINVAL"  # another open, same context
    await b.open(0, "other")
    assert await b.bind("other") == "EINVAL"  # another open, other context
    # none of that touched the binding
    g4 = daemon.system.groups[4]
    assert g4.owner is a.ctx and g4.owner_cnt == 1 and daemon.system.devices[0].vfio.in_use
    # closing the unbound opens changes nothing; closing the bound one frees the device
    await a.close("again")
    await b.close("other")
    await trio.sleep(0.05)
    assert g4.owner is a.ctx
    await a.close("vfio0")
    await wait_until(lambda: with_kernel(g4), "group 4 back with the kernel")
    await b.open(0, "now")
    assert await b.bind("now") == 1


async def test_group_returns_to_kernel_when_every_device_is_unbound(daemon, two):
    a, b = two
    g6 = daemon.system.groups[GROUP6]
    assert await a.open_bind(2) == 1
    assert await a.open_bind(3) == 2
    await a.close("vfio2")
    await wait_until(lambda: g6.owner_cnt == 1, "vfio2 unbound")
    assert g6.owner is a.ctx  # vfio3 still holds it
    await b.open(2)
    assert await b.bind("vfio2") == "EPERM"
    await a.close("vfio3")
    # the iommufd stays open: the group goes back all the same
    await wait_until(lambda: with_kernel(g6), "group 6 back with the kernel")
    assert GROUP6 not in a.ctx.igroups
    assert await b.bind("vfio2") == 1
    assert await b.open_bind(3) == 2
    assert g6.owner is b.ctx and g6.owner_cnt == 2


async def test_killed_owner_frees_the_group(daemon, two):
    a, b = two
    g6 = daemon.system.groups[GROUP6]
    assert await a.open_bind(2) == 1
    assert await a.c.call("attach", fd="vfio2", pt_id=await a.c.call("ioas_alloc")) == 3
    assert await b.open_bind(3) == "EPERM"
    a.c.proc.send_signal(signal.SIGKILL)
    await a.c.proc.wait()
    await wait_until(lambda: with_kernel(g6), "group 6 back with the kernel")
    assert await b.bind("vfio3") == 1


# -- kernel DMA drivers -------------------------------------------------------------------
async def test_member_on_a_dma_driver_makes_the_group_unclaimable(daemon, two):
    a, _ = two
    dev2, dev3 = daemon.system.devices[2], daemon.system.devices[3]
    g6 = daemon.system.groups[GROUP6]
    dev3.bind_driver("e1000e")  # a DMA-capable kernel driver on 06.1
    try:
        assert g6.owner is None and g6.owner_cnt == 1 and g6.domain is g6.default_domain
        assert await a.open_bind(2) == "EPERM"  # owned by the kernel
        # not on vfio-pci: its cdev has no device behind it (vfio_device_fops_cdev_open)
        assert (await a.c.do("open_device", path=vfio(daemon, 3), name="vfio3")).get("errno") == E.ENODEV
        assert not dev2.vfio.in_use and g6.owner is None and g6.owner_cnt == 1
    finally:
        dev3.bind_driver("vfio-pci")
    assert with_kernel(g6)
    assert await a.bind("vfio2") == 1


async def test_dma_driver_refused_while_the_group_is_user_owned(daemon, two):
    a, _ = two
    dev2, dev3 = daemon.system.devices[2], daemon.system.devices[3]
    g6 = daemon.system.groups[GROUP6]
    assert await a.open_bind(2) == 1
    # the unbound member may not go to a DMA driver: EBUSY, nothing changes
    with pytest.raises(Errno) as e:
        dev3.bind_driver("e1000e")
    assert e.value.errno == E.EBUSY
    assert dev3.driver == "vfio-pci" and g6.owner is a.ctx and g6.owner_cnt == 1
    # nor may the bound one
    with pytest.raises(Errno) as e:
        dev2.bind_driver("e1000e")
    assert e.value.errno == E.EBUSY and dev2.driver == "vfio-pci"
    # a driver that does no DMA (driver_managed_dma) is fine, and so is no driver
    dev3.bind_driver("pci-stub")
    dev3.bind_driver("none")
    dev3.bind_driver("vfio-pci")
    assert g6.owner is a.ctx and g6.owner_cnt == 1
    # once the group is back with the kernel, the DMA driver may bind
    await a.close("vfio2")
    await wait_until(lambda: with_kernel(g6), "group 6 back with the kernel")
    dev3.bind_driver("e1000e")
    try:
        assert g6.owner_cnt == 1 and g6.owner is None
    finally:
        dev3.bind_driver("vfio-pci")
    assert with_kernel(g6)


# -- the Group rules themselves ---------------------------------------------------------------
@pytest.fixture
def group() -> Group:
    return Group(9, Iommu(IommuConfig("t")))


def test_claim_and_release(group):
    a, b = object(), object()
    group.claim_dma_owner(a)
    assert (group.owner, group.owner_cnt, group.domain) == (a, 1, group.blocking_domain)
    group.claim_dma_owner(a)
    assert group.owner_cnt == 2
    with pytest.raises(Errno) as e:
        group.claim_dma_owner(b)
    assert e.value.errno == E.EPERM
    group.release_dma_owner()
    assert (group.owner, group.owner_cnt, group.domain) == (a, 1, group.blocking_domain)
    group.release_dma_owner()
    assert with_kernel(group)


def test_kernel_driver_and_user_exclude_each_other(group):
    a = object()
    group.use_default_domain()
    with pytest.raises(Errno) as e:
        group.claim_dma_owner(a)
    assert e.value.errno == E.EPERM
    group.unuse_default_domain()
    assert with_kernel(group)
    group.claim_dma_owner(a)
    with pytest.raises(Errno) as e:
        group.use_default_domain()
    assert e.value.errno == E.EBUSY
    assert (group.owner, group.owner_cnt) == (a, 1)
    group.release_dma_owner()
    group.use_default_domain()
    group.use_default_domain()  # two kernel drivers on two members
    assert group.owner is None and group.owner_cnt == 2 and group.domain is group.default_domain
