#!/usr/bin/env bash
# System prerequisites of statesync's tests and demo. As root: installs them.
# Otherwise: says what is missing (the Python build itself needs only gcc and liblz4-dev).
set -uo pipefail
cd "$(dirname "$0")/.."

# python3/-venv/-dev: a minimal Debian image has no venv module and no Python.h (the Makefile builds
# the extension in a venv); install-criu.sh's probes and the crit wrapper use /usr/bin/python3.
APT_PACKAGES=(python3 python3-venv python3-dev gcc liblz4-dev redis-server memcached nginx-light iperf3 sockperf
              iproute2 util-linux python3-protobuf
              # containers (docs/containers.md): runc drives CRIU for container checkpoints; podman with
              # --runtime runc (crun here is built without CRIU); mmdebstrap builds the test rootfs without a
              # registry; iptables/nftables carry CRIU's network lock to the destination; arping announces
              # a moved service IP.
              runc podman conmon containernetworking-plugins mmdebstrap iptables nftables iputils-arping)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "$(id -u)" -ne 0 ]; then
    [ ${#missing[@]} -eq 0 ] || echo "statesync setup: not root; missing Debian packages: ${missing[*]} (run 'make setup' as root, or apt-get install them)" >&2
    bash scripts/install-criu.sh --check-only || echo "statesync setup: not root; CRIU >= 4 missing (run 'make setup' as root)" >&2
    bash scripts/build-rootfs.sh --check-only >/dev/null \
        || echo "statesync setup: not root; container test rootfs missing (scripts/build-rootfs.sh --podman as root)" >&2
    exit 0
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "statesync setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || { echo "statesync setup: apt-get update failed" >&2; exit 1; }
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { echo "statesync setup: apt-get install ${missing[*]} failed" >&2; exit 1; }
    # Services are started by the tests themselves, on private ports and sockets.
    for svc in redis-server memcached nginx podman podman-restart; do
        systemctl disable --now "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1 || true
    done
fi
bash scripts/install-criu.sh || { echo "statesync setup: CRIU installation failed" >&2; exit 1; }
# A lazy switch-over's `criu dump --lazy-pages` holds every lazy page in pipes (by
# reference, vmsplice) until its page server ends. Without CAP_SYS_RESOURCE two limits
# break it: CRIU grows each pipe to 819 pages (3.2 MiB) and fails to splice when
# fs.pipe-max-size (1 MiB by default) refuses that, and the per-user total
# fs.pipe-user-pages-soft (64 MiB by default) caps the state. docs/lazy.md.
cur_max=$(cat /proc/sys/fs/pipe-max-size 2>/dev/null || echo 0)
cur_soft=$(cat /proc/sys/fs/pipe-user-pages-soft 2>/dev/null || echo 0)
if [ "$cur_max" -lt 4194304 ] || [ "$cur_soft" != "0" ]; then
    printf 'fs.pipe-max-size = 4194304\nfs.pipe-user-pages-soft = 0\n' \
        > /etc/sysctl.d/60-statesync.conf 2>/dev/null || true
    { sysctl -q -w fs.pipe-max-size=4194304 && sysctl -q -w fs.pipe-user-pages-soft=0; } >/dev/null 2>&1 \
        || echo "statesync setup: could not raise the pipe limits (the lazy switch-over falls back to a full one)" >&2
fi
# The root file system the container tests run (cached outside the tree; a stat when it exists).
bash scripts/build-rootfs.sh --podman >/dev/null || { echo "statesync setup: building the container test rootfs failed" >&2; exit 1; }
