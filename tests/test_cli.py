"""`iommufd-cuse serve` refuses to start with a one-line error when it cannot work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import trio
from harness import NOBODY, make_daemon, scratch_dir

EXE = str(Path(sys.executable).parent / "iommufd-cuse")


def serve(base: Path, *prefix: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`serve` on scratch paths under base (prefix: a command to run it under, options: more of serve's)."""
    argv = [
        *prefix,
        EXE,
        "serve",
        *options,
        "--dev-dir",
        str(base / "dev"),
        "--mountpoint",
        str(base / "mnt"),
        "--control-socket",
        "",
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("iommufd-cuse: error: "), lines[0]
    for w in words:
        assert w in lines[0], lines[0]


def test_not_root() -> None:
    base = scratch_dir()
    try:
        p = serve(base, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--")
        one_line_error(p, "root")
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_mountpoint_busy_while_another_daemon_serves() -> None:
    base = scratch_dir()
    try:
        async with trio.open_nursery() as nursery:
            d = make_daemon(base)
            await nursery.start(d.run)
            # a second daemon on the same mountpoint (and node paths)
            p = await trio.to_thread.run_sync(lambda: serve(base))
            one_line_error(p, "busy")
            assert (base / "dev" / "iommu").is_symlink()  # the first one's links stay
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_bad_config() -> None:
    base = scratch_dir()
    try:
        cfg = base / "bad.toml"
        cfg.write_text("[[device]]\nbdf = 1\n")
        p = serve(base, options=("--config", str(cfg)))
        one_line_error(p)
        assert not (base / "dev").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unknown_model_option() -> None:
    base = scratch_dir()
    try:
        cfg = base / "opt.toml"
        cfg.write_text(
            "[[iommu]]\nname='a'\n[[device]]\nbdf='0000:00:01.0'\nmodel='dma-engine'\n"
            "iommu='a'\ngroup=1\nwarp_speed=9\n"
        )
        p = serve(base, options=("--config", str(cfg)))
        one_line_error(p, "0000:00:01.0", "warp_speed")
    finally:
        shutil.rmtree(base, ignore_errors=True)
