#!/usr/bin/env bash
# devns.sh CMD ARGS...: runs CMD as root in a private mount namespace whose /dev is a
# private tmpfs copy of the host's /dev (device nodes, links and the file systems mounted
# under it), so that a daemon started inside may put its nodes at /dev/iommu and
# /dev/vfio/... without touching the host's /dev. Everything made inside goes with the
# namespace when CMD exits; CMD's exit status is the script's.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: devns.sh CMD [ARGS...]" >&2; exit 2; }
if [ "${ICUSE_DEVNS_INSIDE:-}" != 1 ]; then
    ICUSE_DEVNS_INSIDE=1 exec unshare --mount --propagation private "$0" "$@"
fi
unset ICUSE_DEVNS_INSIDE
host=$(mktemp -d /tmp/icuse-hostdev.XXXXXX)
mount --rbind /dev "$host"
mount -t tmpfs -o mode=0755,nosuid devns /dev
# Nodes, links and plain directories: copied (cp -a makes device nodes with mknod).
(cd "$host" && find . -mindepth 1 -maxdepth 1 ! -type d -exec cp -a {} /dev/ \;)
# Directories: each mount point is bound again; other directories copied.
while IFS= read -r -d '' d; do
    name=${d#"$host"/}
    if mountpoint -q "$d"; then
        mkdir -p "/dev/$name" && mount --rbind "$d" "/dev/$name"
    else
        cp -a "$d" "/dev/$name"
    fi
done < <(find "$host" -mindepth 1 -maxdepth 1 -type d -print0)
umount -l "$host" && rmdir "$host"
exec "$@"
