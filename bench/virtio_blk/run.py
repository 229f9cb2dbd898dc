"""virtio-blk reads through the emulated disk against pread of its backing file, in the same run.

    .venv/bin/python bench/virtio_blk/run.py [--span BYTES] [--rounds N] [--profile FILE]

Compiles examples/virtio_blk.c (a userspace virtio-blk driver), starts the daemon
(`iommufd-cuse serve`) with one virtio-blk disk whose backing is a file in a scratch
directory under /tmp, and runs the driver --rounds times with -B: its round trip writes
the first SPAN bytes of the disk through the device (so the file's pages are in the page
cache), then, case by case,

  - 4 KiB random reads at queue depth 1 and at 32, and 1 MiB sequential reads at queue
    depth 1 and at 8 (each a chain of the device's size_max segments, 64 KiB: 16 of its
    seg_max 64), through request queue 0 into memfd memory, timed from the first
    notification to the last completion, completions waited for on the queue's MSI-X
    eventfd;
  - the same offsets read from the backing file with pread(2) into the same memory, by
    the same process, right after.

Ratio = device IOPS / pread IOPS (1.0: as fast as pread from the page cache).
The medians over the rounds are printed. No target: this measures, it does not judge.
Everything it started is stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import BIN, ROOT, block_driver_rounds, compile_c  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--span", type=int, default=64 << 20, help="bytes of the disk read (default 64 MiB)")
    ap.add_argument("--rounds", type=int, default=3, help="driver runs (default 3)")
    ap.add_argument("--profile", metavar="FILE", help="run the daemon under cProfile, stats to FILE")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the daemon mounts a FUSE file system")
    if args.span <= 0 or args.span % (1 << 20):
        raise SystemExit("--span must be a positive multiple of 1 MiB")

    driver = compile_c(BIN / "virtio_blk", ROOT / "examples" / "virtio_blk.c")
    results = block_driver_rounds("virtio-blk", "0000:00:08.0", 8, driver, args.span, args.rounds, args.profile)

    print(
        f"virtio-blk reads of a {args.span >> 20} MiB span through the device vs pread of its backing file "
        f"(page cache); {args.rounds} rounds, medians; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'case':<16} {'dev IOPS':>10} {'dev GB/s':>9} {'pread IOPS':>11} {'pread GB/s':>10} {'ratio':>7}")
    for name, rows in results.items():
        med = [statistics.median(r[i] for r in rows) for i in range(5)]
        print(f"{name:<16} {med[0]:>10.0f} {med[1]:>9.3f} {med[2]:>11.0f} {med[3]:>10.3f} {med[4]:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
