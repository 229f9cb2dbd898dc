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
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import BIN, compile_c, serve_daemon  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULT_RE = re.compile(r"^result (.*)$", re.M)


def build() -> Path:
    return compile_c(BIN / "map", HERE / "map.c")


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
    with serve_daemon("icuse-bench-map-") as (_, dev):
        rows = [
            (
                "device attached (vfio0)",
                measure(exe, dev / "iommu", str(dev / "vfio" / "devices" / "vfio0"), args.size, args.runs),
            ),
            ("no device", measure(exe, dev / "iommu", "none", args.size, args.runs)),
        ]

    print(
        f"IOAS_MAP + IOAS_UNMAP of {args.size >> 20} MiB of populated anonymous 4 KiB pages vs "
        f"mlock + munlock of the same range; medians of {args.runs}"
    )
    print(f"{'IOAS':<26} {'map ms':>8} {'unmap ms':>9} {'mlock ms':>9} {'munlock ms':>11} {'ratio':>7}")
    for label, r in rows:
        ratio = (r["map_ms"] + r["unmap_ms"]) / (r["mlock_ms"] + r["munlock_ms"])
        verdict = ("met" if ratio <= 1.0 else "MISSED") + " (target <= 1.0)" if label.startswith("device") else ""
        print(
            f"{label:<26} {r['map_ms']:>8.2f} {r['unmap_ms']:>9.2f} {r['mlock_ms']:>9.2f} "
            f"{r['munlock_ms']:>11.2f} {ratio:>7.3f}  {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
