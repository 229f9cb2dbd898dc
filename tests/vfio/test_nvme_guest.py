"""The NVMe controller passed to QEMU (TCG) with a real Linux guest whose own `nvme` driver binds it
(tests/guestkit.py): a 64 MiB pattern written, the page cache dropped, read back and compared — without a
vIOMMU (IOVA = guest physical) and with QEMU's intel-iommu and the guest's `intel_iommu=on`, where every
guest DMA mapping becomes an IOAS_MAP/UNMAP on the daemon. In the same boots: a controller reset by the
driver (sysfs reset_controller), the shutdown notification of the guest's power-off, and (without vIOMMU) a
userspace driver in the guest (tests/clients/guest_nvme.c) that programs a bad PRP, the kernel's driver bound
again, and a guest reboot, after which the driver probes the controller again and finds the data."""

from __future__ import annotations

import shutil

import guestkit
import pytest
from harness import CLIENTS
from test_device_cdev import assert_released

from iommufd_cuse.service import collect_status

NVME_VFIO = 4  # vfio4: the default topology's NVMe controller
MIB = 1 << 20
GIB = 1 << 30
PATTERN_MIB = 64

# The guest's script: find the namespace, write PATTERN_MIB of random data, drop the page cache, read it back
# and compare; then a controller reset, and the comparison again. On the second boot (a marker in the last
# block says so) only the comparison: the data survived the reboot.
SCRIPT = f"""
i=0
while [ ! -b /dev/nvme0n1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/nvme0n1 ] || {{ echo "RESULT probe none"; dmesg | grep -i nvme; exit 1; }}
echo "RESULT probe ok"
echo "RESULT blocks $(cat /sys/block/nvme0n1/size)"
echo "RESULT model $(cat /sys/class/nvme/nvme0/model)"
echo "RESULT serial $(cat /sys/class/nvme/nvme0/serial)"
if [ -n "$NVME_CLI" ]; then
  # nvme-cli, the host's (its root shared by 9p), asks the controller itself by admin passthrough ioctls
  {guestkit.mount_host_root()}
  cli="chroot /host /usr/sbin/nvme"
  $cli id-ctrl /dev/nvme0 > /tmp/id-ctrl; echo "RESULT id_ctrl_rc $?"
  $cli id-ns /dev/nvme0 -n 1 > /tmp/id-ns; echo "RESULT id_ns_rc $?"
  for f in vid sn mn fr nn mdts; do echo "RESULT id_ctrl_$f $(sed -n "s/^$f *: *//p" /tmp/id-ctrl)"; done
  for f in nsze ncap nlbaf; do echo "RESULT id_ns_$f $(sed -n "s/^$f *: *//p" /tmp/id-ns)"; done
  echo "RESULT id_ns_lbaf0 $(sed -n 's/^lbaf *0 *: *//p' /tmp/id-ns)"
  {guestkit.umount_host_root()}
fi
last=$(( $(cat /sys/block/nvme0n1/size) - 1 ))
marker=$(dd if=/dev/nvme0n1 bs=512 skip=$last count=1 2>/dev/null | head -c 8)
if [ "$marker" = "REBOOTED" ]; then
  echo "RESULT boot second"
  dd if=/dev/nvme0n1 of=/tmp/back bs=1M count={PATTERN_MIB} 2>/dev/null
  echo "RESULT md5_after_reboot $(md5sum < /tmp/back | cut -d' ' -f1)"
  exit 0
fi
echo "RESULT boot first"
dd if=/dev/urandom of=/tmp/pat bs=1M count={PATTERN_MIB} 2>/dev/null
echo "RESULT md5 $(md5sum < /tmp/pat | cut -d' ' -f1)"
dd if=/tmp/pat of=/dev/nvme0n1 bs=1M conv=fsync 2>/dev/null || {{ echo "RESULT write failed"; exit 1; }}
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nvme0n1 of=/tmp/back bs=1M count={PATTERN_MIB} 2>/dev/null
cmp /tmp/pat /tmp/back && echo "RESULT compare equal" || echo "RESULT compare differ"
rm /tmp/back
echo 1 > /sys/class/nvme/nvme0/reset_controller
i=0
while [ "$(cat /sys/class/nvme/nvme0/state)" != live ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "RESULT state_after_reset $(cat /sys/class/nvme/nvme0/state)"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nvme0n1 of=/tmp/back bs=1M count={PATTERN_MIB} 2>/dev/null
cmp /tmp/pat /tmp/back && echo "RESULT compare_after_reset equal" || echo "RESULT compare_after_reset differ"
if [ -n "$USER_DRIVER" ]; then
  # the kernel's driver lets go; a userspace driver programs a bad PRP, then a good one; the kernel's takes it back
  bdf=$(basename $(readlink /sys/class/nvme/nvme0/device))
  echo $bdf > /sys/bus/pci/drivers/nvme/unbind
  guest_nvme $bdf 2>/tmp/lba0
  head -c 4096 /tmp/pat | cmp - /tmp/lba0 && echo "RESULT user_read equal" || echo "RESULT user_read differ"
  echo $bdf > /sys/bus/pci/drivers/nvme/bind
  i=0
  while [ ! -b /dev/nvme0n1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/nvme0n1 of=/tmp/back bs=1M count={PATTERN_MIB} 2>/dev/null
  cmp /tmp/pat /tmp/back && echo "RESULT compare_after_rebind equal" || echo "RESULT compare_after_rebind differ"
fi
if [ -n "$REBOOT" ]; then
  printf REBOOTED | dd of=/dev/nvme0n1 bs=512 seek=$last conv=sync,fsync 2>/dev/null
  reboot -f
fi
exit 0
"""


async def boot_with_nvme(daemon, *, viommu: bool, reboot: bool = False) -> guestkit.GuestRun:
    kit = guestkit.require()
    work = guestkit.scratch()
    try:
        initrd = guestkit.Initramfs(kit)
        initrd.add_modules("nvme", *(("9p", "9pnet_virtio") if reboot else ()))
        args = []
        if reboot:  # the boot without a vIOMMU: device addresses are guest physical, for guest_nvme
            exe = guestkit.compile_static(CLIENTS / "guest_nvme.c", work / "guest_nvme")
            initrd.add_file("/bin/guest_nvme", exe)
            # the host's root, for its nvme-cli (scripts/setup.sh installs it); a guest reboot resets the
            # machine (boot() says -no-reboot)
            args += [*guestkit.virtfs("/"), "-action", "reboot=reset"]
        initrd.script(("REBOOT=1\nUSER_DRIVER=1\nNVME_CLI=1\n" if reboot else "") + SCRIPT)
        return await guestkit.boot_with_vfio_device(
            daemon.dev_dir, NVME_VFIO, initrd.build(work / "initrd"), viommu=viommu, qemu_args=args
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def assert_round_trip(run: guestkit.GuestRun) -> None:
    r = run.results
    assert r.get("probe") == "ok", run
    assert (
        r["blocks"] == str((1 << 30) // 512)
        and r["model"].strip() == "iommufd-cuse NVMe"
        and r["serial"].strip() == "ICUSE0001"
    )
    assert r.get("compare") == "equal", run
    assert r.get("state_after_reset") == "live" and r.get("compare_after_reset") == "equal", run


@pytest.mark.timeout(900)
async def test_guest_nvme_driver_round_trip_reset_and_reboot(daemon) -> None:
    vdev = daemon.system.devices[NVME_VFIO].vfio
    maps, unmaps, faults = daemon.system.maps, daemon.system.unmaps, vdev.fault_count
    run = await boot_with_nvme(daemon, viommu=False, reboot=True)
    assert_round_trip(run)
    # the reboot: the driver probed the controller again (after QEMU's reset of it) and read the same data
    assert run.results.get("boot") == "second", run
    assert run.results["md5_after_reboot"] == run.results["md5"], run
    assert run.rc == 0 and run.qemu_rc == 0, run
    # the userspace driver's bad PRP: an error completion (Data Transfer Error) and one recorded fault; the
    # good read after it, and the kernel's driver bound again, see the data
    r = run.results
    assert r.get("user_identify_vid") == "0x1de5" and r.get("user_driver") == "done", run
    assert (r.get("bad_prp_status"), r.get("good_read_status"), r.get("user_read")) == ("0x004", "0x000", "equal"), run
    assert r.get("compare_after_rebind") == "equal", run
    # nvme-cli's Identify Controller and Namespace: what the default topology's config gave the controller
    assert (r.get("id_ctrl_rc"), r.get("id_ns_rc")) == ("0", "0"), run
    assert (r["id_ctrl_vid"], r["id_ctrl_sn"].strip(), r["id_ctrl_mn"].strip()) == (
        "0x1de5",
        "ICUSE0001",
        "iommufd-cuse NVMe",
    ), run
    assert (r["id_ctrl_fr"].strip(), r["id_ctrl_nn"], r["id_ctrl_mdts"]) == ("1.0", "1", "8"), run
    assert (r["id_ns_nsze"], r["id_ns_ncap"], r["id_ns_nlbaf"]) == (hex(GIB // 512),) * 2 + ("0",), run
    assert r["id_ns_lbaf0"].split()[:2] == ["ms:0", "lbads:9"] and "in use" in r["id_ns_lbaf0"], run
    assert vdev.fault_count == faults + 1, vdev.faults
    f = vdev.faults[-1]
    assert (f.iova, f.write, f.reason) == (0xF00000000, True, "no translation")
    # no vIOMMU: QEMU mapped guest RAM once, at IOVA = guest physical; a handful of maps for its regions
    assert daemon.system.maps - maps < 100 and daemon.system.unmaps - unmaps < 100
    await assert_released(daemon)


@pytest.mark.timeout(900)
async def test_guest_nvme_driver_round_trip_through_a_guest_viommu(daemon) -> None:
    vdev = daemon.system.devices[NVME_VFIO].vfio
    maps, unmaps = daemon.system.maps, daemon.system.unmaps
    run = await boot_with_nvme(daemon, viommu=True)
    assert_round_trip(run)
    assert run.rc == 0 and run.qemu_rc == 0, run
    assert vdev.fault_count == 0, vdev.faults
    # translated DMA: the guest's DMA API mapped and unmapped every buffer, QEMU passed each on as an
    # IOAS_MAP / IOAS_UNMAP: at least one of each per 4 KiB page of the 2 x 64 MiB moved
    pages = 2 * PATTERN_MIB * MIB // 4096
    assert daemon.system.maps - maps >= pages and daemon.system.unmaps - unmaps >= pages
    # as `iommufd-cuse status` shows it: the counts, and no DMA fault on the controller
    st = collect_status(daemon)
    assert st["maps"] == daemon.system.maps and st["unmaps"] == daemon.system.unmaps
    dev = next(d for d in st["devices"] if d["bdf"] == "0000:00:07.0")
    assert dev["dma_faults"] == 0 and dev["model"]["dma_faults"] == 0
    await assert_released(daemon)
