#!/usr/bin/env bash
# Install a CRIU >= 4 whose `criu check` passes, plus the `crit` image decoder.
#
#   scripts/install-criu.sh              as root: install (idempotent; fast when already done)
#   scripts/install-criu.sh --check-only  anyone: exit 0 when a working CRIU >= 4 and crit are on PATH
#
# Debian 13 (trixie) and later: `apt-get install criu python3-pycriu` (crit is in python3-pycriu).
# Debian 12 (bookworm): its criu 3.17 fails `criu check` on recent kernels ("vdso: Unexpected rt vDSO area
# bounds"). We take criu 4.x and its whole dependency closure from Debian 13 with a private apt state (nothing
# in the system's apt configuration or dpkg database changes), unpack the packages with `dpkg -x` into
# $PREFIX, and install wrappers that run the binary through the prefix's own dynamic loader, so it never
# mixes with the system's older libc:
#   /usr/local/sbin/criu  -> $PREFIX/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path ... criu
#   /usr/local/bin/crit   -> system python3 with PYTHONPATH=$PREFIX/.../dist-packages (trixie's pycriu, which
#                            matches CRIU 4's image definitions; needs python3-protobuf, pure Python)
# /usr/local/sbin comes before /usr/sbin in root's PATH. statesync itself also honours STATESYNC_CRIU.
set -euo pipefail

PREFIX=${STATESYNC_CRIU_PREFIX:-/opt/statesync/criu}
WRAP_CRIU=/usr/local/sbin/criu
WRAP_CRIT=/usr/local/bin/crit
SUITE=trixie
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MIN_MAJOR=4

log() { echo "install-criu: $*" >&2; }
die() { log "$*"; exit 1; }

# A CRIU is good when it reports version >= MIN_MAJOR and `criu check` passes.
criu_ok() {
    local bin=$1 ver major
    ver=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1) || return 1
    major=${ver%%.*}
    [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -ge "$MIN_MAJOR" ] || return 1
    # `criu check` needs root; unprivileged --check-only callers get the version test only.
    [ "$(id -u)" -ne 0 ] || "$bin" check >/dev/null 2>&1
}

crit_ok() {
    local bin=$1
    "$bin" --help >/dev/null 2>&1
}

found_criu() {
    local c
    for c in "${STATESYNC_CRIU:-}" "$(PATH=/usr/local/sbin:/usr/local/bin:$PATH command -v criu || true)"; do
        [ -n "$c" ] && [ -x "$c" ] && criu_ok "$c" && { echo "$c"; return 0; }
    done
    return 1
}

found_crit() {
    local c
    c=$(PATH=/usr/local/sbin:/usr/local/bin:$PATH command -v crit || true)
    [ -n "$c" ] && crit_ok "$c" && { echo "$c"; return 0; }
    return 1
}

if [ "${1:-}" = "--check-only" ]; then
    c=$(found_criu) || { log "no CRIU >= $MIN_MAJOR whose 'criu check' passes (run scripts/install-criu.sh as root)"; exit 1; }
    found_crit >/dev/null || { log "CRIU ok ($c) but no working crit (run scripts/install-criu.sh as root)"; exit 1; }
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "must run as root (or use --check-only)"

if c=$(found_criu) && found_crit >/dev/null; then
    exit 0   # already installed and working: the quick path
fi

. /etc/os-release
major=${VERSION_ID%%.*}

if [ "$ID" = debian ] && [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -ge 13 ]; then
    log "Debian $VERSION_ID: installing criu and python3-pycriu (crit) from the distribution"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends criu python3-pycriu python3-protobuf >/dev/null
elif [ "$ID" = debian ] && [ "$major" = 12 ]; then
    log "Debian $VERSION_ID: installing criu from Debian 13 into $PREFIX"
    gpg_has_trixie=0
    if command -v gpg >/dev/null; then
        gpg --show-keys "$KEYRING" 2>/dev/null | grep -q '13/trixie' && gpg_has_trixie=1
    else
        [ -e /usr/share/keyrings/debian-archive-trixie-stable.gpg ] && gpg_has_trixie=1
    fi
    if [ $gpg_has_trixie = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq debian-archive-keyring >/dev/null || true
    fi
    # The same mirror host the system uses, so proxies and mirrors configured for it keep working.
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1)
    [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' \
        /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    apt_dir=$(mktemp -d /var/tmp/statesync-apt.XXXXXX)
    trap 'rm -rf "$apt_dir"' EXIT
    mkdir -p "$apt_dir/etc/sources.list.d" "$apt_dir/etc/preferences.d" "$apt_dir/state/lists/partial" \
             "$apt_dir/cache/archives/partial" "$apt_dir/debs"
    : >"$apt_dir/status"
    echo "deb [signed-by=$KEYRING] $mirror $SUITE main" >"$apt_dir/etc/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
              -o "Dir::Etc::SourceParts=$apt_dir/etc/sources.list.d"
              -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
              -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/status"
              -o "Dir::Cache=$apt_dir/cache" -o "APT::Architecture=amd64" -o "Debug::NoLocking=1"
              -o "APT::Sandbox::User=root")
    apt-get "${apt_opts[@]}" -qq update || die "apt-get update of $mirror $SUITE failed"
    # The dependency closure of criu. The status file is empty, so apt treats nothing as installed and lists
    # every library down to libc6: the prefix is complete and self-consistent. python3-pycriu (crit) is
    # pure Python and runs on the system's python3, so it is taken alone, without its dependencies.
    mapfile -t pkgs < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances criu | grep -E '^[a-z0-9]' | sort -u)
    pkgs+=(python3-pycriu)
    [ ${#pkgs[@]} -gt 3 ] || die "could not resolve criu's dependencies from $SUITE"
    (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" -qq download "${pkgs[@]}") \
        || die "apt-get download ${pkgs[*]} failed"
    new=$(mktemp -d "$(dirname "$PREFIX")/.criu-new.XXXXXX" 2>/dev/null || { mkdir -p "$(dirname "$PREFIX")"; mktemp -d "$(dirname "$PREFIX")/.criu-new.XXXXXX"; })
    for deb in "$apt_dir"/debs/*.deb; do dpkg -x "$deb" "$new"; done
    chmod 755 "$new"
    ld=$new/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
    [ -x "$ld" ] || ld=$new/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
    [ -x "$ld" ] || die "no dynamic loader in the unpacked packages"
    [ -x "$new/usr/sbin/criu" ] || die "criu binary missing after unpacking"
    # Swap in the new prefix whole, then write the wrappers (each written atomically).
    rm -rf "$PREFIX.old"; [ -e "$PREFIX" ] && mv "$PREFIX" "$PREFIX.old"
    mv "$new" "$PREFIX"; rm -rf "$PREFIX.old"
    ldrel=${ld#"$new"}
    libpath="$PREFIX/usr/lib/x86_64-linux-gnu:$PREFIX/lib/x86_64-linux-gnu"
    mkdir -p "$(dirname "$WRAP_CRIU")" "$(dirname "$WRAP_CRIT")"
    cat >"$WRAP_CRIU.tmp" <<EOF
#!/bin/sh
# statesync: CRIU from Debian $SUITE, run through its own dynamic loader (scripts/install-criu.sh).
exec "$PREFIX$ldrel" --library-path "$libpath" "$PREFIX/usr/sbin/criu" "\$@"
EOF
    cat >"$WRAP_CRIT.tmp" <<EOF
#!/bin/sh
# statesync: crit from Debian $SUITE's python3-pycriu, run by /usr/bin/python3 (scripts/install-criu.sh).
PYTHONPATH="$PREFIX/usr/lib/python3/dist-packages\${PYTHONPATH:+:\$PYTHONPATH}" exec /usr/bin/python3 -m crit "\$@"
EOF
    chmod 755 "$WRAP_CRIU.tmp" "$WRAP_CRIT.tmp"
    mv "$WRAP_CRIU.tmp" "$WRAP_CRIU"; mv "$WRAP_CRIT.tmp" "$WRAP_CRIT"
    if ! dpkg-query -W -f='${Status}' python3-protobuf 2>/dev/null | grep -q "install ok installed"; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-protobuf >/dev/null \
            || die "apt-get install python3-protobuf (needed by crit) failed"
    fi
else
    die "unsupported system ${PRETTY_NAME:-unknown}: install CRIU >= $MIN_MAJOR yourself and set STATESYNC_CRIU"
fi

c=$(found_criu) || {
    log "CRIU installed but 'criu check' fails:"
    PATH=/usr/local/sbin:$PATH criu check >&2 || true
    exit 1
}
found_crit >/dev/null || die "crit does not run (python3-protobuf missing?)"
log "ok: $($c --version | sed -n 's/^Version: *//p') at $c; crit at $(found_crit)"
