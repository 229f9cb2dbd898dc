"""The CUSE carrier (iommufd_cuse/transport/cuse.py).

This host's kernel has no CUSE: here, `--backend cuse` is a one-line start-up error and auto serves by FUSE.
The rest runs in a QEMU guest with Debian's kernel (tests/guestkit.py), which has cuse.ko: the host's root
shared read-only by 9p, the daemon of this very tree started inside (`serve`, auto), and the suite's C clients
and the examples run there against the character devices, then SIGTERM with a client holding one.
One boot does it all: TCG on a busy machine is slow.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import guestkit
import pytest
from clientkit import outcomes, parse_steps
from harness import INCLUDE, ROOT, run, scratch_dir

from iommufd_cuse import uapi
from iommufd_cuse.transport import cuse
from iommufd_cuse.transport import protocol as P

NO_CUSE = cuse.available()


@pytest.mark.skipif(NO_CUSE is None, reason="this kernel has CUSE: the error cannot be seen here")
def test_backend_cuse_without_cuse_is_a_one_line_error() -> None:
    base = scratch_dir()
    p = subprocess.run(
        [sys.executable, "-m", "iommufd_cuse.cli", "serve", "--backend", "cuse", "--dev-dir", str(base / "dev")]
        + ["--mountpoint", str(base / "mnt"), "--control-socket", ""],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"iommufd-cuse: error: {NO_CUSE}"], p.stderr
    assert not (base / "dev").exists() and not (base / "mnt").exists()  # nothing made before the refusal
    os.rmdir(base)


@pytest.mark.skipif(NO_CUSE is None, reason="this kernel has CUSE: auto serves by CUSE here")
async def test_auto_falls_back_to_fuse(daemon) -> None:
    assert daemon.requested_backend == "auto" and daemon.backend == "fuse"
    iommu = os.path.join(daemon.dev_dir, "iommu")
    assert os.path.islink(iommu) and os.readlink(iommu).startswith(daemon.mountpoint)
    assert daemon.devt("iommu") is None


# -- in a guest that has CUSE ----------------------------------------------------------------------------------

HOLD = f"""
import fcntl, os, struct, sys, time
fd = os.open("/dev/iommu", os.O_RDWR)
def alloc():
    buf = bytearray(struct.pack("<III", 12, 0, 0))
    try:
        fcntl.ioctl(fd, {uapi.IOMMU_IOAS_ALLOC:#x}, buf, True)
        return "ok"
    except OSError as e:
        return "errno=%d" % e.errno
print("RESULT hold_before", alloc(), flush=True)
open("/run/held", "w").close()
while not os.path.exists("/run/go"):
    time.sleep(0.1)
print("RESULT hold_after", alloc(), flush=True)
"""

# Runs in the guest, chrooted into the host's root (read-only) with the guest's own /proc, /sys, /dev, /run.
TEST = """
cd {root}
export PYTHONDONTWRITEBYTECODE=1 HOME=/run
sock=/run/iommufd-cuse/control.sock
.venv/bin/iommufd-cuse serve --control-socket $sock >/run/daemon.log 2>&1 &
d=$!
i=0
while ! grep -q "serving by" /run/daemon.log && kill -0 $d 2>/dev/null && [ $i -lt 1500 ]; do
    sleep 0.2; i=$((i+1))
done
grep -o "serving by [A-Z]*" /run/daemon.log | sed 's/^serving /RESULT serving /'
echo "RESULT type $(stat -c %F /dev/iommu)"
for n in vfio/vfio vfio/devices/vfio0 vfio/devices/vfio3; do echo "RESULT type:$n $(stat -c %F /dev/$n)"; done
echo "RESULT mode $(stat -c '%a %u %g' /dev/iommu)"
rdev=$(stat -c '%Hr:%Lr' /dev/vfio/devices/vfio0)
echo "RESULT rdev $rdev"
view=/run/iommufd-cuse/mnt/sys
echo "RESULT view_dev $(cat $view/bus/pci/devices/0000:00:04.0/vfio-dev/vfio0/dev)"
echo "RESULT sysfs_dev $(cat '/sys/class/cuse/vfio!devices!vfio0/dev')"
echo "RESULT char_link $(readlink /dev/char/$rdev)"
echo "RESULT distinct $(stat -c '%Hr:%Lr' /dev/iommu /dev/vfio/vfio /dev/vfio/devices/vfio* | sort -u | wc -l)"
.venv/bin/iommufd-cuse status --control-socket $sock | grep '^nodes:' | sed 's/^/RESULT status /'
{ioas_alloc} /dev/iommu >/run/ioas.out 2>&1; echo "RESULT ioas_alloc $? $(tr '\\n' '|' </run/ioas.out)"
{qemu_startup} /dev/iommu /dev/vfio/devices/vfio0 startup
echo "RESULT qemu_startup $?"
{qemu_startup} /dev/iommu /dev/vfio/devices/vfio0 errors | sed 's/^STEP /STEP errors./'
{edu} /dev/iommu /dev/vfio/devices/vfio0 >/run/edu.out 2>&1; echo "RESULT edu $?"
{dma_engine} /dev/iommu /dev/vfio/devices/vfio1 >/run/dma.out 2>&1; echo "RESULT dma_engine $?"
# QEMU itself (nested, its CPUs never started: -S) by its cdev path without fd passing: from the sysfs view's
# vfio-dev/vfioN/dev to the character device with that st_rdev, and /dev/iommu; vfio-pci realized on them, its
# RAM mapped into the IOAS (pinned by the daemon) until it is killed
pinned() {{ .venv/bin/iommufd-cuse status --json --control-socket $sock | .venv/bin/python -c \
    'import json,sys; print(json.load(sys.stdin)["pinned_pages"])'; }}
qemu-system-x86_64 -machine q35 -accel tcg -m 64M -nodefaults -display none -S \
    -object iommufd,id=ifd -device vfio-pci,sysfsdev=$view/bus/pci/devices/0000:00:06.0,iommufd=ifd \
    </dev/null >/run/qemu.out 2>&1 &
q=$!
i=0; while [ "$(pinned)" = 0 ] && kill -0 $q 2>/dev/null && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done
echo "RESULT nested_qemu_pinned $(pinned)"
kill $q; wait $q
i=0; while [ "$(pinned)" != 0 ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
echo "RESULT nested_qemu_after $(pinned)"
.venv/bin/python /run/guest/hold.py &
h=$!
i=0; while [ ! -e /run/held ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
kill -TERM $d
i=0; while [ -e /dev/iommu ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "RESULT removed $(ls /dev/iommu 2>&1 >/dev/null | wc -l) $(kill -0 $d 2>/dev/null && echo waiting)"
touch /run/go; wait $h
wait $d; echo "RESULT daemon_rc $?"
left=""; for p in /dev/iommu /dev/vfio /dev/iommufd-cuse /dev/char; do [ ! -e $p ] || left="$left $p"; done
echo "RESULT left [$left] $(ls /sys/class/cuse | wc -l)"
echo "--- qemu.out"; cat /run/qemu.out; echo "--- edu.out"; cat /run/edu.out; echo "--- dma.out"; cat /run/dma.out; echo "--- daemon log"; cat /run/daemon.log
"""


def _cc(src: Path, out: Path) -> Path:
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-pthread", f"-I{INCLUDE}", "-o", str(out), str(src)], check=True)
    return out


async def _on_fuse(daemon, exe: Path, scenario: str) -> dict[str, str]:  # noqa: ANN001
    p = await run(
        [exe, os.path.join(daemon.dev_dir, "iommu"), os.path.join(daemon.dev_dir, "vfio/devices/vfio0"), scenario]
    )
    return outcomes(parse_steps(p.stdout))


@pytest.mark.timeout(900)
async def test_cuse_in_a_guest(daemon, cbuild) -> None:
    kit = guestkit.require()
    work = scratch_dir()  # the guest sees the host's /tmp (read-only): the clients are run from here
    try:
        exes = {
            "ioas_alloc": _cc(ROOT / "examples/ioas_alloc.c", work / "ioas_alloc"),
            "edu": _cc(ROOT / "examples/edu.c", work / "edu"),
            "dma_engine": _cc(ROOT / "examples/dma_engine.c", work / "dma_engine"),
            "qemu_startup": cbuild("qemu_startup"),
        }
        initrd = guestkit.Initramfs(kit)
        initrd.add_modules("cuse", "9p", "9pnet_virtio")
        initrd.add_file("/guest/hold.py", HOLD)
        initrd.add_file("/guest/test.sh", TEST.format(root=ROOT, **exes))
        initrd.script(guestkit.in_host_root("/run/guest/test.sh"))
        guest = await guestkit.boot(
            initrd.build(work / "initrd"), qemu_args=guestkit.virtfs("/"), memory="1536M", timeout=800
        )
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    r = guest.results
    assert guest.rc == 0, guest
    # 1. serve (auto) makes character devices, and the clients and examples pass on them unchanged
    assert r.get("serving") == "by CUSE", guest
    assert r["type"] == "character special file", guest
    assert all(r[f"type:{n}"] == "character special file" for n in ("vfio/vfio", "vfio/devices/vfio0")), guest
    assert r["mode"] == "660 0 0", guest  # the configured mode and owner
    assert r["distinct"] == "6", guest  # iommu, vfio/vfio, vfio0..3: a major:minor each
    assert "character devices by CUSE" in r["status"], guest
    assert r["ioas_alloc"].startswith("0 ioas id 1|"), guest
    steps = parse_steps(guest.console)
    assert steps["CONFIG_IDS"].int("vendor") == 0x1234, guest  # pread at the config region's offset
    rt = steps["EDU_DMA_TO_RAM"]
    assert (rt["same"], rt["first"]) == ("1", "030a1118"), guest
    assert r["qemu_startup"] == "0" and r["edu"] == "0" and r["dma_engine"] == "0", guest
    # the same client gets the same answers, step by step, by CUSE in the guest as by FUSE here
    exe = exes["qemu_startup"]
    on_cuse = outcomes(steps)
    assert {k: v for k, v in on_cuse.items() if not k.startswith("errors.")} == await _on_fuse(daemon, exe, "startup")
    errors = {k[7:]: v for k, v in on_cuse.items() if k.startswith("errors.")}
    assert errors and errors == await _on_fuse(daemon, exe, "errors")
    # 2. QEMU's cdev path by sysfsdev= (no fds passed) finds the device and maps its 64 MiB of RAM through it
    assert int(r["nested_qemu_pinned"]) >= 64 * 256 and r["nested_qemu_after"] == "0", guest
    # the kernel's sysfs `dev`, the daemon's sysfs view and the /dev/char link agree with st_rdev
    assert r["sysfs_dev"] == r["rdev"] == r["view_dev"], guest  # the kernel's sysfs, and the daemon's view
    assert r["char_link"] == "../vfio/devices/vfio0", guest
    # 3. SIGTERM removes every device; the client holding one is refused afterwards
    assert r["daemon_rc"] == "0", guest
    assert r["hold_before"] == "ok", guest
    # the node left /dev at once, the daemon waits for the file still open, which gets ENODEV meanwhile
    assert r["removed"] == "1 waiting", guest
    assert r["hold_after"] == f"errno={errno.ENODEV}", guest
    assert r["left"] == "[] 0", guest  # no node, link or directory in /dev, no device in sysfs


CLIENT = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for op, off in ((os.pread, 0x70000000010), (os.preadv, 0x10000000123), (os.pwrite, 0x55), (os.pwritev, 0x7FFF00000001)):
    try:
        if op is os.pread:
            op(fd, 4, off)
        elif op is os.preadv:
            op(fd, [bytearray(4)], off)
        elif op is os.pwrite:
            op(fd, b"abcd", off)
        else:
            op(fd, [b"abcd"], off)
    except OSError:
        pass
"""


async def test_caller_offset_is_the_blocked_calls(daemon, monkeypatch) -> None:
    """What CUSE does not send, read from the caller's blocked call: checked here against the offsets FUSE
    does send, for the calls clients make (pread64, preadv, pwrite64, pwritev)."""
    seen: list[tuple[int, int]] = []
    server = daemon.server
    for opcode in (P.READ, P.WRITE):
        served = server._ops[opcode]

        def spy(req, body, served=served) -> None:  # noqa: ANN001
            seen.append((P.READ_IN.unpack_from(body)[1], cuse.caller_offset(req.caller.tid)))
            served(req, body)

        monkeypatch.setitem(server._ops, opcode, spy)
    await run([sys.executable, "-c", CLIENT, os.path.join(daemon.dev_dir, "vfio/devices/vfio0")])
    assert [sent for sent, _ in seen] == [0x70000000010, 0x10000000123, 0x55, 0x7FFF00000001]
    assert [found for _, found in seen] == [sent for sent, _ in seen]
