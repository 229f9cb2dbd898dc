"""NVMe reads through the emulated controller against pread of its backing file, in the same run.

    .venv/bin/python bench/nvme/run.py [--span BYTES] [--rounds N] [--profile FILE]

Compiles examples/nvme.c (a userspace NVMe driver), starts the daemon
(`iommufd-cuse serve`) with one NVMe controller whose namespace is a file in a
scratch directory under /tmp, and runs the driver --rounds times with -B: it
writes the first SPAN bytes of the namespace through the controller (so the
file's pages are in the page cache), then, case by case,

  - 4 KiB random reads at queue depth 1 and at 32, and 1 MiB sequential reads
    at queue depth 1 and at 8, through the controller into memfd memory, timed
    from the first doorbell to the last completion, in two modes: "irq" (an I/O
    queue pair whose completions signal an MSI-X vector, waited for on its eventfd)
    and "polled" (a pair created with interrupts off, the driver spinning on the
    phase bit of the next completion entry, as SPDK and libvfn do);
  - the same offsets read from the backing file with pread(2) into the same
    memory, by the same process, right after.

Ratio = device IOPS / pread IOPS (1.0: as fast as pread from the page cache);
polled/irq = the polled mode's IOPS over the interrupt mode's, of the same round.
Target: 1 MiB sequential >= 0.5 (pread itself is synchronous: one read at a time).
The medians over the rounds are printed.
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

TARGETS = {f"1m-seq-qd{qd}-{mode}": 0.5 for qd in (1, 8) for mode in ("irq", "polled")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--span", type=int, default=64 << 20, help="bytes of the namespace read (default 64 MiB)")
    ap.add_argument("--rounds", type=int, default=3, help="driver runs (default 3)")
    ap.add_argument("--profile", metavar="FILE", help="run the daemon under cProfile, stats to FILE")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the daemon mounts a FUSE file system")
    if args.span % (1 << 20):
        raise SystemExit("--span must be a multiple of 1 MiB")

    driver = compile_c(BIN / "nvme", ROOT / "examples" / "nvme.c")
    results = block_driver_rounds("nvme", "0000:00:07.0", 7, driver, args.span, args.rounds, args.profile)

    print(
        f"NVMe reads of a {args.span >> 20} MiB span through the controller vs pread of its backing file "
        f"(page cache); {args.rounds} rounds, medians; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'case':<22} {'dev IOPS':>10} {'dev GB/s':>9} {'pread IOPS':>11} {'pread GB/s':>10} {'ratio':>7} "
        f"{'polled/irq':>10} {'target':>7}"
    )
    for name, rows in results.items():
        med = [statistics.median(r[i] for r in rows) for i in range(5)]
        target = TARGETS.get(name)
        verdict = "" if target is None else "met" if med[4] >= target else "MISSED"
        shown = "" if target is None else f">={target}"
        irq = results.get(name.removesuffix("-polled") + "-irq") if name.endswith("-polled") else None
        speedup = f"{statistics.median(p[0] / i[0] for p, i in zip(rows, irq, strict=True)):.3f}" if irq else ""
        print(
            f"{name:<22} {med[0]:>10.0f} {med[1]:>9.3f} {med[2]:>11.0f} {med[3]:>10.3f} {med[4]:>7.3f} "
            f"{speedup:>10} {shown:>7}  {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
