"""What the bench/*/run.py scripts share: compiling their C clients, and running
a FUSE server (the daemon or another) on a scratch mount until they are done.

The scripts are run by path (`.venv/bin/python bench/X/run.py`) and put bench/
on sys.path to import this.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bench" / "bin"


def compile_c(exe: Path, *sources: Path) -> Path:
    """cc -O2 with warnings as errors and the project's include/; returns exe."""
    exe.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'include'}", "-o", str(exe), *map(str, sources)],
        check=True,
    )
    return exe


def mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_openable(path: Path, proc: subprocess.Popen, name: str, timeout: float = 30) -> None:
    """Wait for the server `proc` (called `name` if it exits first) to serve `path`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited {proc.returncode}")
        try:
            os.close(os.open(path, os.O_RDWR))
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{path} did not appear")


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of a running server to one CPU."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, stdout=subprocess.DEVNULL)


@contextmanager
def fuse_server(
    cmd: Sequence[str], node: Path, mountpoint: Path, *, name: str | None = None, stop_timeout: float = 30, **popen
) -> Iterator[subprocess.Popen]:
    """Start a FUSE server, wait until `node` opens, yield it; at the end SIGTERM it
    (killed if it has not exited after `stop_timeout` s) and lazily unmount `mountpoint`."""
    proc = subprocess.Popen(list(cmd), **popen)
    try:
        wait_openable(node, proc, proc.args[0] if name is None else name)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@contextmanager
def serve_daemon(
    prefix: str,
    *,
    profile: str | None = None,
    stop_timeout: float = 30,
    selftest: bool = False,
    config: Path | None = None,
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`iommufd-cuse serve` on a new scratch directory /tmp/<prefix>*: yields the
    process, once <dev>/iommu opens, and the dev dir; stops it and removes the
    scratch directory at the end. With `profile`, under cProfile writing to it;
    with `selftest`, in test mode (--selftest); with `config`, serving that
    configuration file instead of the embedded default."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        scratch.chmod(0o755)
        dev, mnt = scratch / "dev", scratch / "mnt"
        dev.mkdir()
        cmd = [
            str(Path(sys.executable).parent / "iommufd-cuse"),
            "serve",
            "--dev-dir",
            str(dev),
            "--mountpoint",
            str(mnt),
            "--log-level",
            "warning",
            *(["--selftest"] if selftest else []),
        ]
        if config is not None:
            cmd += ["--config", str(config)]
        if profile:
            cmd = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "iommufd_cuse.cli", *cmd[1:]]
        with fuse_server(cmd, dev / "iommu", mnt, name="the daemon", stop_timeout=stop_timeout) as proc:
            yield proc, dev
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


BLOCK_LINE = re.compile(
    r"^bench (\S+): device ([0-9.]+) IOPS ([0-9.]+) GB/s, pread ([0-9.]+) IOPS ([0-9.]+) GB/s, ratio ([0-9.]+)$", re.M
)
BLOCK_CONFIG = """\
[[iommu]]
name = "vtd0"
hw_info_type = "intel_vtd"
pgsize_bitmap = 0x40201000
aperture = [0x0, 0xffffffffffff]
reserved = [[0xfee00000, 0xfeefffff]]

[[device]]
bdf = "{bdf}"
model = "{model}"
iommu = "vtd0"
group = {group}
size = {size}
backing = "{backing}"
"""


def block_driver_rounds(
    model: str, bdf: str, group: int, driver: Path, span: int, rounds: int, profile: str | None
) -> dict[str, list[tuple[float, ...]]]:
    """A block device bench (bench/nvme, bench/virtio_blk): the daemon serving one device of `model`
    backed by a file in a scratch directory, its userspace driver run `rounds` times with `-B FILE -n span`;
    per case the rows (device IOPS, device GB/s, pread IOPS, pread GB/s, ratio) it printed."""
    scratch = Path(tempfile.mkdtemp(prefix=f"icuse-bench-{model}-", dir="/tmp"))
    try:
        backing = scratch / "disk.img"
        cfg = scratch / "config.toml"
        fields = {"bdf": bdf, "model": model, "group": group, "size": max(span, 256 << 20), "backing": backing}
        cfg.write_text(BLOCK_CONFIG.format(**fields))
        results: dict[str, list[tuple[float, ...]]] = {}
        with serve_daemon(f"icuse-bench-{model}-", profile=profile, config=cfg) as (_proc, dev):
            nodes = [str(dev / "iommu"), str(dev / "vfio" / "devices" / "vfio0")]
            for _ in range(rounds):
                argv = [str(driver), "-B", str(backing), "-n", str(span), *nodes]
                p = subprocess.run(argv, capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(f"{argv} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
                for name, *values in BLOCK_LINE.findall(p.stdout):
                    results.setdefault(name, []).append(tuple(float(v) for v in values))
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
