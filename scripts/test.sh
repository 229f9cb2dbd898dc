#!/usr/bin/env bash
# Sets the project up (idempotent) and runs the whole test suite as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
