"""Isolation: a victim client's round trip while a hostile client loops on a call
that used to stall the daemon, against the victim alone, in the same run.

    .venv/bin/python bench/isolation/run.py [--calls N]

Compiles bench/isolation/victim.c and the hostile client of the tests
(tests/clients/hostile.c), starts the daemon (`iommufd-cuse serve`) on a scratch
directory, and times N IOMMU_OPTION round trips of the victim (each timed, 200 us
apart) alone, then while the hostile client loops on each of: IOAS_ALLOC with a
4 GiB zero tail, GET_HW_INFO with data_len 4 GiB before a guard page, ALLOW_IOVAS
with 2^20 ranges, IOAS_MAP of 2^63 then attach, and a virtio-blk driver whose every
request is the longest chain the device follows (an indirect table of 1024
descriptors, 1022 of them 512-byte data buffers), 256 at a time. Prints p50 and p99 and the p99
ratio to idle (target <= 3), and for each hostile call how long the daemon takes
to stop on SIGTERM with it in flight (target < 2 s).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import BIN, ROOT, compile_c, serve_daemon  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = ["alloc_tail", "hw_info", "allow_iovas", "map_high", "virtio_chains"]
DEVICE = {"virtio_chains": "vfio5"}  # the virtio-blk's cdev in the default topology; the others use the edu at vfio0


def victim(exe: Path, node: Path, calls: int) -> tuple[int, int]:
    p = subprocess.run([str(exe), str(node), str(calls)], capture_output=True, text=True, check=True)
    f = dict(kv.split("=") for kv in p.stdout.split())
    return int(f["p50_ns"]), int(f["p99_ns"])


def start_hostile(exe: Path, mode: str, dev: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        [str(exe), mode, str(dev / "iommu"), str(dev / "vfio" / "devices" / DEVICE.get(mode, "vfio0")), "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    if p.stdout.readline().strip() != "READY":
        raise SystemExit(f"hostile {mode} did not start")
    return p


def stop_hostile(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="timed victim calls per row (default 2000)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the daemon mounts a FUSE file system")
    victim_exe = compile_c(BIN / "isolation_victim", HERE / "victim.c")
    hostile_exe = BIN / "isolation_hostile"
    subprocess.run(
        ["cc", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'include'}", f"-I{ROOT / 'tests' / 'clients'}", "-o",
         str(hostile_exe), str(ROOT / "tests" / "clients" / "hostile.c")],
        check=True,
    )  # fmt: skip

    rows = []
    with serve_daemon("icuse-bench-iso-") as (_proc, dev):
        node = dev / "iommu"
        victim(victim_exe, node, 200)  # warm up
        idle = victim(victim_exe, node, args.calls)
        for mode in MODES:
            h = start_hostile(hostile_exe, mode, dev)
            try:
                time.sleep(0.2)
                rows.append((mode, *victim(victim_exe, node, args.calls)))
            finally:
                stop_hostile(h)
    stops = {}
    for mode in MODES:
        with serve_daemon("icuse-bench-iso-") as (proc, dev):
            h = start_hostile(hostile_exe, mode, dev)
            try:
                time.sleep(0.3)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
                stops[mode] = time.monotonic() - t0
            finally:
                stop_hostile(h)

    print(f"victim IOMMU_OPTION round trip, {args.calls} calls per row; p99 ratio to idle (target <= 3)")
    print(f"{'hostile client loops on':<28} {'p50 (us)':>9} {'p99 (us)':>9} {'p99/idle':>9} {'SIGTERM (s)':>12}")
    print(f"{'nothing (idle)':<28} {idle[0] / 1e3:>9.1f} {idle[1] / 1e3:>9.1f} {1:>9.2f} {'':>12}")
    for mode, p50, p99 in rows:
        print(f"{mode:<28} {p50 / 1e3:>9.1f} {p99 / 1e3:>9.1f} {p99 / idle[1]:>9.2f} {stops[mode]:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
