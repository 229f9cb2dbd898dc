"""Helpers for tests that run C clients against the daemon.

Clients print one line per call (tests/clients/stepper.h):

    STEP <name> rc=<rc> errno=<errno> [key=value ...]
"""

from __future__ import annotations

import errno as E
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from harness import serving

from iommufd_cuse import config
from iommufd_cuse.daemon import Daemon


@dataclass
class Step:
    name: str
    rc: int
    errno: int
    fields: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def int(self, key: str) -> int:
        return int(self.fields[key], 0)

    @property
    def outcome(self) -> str:
        """'OK' or the errno's name, as the reference answers write it."""
        if self.rc >= 0 and self.errno == 0:
            return "OK"
        return _NAMES.get(self.errno) or E.errorcode.get(self.errno, str(self.errno))


# the names the kernel's headers (and the reference answers) use for shared numbers
_NAMES = {E.EOPNOTSUPP: "EOPNOTSUPP", E.EAGAIN: "EAGAIN", E.EDEADLK: "EDEADLK"}


def parse_steps(text: str | bytes) -> dict[str, Step]:
    """Steps by name (names are unique within one client run)."""
    if isinstance(text, bytes):
        text = text.decode()
    steps: dict[str, Step] = {}
    for line in text.splitlines():
        if not line.startswith("STEP "):
            continue
        name, rc, err, *rest = line[5:].split(" ")
        assert rc.startswith("rc=") and err.startswith("errno="), line
        assert name not in steps, f"step {name} printed twice"
        fields = dict(kv.split("=", 1) for kv in rest)
        steps[name] = Step(name, int(rc[3:]), int(err[6:]), fields)
    return steps


def outcomes(steps: dict[str, Step]) -> dict[str, str]:
    return {name: s.outcome for name, s in steps.items()}


def mismatches(steps: dict[str, Step], expected: dict[str, str]) -> list[str]:
    """Readable differences between expected outcomes and what the client saw."""
    out = []
    for name, want in expected.items():
        got = steps[name].outcome if name in steps else "(not run)"
        if got != want:
            out.append(f"{name}: got {got}, kernel answers {want}")
    return out


# -- daemons with a configuration of their own, and waiting for the daemon's state -----

NOBODY = 65534


def cap_effective(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


CAP_SYS_RESOURCE = 24


@asynccontextmanager
async def config_daemon(toml: str) -> AsyncIterator[Daemon]:
    """Like the `daemon` fixture, with a configuration of its own (TOML text)."""
    async with serving(config.parse(toml)) as d:
        yield d


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0, what: str = "condition") -> None:
    """Poll predicate (on the trio loop, so the daemon keeps serving) until true."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
    assert predicate(), f"{what}: still false after {timeout} s"
