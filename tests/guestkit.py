"""Real Linux guests as test clients (docs/guests.md): QEMU 10 under TCG boots the kit's Debian kernel
(scripts/guest-kit.sh) with a busybox initramfs built here, with the modules, files and init script a test
chooses, while the daemon keeps serving in the test process. The guest reports on its serial console; the
helper parses what it printed, enforces a timeout and always kills QEMU.

    kit = guestkit.require()                                     # skips the test, saying why, without a kit
    initrd = guestkit.Initramfs(kit)
    initrd.add_modules("vfio-pci", "cuse")                       # with their dependencies, loaded in order
    initrd.add_file("/bin/probe", cbuild_static("probe"))
    initrd.script("probe /dev/something")                        # the init's body (busybox sh)
    run = await guestkit.boot(initrd.build(tmp), qemu_args=[...], pass_fds=[fd])
    assert run.rc == 0, run.console                              # the body's exit status

Lines the guest prints as `RESULT name value...` land in `run.results`; STEP lines (tests/clients/stepper.h)
parse with clientkit.parse_steps(run.console).
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

GUEST_DIR = Path(os.environ.get("ICUSE_GUEST_DIR", "/var/cache/iommufd-cuse/guest"))
QEMU = "qemu-system-x86_64"
# The kernel command line every boot gets: the serial console, an immediate exit on panic (with -no-reboot),
# only warnings on the console (TCG prints slowly), and no time spent on mitigations nobody attacks here.
CMDLINE = "console=ttyS0 panic=-1 oops=panic quiet loglevel=4 mitigations=off rdinit=/init"
DONE = "ICUSE-GUEST-DONE"
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")  # the firmware's terminal resets and clears
_DONE_RE = re.compile(rf"^{DONE} rc=(\d+)$", re.M)


@dataclass(frozen=True)
class Kit:
    """What scripts/guest-kit.sh unpacked (its kit.env)."""

    kver: str
    kernel: Path
    modules: Path
    busybox: Path

    def module_path(self, name: str) -> str:
        """The module's path relative to the module tree (names as modprobe takes them: - and _ alike)."""
        key = name.replace("-", "_")
        for path in self._deps():
            if Path(path).name.split(".ko")[0].replace("-", "_") == key:
                return path
        raise KeyError(f"no module {name} in {self.modules}")

    def load_order(self, names: Iterable[str]) -> list[str]:
        """Module paths for `names` and everything they need, each after what it needs (modules.dep lists a
        module's needs nearest first, so they load from the end)."""
        deps = self._deps()
        order: list[str] = []
        for name in names:
            path = self.module_path(name)
            for p in [*reversed(deps[path]), path]:
                if p not in order:
                    order.append(p)
        return order

    def _deps(self) -> dict[str, list[str]]:
        cached = _DEPS.get(self.modules)
        if cached is None:
            cached = {}
            for line in (self.modules / "modules.dep").read_text().splitlines():
                mod, _, needs = line.partition(":")
                cached[mod] = needs.split()
            _DEPS[self.modules] = cached
        return cached


_DEPS: dict[Path, dict[str, list[str]]] = {}


def find() -> Kit | str:
    """The kit, or why there is none."""
    env = GUEST_DIR / "kit.env"
    if not env.exists():
        return f"no guest kit ({env}): run scripts/guest-kit.sh"
    vals = dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line and not line.startswith("#"))
    kit = Kit(vals["KVER"], Path(vals["KERNEL"]), Path(vals["MODULES"]), Path(vals["BUSYBOX"]))
    for p in (kit.kernel, kit.modules / "modules.dep", kit.busybox):
        if not p.exists():
            return f"guest kit incomplete: no {p}: run scripts/guest-kit.sh"
    if shutil.which(QEMU) is None:
        return f"no {QEMU}: run scripts/guest-kit.sh"
    return kit


def require() -> Kit:
    """The kit, or skip the calling test with the reason (scripts/test.sh makes a missing kit fatal in CI)."""
    kit = find()
    if isinstance(kit, str):
        pytest.skip(kit)
    return kit


def compile_static(src: Path | Sequence[Path], out: Path, *cflags: str) -> Path:
    """A static binary for the guest (the guest has no libc of its own)."""
    srcs = [str(src)] if isinstance(src, Path) else [str(s) for s in src]
    subprocess.run(["cc", "-static", "-O2", "-Wall", "-Werror", *cflags, "-o", str(out), *srcs], check=True)
    return out


# -- the initramfs ------------------------------------------------------------------------------------------------


class Initramfs:
    """A busybox initramfs: the kit's static busybox, chosen modules (loaded by init in dependency order), extra
    files, and an init script whose body the test writes."""

    def __init__(self, kit: Kit) -> None:
        self.kit = kit
        self._files: dict[str, tuple[bytes | Path, int]] = {}
        self._modules: list[str] = []
        self._body = ""
        self.add_file("/bin/busybox", kit.busybox, 0o755)

    def add_file(self, guest_path: str, src: bytes | str | Path, mode: int = 0o755) -> None:
        """A file at `guest_path`: a host file's contents (read at build time) or bytes/str."""
        if isinstance(src, str):
            src = src.encode()
        self._files[guest_path] = (src, mode)

    def add_modules(self, *names: str) -> None:
        for path in self.kit.load_order(names):
            if path not in self._modules:
                self._modules.append(path)

    def script(self, body: str) -> None:
        """The init's body (busybox sh, `set -e` not implied). Its exit status is the run's rc."""
        self._body = body

    def init(self) -> str:
        mods = "\n".join(
            f"insmod /lib/modules/{self.kit.kver}/{_plain(p)} || echo 'insmod {p} failed'" for p in self._modules
        )
        # (the first echo ends the firmware's last line, which has no newline of its own)
        return f"""#!/bin/busybox sh
echo
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
{mods}
# a subshell: `exit` in the body ends the body, not init
(
{self._body}
)
echo "{DONE} rc=$?"
poweroff -f
"""

    def build(self, out: Path) -> Path:
        """Write the initramfs (cpio newc, uncompressed: the kernel unpacks it faster than it inflates it)."""
        entries: dict[str, tuple[int, bytes, int]] = {}  # path -> (mode, data, rdev)

        def add_dirs(path: str) -> None:
            parts = path.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                entries.setdefault("/".join(parts[:i]), (0o040755, b"", 0))

        for d in ("dev", "proc", "sys", "tmp", "run", "bin", "lib", "mnt"):
            entries[d] = (0o040755, b"", 0)
        # init's console before devtmpfs is mounted (the kernel opens it for init's stdio)
        entries["dev/console"] = (0o020600, b"", os.makedev(5, 1))
        for p in self._modules:
            gp = f"lib/modules/{self.kit.kver}/{_plain(p)}"
            add_dirs(gp)
            data = (self.kit.modules / p).read_bytes()
            entries[gp] = (0o100644, lzma.decompress(data) if p.endswith(".xz") else data, 0)
        for gp, (src, mode) in self._files.items():
            gp = gp.lstrip("/")
            add_dirs(gp)
            entries[gp] = (0o100000 | mode, src.read_bytes() if isinstance(src, Path) else src, 0)
        entries["init"] = (0o100755, self.init().encode(), 0)
        with open(out, "wb") as f:
            for ino, (name, (mode, data, rdev)) in enumerate(sorted(entries.items()), start=1):
                f.write(_cpio_entry(name, ino, mode, data, rdev))
            f.write(_cpio_entry("TRAILER!!!", 0, 0, b"", 0))
        return out


def _plain(path: str) -> str:
    return path[: -len(".xz")] if path.endswith(".xz") else path


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _cpio_entry(name: str, ino: int, mode: int, data: bytes, rdev: int) -> bytes:
    bname = name.encode() + b"\0"
    nlink = 2 if mode & 0o170000 == 0o040000 else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(bname), 0)
    head = b"070701" + b"".join(b"%08x" % v for v in fields)
    return head + bname + _pad4(len(head) + len(bname)) + data + _pad4(len(data))


# -- booting ------------------------------------------------------------------------------------------------------


@dataclass
class GuestRun:
    console: str
    rc: int | None  # the init body's exit status; None when the guest never got that far
    results: dict[str, str] = field(default_factory=dict)
    qemu_rc: int | None = None

    def __str__(self) -> str:
        return f"guest rc={self.rc} qemu rc={self.qemu_rc}\n--- console ---\n{self.console}"

    __repr__ = __str__  # what an assertion message shows


def virtfs(path: str = "/", tag: str = "host", *, readonly: bool = True) -> list[str]:
    """QEMU arguments sharing a host directory by 9p (the guest mounts it with
    `mount -t 9p -o trans=virtio,version=9p2000.L TAG DIR`; modules 9p and 9pnet_virtio)."""
    opts = f"local,path={path},mount_tag={tag},security_model=passthrough,multidevs=remap"
    return ["-virtfs", opts + (",readonly=on" if readonly else "")]


def in_host_root(script: str) -> str:
    """An init body that runs `script` (a file the initramfs has) chrooted into the host's root, shared by
    `virtfs("/")` (add modules 9p and 9pnet_virtio): the host's programs, Python and this tree's .venv, with
    the guest's own /proc, /sys, /dev (devtmpfs) and a tmpfs /run. The initramfs's /guest is copied to /run/guest.
    The host's /tmp is the host's (read-only): programs compiled by a test can be run from there."""
    return f"""
{mount_host_root()}
[ ! -d /guest ] || cp -r /guest /host/run/guest
chroot /host /bin/sh {script}
"""


def mount_host_root(at: str = "/host") -> str:
    """Shell lines that mount the host's root shared by `virtfs("/")` at `at` (read-only), with the guest's own
    /proc, /sys, /dev and a tmpfs /run in it (exit 10-12 when a mount fails): `chroot AT PROGRAM` then runs a
    host program in the guest. `umount_host_root(at)` takes them down again."""
    return f"""mkdir -p {at}
mount -t 9p -o trans=virtio,version=9p2000.L,ro host {at} || exit 10
mount -t proc proc {at}/proc && mount -t sysfs sys {at}/sys && mount -t devtmpfs dev {at}/dev || exit 11
mount -t tmpfs run {at}/run || exit 12"""


def umount_host_root(at: str = "/host") -> str:
    return f"umount {at}/run {at}/dev {at}/sys {at}/proc && umount {at}"


async def boot(
    initrd: Path,
    *,
    qemu_args: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    memory: str = "512M",
    cmdline: str = "",
    timeout: float = 180,
    kit: Kit | None = None,
    wrapper: Sequence[str] = (),
) -> GuestRun:
    """Boot the kit's kernel with `initrd` (q35, TCG, one CPU, no default devices), the serial console on a pipe;
    return when the guest powers off, dies or runs out of time (QEMU is killed in every case). wrapper: a command
    QEMU runs under (e.g. `iommufd-cuse run --`)."""
    kit = kit or require()
    argv = [
        *wrapper,
        QEMU,
        "-accel",
        "tcg",
        "-machine",
        "q35",
        "-m",
        memory,
        "-smp",
        "1",
        "-nodefaults",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-kernel",
        str(kit.kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"{CMDLINE} {cmdline}".strip(),
        *qemu_args,
    ]
    out = bytearray()
    qemu_rc = None
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=tuple(pass_fds)
    )
    try:
        assert proc.stdout is not None
        with trio.move_on_after(timeout):
            while True:
                chunk = await proc.stdout.receive_some(65536)
                if not chunk:
                    break
                out += chunk
            # stdout closes when QEMU exits (after `poweroff -f`, a panic, or a failed start)
            qemu_rc = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
    console = _ESCAPES.sub("", out.decode(errors="replace").replace("\r\n", "\n"))
    m = _DONE_RE.search(console)
    results = {}
    for line in console.splitlines():
        if line.startswith("RESULT "):
            name, _, value = line[7:].partition(" ")
            results[name] = value
    if qemu_rc is None:
        console += f"\n[guestkit: timed out after {timeout} s, QEMU killed]"
    if os.environ.get("ICUSE_GUEST_CONSOLE"):  # for debugging: the last console, whole
        Path(os.environ["ICUSE_GUEST_CONSOLE"]).write_text(console)
    return GuestRun(console, int(m.group(1)) if m else None, results, qemu_rc)


async def boot_with_vfio_device(
    dev_dir: str, vfio: int, initrd: Path, *, viommu: bool, qemu_args: Sequence[str] = (), timeout: float = 540
) -> GuestRun:
    """boot() with the daemon's /dev/vfio/devices/vfio<vfio> (under dev_dir) passed to QEMU by descriptor
    (`-object iommufd,fd=N -device vfio-pci,fd=M`); with viommu, behind QEMU's intel-iommu and the guest's
    `intel_iommu=on`, so that every guest DMA mapping becomes an IOAS_MAP/UNMAP on the daemon. qemu_args: more
    of QEMU's arguments."""
    # opened off the loop: the daemon answering the OPEN runs on it
    iommu = await trio.to_thread.run_sync(os.open, os.path.join(dev_dir, "iommu"), os.O_RDWR)
    try:
        dev = await trio.to_thread.run_sync(os.open, os.path.join(dev_dir, f"vfio/devices/vfio{vfio}"), os.O_RDWR)
    except OSError:
        await trio.to_thread.run_sync(os.close, iommu)
        raise
    try:
        args = ["-object", f"iommufd,id=iommufd0,fd={iommu}", *qemu_args]
        if viommu:  # before the device it translates for
            args += ["-device", "intel-iommu,caching-mode=on"]
        args += ["-device", f"vfio-pci,fd={dev},iommufd=iommufd0"]
        return await boot(
            initrd,
            qemu_args=args,
            pass_fds=[iommu, dev],
            cmdline="intel_iommu=on" if viommu else "",
            timeout=timeout,
        )
    finally:
        await trio.to_thread.run_sync(os.close, iommu)
        await trio.to_thread.run_sync(os.close, dev)


def scratch() -> Path:
    """A scratch directory for initramfs images and static binaries."""
    return Path(tempfile.mkdtemp(prefix="icuse-guest-", dir="/tmp"))


def _main(argv: Sequence[str] | None = None) -> int:
    """`python tests/guestkit.py OUT [--module M]... [--file GUEST=HOST]... [--script TEXT]`: write an initramfs
    by hand and print the QEMU command line that boots it (docs/guests.md)."""
    import argparse
    import shlex

    ap = argparse.ArgumentParser(prog="tests/guestkit.py", description=_main.__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--module", action="append", default=[], help="a module to load (with its dependencies)")
    ap.add_argument("--file", action="append", default=[], help="GUEST_PATH=HOST_PATH")
    ap.add_argument("--script", default="exec sh", help="the init's body (default: a shell on the console)")
    a = ap.parse_args(argv)
    kit = find()
    if isinstance(kit, str):
        ap.error(kit)
    initrd = Initramfs(kit)
    initrd.add_modules(*a.module)
    for spec in a.file:
        guest, _, host = spec.partition("=")
        initrd.add_file(guest, Path(host))
    initrd.script(a.script)
    initrd.build(a.out)
    print(
        shlex.join(
            [QEMU, "-accel", "tcg", "-machine", "q35", "-m", "512M", "-nodefaults", "-nographic", "-no-reboot"]
            + ["-serial", "mon:stdio", "-kernel", str(kit.kernel), "-initrd", str(a.out), "-append", CMDLINE]
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
