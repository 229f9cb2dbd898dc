"""Fixtures of the device model tests (helpers in devhelp.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from devhelp import IrqLog, Port
from memhelp import Memory


@pytest.fixture
def mem() -> Iterator[Memory]:
    m = Memory(64)
    yield m
    m.close()


@pytest.fixture
def port(mem: Memory) -> Port:
    return Port(mem)


@pytest.fixture
def irq() -> IrqLog:
    return IrqLog()
