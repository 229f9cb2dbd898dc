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


# -- the layers and what each may import (docs/architecture.md) ----------------------------
# Module (or package) -> the package's modules it may import at run time (prefixes;
# imports under `if TYPE_CHECKING:` are for annotations only and not counted). The
# longest matching key rules a module.
LAYERS: dict[str, tuple[str, ...]] = {
    "errors": (),
    "uapi": (),
    "config": (),
    "_native": (),
    "transport": ("errors", "_native", "transport"),
    "iommu": ("errors", "_native", "uapi", "config", "iommu"),
    "system": ("errors", "_native"),
    "iommufd": ("errors", "_native", "uapi", "config", "transport", "iommu", "system", "iommufd"),
    # device models see their DMA port, interrupt sink and config space, nothing else
    "vfio.pci": ("vfio.pci.model", "vfio.pci.config", "vfio.pci.blockstore"),
    # the vfio-pci driver: DMA through the IOMMU layer's domains, never the native library
    "vfio.pci.core": ("errors", "uapi", "iommu.core", "iommu.domain", "system", "transport.caller", "vfio.pci"),
    "vfio": ("errors", "uapi", "transport", "iommu", "iommufd", "vfio"),
    # the sysfs view: a node tree of the topology's values (driver core, not iommufd)
    "sysfs": ("errors", "uapi", "transport", "iommu", "system"),
    "daemon": ("errors", "config", "system", "transport", "iommu", "iommufd", "vfio", "sysfs"),
    # run: a mount namespace and an exec, and the seccomp filter whose listener goes to the
    # daemon (the notified commands, the listener's node): nothing else of the daemon's insides
    "run": ("iommufd.notified", "transport.usernotif"),
    "service": ("errors", "uapi", "system", "daemon", "iommufd.debug", "service"),
    "install": ("config",),
    "cli": ("config", "daemon", "install", "service", "run"),
    # a client of the uAPI works against the kernel too: nothing of the daemon
    "client": ("uapi",),
    "pytest_plugin": ("client", "service"),
}


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _known_modules() -> set[str]:
    return {_module_of(p) for p in PACKAGE.rglob("*.py")}


def _runtime_imports(source: str, mod: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules (relative names) that the source of module mod imports
    when it runs."""
    pkg = mod.split(".") if is_package else mod.split(".")[:-1]
    tree = ast.parse(source)
    skipped = {
        id(n)
        for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    out: set[str] = set()
    for n in ast.walk(tree):
        if id(n) in skipped:
            continue
        if isinstance(n, ast.Import):
            out.update(a.name.removeprefix("iommufd_cuse.") for a in n.names if a.name.startswith("iommufd_cuse."))
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg[: len(pkg) - (n.level - 1)] + (n.module.split(".") if n.module else [])
                target = ".".join(base)
            elif n.module and n.module.startswith("iommufd_cuse"):
                target = n.module.removeprefix("iommufd_cuse").lstrip(".")
            else:
                continue
            for a in n.names:  # `from . import device` imports the module device
                sub = f"{target}.{a.name}" if target else a.name
                out.add(sub if sub in known else target)
    out.discard("")
    return out


def _rule(mod: str) -> tuple[str, tuple[str, ...]]:
    keys = [k for k in LAYERS if mod == k or mod.startswith(k + ".")]
    assert keys, f"{mod} is in no layer of LAYERS (docs/architecture.md)"
    key = max(keys, key=len)
    return key, LAYERS[key]


def _allowed(dep: str, allowed: tuple[str, ...]) -> bool:
    return any(dep == a or dep.startswith(a + ".") for a in allowed)


def _layer_violations(mod: str, deps: set[str]) -> list[str]:
    key, allowed = _rule(mod)
    return [
        f"{mod} imports {dep} (layer {key} may import {', '.join(allowed) or 'nothing'})"
        for dep in sorted(deps)
        if not _allowed(dep, allowed) and not (dep == mod or dep.startswith(mod + "."))
    ]


def test_each_layer_imports_only_what_it_may():
    known = _known_modules()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = _module_of(path)
        if mod:
            wrong += _layer_violations(mod, _runtime_imports(path.read_text(), mod, path.name == "__init__.py", known))
    assert wrong == []


def test_the_layer_rules_would_catch_a_wrong_import():
    known = _known_modules()
    src = (
        "from ... import uapi\n"
        "from ..._native import lib\n"
        "from ...iommu.domain import dma_copy\n"
        "if TYPE_CHECKING:\n"
        "    from ...iommufd import main\n"
    )
    deps = _runtime_imports(src, "vfio.pci.core", False, known)
    assert deps == {"uapi", "_native", "iommu.domain"}
    assert _layer_violations("vfio.pci.core", deps) == [
        "vfio.pci.core imports _native (layer vfio.pci.core may import " + ", ".join(LAYERS["vfio.pci.core"]) + ")"
    ]
    assert _layer_violations("vfio.pci.edu", {"iommu.domain"}) != []
    assert (
        _layer_violations(
            "transport.server", _runtime_imports("from ..iommufd import main\n", "transport.server", False, known)
        )
        != []
    )


def test_device_models_and_vfio_never_touch_a_page_table():
    """The vfio layer reaches memory through iommu/domain.py's DMA calls only: no
    attribute pt (a domain's native page table) anywhere under vfio/."""
    found = []
    for path in sorted((PACKAGE / "vfio").rglob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Attribute) and n.attr == "pt":
                found.append(f"{path.relative_to(PACKAGE)}:{n.lineno}")
    assert found == []
