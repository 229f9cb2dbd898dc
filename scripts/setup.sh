#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine, idempotently:
# Debian packages (compiler, systemd tools, strace), a virtualenv in .venv with the package
# (its C core is compiled by cffi during the install) and the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc libc6-dev)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# tests/test_service.py checks the unit's SystemCallFilter= against what strace sees
command -v strace >/dev/null || need_apt+=(strace)
command -v setpriv >/dev/null || need_apt+=(util-linux)
# tests/test_run.py: real sysfs readers under `iommufd-cuse run` (lspci, DPDK's devbind)
command -v lspci >/dev/null || need_apt+=(pciutils)
command -v dpdk-devbind.py >/dev/null || need_apt+=(dpdk)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || need_apt+=(python3)
# Debian's own python3 needs these for a venv and for compiling the C core.
if command -v "$PY" >/dev/null; then
    "$PY" -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
    inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [ -f "$inc/Python.h" ] || need_apt+=(python3-dev)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# Editable install: the cffi build puts the native extension next to the sources.
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
