#!/usr/bin/env bash
# Sets the project up (idempotent) and runs the whole test suite as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# QEMU and a guest kernel for the tests that boot a Linux guest (tests/guestkit.py). In CI a kit that cannot be
# had fails the run; elsewhere those tests skip, saying why.
if ! bash scripts/guest-kit.sh; then
    [ -z "${CI:-}" ] || exit 1
    echo "test.sh: no guest kit: the guest tests will skip" >&2
fi

# The tree must be formatted and lint-clean (pyproject.toml's ruff settings) before
# anything runs: a failure here fails the run.
.venv/bin/ruff format --check --quiet . || { echo "test.sh: ruff format --check failed (run .venv/bin/ruff format .)" >&2; exit 1; }
.venv/bin/ruff check --quiet . || { echo "test.sh: ruff check failed" >&2; exit 1; }

# Safety net: a test process deadlocked on a FUSE mount of its own daemon sits in
# uninterruptible sleep and cannot even be killed; aborting the FUSE connections
# ends it. Only after the suite's time is long past (pytest's own per-test timeout
# catches everything that can be interrupted).
fusectl=/sys/fs/fuse/connections
mounted_fusectl=
if ! mountpoint -q "$fusectl" && mount -t fusectl fusectl "$fusectl" 2>/dev/null; then
    mounted_fusectl=1  # ours: unmounted again at the end
fi
exec 3>&2
(
    sleep "${ICUSE_SUITE_DEADLINE:-1500}"
    echo "test.sh: the suite ran past its deadline: aborting FUSE connections" >&3
    for c in "$fusectl"/*/abort; do [ -e "$c" ] && echo 1 >"$c"; done
) 2>/dev/null &
watchdog=$!
trap 'pkill -P $watchdog 2>/dev/null; kill $watchdog 2>/dev/null || true
      [ -z "$mounted_fusectl" ] || umount "$fusectl" 2>/dev/null || true' EXIT

# The project's own suite, then the kernel's conformance suite (scripts/kselftest.sh);
# both decide the exit status. ICUSE_KSELFTEST=0 skips the second, and so does a run of
# chosen tests (arguments given).
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || rc=$?
if [ "${ICUSE_KSELFTEST:-1}" != 0 ] && [ $# -eq 0 ]; then
    scripts/kselftest.sh || { k=$?; [ $rc -ne 0 ] || rc=$k; }
fi
exit $rc
