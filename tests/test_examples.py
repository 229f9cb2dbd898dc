"""The examples of the README, compiled as a user would and run against the daemon."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clientkit import wait_until
from harness import INCLUDE, NOBODY, ROOT, built_examples, run

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def ioas_alloc() -> Iterator[Path]:
    with built_examples("ioas_alloc") as exes:  # a world-traversable directory: the example also runs as nobody
        yield exes["ioas_alloc"]


async def test_ioas_alloc(daemon, ioas_alloc: Path) -> None:
    p = await run([ioas_alloc, Path(daemon.dev_dir) / "iommu"])
    assert p.stdout.decode().splitlines() == [
        "ioas id 1",
        # a fresh IOAS with no device attached: the whole 64-bit space, any alignment
        # (what the reference kernel answered)
        "iova range 0: [0x0, 0xffffffffffffffff]",
        "iova alignment 0x1",
        "destroyed ioas 1",
    ]
    await wait_until(lambda: not daemon.system.contexts, what="context released at exit")


async def test_ioas_alloc_reports_errors(daemon, ioas_alloc: Path, tmp_path: Path) -> None:
    # /dev/iommu is root:root 0660: nobody may not open it
    p = await run([ioas_alloc, Path(daemon.dev_dir) / "iommu"], user=NOBODY, check=False)
    assert p.returncode == 1
    assert p.stderr.decode().strip().endswith("Permission denied")
    p = await run([ioas_alloc, tmp_path / "missing"], check=False)
    assert p.returncode == 1
    assert "No such file or directory" in p.stderr.decode()


async def test_readme_c_example(daemon, tmp_path: Path) -> None:
    """The C program printed in the README compiles and allocates and destroys an IOAS."""
    import re

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```c\n(.*?)```", readme, re.S).group(1)
    node = str(Path(daemon.dev_dir) / "iommu")
    src = tmp_path / "readme.c"
    src.write_text(code.replace('"/dev/iommu"', f'"{node}"'))
    exe = tmp_path / "readme"
    subprocess.run(["cc", "-Wall", "-Werror", f"-I{INCLUDE}", "-o", str(exe), str(src)], check=True)
    p = await run([exe])
    assert p.stdout.decode() == "ioas 1\n"
    await wait_until(lambda: not daemon.system.contexts, what="context released at exit")
