"""Compare the TAP output of the kernel's iommufd selftest with the expectations file.

    compare.py [--expected FILE] [--via preload|seccomp] [--daemon-log LOG] TAP

The expectations file has one line per case (blank lines and `#` comments aside):

    pass NAME
    skip NAME
    fail NAME WHERE  REASON...

An outcome may be for one way of handing files back only (kselftest.sh's --via):
`fail@seccomp NAME WHERE REASON` holds for the run with --via seccomp, in place of the
plain line of that case.

WHERE is where the case fails: the `file:line` of its first failed assertion
(`iommufd.c:179`), or `timeout` when the harness ended it. A case marked `fail` must
fail there; one marked `pass` must pass; `skip` must skip. Any other outcome, a case
the file does not know, a case of the file the run did not report, or a traceback in
the daemon's log is a mismatch: the exit status is 1. Without --expected the run is
only reported. The last line printed is "N passed, M failed, K skipped".
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

_RESULT = re.compile(r"^(ok|not ok) \d+ (\S+)(?: # (SKIP|XFAIL)\b.*)?$")
_RUN = re.compile(r"^#\s+RUN\s+(\S+) \.\.\.$")
_WHERE = re.compile(r"^# ([\w.-]+\.[ch]:\d+):")
_TIMEOUT = re.compile(r"^# \S+: Test terminated by timeout$")


@dataclass
class Outcome:
    result: str  # pass, fail or skip
    where: str = ""  # for a failure: file:line of the first failed assertion, or "timeout"
    detail: str = ""  # the harness's first diagnostic line


def parse_tap(text: str) -> dict[str, Outcome]:
    """Case name -> its outcome, from the harness's TAP (and the diagnostics before each result)."""
    outcomes: dict[str, Outcome] = {}
    diag: list[str] = []
    for line in text.splitlines():
        if _RUN.match(line):
            diag = []
            continue
        m = _RESULT.match(line)
        if not m:
            if line.startswith("# "):
                diag.append(line)
            continue
        ok, name, directive = m.groups()
        if directive == "SKIP":
            outcomes[name] = Outcome("skip")
        elif ok == "ok":
            outcomes[name] = Outcome("pass")
        else:
            where, detail = "", ""
            for d in diag:
                if w := _WHERE.match(d):
                    where, detail = w.group(1), d[2:]
                    break
                if _TIMEOUT.match(d):
                    where, detail = "timeout", d[2:]
                    break
            outcomes[name] = Outcome("fail", where or "unknown", detail or (diag[0][2:] if diag else ""))
        diag = []
    return outcomes


def parse_expected(text: str, via: str = "preload") -> dict[str, Outcome]:
    expected: dict[str, Outcome] = {}
    qualified: dict[str, Outcome] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 3)
        result, _, only = fields[0].partition("@")
        table = expected if not only else qualified if only == via else {}
        if result in ("pass", "skip") and len(fields) == 2:
            table[fields[1]] = Outcome(result)
        elif result == "fail" and len(fields) == 4:
            table[fields[1]] = Outcome("fail", fields[2], fields[3])
        else:
            raise SystemExit(f"expectations line {n}: want 'pass|skip NAME' or 'fail NAME WHERE REASON': {raw!r}")
    return expected | qualified


def tracebacks(log: str) -> list[str]:
    lines = log.splitlines()
    return [lines[i + 1] if i + 1 < len(lines) else "" for i, line in enumerate(lines) if "Traceback" in line]


def compare(got: dict[str, Outcome], expected: dict[str, Outcome]) -> list[str]:
    """One line per mismatch between the run and the expectations."""
    bad = []
    for name, g in got.items():
        e = expected.get(name)
        if e is None:
            bad.append(f"{name}: {g.result} {g.where} (not in the expectations file)")
        elif e.result != g.result:
            want = f"fail at {e.where}" if e.result == "fail" else e.result
            bad.append(f"{name}: expected {want}, got {g.result} {g.detail}".rstrip())
        elif e.result == "fail" and e.where != g.where:
            bad.append(f"{name}: expected to fail at {e.where}, failed at {g.where}: {g.detail}")
    bad += [f"{name}: expected {e.result}, not reported" for name, e in expected.items() if name not in got]
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tap", type=Path)
    ap.add_argument("--expected", type=Path)
    ap.add_argument("--via", default="preload", help="how files were handed back (qualified expectations)")
    ap.add_argument("--daemon-log", type=Path)
    args = ap.parse_args()
    got = parse_tap(args.tap.read_text(errors="replace"))
    status = 0
    for name, g in got.items():
        if g.result == "fail":
            print(f"FAIL {name}: {g.detail}")
    if args.expected is not None:
        mismatches = compare(got, parse_expected(args.expected.read_text(), args.via))
        for m in mismatches:
            print(f"MISMATCH {m}")
        if mismatches:
            status = 1
    if not got:
        print("no test results in the TAP output")
        status = 1
    if args.daemon_log is not None and args.daemon_log.exists():
        for tb in tracebacks(args.daemon_log.read_text(errors="replace")):
            print(f"TRACEBACK in the daemon's log: {tb.strip()}")
            status = 1
    counts = {r: sum(o.result == r for o in got.values()) for r in ("pass", "fail", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return status


if __name__ == "__main__":
    sys.exit(main())
