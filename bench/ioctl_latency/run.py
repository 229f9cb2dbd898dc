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

--profile FILE runs the daemon under cProfile and writes its stats to FILE (pstats);
the timings of that run are then not comparable.
"""

from __future__ import annotations

import argparse
import os
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

PLACEMENTS = [("same CPU", 0, 0), ("different CPUs", 0, 1)]  # (name, server CPU, client CPU)


def build() -> tuple[Path, Path]:
    BIN.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("client", "echo_server"):
        exe = BIN / f"ioctl_latency_{name}"
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'include'}",
                        "-o", str(exe), str(HERE / f"{name}.c")], check=True)
        out.append(exe)
    return out[0], out[1]


def mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_openable(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited {proc.returncode}")
        try:
            os.close(os.open(path, os.O_RDWR))
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{path} did not appear")


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of a running server to one CPU."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, stdout=subprocess.DEVNULL)


def measure(client: Path, path: Path, cpu: int, calls: int, repeat: int) -> int:
    """The best of `repeat` runs' medians (each run: median of batch means)."""
    medians = []
    for _ in range(repeat):
        p = subprocess.run(["taskset", "-c", str(cpu), str(client), str(path), str(calls)],
                           capture_output=True, text=True, check=True)
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

    client, echo = build()
    scratch = Path(tempfile.mkdtemp(prefix="icuse-bench-"))
    scratch.chmod(0o755)
    echo_mnt, dev, mnt = scratch / "echo", scratch / "dev", scratch / "mnt"
    echo_mnt.mkdir()
    dev.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        echo_proc = subprocess.Popen([str(echo), str(echo_mnt)], stdout=subprocess.PIPE, text=True)
        procs.append(echo_proc)
        daemon_cmd = [str(Path(sys.executable).parent / "iommufd-cuse"), "serve", "--dev-dir", str(dev),
                      "--mountpoint", str(mnt), "--log-level", "warning"]
        if args.profile:
            daemon_cmd = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "iommufd_cuse.cli",
                          *daemon_cmd[1:]]
        daemon_proc = subprocess.Popen(daemon_cmd)
        procs.append(daemon_proc)
        wait_openable(echo_mnt / "iommu", echo_proc)
        wait_openable(dev / "iommu", daemon_proc)

        rows = []
        for name, server_cpu, client_cpu in PLACEMENTS:
            pin(echo_proc.pid, server_cpu)
            pin(daemon_proc.pid, server_cpu)
            e = measure(client, echo_mnt / "iommu", client_cpu, args.calls, args.repeat)
            d = measure(client, dev / "iommu", client_cpu, args.calls, args.repeat)
            rows.append((f"{name} (server {server_cpu}, client {client_cpu})", e, d))

        print(f"IOMMU_OPTION(GET RLIMIT_MODE) round trip, median of batch means, "
              f"{args.calls} calls, best of {args.repeat}")
        print(f"{'placement':<36} {'echo (ns)':>10} {'daemon (ns)':>12} {'daemon/echo':>12}")
        for label, e, d in rows:
            print(f"{label:<36} {e:>10} {d:>12} {d / e:>12.2f}")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for m in (echo_mnt, mnt):
            if mounted(m):
                subprocess.run(["umount", "-l", str(m)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
