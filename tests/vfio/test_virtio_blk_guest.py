"""The virtio-blk device (virtio 1.x, non-transitional) passed to QEMU (TCG) with a real Linux guest whose own
`virtio_pci` and `virtio_blk` drivers bind it (tests/guestkit.py): what the driver read of the device (PCI ids,
negotiated features, capacity, the serial GET_ID returns, its hardware queues, the write cache mode), then a
64 MiB pattern written with an fsync (a FLUSH), the page cache dropped, read back and compared — without a
vIOMMU (IOVA = guest physical) and with QEMU's intel-iommu and the guest's `intel_iommu=on`, where every guest
DMA mapping (the rings, each request's header, data and status byte) becomes an IOAS_MAP/UNMAP on the daemon.

The guest has two vCPUs (`-smp 2`): virtio_blk uses no more queues than there are possible CPUs. (A second
possible CPU that is not running, `-smp 1,maxcpus=2`, would be cheaper, but QEMU 10's q35 and the kit's 6.12
kernel end up with one possible CPU.) The pattern is written from CPU 1 and read back on CPU 0, so both queues
carry requests, each completing on its own MSI-X vector.

WRITE_ZEROES is offered and negotiated (asserted from the features and the queue limit the driver sets) but not
exercised: busybox's blkdiscard has no -z and its fallocate no modes, so nothing in the initramfs issues a
BLKZEROOUT / FALLOC_FL_ZERO_RANGE (the host's util-linux, shared by 9p, could; not worth a slower boot here)."""

from __future__ import annotations

import shutil

import guestkit
import pytest
from test_device_cdev import assert_released

from iommufd_cuse.service import collect_status

VBLK_VFIO = 5  # vfio5: the default topology's virtio-blk
VBLK_BDF = "0000:00:08.0"
MIB = 1 << 20
PATTERN_MIB = 64
SECTORS = (1 << 30) // 512
SERIAL = "ICUSE-VBLK0001"

# virtio feature bits (virtio 1.2, 5.2.3 and 6) the model offers and Linux's virtio_blk accepts
F_SIZE_MAX, F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_MQ, F_WRITE_ZEROES = 1, 2, 6, 9, 12, 14
F_INDIRECT_DESC, F_VERSION_1, F_ACCESS_PLATFORM = 28, 32, 33
FEATURES = (F_SIZE_MAX, F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_MQ, F_WRITE_ZEROES, F_INDIRECT_DESC)
FEATURES += (F_VERSION_1, F_ACCESS_PLATFORM)

# The guest's script: wait for the disk, report what the driver made of the device, write PATTERN_MIB of random
# data (conv=fsync: the block layer sends a FLUSH, the cache being write back), drop the page cache, read back
# and compare (written from CPU 1, read on CPU 0: blk-mq submits on the submitting CPU's queue). Kernel messages
# about the disk are echoed as DMESG lines when something is wrong.
SCRIPT = f"""
i=0
while [ ! -b /dev/vda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || {{ echo "RESULT probe none"; dmesg | grep -i -e virtio -e vda | sed 's/^/DMESG /'; exit 1; }}
echo "RESULT probe ok"
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor)" = 0x1af4 ] || continue
  echo "RESULT pci $(cat $d/vendor) $(cat $d/device) $(cat $d/class)"
  echo "RESULT pci_subsystem_vendor $(cat $d/subsystem_vendor)"
done
v=/sys/block/vda/device
echo "RESULT virtio_id $(cat $v/vendor) $(cat $v/device)"
echo "RESULT features $(cat $v/features)"
echo "RESULT possible_cpus $(cat /sys/devices/system/cpu/possible)"
echo "RESULT sectors $(cat /sys/block/vda/size)"
echo "RESULT serial $(cat /sys/block/vda/serial)"
echo "RESULT queues $(ls /sys/block/vda/mq | wc -l)"
echo "RESULT write_cache $(cat /sys/block/vda/queue/write_cache)"
echo "RESULT write_zeroes_max_bytes $(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
dd if=/dev/urandom of=/tmp/pat bs=1M count={PATTERN_MIB} 2>/dev/null
echo "RESULT md5 $(md5sum < /tmp/pat | cut -d' ' -f1)"
taskset 2 dd if=/tmp/pat of=/dev/vda bs=1M conv=fsync 2>/dev/null && echo "RESULT write ok" || echo "RESULT write failed"
echo 3 > /proc/sys/vm/drop_caches
taskset 1 dd if=/dev/vda of=/tmp/back bs=1M count={PATTERN_MIB} 2>/dev/null
echo "RESULT md5_back $(md5sum < /tmp/back | cut -d' ' -f1)"
cmp /tmp/pat /tmp/back && echo "RESULT compare equal" || echo "RESULT compare differ"
# each request queue's MSI-X vector, summed over the CPUs: the writer ran on CPU 1, the reader on CPU 0
awk '/virtio[0-9]+-req/ {{ n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; q = $NF; sub(/.*-/, "", q); print "RESULT irq_" q " " n }}' /proc/interrupts
errors=$(dmesg | grep -c -i -e 'I/O error' -e 'virtio.*\\(error\\|fail\\|bad\\|broken\\)')
echo "RESULT kernel_errors $errors"
[ "$errors" = 0 ] || dmesg | grep -i -e virtio -e vda -e 'I/O error' | sed 's/^/DMESG /'
exit 0
"""


async def boot_with_virtio_blk(daemon, *, viommu: bool) -> guestkit.GuestRun:
    kit = guestkit.require()
    work = guestkit.scratch()
    try:
        initrd = guestkit.Initramfs(kit)
        initrd.add_modules("virtio_blk")  # virtio_pci is built into the kit's kernel
        initrd.script(SCRIPT)
        # two CPUs, for the two queues (boot() says -smp 1; the later -smp wins)
        return await guestkit.boot_with_vfio_device(
            daemon.dev_dir, VBLK_VFIO, initrd.build(work / "initrd"), viommu=viommu, qemu_args=["-smp", "2"]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def assert_device_and_round_trip(run: guestkit.GuestRun) -> None:
    r = run.results
    assert r.get("probe") == "ok", run
    assert r.get("pci") == "0x1af4 0x1042 0x018000", run  # a modern-only (non-transitional) virtio-blk
    # virtio device 2 (block); a modern driver takes the virtio vendor id from the PCI subsystem vendor id
    assert r.get("virtio_id") == f"{r.get('pci_subsystem_vendor')} 0x0002", run
    # the features the driver accepted (sysfs: one character per bit, bit 0 first)
    bits = r.get("features", "")
    assert all(bits[b : b + 1] == "1" for b in FEATURES), (bits, run)
    assert r.get("possible_cpus") == "0-1", run
    assert r.get("sectors") == str(SECTORS), run
    assert r.get("serial") == SERIAL, run  # Linux asks GET_ID for it
    assert r.get("queues") == "2", run  # MQ with num_queues 2
    assert r.get("write_cache") == "write back", run  # FLUSH offered
    assert int(r.get("write_zeroes_max_bytes", "0")) > 0, run  # WRITE_ZEROES negotiated
    assert r.get("write") == "ok" and r.get("compare") == "equal", run
    assert r.get("md5_back") == r.get("md5"), run
    # both queues served, each completion signalled on its own vector
    assert int(r.get("irq_req.0", "0")) > 0 and int(r.get("irq_req.1", "0")) > 0, run
    assert r.get("kernel_errors") == "0", run
    assert run.rc == 0 and run.qemu_rc == 0, run


@pytest.mark.timeout(900)
async def test_guest_virtio_blk_driver_round_trip(daemon) -> None:
    vdev = daemon.system.devices[VBLK_VFIO].vfio
    maps, unmaps, faults = daemon.system.maps, daemon.system.unmaps, vdev.fault_count
    run = await boot_with_virtio_blk(daemon, viommu=False)
    assert_device_and_round_trip(run)
    assert vdev.fault_count == faults, vdev.faults
    # no vIOMMU: QEMU mapped guest RAM once, at IOVA = guest physical; a handful of maps for its regions
    assert daemon.system.maps - maps < 100 and daemon.system.unmaps - unmaps < 100
    await assert_released(daemon)


@pytest.mark.timeout(900)
async def test_guest_virtio_blk_driver_round_trip_through_a_guest_viommu(daemon) -> None:
    vdev = daemon.system.devices[VBLK_VFIO].vfio
    maps, unmaps, faults = daemon.system.maps, daemon.system.unmaps, vdev.fault_count
    run = await boot_with_virtio_blk(daemon, viommu=True)
    assert_device_and_round_trip(run)
    assert vdev.fault_count == faults, vdev.faults
    # translated DMA: the guest's DMA API mapped and unmapped every buffer, QEMU passed each on as an
    # IOAS_MAP / IOAS_UNMAP: at least one of each per 4 KiB page of the 2 x 64 MiB moved
    pages = 2 * PATTERN_MIB * MIB // 4096
    assert daemon.system.maps - maps >= pages and daemon.system.unmaps - unmaps >= pages
    # as `iommufd-cuse status` shows it: no DMA fault on the device
    st = collect_status(daemon)
    dev = next(d for d in st["devices"] if d["bdf"] == VBLK_BDF)
    assert dev["dma_faults"] == 0, dev
    await assert_released(daemon)
