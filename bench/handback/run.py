"""Files handed back: a notified ioctl's round trip against a companion-carried one.

    .venv/bin/python bench/handback/run.py [--calls N] [--repeat R]

Compiles client.c (dynamic) and starts the daemon (`iommufd-cuse serve`) on a scratch
directory, then runs the same client twice, pinned with the daemon to CPU 0:
- companion: LD_PRELOAD of the companion, nodes at the daemon's dev dir;
- seccomp: under `iommufd-cuse run --no-companion`, so the seccomp filter carries the
  file (the daemon's nodes at /dev in run's namespace).
Prints, for each, the median round trip of a plain IOMMU_OPTION, of an
IOMMU_FAULT_QUEUE_ALLOC that hands back a file, and of one with flags 1 (EOPNOTSUPP:
under the filter notified and continued), each as a ratio to IOMMU_OPTION of the same
run, and the seccomp/companion ratio of each call.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import BIN, compile_c, pin, serve_daemon  # noqa: E402

HERE = Path(__file__).resolve().parent
EXE = Path(sys.executable).parent / "iommufd-cuse"
CALLS = ("option", "fault", "continued")


def measure(argv: list[str], env: dict[str, str], repeat: int) -> dict[str, int]:
    """The per-call medians of the run whose fault_ns is lowest of `repeat`."""
    runs = []
    for _ in range(repeat):
        p = subprocess.run(["taskset", "-c", "0", *argv], capture_output=True, text=True, check=True, env=env)
        runs.append({k: int(v) for k, v in (kv.split("=") for kv in p.stdout.split())})
    return min(runs, key=lambda r: r["fault_ns"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="calls of each kind per run (default 300)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per carrier; the best is kept")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the daemon mounts a FUSE file system, run makes a namespace")
    client = compile_c(BIN / "handback_client", HERE / "client.c")
    companion = subprocess.run([str(EXE), "companion"], capture_output=True, text=True, check=True).stdout.strip()
    with serve_daemon("icuse-bench-", stop_timeout=15) as (daemon_proc, dev):
        pin(daemon_proc.pid, 0)
        mnt = dev.parent / "mnt"
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        comp = measure([str(client), str(dev), str(args.calls)], dict(env, LD_PRELOAD=companion), args.repeat)
        run = [str(EXE), "run", "--no-companion", "--mountpoint", str(mnt), "--"]
        secc = measure([*run, str(client), "/dev", str(args.calls)], env, args.repeat)

    print(f"Files handed back, median round trip (ns), {args.calls} calls each, best of {args.repeat}, same CPU")
    print(f"{'call':<40} {'companion':>10} {'/ OPTION':>9} {'seccomp':>10} {'/ OPTION':>9} {'secc/comp':>10}")
    labels = {
        "option": "IOMMU_OPTION (never notified)",
        "fault": "FAULT_QUEUE_ALLOC (a file handed back)",
        "continued": "FAULT_QUEUE_ALLOC flags 1 (continued)",
    }
    for k in CALLS:
        c, s = comp[f"{k}_ns"], secc[f"{k}_ns"]
        print(
            f"{labels[k]:<40} {c:>10} {c / comp['option_ns']:>9.2f} {s:>10} {s / secc['option_ns']:>9.2f} {s / c:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
