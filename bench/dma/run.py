"""dma-engine copy throughput against memcpy of the same size, in the same run.

    .venv/bin/python bench/dma/run.py [--size BYTES] [--rounds N] [--runs R] [--profile FILE]

Compiles examples/dma_engine.c (the driver) and bench/dma/memcpy.c (the
baseline), starts the daemon (`iommufd-cuse serve`) on scratch directories
under /tmp, and then, --rounds times, interleaved so that all three see the
same machine state:

  - memcpy: SIZE bytes between two prefaulted buffers of one process, R times;
  - the engine on anonymous memory: one driver process copies SIZE bytes in
    1 MiB descriptors (16 per transfer, an interrupt per transfer) R times;
  - the same on memfd memory (MAP_SHARED of a memfd);
  - and, for information (no target), on anonymous memory the driver asked
    transparent huge pages for (madvise(MADV_HUGEPAGE), 2 MiB aligned), as
    VMMs do for guest RAM: the kernel's copies of another process's memory
    are far cheaper on huge pages.

Each driver run is timed from its first doorbell to its last completion
interrupt, and verified byte for byte by the driver. The first run of each
driver process is reported apart as "cold" (the daemon touches the pages for
the first time); the medians are over the other runs of every round. Ratio =
memcpy time / engine time (1.0: as fast as memcpy). Targets: memfd >= 0.8,
anonymous >= 0.3. Everything it started is stopped and removed at the end.

The daemon's long copies use every CPU (docs/performance.md), so nothing is
pinned. --profile FILE runs the daemon under cProfile (timings then not comparable).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import BIN, ROOT, compile_c, serve_daemon  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = {"anon": 0.3, "memfd": 0.8}
# (dma_engine -m KIND, label): the targets are for plain anonymous and memfd memory
KINDS = (
    ("memfd", "engine, memfd (MAP_SHARED)"),
    ("anon", "engine, anonymous"),
    ("thp", "engine, anonymous on huge pages"),
)
RUN_RE = re.compile(r"^run (\d+): .* in ([0-9.]+) ms", re.M)


def build() -> tuple[Path, Path]:
    return (
        compile_c(BIN / "dma_memcpy", HERE / "memcpy.c"),
        compile_c(BIN / "dma_engine", ROOT / "examples" / "dma_engine.c"),
    )


def times(argv: list[str]) -> list[float]:
    """Run a client to completion; the ms of each of its runs, in order."""
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{argv} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    runs = sorted((int(n), float(ms)) for n, ms in RUN_RE.findall(p.stdout))
    return [ms for _, ms in runs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64 << 20, help="bytes per copy (default 64 MiB)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--runs", type=int, default=9, help="copies per client process (default 9)")
    ap.add_argument("--profile", metavar="FILE", help="run the daemon under cProfile, stats to FILE")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the daemon mounts a FUSE file system")
    if args.runs < 2:
        raise SystemExit("--runs must be at least 2 (the first run of a driver is cold)")

    memcpy, engine = build()
    with serve_daemon("icuse-bench-dma-", profile=args.profile) as (proc, dev):
        nodes = [str(dev / "iommu"), str(dev / "vfio" / "devices" / "vfio1")]

        base: list[float] = []
        warm: dict[str, list[float]] = {kind: [] for kind, _ in KINDS}
        cold: dict[str, list[float]] = {kind: [] for kind, _ in KINDS}
        for _ in range(args.rounds):
            base += times([str(memcpy), str(args.size), str(args.runs)])
            for kind, _ in KINDS:
                t = times([str(engine), "-s", str(args.size), "-m", kind, "-r", str(args.runs), *nodes])
                cold[kind].append(t[0])
                warm[kind] += t[1:]

    size_mib = args.size >> 20
    m = statistics.median(base)
    gbs = lambda ms: args.size / ms / 1e6  # noqa: E731
    print(
        f"copy of {size_mib} MiB: dma-engine (1 MiB descriptors, 16 per transfer, MSI-X per transfer) "
        f"vs memcpy; {args.rounds} rounds x {args.runs} runs, medians; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(f"{'copy':<34} {'median ms':>10} {'GB/s':>7} {'ratio':>7} {'target':>7}  {'cold ms':>8}")
    print(f"{'memcpy':<34} {m:>10.2f} {gbs(m):>7.2f} {1.0:>7.2f} {'':>7}  {'':>8}")
    for kind, label in KINDS:
        e = statistics.median(warm[kind])
        ratio = m / e
        target = TARGETS.get(kind)
        verdict = "" if target is None else "met" if ratio >= target else "MISSED"
        shown = "" if target is None else f">={target}"
        print(
            f"{label:<34} {e:>10.2f} {gbs(e):>7.2f} {ratio:>7.2f} {shown:>7}  "
            f"{statistics.median(cold[kind]):>8.2f}  {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
