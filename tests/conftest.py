"""Fixtures of the whole suite; the helpers live in harness.py (a module of its
own: tests/vfio has a conftest.py too, so `from harness import` is ambiguous)."""

from harness import cbuild, daemon, scripted  # noqa: F401  (fixtures)
