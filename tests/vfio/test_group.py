"""VFIO groups, /dev/vfio/<N> (drivers/vfio/group.c with iommufd's /dev/vfio/vfio),
from a C program written for the legacy group path, with and without the companion."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from clientkit import parse_steps
from harness import run

OK = 0


@pytest.fixture(scope="session")
def companion() -> Path:
    """The companion as the package installs it (`iommufd-cuse companion`)."""
    exe = Path(sys.executable).parent / "iommufd-cuse"
    out = subprocess.run([str(exe), "companion"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def outcome(steps, name):  # noqa: ANN001, ANN201
    return steps[name].rc, steps[name].errno


async def no_owner_left(daemon) -> None:  # noqa: ANN001
    """Releases are asynchronous: wait until every group is the kernel's again."""
    with trio.fail_after(10):
        while any(g.owner is not None for g in daemon.system.groups.values()) or any(
            g.vfio.opened_file is not None or g.vfio.iommufd_fd >= 0 for g in daemon.system.groups.values()
        ):
            await trio.sleep(0.02)


async def test_group_path(daemon, cbuild, companion):
    exe = cbuild("vfio_group")
    env = dict(os.environ, LD_PRELOAD=str(companion))
    cdev = os.path.join(daemon.dev_dir, "vfio/devices/vfio0")
    p = await run([exe, daemon.dev_dir, "4", "0000:00:04.0", "0000:00:05.0", cdev], env=env)
    s = parse_steps(p.stdout)
    assert outcome(s, "open_group") == (s["open_group"].rc, OK)
    assert outcome(s, "open_group_again") == (-1, errno.EBUSY)  # one open at a time
    assert outcome(s, "status_short") == (-1, errno.EINVAL)
    assert s["status"]["flags"] == "1"  # VIABLE, no container
    assert outcome(s, "get_device_no_container") == (-1, errno.EINVAL)
    assert outcome(s, "set_container_bad_fd") == (-1, errno.EBADF)
    assert outcome(s, "set_container_closed_fd") == (-1, errno.EBADF)
    assert outcome(s, "set_container_pipe") == (-1, errno.EBADFD)  # not a container
    assert outcome(s, "set_container_group") == (-1, errno.EBADFD)
    assert outcome(s, "unset_container_none") == (-1, errno.EINVAL)
    assert outcome(s, "api_version") == (0, OK)
    assert outcome(s, "set_iommu_no_group") == (-1, errno.ENODEV)
    assert outcome(s, "set_container") == (0, OK)
    assert outcome(s, "set_container_again") == (-1, errno.EINVAL)
    assert s["status_set"]["flags"] == "3"  # VIABLE | CONTAINER_SET
    assert outcome(s, "set_iommu") == (0, OK)
    assert outcome(s, "map_dma") == (0, OK)
    # vfio_pci_core_match: text after the name that is no space is no match (ENODEV);
    # after a space only "vf_token=<uuid>", which a non-SR-IOV function refuses (EINVAL).
    assert outcome(s, "name_trailing_garbage") == (-1, errno.ENODEV)
    assert outcome(s, "name_unknown_option") == (-1, errno.EINVAL)
    assert outcome(s, "name_vf_token") == (-1, errno.EINVAL)
    assert outcome(s, "name_bad_token") == (-1, errno.EINVAL)
    assert outcome(s, "name_other_group") == (-1, errno.ENODEV)
    assert outcome(s, "name_prefix") == (-1, errno.ENODEV)
    assert outcome(s, "name_null") == (-1, errno.EFAULT)
    assert outcome(s, "name_too_long") == (-1, errno.EINVAL)  # strndup_user(PAGE_SIZE)
    assert outcome(s, "name_runs_into_hole") == (-1, errno.EFAULT)
    assert s["get_device_fd"].rc >= 0 and s["cloexec"]["set"] == "1"
    assert s["get_device_fd_again"].rc >= 0  # the group path may open a device twice
    assert s["device_info"]["regions"] == "9"
    assert outcome(s, "bind_on_group_device") == (-1, errno.EINVAL)  # BIND is for cdev files
    assert outcome(s, "attach_on_group_device") == (-1, errno.ENOTTY)
    assert outcome(s, "bind_cdev_group_open") == (-1, errno.EBUSY)  # vfio_device_block_group
    assert s["edu_id"]["id"] == "0x10000ed"
    assert s["edu_dma"]["same"] == "1"
    assert outcome(s, "reopen_while_devices_open") == (-1, errno.EBUSY)
    assert s["edu_after_group_close"]["id"] == "0x10000ed"
    assert s["reopen_after_close"].rc >= 0
    assert s["status_reopened"]["flags"] == "1"  # the container went with the group file
    assert outcome(s, "set_container_reopened") == (0, OK)
    assert outcome(s, "unset_container") == (0, OK)
    assert outcome(s, "unset_container_again") == (-1, errno.EINVAL)
    assert outcome(s, "unknown_ioctl") == (-1, errno.ENOTTY)
    await no_owner_left(daemon)
    assert not daemon.system.contexts or all(c.closed for c in daemon.system.contexts)
    assert daemon.system.pinned_pages() == 0
    assert not daemon.system.pending_files.get("vfio-device")


async def test_get_device_fd_without_companion(daemon, cbuild, caplog):
    """No way to hand the file back: EOPNOTSUPP after the name was found, logged
    with the two ways to get one; nothing is opened."""
    exe = cbuild("vfio_group")
    cdev = os.path.join(daemon.dev_dir, "vfio/devices/vfio0")
    with caplog.at_level(logging.WARNING):
        p = await run([exe, daemon.dev_dir, "4", "0000:00:04.0", "0000:00:05.0", cdev], check=False)
    s = parse_steps(p.stdout)
    assert outcome(s, "name_trailing_garbage") == (-1, errno.ENODEV)
    assert outcome(s, "get_device_fd") == (-1, errno.EOPNOTSUPP)
    assert "LD_PRELOAD=$(iommufd-cuse companion)" in caplog.text and "iommufd-cuse run" in caplog.text
    await no_owner_left(daemon)


async def test_unknown_group_and_cdev_exclusion(daemon, cbuild):
    """An unknown group has no node; a cdev bound keeps its group from being opened
    (EBUSY), until it is unbound."""
    assert not os.path.lexists(os.path.join(daemon.dev_dir, "vfio/9"))  # groups 4 to 7 exist
    exe = cbuild("group_cdev")
    p = await run([exe, daemon.dev_dir, "4", "0"])
    s = parse_steps(p.stdout)
    assert outcome(s, "bind_cdev") == (0, OK)
    assert outcome(s, "open_group_cdev_bound") == (-1, errno.EBUSY)
    assert s["open_group_after_close"].rc >= 0
    await no_owner_left(daemon)


async def test_group_with_a_dma_driver_member(daemon, cbuild, companion):
    """A member on a DMA-capable kernel driver: the group is not viable, and the
    open of another member's device fails as the bind does (EPERM); the member on
    that driver is no VFIO device of the group (ENODEV)."""
    other = next(d for d in daemon.system.devices if d.bdf == "0000:00:06.1")
    other.bind_driver("e1000e")
    try:
        exe = cbuild("vfio_group")
        env = dict(os.environ, LD_PRELOAD=str(companion))
        cdev = os.path.join(daemon.dev_dir, "vfio/devices/vfio2")
        p = await run([exe, daemon.dev_dir, "6", "0000:00:06.0", "0000:00:06.1", cdev], env=env, check=False)
        s = parse_steps(p.stdout)
        assert s["status"]["flags"] == "0"  # not viable
        assert s["status_set"]["flags"] == "3"  # with iommufd: reported viable once a container is set
        assert outcome(s, "name_other_group") == (-1, errno.ENODEV)  # 06.1 is not vfio-pci's
        assert outcome(s, "get_device_fd") == (-1, errno.EPERM)
        await no_owner_left(daemon)
        assert daemon.system.groups[6].owner_cnt == 1  # the kernel driver's use only
    finally:
        await no_owner_left(daemon)
        other.bind_driver("vfio-pci")


async def test_bind_from_another_mount_namespace(daemon, cbuild):
    """A client in another mount namespace (its own copy of the daemon's mount, with
    another mount id) binds a cdev to its iommufd: files of ours are known by their
    superblock, not by the daemon's mount ids."""
    exe = cbuild("group_cdev")
    p = await run(["unshare", "-m", "--propagation", "private", exe, daemon.mountpoint, "4", "0"])
    s = parse_steps(p.stdout)
    assert outcome(s, "bind_cdev") == (0, OK)
    assert outcome(s, "open_group_cdev_bound") == (-1, errno.EBUSY)
    await no_owner_left(daemon)
