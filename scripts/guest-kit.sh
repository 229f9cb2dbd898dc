#!/usr/bin/env bash
# The guest kit (idempotent; run as root; docs/guests.md): what the tests need to boot a real Linux guest under
# QEMU/TCG as a client of the daemon.
#   - qemu-system-x86 10.x from bookworm-backports (the suite is added pinned low, as backports are by default:
#     nothing else on the host moves to it unless asked for by name or pulled in as a dependency of QEMU)
#   - a Debian kernel (vmlinuz and its whole module tree, with a modules.dep made here: the package has none,
#     depmod runs at install time) and a static busybox, both unpacked from their packages, never installed.
# Everything lands under $ICUSE_GUEST_DIR (default /var/cache/iommufd-cuse/guest); kit.env there says where.
# A second run with the kit in place does no network access at all.
set -euo pipefail

GUEST_DIR=${ICUSE_GUEST_DIR:-/var/cache/iommufd-cuse/guest}
SUITE=bookworm-backports
# The kernel package: by default whatever linux-image-amd64 in $SUITE depends on (6.12 today: vfio-pci, nvme,
# cuse, 9p and virtio_blk as modules; intel-iommu, virtio-pci and fuse built in).
KERNEL_PKG=${ICUSE_GUEST_KERNEL_PKG:-}
export DEBIAN_FRONTEND=noninteractive

log() { echo "guest-kit: $*" >&2; }

updated=
apt_update() {
    [ -n "$updated" ] && return 0
    apt-get update -qq
    updated=1
}

# -- the backports suite, pinned low (the default for backports; said explicitly so it holds whatever the host's
# other preferences are)
src=/etc/apt/sources.list.d/$SUITE.sources
if ! grep -rqs "^Suites:.*\b$SUITE\b\|^deb .* $SUITE " /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding $SUITE to $src"
    cat >"$src" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    updated=
fi
pref=/etc/apt/preferences.d/$SUITE.pref
if [ ! -e "$pref" ]; then
    printf 'Package: *\nPin: release n=%s\nPin-Priority: 100\n' "$SUITE" >"$pref"
fi

# -- QEMU 10 (the `-object iommufd,fd=` and `-device vfio-pci,fd=` syntax the tests use)
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
major=$(qemu_major || true)
if [ -z "$major" ] || [ "$major" -lt 10 ]; then
    if ! apt-cache policy qemu-system-x86 | grep -q "$SUITE"; then apt_update; fi
    log "installing qemu-system-x86 from $SUITE"
    apt-get install -y -qq -t "$SUITE" qemu-system-x86 >/dev/null
fi
[ "$(qemu_major)" -ge 10 ] || { log "qemu-system-x86_64 is $(qemu_major).x, need 10.x"; exit 1; }

# -- kernel and busybox, unpacked under $GUEST_DIR
mkdir -p "$GUEST_DIR/dl"
kit_ok() {
    [ -f "$GUEST_DIR/kit.env" ] || return 1
    # shellcheck disable=SC1091
    . "$GUEST_DIR/kit.env"
    [ -f "$KERNEL" ] && [ -f "$MODULES/modules.dep" ] && [ -x "$BUSYBOX" ] &&
        { [ -z "$KERNEL_PKG" ] || [ "$KERNEL_PKG" = "$PACKAGE" ]; }
}
if kit_ok; then
    log "kit in place: $KERNEL"
    exit 0
fi

download() {  # download PKG -> path of the .deb in $GUEST_DIR/dl
    local pkg=$1 deb
    deb=$(find "$GUEST_DIR/dl" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
    if [ -z "$deb" ]; then
        (cd "$GUEST_DIR/dl" && apt-get download -qq -o APT::Sandbox::User=root "$pkg") ||
            { apt_update && (cd "$GUEST_DIR/dl" && apt-get download -qq -o APT::Sandbox::User=root "$pkg"); }
        deb=$(find "$GUEST_DIR/dl" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
    fi
    [ -n "$deb" ] || { log "could not download $pkg"; return 1; }
    echo "$deb"
}

if [ -z "$KERNEL_PKG" ]; then
    if ! apt-cache policy linux-image-amd64 | grep -q "$SUITE"; then apt_update; fi
    KERNEL_PKG=$(apt-cache depends "linux-image-amd64/$SUITE" | sed -n 's/^ *Depends: \(linux-image-[^ ]*\).*/\1/p' | head -n1)
    [ -n "$KERNEL_PKG" ] || { log "no linux-image-amd64 in $SUITE"; exit 1; }
fi
log "kernel package $KERNEL_PKG"
kdeb=$(download "$KERNEL_PKG")
bdeb=$(download busybox-static)

tmp=$(mktemp -d "$GUEST_DIR/.unpack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$kdeb" "$tmp/k"
kver=$(basename "$(find "$tmp/k/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
[ -n "$kver" ] && [ -f "$tmp/k/boot/vmlinuz-$kver" ] || { log "$kdeb has no vmlinuz/modules"; exit 1; }
dpkg-deb -x "$bdeb" "$tmp/b"

dest=$GUEST_DIR/$kver
rm -rf "$dest"
mkdir -p "$dest"
mv "$tmp/k/boot/vmlinuz-$kver" "$tmp/k/boot/config-$kver" "$dest/"
mv "$tmp/k/lib/modules/$kver" "$dest/modules"
mv "$tmp/b/bin/busybox" "$GUEST_DIR/busybox"

# modules.dep in depmod's format, from each module's own .modinfo "depends=" (the host may have no kmod).
python3 - "$dest/modules" <<'EOF'
import lzma, os, sys

root = sys.argv[1]
paths = {}
for d, _, files in os.walk(os.path.join(root, "kernel")):
    for f in files:
        if f.endswith((".ko", ".ko.xz")):
            p = os.path.relpath(os.path.join(d, f), root)
            paths[f.split(".ko")[0].replace("-", "_")] = p


def depends(path: str) -> list[str]:
    with open(os.path.join(root, path), "rb") as fh:
        data = fh.read()
    if path.endswith(".xz"):
        data = lzma.decompress(data)
    i = data.find(b"\0depends=")
    if i < 0:
        return []
    val = data[i + 9 : data.index(b"\0", i + 9)].decode()
    return [n.replace("-", "_") for n in val.split(",") if n]


direct = {name: depends(p) for name, p in paths.items()}


def closure(name: str) -> list[str]:
    """Every module `name` needs, each after the ones it needs (depmod lists them nearest first)."""
    order: list[str] = []

    def visit(n: str) -> None:
        for d in direct.get(n, []):
            if d in paths and d not in order:
                visit(d)
                order.append(d)

    visit(name)
    return order[::-1]


with open(os.path.join(root, "modules.dep"), "w") as out:
    for name in sorted(paths):
        out.write(f"{paths[name]}: {' '.join(paths[d] for d in closure(name))}\n".replace(": \n", ":\n"))
EOF

cat >"$GUEST_DIR/kit.env" <<EOF
# written by scripts/guest-kit.sh
PACKAGE=$KERNEL_PKG
KVER=$kver
KERNEL=$dest/vmlinuz-$kver
MODULES=$dest/modules
BUSYBOX=$GUEST_DIR/busybox
EOF
# kernels of earlier kits
find "$GUEST_DIR" -mindepth 1 -maxdepth 1 -type d ! -name dl ! -name "$kver" ! -name '.unpack.*' -exec rm -rf {} +
find "$GUEST_DIR/dl" -name 'linux-image-*.deb' ! -name "${KERNEL_PKG}_*" -delete
log "kit ready: $dest"
