"""`iommufd-cuse install` / `uninstall`: the systemd unit and the default
configuration, under a root directory (/ for the real system).

install writes <root>/etc/systemd/system/iommufd-cuse.service (the unit of
systemd/, with ExecStart pointing at this installation's console script) and
<root>/etc/iommufd-cuse/config.toml if there is none. uninstall removes the
unit if it is one install wrote, and the configuration only if it is still the
text install writes: a configuration the user changed stays.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from . import config as config_mod

UNIT_NAME = "iommufd-cuse.service"
UNIT_DIR = "etc/systemd/system"
CONSOLE_SCRIPT = "iommufd-cuse"
_EXEC_START = re.compile(r"^ExecStart=(.*?) serve\b", re.MULTILINE)


def unit_template() -> str:
    return importlib.resources.files("iommufd_cuse").joinpath("data", UNIT_NAME).read_text()


def render_unit(command: str) -> str:
    """The unit with ExecStart running `command serve`."""
    text, n = _EXEC_START.subn(lambda m: f"ExecStart={command} serve", unit_template(), count=1)
    if n != 1:
        raise RuntimeError(f"{UNIT_NAME}: no `ExecStart=... serve` line")
    return text


def _normalized(unit_text: str) -> str:
    return _EXEC_START.sub("ExecStart=@ serve", unit_text, count=1)


def default_command(argv0: str | None = None) -> str:
    """How systemd should start this installation: the console script that is
    running (argv[0], resolved), else the one on PATH, else `python -m`."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    candidates = []
    if os.path.basename(argv0) == CONSOLE_SCRIPT:
        candidates.append(argv0 if os.sep in argv0 else shutil.which(argv0))
    candidates.append(shutil.which(CONSOLE_SCRIPT))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return _quote(str(Path(c).resolve()))
    return f"{_quote(sys.executable)} -m iommufd_cuse.cli"


def _quote(path: str) -> str:
    # systemd's ExecStart= quoting is close enough to the shell's for paths.
    return path if re.fullmatch(r"[\w@%+=:,./-]+", path) else shlex.quote(path)


def _paths(root: str) -> tuple[Path, Path]:
    r = Path(root)
    return r / UNIT_DIR / UNIT_NAME, r / config_mod.DEFAULT_CONFIG_PATH.lstrip("/")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def install(root: str = "/", command: str | None = None) -> list[str]:
    """Install; returns what was done, one line each."""
    unit_path, cfg_path = _paths(root)
    done = []
    unit = render_unit(command or default_command())
    if unit_path.exists() and unit_path.read_text() == unit:
        done.append(f"unchanged {unit_path}")
    else:
        verb = "updated" if unit_path.exists() else "installed"
        _write(unit_path, unit)
        done.append(f"{verb} {unit_path}")
    if cfg_path.exists():
        done.append(f"kept the existing {cfg_path}")
    else:
        _write(cfg_path, config_mod.installed_text())
        done.append(f"wrote {cfg_path}")
    return done


def uninstall(root: str = "/") -> list[str]:
    """Remove what install wrote, if it is still what install writes."""
    unit_path, cfg_path = _paths(root)
    done = []
    if unit_path.exists():
        if _normalized(unit_path.read_text()) == _normalized(unit_template()):
            unit_path.unlink()
            done.append(f"removed {unit_path}")
        else:
            done.append(f"kept {unit_path}: it is not the unit install writes (remove it yourself)")
    else:
        done.append(f"no {unit_path}")
    if cfg_path.exists():
        if cfg_path.read_text() == config_mod.installed_text():
            cfg_path.unlink()
            done.append(f"removed {cfg_path}")
        else:
            done.append(f"kept {cfg_path}: it was changed")
    try:
        cfg_path.parent.rmdir()
        done.append(f"removed {cfg_path.parent}")
    except OSError:
        pass  # absent, or holds the kept configuration or other files
    return done


def enabled_links(root: str = "/") -> list[Path]:
    """Links that `systemctl enable` made to the unit (left dangling by uninstall)."""
    base = Path(root) / UNIT_DIR
    wants = [d / UNIT_NAME for d in base.glob("*.wants")] + [d / UNIT_NAME for d in base.glob("*.requires")]
    return sorted(p for p in wants if p.is_symlink())  # dangling (under --root) counts too
