#!/usr/bin/env bash
# scripts/kselftest.sh [build|run] [--variant dynamic|static] [--via preload|seccomp] [-- SELFTEST ARGS...]
#
# The kernel's own iommufd conformance suite (tools/testing/selftests/iommu/iommufd.c of
# Linux 7.3.4), unmodified, against `iommufd-cuse serve --selftest`.
#
#   build  fetch the sources (Debian's linux-source-7.3) and the matching uapi headers
#          (linux-libc-dev, the kernel's `make headers_install` output) with apt, into
#          private apt state; build `iommufd` with the kernel's own Makefile, dynamic
#          (-lcap, as the kernel builds it) and static. Everything is cached under
#          $ICUSE_KSELFTEST_CACHE (/var/cache/iommufd-cuse/kselftest/<version>): a second
#          run reuses it.
#   run    (default) build, then run the chosen variant against a daemon this script
#          starts (private /dev via scripts/devns.sh, private mountpoint, no control
#          socket), and compare its TAP output with tests/kselftest/expected-<kver>.txt.
#          A case that should pass and fails, one marked failing that passes or fails
#          elsewhere, an unknown case, or a traceback in the daemon's log fails the run.
#          The last line is "N passed, M failed, K skipped".
#
# --via says how files are handed back to the client (docs/selftest.md): `preload`
# (LD_PRELOAD companion; dynamic binaries only) or `seccomp` (the client runs under
# `iommufd-cuse run --no-companion`, whose seccomp filter lets the daemon install the
# files: every binary). The default variant's is preload, the static one's seccomp.
# Without --variant and --via both runs are made, the dynamic build via preload and the
# static build via seccomp, each compared with the same expectations: the exit status
# is the first failure's.
#
# The host's apt configuration is not touched: apt runs with its own sources list,
# lists and cache under the cache directory (the host's dpkg status is only read).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

KVER=7.3.4
DEB_VERSION=7.3.4-1~bpo13+1
SUITE="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main"
cache=${ICUSE_KSELFTEST_CACHE:-/var/cache/iommufd-cuse/kselftest}/$DEB_VERSION
expected=$root/tests/kselftest/expected-$KVER.txt

action=run
variant=
via=
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        build | run) action=$1 ;;
        --variant) variant=$2; shift ;;
        --via) via=$2; shift ;;
        --inside) action=inside ;;
        --) shift; extra=("$@"); break ;;
        *) echo "usage: $0 [build|run] [--variant dynamic|static] [--via preload|seccomp] [-- ARGS]" >&2; exit 2 ;;
    esac
    shift
done
both=
if [ -z "$variant" ] && [ -z "$via" ] && [ "$action" = run ]; then both=1; fi
[ -n "$variant" ] || variant=dynamic
[ -n "$via" ] || { [ "$variant" = static ] && via=seccomp || via=preload; }
case $variant in dynamic | static) ;; *) echo "kselftest.sh: unknown variant $variant" >&2; exit 2 ;; esac
case $via in preload | seccomp) ;; *) echo "kselftest.sh: unknown --via $via" >&2; exit 2 ;; esac
if [ -n "$both" ]; then
    rc=0
    "$0" run --variant dynamic --via preload -- "${extra[@]}" || rc=$?
    r2=0
    "$0" run --variant static --via seccomp -- "${extra[@]}" || r2=$?
    [ $rc -ne 0 ] || rc=$r2
    exit $rc
fi

log() { echo "kselftest.sh: $*" >&2; }

# -- sources and headers ------------------------------------------------------------------
apt_private() {
    apt-get -q -o Dir::Etc::sourcelist="$cache/apt/sources.list" -o Dir::Etc::sourceparts=/dev/null \
        -o Dir::State::Lists="$cache/apt/lists" -o Dir::Cache="$cache/apt/cache" \
        -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root "$@"
}

fetch() {
    local src=$cache/src hdr=$cache/hdr
    [ -f "$src/.done" ] && [ -f "$hdr/.done" ] && return 0
    mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial" "$cache/deb"
    echo "$SUITE" >"$cache/apt/sources.list"
    local pkgs=("linux-source-7.3=$DEB_VERSION" "linux-libc-dev=$DEB_VERSION")
    if ! ls "$cache"/deb/linux-source-7.3_*.deb "$cache"/deb/linux-libc-dev_*.deb >/dev/null 2>&1; then
        log "fetching ${pkgs[*]} (private apt state in $cache/apt)"
        apt_private update >/dev/null
        (cd "$cache/deb" && apt_private download "${pkgs[@]}" >/dev/null)
    fi
    if [ ! -f "$hdr/.done" ]; then
        rm -rf "$hdr" && mkdir -p "$hdr"
        # A broken download (interrupted) is fetched again on the next run.
        dpkg-deb -x "$cache"/deb/linux-libc-dev_*.deb "$hdr" || { rm -rf "$cache/deb" "$hdr"; exit 1; }
        touch "$hdr/.done"
    fi
    if [ ! -f "$src/.done" ]; then
        # Only what the iommu suite builds from: its directory, the harness, lib.mk and
        # the test uAPI header it includes by relative path.
        log "unpacking the iommu selftest sources"
        rm -rf "$src" && mkdir -p "$src"
        local t=linux-source-7.3
        dpkg-deb --fsys-tarfile "$cache"/deb/linux-source-7.3_*.deb |
            tar -xO ./usr/src/$t.tar.xz |
            tar -xJ -C "$src" --strip-components=1 \
                $t/tools/testing/selftests/iommu $t/tools/testing/selftests/lib.mk \
                $t/tools/testing/selftests/kselftest.h $t/tools/testing/selftests/kselftest_harness.h \
                $t/drivers/iommu/iommufd/iommufd_test.h || { rm -rf "$cache/deb" "$src"; exit 1; }
        touch "$src/.done"
    fi
}

build_variant() {  # build_variant dynamic|static: the path of the binary on stdout
    local v=$1 out=$cache/build-$1
    if [ ! -x "$out/iommufd" ]; then
        command -v make >/dev/null && [ -f /usr/include/sys/capability.h ] || {
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y -qq make libcap-dev >/dev/null || { apt-get update -qq && apt-get install -y -qq make libcap-dev >/dev/null; }
        }
        mkdir -p "$out"
        local ldflags=
        [ "$v" = static ] && ldflags=-static
        log "building the $v iommufd selftest"
        make -s -C "$cache/src/tools/testing/selftests/iommu" OUTPUT="$out" \
            KHDR_INCLUDES="-isystem $cache/hdr/usr/include -isystem $cache/hdr/usr/include/x86_64-linux-gnu" \
            LDFLAGS="$ldflags" "$out/iommufd" >&2
    fi
    echo "$out/iommufd"
}

build() {
    # One fetch and build at a time (runs from several checkouts share the cache).
    mkdir -p "$cache"
    exec 9>"$cache/.lock"
    flock 9
    fetch
    build_variant dynamic >/dev/null
    build_variant static >/dev/null
    flock -u 9
}

# -- one run, inside a private mount namespace (scripts/devns.sh) -----------------------------
inside() {
    local bin=$1 scratch=$2
    shift 2
    "$root/.venv/bin/iommufd-cuse" serve --selftest --mountpoint "$scratch/mnt" --control-socket '' \
        --log-level info >"$scratch/daemon.log" 2>&1 &
    local daemon=$!
    local i
    for i in $(seq 300); do
        [ -e /dev/iommu ] && break
        kill -0 $daemon 2>/dev/null || { log "the daemon exited"; cat "$scratch/daemon.log" >&2; return 1; }
        sleep 0.1
    done
    local preload= wrap=()
    [ "$via" = preload ] && preload=$("$root/.venv/bin/iommufd-cuse" companion)
    [ "$via" = seccomp ] && wrap=("$root/.venv/bin/iommufd-cuse" run --no-companion --mountpoint "$scratch/mnt" --)
    local rc=0
    (cd "$scratch/cwd" && LD_PRELOAD=$preload timeout "${ICUSE_KSELFTEST_TIMEOUT:-1500}" "${wrap[@]}" "$bin" "$@") \
        >"$scratch/tap.txt" 2>&1 || rc=$?
    kill -TERM $daemon
    wait $daemon || log "the daemon exited with status $?"
    return 0
}

if [ "$action" = inside ]; then
    inside "${extra[@]}"
    exit
fi

build
[ "$action" = build ] && { log "built in $cache"; exit 0; }

bin=$(build_variant "$variant")
[ -f "$root/.venv/bin/iommufd-cuse" ] || bash "$root/scripts/setup.sh"

# The huge variants allocate hugetlb pages; raised for the run if too low, and set back
# afterwards unless someone else changed it meanwhile.
need_huge=64
huge_was=$(cat /proc/sys/vm/nr_hugepages)
huge_set=
if [ "$huge_was" -lt $need_huge ]; then
    echo $need_huge >/proc/sys/vm/nr_hugepages
    huge_set=$(cat /proc/sys/vm/nr_hugepages)
fi
scratch=$(mktemp -d /tmp/icuse-kselftest.XXXXXX)
mkdir -p "$scratch/mnt" "$scratch/cwd"
cleanup() {
    if [ -n "$huge_set" ] && [ "$(cat /proc/sys/vm/nr_hugepages)" = "$huge_set" ]; then
        echo "$huge_was" >/proc/sys/vm/nr_hugepages
    fi
    if [ -n "${ICUSE_KSELFTEST_KEEP:-}" ]; then log "kept $scratch"; else rm -rf "$scratch"; fi
}
trap cleanup EXIT

log "running $bin ($variant, via $via) against iommufd-cuse serve --selftest"
"$root/scripts/devns.sh" "$root/scripts/kselftest.sh" --variant "$variant" --via "$via" --inside -- \
    "$bin" "$scratch" "${extra[@]}"
[ -n "${ICUSE_KSELFTEST_TAP:-}" ] && cp "$scratch/tap.txt" "$ICUSE_KSELFTEST_TAP"
[ -n "${ICUSE_KSELFTEST_LOG:-}" ] && cp "$scratch/daemon.log" "$ICUSE_KSELFTEST_LOG"

compare=(--expected "$expected")
# Expectations hold for the whole suite with files handed back (the dynamic build with
# the companion, or either build under run); a static build with the companion only
# preloaded gets no file back and compares nothing.
if [ ${#extra[@]} -gt 0 ] || { [ "$variant" = static ] && [ "$via" = preload ]; }; then compare=(); fi
"$root/.venv/bin/python" "$root/tests/kselftest/compare.py" "${compare[@]}" --via "$via" --daemon-log "$scratch/daemon.log" \
    "$scratch/tap.txt"
