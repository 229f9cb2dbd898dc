"""The pytest plugin as a user meets it: pytest run in a subprocess on test files in a
scratch directory outside the project, using only the plugin's fixtures and the
client; each run starts and stops real daemons."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import NOBODY, ROOT, scratch_dir

DOCS = ROOT / "docs" / "pytest.md"


def pytest_in(
    where: Path, *args: str, user: int | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """pytest on the files in where, as a user would run it there."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}, **(env or {})}
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *argv]
    return subprocess.run(argv, cwd=where, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project: its own directory and an empty pytest configuration."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return tmp_path


def section(output: str, title: str) -> str:
    """One test's report in pytest's output: from its header to the next header or summary line.
    (On CI, pytest prints the summary's messages untruncated, so the rest of the output says more.)"""
    start = output.index(title)
    body = output.index("\n", start) + 1
    end = re.search(r"^(_{3,} |={3,} )", output[body:], re.M)
    return output[start : body + end.start()] if end else output[start:]


def bases(output: str) -> set[str]:
    """The daemons' scratch directories named in a run's output."""
    return set(re.findall(r"(/tmp/iommufd-cuse-pytest-[\w-]+?)/dev/", output))


def mounted_under(base: str) -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if line.split()[1].startswith(base + "/")]


def test_docs_example_passes_and_its_leak_errors(project: Path) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    (project / "test_edu.py").write_text(code)
    p = pytest_in(project)
    out = p.stdout
    assert p.returncode == 1, out + p.stderr
    assert "PASSED test_edu.py::test_edu_dma_through_the_iommu" in out
    assert "ERROR test_edu.py::test_leaks_an_ioas" in out and "2 passed, 1 error" in out  # the leak: its call passed
    assert "ERROR at teardown of test_leaks_an_ioas" in out
    assert (
        "test_edu.py::test_leaks_an_ioas left state behind in the daemon:\n"
        "  - the `iommufd` fixture's context still holds ioas 1 (0 areas, 0 pages pinned)"
    ) in out
    # the status of that moment, and the log section
    assert "objects: 1 ioas" in out and "iommufd-cuse daemon log" in out
    (base,) = bases(out)
    assert not os.path.exists(base) and not mounted_under(base)


LEAKS = """
import mmap
import time

from iommufd_cuse.client import Iommufd, VfioDevice

EDU = "0000:00:04.0"


def test_context_left_open(iommufd_daemon, iommufd):
    global kept
    kept = Iommufd.open(iommufd_daemon.iommu)


def test_device_left_open_pins_and_owns(iommufd_daemon, iommufd):
    global dev, mem, other
    kept.close()
    dev = VfioDevice.open(iommufd_daemon.device_node(EDU))
    dev.bind(iommufd)
    ioas = iommufd.ioas()
    mem = mmap.mmap(-1, 1 << 16)
    ioas.map(mem, iova=0x100000)
    dev.attach(ioas)
    dev.detach()
    ioas.unmap()
    ioas.destroy()
    dev.close()
    # the same again on a context the test opened and left open
    other = Iommufd.open(iommufd_daemon.iommu)
    dev = VfioDevice.open(iommufd_daemon.device_node(EDU))
    dev.bind(other)
    ioas = other.ioas()
    ioas.map(mem, iova=0x100000)
    dev.attach(ioas)


def test_then_the_daemon_is_clean_again(iommufd_daemon, iommufd, vfio_device):
    dev.close()
    other.close()
    for _ in range(500):  # the daemon releases closed files after close() returns
        st = iommufd_daemon.status()
        if len(st["contexts"]) == 1:
            break
        time.sleep(0.02)
    assert [c["objects"] for c in st["contexts"]] == [[]]  # only this test's fixture
    assert st["pinned_pages"] == 0
    assert vfio_device(EDU).bind(iommufd) == 1


def test_a_failure_carries_the_daemon_log(vfio_device, iommufd):
    vfio_device(EDU).bind(iommufd)
    assert False, "the test's own failure"


def test_so_does_one_with_the_daemon_alone(iommufd_daemon):
    with Iommufd.open(iommufd_daemon.iommu) as ctx, VfioDevice.open(iommufd_daemon.device_node(EDU)) as dev:
        dev.bind(ctx)
    assert False, "a failure without the leak check"
"""


def test_every_kind_of_leak_is_named(project: Path) -> None:
    (project / "test_leaks.py").write_text(LEAKS)
    p = pytest_in(project)
    out = p.stdout
    assert p.returncode == 1, out + p.stderr
    assert "2 failed, 3 passed, 2 errors" in out
    leak1 = section(out, "ERROR at teardown of test_context_left_open")
    # the fixture's context is 1, the test's own 2
    assert "left state behind in the daemon:\n  - context 2 (pid " in leak1
    assert re.search(r"  - context 2 \(pid \d+ \S+, tid \d+\) is still open: close it\n\n", leak1)
    leak2 = section(out, "ERROR at teardown of test_device_left_open_pins_and_owns")
    assert re.search(
        r"  - context 2 \(pid \d+ \S+, tid \d+\) is still open, holding device 1, ioas 2 "
        r"\(1 area, 16 pages pinned\), hwpt_paging 3: close it\n"
        r"  - 16 pages are pinned \(0 before the test\)\n"
        r"  - group 4 is owned by userspace \(context 2 \(pid \d+ \S+\)\): close its devices\n",
        leak2,
    )
    assert "the daemon's status after the test:" in leak2 and "0x0000000000100000       0x10000  rw" in leak2
    assert "PASSED test_leaks.py::test_then_the_daemon_is_clean_again" in out
    failed = section(out, "_ test_a_failure_carries_the_daemon_log _")
    assert "the test's own failure" in failed
    log = failed[failed.index("iommufd-cuse daemon log") :]
    assert "0000:00:04.0 bound to a context as device 1" in log
    assert "left state behind" not in failed  # it left nothing: the fixture's close released it
    alone = section(out, "_ test_so_does_one_with_the_daemon_alone _")
    assert "a failure without the leak check" in alone
    log = alone[alone.index("iommufd-cuse daemon log") :]
    assert "0000:00:04.0 bound to a context as device 1" in log  # (its release is logged later, maybe after)
    (base,) = bases(out)
    assert not os.path.exists(base) and not mounted_under(base)


XDIST = """
import json
import mmap
import os

import pytest

EDU = "0000:00:04.0"


@pytest.mark.parametrize("n", range(4))
def test_each_worker_has_its_own_daemon(n, iommufd_daemon, iommufd, vfio_device):
    st = iommufd_daemon.status()
    with open(os.environ["RECORD"], "a") as f:
        print(json.dumps([os.environ["PYTEST_XDIST_WORKER"], iommufd_daemon.dev_dir, st["daemon"]["pid"]]), file=f)
    # the same device, bound at once in both workers: each daemon has its own
    dev = vfio_device(EDU)
    dev.bind(iommufd)
    ioas = iommufd.ioas()
    mem = mmap.mmap(-1, 1 << 20)
    ioas.map(mem, iova=0x100000)
    dev.attach(ioas)
    dev.detach()
    ioas.unmap()
    ioas.destroy()
"""


def test_xdist_workers_get_separate_daemons(project: Path) -> None:
    (project / "test_parallel.py").write_text(XDIST)
    record = project / "record"
    p = pytest_in(project, "-n", "2", env={"RECORD": str(record)})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 passed" in p.stdout
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    by_worker = {w: (d, pid) for w, d, pid in rows}
    assert sorted(by_worker) == ["gw0", "gw1"]  # both workers ran tests...
    (d0, pid0), (d1, pid1) = by_worker.values()
    assert d0 != d1 and pid0 != pid1  # ...each on a daemon of its own
    assert len({tuple(r) for r in rows}) == 2  # one daemon per worker for the whole session
    for d in (d0, d1):
        base = os.path.dirname(d)
        assert not os.path.exists(base) and not mounted_under(base)


OPTIONS = """
from iommufd_cuse import uapi

U64_MAX = (1 << 64) - 1


def test_its_topology_and_test_mode(iommufd_daemon, iommufd):
    assert iommufd_daemon.devices() == ["0000:00:07.0"]
    assert iommufd_daemon.devices(model="edu") == []
    ioas = iommufd.ioas()
    add = uapi.IOMMU_TEST_CMD_UNION["add_reserved"]
    data = add.pack(add.new(start=0x10000, length=0x10000)).ljust(uapi.iommu_test_cmd.FIELDS["data"][1], b"\\0")
    r = iommufd.raw(uapi.IOMMU_TEST_CMD, uapi.iommu_test_cmd, op=uapi.IOMMU_TEST_OP_ADD_RESERVED, id=ioas.id, data=data)
    assert (r.rc, r.errno) == EXPECT
    if r.rc == 0:
        assert ioas.iova_ranges()[0] == [(0, 0xFFFF), (0x20000, U64_MAX)]
    ioas.destroy()
"""

CONFIG = """
[[iommu]]
name = "smmu0"
hw_info_type = "arm_smmuv3"

[[device]]
bdf = "0000:00:07.0"
model = "dma-engine"
iommu = "smmu0"
group = 7
"""


@pytest.mark.parametrize("selftest", [True, False])
def test_config_and_selftest_options(project: Path, selftest: bool) -> None:
    expect = "(0, 0)" if selftest else "(-1, errno.ENOTTY)"  # IOMMU_TEST_CMD only in test mode
    (project / "test_options.py").write_text(f"import errno\nEXPECT = {expect}\n" + OPTIONS)
    (project / "topology.toml").write_text(CONFIG)
    args = ["--iommufd-config", "topology.toml", *(["--iommufd-selftest"] if selftest else [])]
    p = pytest_in(project, *args)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout + p.stderr


def test_inert_unless_used_and_skipped_without_root() -> None:
    where = scratch_dir()  # nobody must be able to enter it
    try:
        (where / "pytest.ini").write_text("[pytest]\n")
        (where / "test_plain.py").write_text("def test_plain():\n    pass\n\n\ndef test_daemon(iommufd):\n    pass\n")
        p = pytest_in(where, "-k", "not daemon")  # as root: no daemon for a test without the fixtures
        assert p.returncode == 0 and "1 passed" in p.stdout and not bases(p.stdout), p.stdout + p.stderr
        assert "--iommufd-config" in pytest_in(where, "--help").stdout  # loaded by its entry point
        p = pytest_in(where, user=NOBODY)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "SKIPPED" in p.stdout and "iommufd_daemon needs root" in p.stdout
        p = pytest_in(where, "-p", "no:iommufd_cuse")
        assert "fixture 'iommufd' not found" in p.stdout
    finally:
        import shutil

        shutil.rmtree(where, ignore_errors=True)
