#!/usr/bin/env bash
# A minimal Debian root file system for statesync's container tests, built without any image registry.
#
#   scripts/build-rootfs.sh                    build (or reuse) the rootfs, print its directory
#   scripts/build-rootfs.sh --podman [REF]     also import it as a podman image (default
#                                              localhost/statesync-test:1) unless that image exists
#   scripts/build-rootfs.sh --check-only       exit 0 when the cached rootfs exists (prints it), else 1
#
# The rootfs is `mmdebstrap --variant=minbase bookworm` plus the services the tests run inside containers
# (redis-server, iperf3). It is cached outside the source tree, under $STATESYNC_CACHE
# (default /var/cache/statesync), in a directory named after a hash of the suite and the package list, so
# a second run costs a stat. A build goes to a temporary directory renamed into place only when complete,
# under a lock, so concurrent callers (parallel test runs) build it once and never see half a tree.
# Needs root (mmdebstrap's root mode, podman's storage).
set -euo pipefail

CACHE=${STATESYNC_CACHE:-/var/cache/statesync}
SUITE=${STATESYNC_ROOTFS_SUITE:-bookworm}
PACKAGES=${STATESYNC_ROOTFS_PACKAGES:-redis-server,iperf3,procps}
IMAGE_REF=localhost/statesync-test:1
import=0
check_only=0

log() { echo "build-rootfs: $*" >&2; }
die() { log "$*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --podman) import=1
                  if [ $# -gt 1 ] && [[ "$2" != --* ]]; then IMAGE_REF=$2; shift; fi ;;
        --check-only) check_only=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

key=$(printf '%s\n%s\nv1\n' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-12)
dir="$CACHE/rootfs-$SUITE-$key"

if [ "$check_only" -eq 1 ]; then
    [ -f "$dir/.statesync-rootfs" ] || exit 1
    echo "$dir"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap, podman storage); run it as root or via 'make setup'"
command -v mmdebstrap >/dev/null || die "mmdebstrap not found: run scripts/setup-system.sh as root"
mkdir -p "$CACHE"

# The same mirror the system's apt uses, so configured mirrors and proxies keep working.
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 \
         | awk '{print $1}' || true)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' \
    /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

exec 9>"$CACHE/.rootfs.lock"
flock 9
if [ ! -f "$dir/.statesync-rootfs" ]; then
    tmp=$(mktemp -d "$CACHE/.rootfs-build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    log "building $SUITE minbase + $PACKAGES into $dir (about 30-60 s)"
    # The services are started by the tests with their own arguments: keep the packages' init hooks out.
    mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" "$tmp/root" "$mirror" >&2 || die "mmdebstrap $SUITE failed (see above)"
    rm -rf "$tmp/root/var/cache/apt/archives/"*.deb "$tmp/root/var/lib/apt/lists/"* || true
    printf 'suite=%s\npackages=%s\n' "$SUITE" "$PACKAGES" >"$tmp/root/.statesync-rootfs"
    rm -rf "$dir"
    mv "$tmp/root" "$dir"
    rm -rf "$tmp"
    trap - EXIT
fi

if [ "$import" -eq 1 ]; then
    command -v podman >/dev/null || die "podman not found: run scripts/setup-system.sh as root"
    if ! podman image exists "$IMAGE_REF" 2>/dev/null; then
        log "importing $dir as $IMAGE_REF"
        tar --exclude=./.statesync-rootfs -C "$dir" -c . | podman import -q - "$IMAGE_REF" >/dev/null \
            || die "podman import of $dir as $IMAGE_REF failed"
    fi
fi
echo "$dir"
