"""The package's structure as docs/architecture.md states it: every module imports on
its own, and imports stay at the top of their module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import iommufd_cuse

PACKAGE = Path(iommufd_cuse.__file__).parent


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def test_the_package_has_the_modules_it_should():
    mods = _modules()
    assert "iommufd_cuse.iommufd.object" in mods and "iommufd_cuse.iommufd.main" in mods
    assert len(mods) > 30


# Each module imported first, in a state where no module of the package is loaded
# yet: an import cycle shows as an ImportError (a partly initialised module) for the
# module that enters it. One interpreter for all (forgetting the package's modules
# between them) rather than one each: the same check for a fraction of the CPU.
_IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "iommufd_cuse" or m.startswith("iommufd_cuse.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *_modules()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_cycle_would_be_seen(tmp_path):
    """The check above fails for a package whose modules import each other."""
    pkg = tmp_path / "iommufd_cuse"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import B\nA = 1\n")
    (pkg / "b.py").write_text("from .a import A\nB = 2\n")
    r = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, "iommufd_cuse.a"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1 and "iommufd_cuse.a" in r.stdout


def _function_imports(tree: ast.Module) -> list[int]:
    """Lines of imports anywhere but at module level (an `if TYPE_CHECKING:` block
    at module level counts as module level: it never runs)."""
    top: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            top.update(id(n) for n in node.body)
        else:
            top.add(id(node))
    return sorted(n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top)


# module -> why an import in it sits inside a function (each also in docs/architecture.md)
FUNCTION_IMPORTS_ALLOWED: dict[str, str] = {}


def test_imports_are_at_the_top_of_their_module():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        lines = _function_imports(ast.parse(path.read_text(), rel))
        if lines and rel not in FUNCTION_IMPORTS_ALLOWED:
            found[rel] = lines
    assert found == {}


def test_function_imports_are_found():
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import sys\ndef f():\n    import json\n")
    assert _function_imports(tree) == [5]
