"""tests/kselftest/compare.py: the verdict of scripts/kselftest.sh on the kernel selftest's TAP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from compare import Outcome, compare, parse_expected, parse_tap, tracebacks

HERE = Path(__file__).resolve().parent

# The harness's output as the kernel's kselftest_harness.h prints it.
TAP = """TAP version 13
1..5
# Starting 5 tests from 2 test cases.
#  RUN           iommufd.simple_close ...
#            OK  iommufd.simple_close
ok 1 iommufd.simple_close
#  RUN           iommufd.global_options ...
# iommufd.c:179:global_options:Expected 0 (0) == ioctl(self->fd, IOMMU_OPTION, &cmd) (-1)
# global_options: Test terminated by assertion
#          FAIL  iommufd.global_options
not ok 2 iommufd.global_options
#  RUN           iommufd_ioas.no_domain.access_rw ...
# access_rw: Test terminated by timeout
#          FAIL  iommufd_ioas.no_domain.access_rw
not ok 3 iommufd_ioas.no_domain.access_rw
#  RUN           iommufd_viommu.no_viommu.hw_queue ...
#      SKIP      Skipping
#            OK  iommufd_viommu.no_viommu.hw_queue
ok 4 iommufd_viommu.no_viommu.hw_queue # SKIP Skipping
#  RUN           iommufd_dirty_tracking.domain_dirty8k.get_dirty_bitmap ...
# iommufd_utils.h:488:get_dirty_bitmap:Expected j < npte (1) == test_bit(i + j, (unsigned long *)bitmap) (0)
#          FAIL  iommufd_dirty_tracking.domain_dirty8k.get_dirty_bitmap
not ok 5 iommufd_dirty_tracking.domain_dirty8k.get_dirty_bitmap
# Totals: pass:2 fail:3 xfail:0 xpass:0 skip:1 error:0
"""


def test_parse_tap_outcomes_and_where_they_fail():
    got = parse_tap(TAP)
    assert got["iommufd.simple_close"] == Outcome("pass")
    assert got["iommufd_viommu.no_viommu.hw_queue"] == Outcome("skip")
    assert got["iommufd.global_options"].result == "fail"
    assert got["iommufd.global_options"].where == "iommufd.c:179"
    assert got["iommufd_ioas.no_domain.access_rw"].where == "timeout"
    assert got["iommufd_dirty_tracking.domain_dirty8k.get_dirty_bitmap"].where == "iommufd_utils.h:488"


def test_compare_flags_every_kind_of_mismatch():
    got = parse_tap(TAP)
    expected = parse_expected(
        "# comment\n"
        "pass iommufd.simple_close\n"
        "fail iommufd.global_options iommufd.c:179 root lacks CAP_SYS_RESOURCE\n"
        "pass iommufd_ioas.no_domain.access_rw\n"  # should pass: failed
        "skip iommufd_viommu.no_viommu.hw_queue\n"
        "fail iommufd_dirty_tracking.domain_dirty8k.get_dirty_bitmap iommufd.c:1 elsewhere\n"  # other place
        "pass iommufd.not_run\n"  # not reported
    )
    bad = compare(got, expected)
    assert len(bad) == 3, bad
    assert any(b.startswith("iommufd_ioas.no_domain.access_rw: expected pass, got fail") for b in bad)
    assert any("expected to fail at iommufd.c:1, failed at iommufd_utils.h:488" in b for b in bad)
    assert any(b == "iommufd.not_run: expected pass, not reported" for b in bad)
    # a case marked failing that passes, and one the file does not know
    bad = compare({"a": Outcome("pass"), "b": Outcome("pass")}, {"a": Outcome("fail", "x.c:1", "why")})
    assert bad == ["a: expected fail at x.c:1, got pass", "b: pass  (not in the expectations file)"]


def test_tracebacks_in_the_daemon_log():
    log = "INFO ok\nERROR IOCTL failed\nTraceback (most recent call last):\n  File x, line 1\nOSError: boom\n"
    assert tracebacks(log) == ["  File x, line 1"]
    assert tracebacks("INFO nothing\n") == []


def test_expectations_file_is_well_formed():
    """Every line of the shipped file parses; every failure names where and why."""
    expected = parse_expected((HERE / "expected-7.3.4.txt").read_text())
    assert len(expected) == 246
    for name, e in expected.items():
        if e.result == "fail":
            assert e.where and len(e.detail) > 10, name


def test_command_line_exit_status_and_closing_line(tmp_path):
    tap = tmp_path / "tap.txt"
    tap.write_text(TAP)
    exp = tmp_path / "expected.txt"
    exp.write_text(
        "pass iommufd.simple_close\n"
        "fail iommufd.global_options iommufd.c:179 no CAP_SYS_RESOURCE here\n"
        "fail iommufd_ioas.no_domain.access_rw timeout too slow\n"
        "skip iommufd_viommu.no_viommu.hw_queue\n"
        "fail iommufd_dirty_tracking.domain_dirty8k.get_dirty_bitmap iommufd_utils.h:488 a bug\n"
    )
    log = tmp_path / "daemon.log"
    log.write_text("INFO fine\n")
    cmd = [sys.executable, str(HERE / "compare.py"), "--expected", str(exp), "--daemon-log", str(log), str(tap)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
    assert p.stdout.splitlines()[-1] == "1 passed, 3 failed, 1 skipped"
    log.write_text("Traceback (most recent call last):\n  File y\n")
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 1 and "TRACEBACK" in p.stdout
