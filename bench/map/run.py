"""IOMMU_IOAS_MAP/UNMAP of 1 GiB of anonymous memory against mlock/munlock of it, same run.

    .venv/bin/python bench/map/run.py [--size BYTES] [--runs N]

Compiles map.c, starts the daemon (`iommufd-cuse serve`) on scratch directories
under /tmp, and runs the client twice against it:

  - with a device: vfio0 bound to the iommufd and attached to the IOAS before
    the map, so IOAS_MAP pins every page and loads it into the device's I/O
    page table (what a VMM does with guest memory);
  - without one: the IOAS has no domain, the map only records the range.

Each run maps SIZE bytes of populated anonymous memory in 4 KiB pages (no THP)
at a fixed IOVA and unmaps it, then mlocks and munlocks the same range, all in
the one client process. Ratio = (map + unmap) / (mlock + munlock), medians;
target <= 1.0 with the device attached. Everything it started is stopped and
removed at the end.

What is being compared: the kernel's mlock walks and locks every page. The
daemon pins by ranges in its page store and maps large I/O page table leaves
where the emulated addresses line up (its design, DESIGN.md section 5); for
private anonymous memory it never touches the client's pages at map time (they
are reached through /proc/<pid>/mem when the device does DMA). A kernel's
iommufd would call pin_user_pages on each of the 262144 pages, so expect a real
kernel to be far slower than this on the same call.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = ROOT / "bench" / "bin"
RESULT_RE = re.compile(r"^result (.*)$", re.M)


def build() -> Path:
    BIN.mkdir(parents=True, exist_ok=True)
    exe = BIN / "map"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'include'}", "-o", str(exe),
                    str(HERE / "map.c")], check=True)
    return exe


def mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_openable(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited {proc.returncode}")
        try:
            os.close(os.open(path, os.O_RDWR))
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{path} did not appear")


def measure(exe: Path, iommu: Path, device: str, size: int, runs: int) -> dict[str, float]:
    p = subprocess.run([str(exe), str(iommu), device, str(size), str(runs)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"map {device} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    m = RESULT_RE.search(p.stdout)
    assert m, p.stdout
    fields = dict(kv.split("=") for kv in m[1].split())
    return {k: float(v) for k, v in fields.items() if k.endswith("_ms")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1 << 30, help="bytes to map (default 1 GiB)")
    ap.add_argument("--runs", type=int, default=5, help="map/unmap + mlock/munlock rounds (default 5)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the daemon mounts a FUSE file system")

    exe = build()
    scratch = Path(tempfile.mkdtemp(prefix="icuse-bench-map-", dir="/tmp"))
    scratch.chmod(0o755)
    dev, mnt = scratch / "dev", scratch / "mnt"
    dev.mkdir()
    proc: subprocess.Popen | None = None
    try:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "iommufd-cuse"), "serve", "--dev-dir", str(dev),
                                 "--mountpoint", str(mnt), "--log-level", "warning"])
        wait_openable(dev / "iommu", proc)
        rows = [
            ("device attached (vfio0)", measure(exe, dev / "iommu", str(dev / "vfio" / "devices" / "vfio0"),
                                                args.size, args.runs)),
            ("no device", measure(exe, dev / "iommu", "none", args.size, args.runs)),
        ]
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"IOAS_MAP + IOAS_UNMAP of {args.size >> 20} MiB of populated anonymous 4 KiB pages vs "
          f"mlock + munlock of the same range; medians of {args.runs}")
    print(f"{'IOAS':<26} {'map ms':>8} {'unmap ms':>9} {'mlock ms':>9} {'munlock ms':>11} {'ratio':>7}")
    for label, r in rows:
        ratio = (r["map_ms"] + r["unmap_ms"]) / (r["mlock_ms"] + r["munlock_ms"])
        verdict = ("met" if ratio <= 1.0 else "MISSED") + " (target <= 1.0)" if label.startswith("device") else ""
        print(f"{label:<26} {r['map_ms']:>8.2f} {r['unmap_ms']:>9.2f} {r['mlock_ms']:>9.2f} "
              f"{r['munlock_ms']:>11.2f} {ratio:>7.3f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
