#!/usr/bin/env bash
# Install a CRIU >= 4 whose `criu check` passes and that can dump a TCP socket, plus `crit`.
#
#   scripts/install-criu.sh              as root: install (idempotent; ~0.2 s when already done)
#   scripts/install-criu.sh --check-only  anyone: exit 0 when a CRIU >= 4 and crit are there
#                                         (as root also runs `criu check`)
#
# Why not just the distribution's package:
# - Debian 12's criu 3.17 fails `criu check` on recent kernels ("vdso: Unexpected rt vDSO area bounds").
# - Debian 13's criu 4.1.1 passes `criu check`, but on Linux >= 6.16 it cannot dump any inet socket:
#   the kernel now refuses getsockopt(SO_PASSCRED/SO_PASSSEC) on non-unix sockets (EOPNOTSUPP) and
#   CRIU 4.1 treats that as fatal (checkpoint-restore/criu#2705, fixed in CRIU 4.2).
# So: the distribution's criu is used when it passes `criu check` and dumps a listening TCP socket (Debian
# 13 on an older kernel, later Debian). Otherwise criu and its whole dependency closure are taken from a
# newer Debian suite ($STATESYNC_CRIU_SUITES, default "forky trixie": the first whose criu passes both
# probes wins) with a private apt state (the system's apt configuration and dpkg database are not
# touched), unpacked with `dpkg -x` into $PREFIX, and run through the prefix's own dynamic loader so it
# never mixes with the system's older libc:
#   /usr/local/sbin/criu -> $PREFIX/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path ... criu
#   /usr/local/bin/crit  -> /usr/bin/python3 -m crit with PYTHONPATH=$PREFIX/.../dist-packages (the same
#                           suite's python3-pycriu: pure Python, needs python3-protobuf)
# /usr/local/sbin precedes /usr/sbin in root's PATH; statesync also honours STATESYNC_CRIU.
set -euo pipefail

PREFIX=${STATESYNC_CRIU_PREFIX:-/opt/statesync/criu}
SUITES=${STATESYNC_CRIU_SUITES:-forky trixie}
WRAP_CRIU=/usr/local/sbin/criu
WRAP_CRIT=/usr/local/bin/crit
STAMP_DIR=/var/lib/statesync
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MIN_MAJOR=4
SEARCH_PATH=/usr/local/sbin:/usr/local/bin:$PATH:/usr/sbin:/sbin

log() { echo "install-criu: $*" >&2; }
die() { log "$*"; exit 1; }

criu_version() { "$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1; }

# Version >= MIN_MAJOR and (as root) `criu check` passes.
criu_ok() {
    local bin=$1 ver major
    ver=$(criu_version "$bin") || return 1
    major=${ver%%.*}
    [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -ge "$MIN_MAJOR" ] || return 1
    # `criu check` needs root; unprivileged --check-only callers get the version test only.
    [ "$(id -u)" -ne 0 ] || "$bin" check >/dev/null 2>&1
}

# Dump (and so end) a process holding a listening TCP socket, started in its own pid namespace and
# session as statesync's tests do.
inet_ok() {
    local bin=$1 dir pid u rc=1
    dir=$(mktemp -d /tmp/statesync-criu-probe.XXXXXX)
    unshare -p -f setsid /usr/bin/python3 -c 'import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); open(__import__("sys").argv[1], "w").close(); time.sleep(60)' \
        "$dir/ready" </dev/null >/dev/null 2>&1 &
    u=$!
    for _ in $(seq 100); do [ -e "$dir/ready" ] && break; sleep 0.05; done
    pid=$(cat "/proc/$u/task/$u/children" 2>/dev/null | awk '{print $1}')
    if [ -n "$pid" ] && [ -e "$dir/ready" ]; then
        "$bin" dump -t "$pid" -D "$dir" -o dump.log >/dev/null 2>&1 && rc=0
        [ $rc = 0 ] || tail -n 3 "$dir/dump.log" 2>/dev/null | sed 's/^/install-criu:   /' >&2 || true
    fi
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    kill -9 "$u" 2>/dev/null || true
    wait "$u" 2>/dev/null || true
    rm -rf "$dir"
    return $rc
}

stamp_line() { echo "$1 $(criu_version "$1") $(uname -r)"; }

# A CRIU that passed every probe before on this kernel (the quick path), or "".
stamped_criu() {
    local line bin
    [ -r "$STAMP_DIR/criu-ok" ] || return 1
    line=$(cat "$STAMP_DIR/criu-ok")
    bin=${line%% *}
    [ -x "$bin" ] && [ "$(stamp_line "$bin")" = "$line" ] && criu_ok "$bin" && echo "$bin"
}

full_ok() { criu_ok "$1" && inet_ok "$1"; }

crit_ok() {
    local c
    c=$(PATH=$SEARCH_PATH command -v crit || true)
    [ -n "$c" ] && "$c" --help >/dev/null 2>&1
}

if [ "${1:-}" = "--check-only" ]; then
    c=${STATESYNC_CRIU:-$(PATH=$SEARCH_PATH command -v criu || true)}
    [ -n "$c" ] && criu_ok "$c" || { log "no CRIU >= $MIN_MAJOR whose 'criu check' passes (run scripts/install-criu.sh as root)"; exit 1; }
    crit_ok || { log "CRIU ok ($c) but no working crit (run scripts/install-criu.sh as root)"; exit 1; }
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "must run as root (or use --check-only)"

if stamped_criu >/dev/null && crit_ok; then
    exit 0   # installed and probed on this kernel: the quick path
fi

remember() {
    mkdir -p "$STAMP_DIR"
    stamp_line "$1" >"$STAMP_DIR/criu-ok.tmp" && mv "$STAMP_DIR/criu-ok.tmp" "$STAMP_DIR/criu-ok"
    log "ok: CRIU $(criu_version "$1") at $1; crit at $(PATH=$SEARCH_PATH command -v crit)"
}

ensure_python_protobuf() {
    dpkg-query -W -f='${Status}' python3-protobuf 2>/dev/null | grep -q "install ok installed" && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-protobuf >/dev/null \
        || die "apt-get install python3-protobuf (needed by crit) failed"
}

. /etc/os-release
[ "$ID" = debian ] || die "unsupported system ${PRETTY_NAME:-unknown}: install CRIU >= $MIN_MAJOR yourself and set STATESYNC_CRIU"
[ "$(dpkg --print-architecture)" = amd64 ] || die "only amd64 is supported by this installer"
major=${VERSION_ID%%.*}

# 1. A working criu already on PATH (an earlier install, or the distribution's)?
for c in "$WRAP_CRIU" /usr/sbin/criu; do
    if [ -x "$c" ] && full_ok "$c" && crit_ok; then remember "$c"; exit 0; fi
done

# 2. Debian 13 and later: the distribution's package.
if [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -ge 13 ]; then
    log "Debian $VERSION_ID: trying the distribution's criu and python3-pycriu"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends criu python3-pycriu python3-protobuf >/dev/null
    if full_ok /usr/sbin/criu && crit_ok; then remember /usr/sbin/criu; exit 0; fi
    log "the distribution's criu $(criu_version /usr/sbin/criu) fails a probe on Linux $(uname -r); using a newer one"
fi

# 3. A private prefix from a newer suite.
if ! gpg --show-keys "$KEYRING" 2>/dev/null | grep -q '13/trixie'; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debian-archive-keyring >/dev/null || true
fi
ensure_python_protobuf
# The same mirror host the system uses, so proxies and mirrors configured for it keep working.
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 | awk '{print $1}')
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' \
    /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

apt_dir=$(mktemp -d /var/tmp/statesync-apt.XXXXXX)
new=""
cleanup() { rm -rf "$apt_dir"; [ -z "$new" ] || rm -rf "$new"; }
trap cleanup EXIT
mkdir -p "$(dirname "$PREFIX")"

install_suite() {
    local suite=$1 pkgs ld ldrel libpath
    local d="$apt_dir/$suite"
    mkdir -p "$d/etc/sources.list.d" "$d/etc/preferences.d" "$d/state/lists/partial" \
             "$d/cache/archives/partial" "$d/debs"
    : >"$d/status"
    echo "deb [signed-by=$KEYRING] $mirror $suite main" >"$d/etc/sources.list"
    local apt_opts=(-o "Dir::Etc::SourceList=$d/etc/sources.list"
              -o "Dir::Etc::SourceParts=$d/etc/sources.list.d"
              -o "Dir::Etc::PreferencesParts=$d/etc/preferences.d"
              -o "Dir::State=$d/state" -o "Dir::State::status=$d/status"
              -o "Dir::Cache=$d/cache" -o "APT::Architecture=amd64" -o "Debug::NoLocking=1"
              -o "APT::Sandbox::User=root")
    apt-get "${apt_opts[@]}" -qq update || { log "apt-get update of $mirror $suite failed"; return 1; }
    # The dependency closure of criu. The status file is empty, so apt treats nothing as installed and
    # lists every library down to libc6: the prefix is complete and self-consistent. python3-pycriu
    # (crit) is pure Python and runs on the system's python3, so it is taken alone.
    mapfile -t pkgs < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances criu | grep -E '^[a-z0-9]' | sort -u)
    [ ${#pkgs[@]} -gt 3 ] || { log "could not resolve criu's dependencies in $suite"; return 1; }
    pkgs+=(python3-pycriu)
    (cd "$d/debs" && apt-get "${apt_opts[@]}" -qq download "${pkgs[@]}") \
        || { log "apt-get download from $suite failed"; return 1; }
    new=$(mktemp -d "$(dirname "$PREFIX")/.criu-new.XXXXXX")
    for deb in "$d"/debs/*.deb; do dpkg -x "$deb" "$new"; done
    chmod 755 "$new"
    ld=$new/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
    [ -x "$ld" ] || ld=$new/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
    [ -x "$ld" ] && [ -x "$new/usr/sbin/criu" ] || { log "$suite: unpacked packages lack criu or ld.so"; return 1; }
    ldrel=${ld#"$new"}
    # Probe the new prefix where it is, through a throw-away wrapper.
    libpath="$new/usr/lib/x86_64-linux-gnu:$new/lib/x86_64-linux-gnu"
    printf '#!/bin/sh\nexec "%s" --library-path "%s" "%s" "$@"\n' "$ld" "$libpath" "$new/usr/sbin/criu" >"$d/criu"
    chmod 755 "$d/criu"
    if ! full_ok "$d/criu"; then
        log "$suite: criu $(criu_version "$d/criu") fails 'criu check' or cannot dump a TCP socket here"
        rm -rf "$new"; new=""
        return 1
    fi
    # Swap the prefix in whole, then write the wrappers (each atomically).
    rm -rf "$PREFIX.old"
    [ ! -e "$PREFIX" ] || mv "$PREFIX" "$PREFIX.old"
    mv "$new" "$PREFIX"; new=""
    rm -rf "$PREFIX.old"
    libpath="$PREFIX/usr/lib/x86_64-linux-gnu:$PREFIX/lib/x86_64-linux-gnu"
    mkdir -p "$(dirname "$WRAP_CRIU")" "$(dirname "$WRAP_CRIT")"
    cat >"$WRAP_CRIU.tmp" <<EOF
#!/bin/sh
# statesync: CRIU from Debian $suite, run through its own dynamic loader (scripts/install-criu.sh).
exec "$PREFIX$ldrel" --library-path "$libpath" "$PREFIX/usr/sbin/criu" "\$@"
EOF
    cat >"$WRAP_CRIT.tmp" <<EOF
#!/bin/sh
# statesync: crit from Debian $suite's python3-pycriu, run by /usr/bin/python3 (scripts/install-criu.sh).
PYTHONPATH="$PREFIX/usr/lib/python3/dist-packages\${PYTHONPATH:+:\$PYTHONPATH}" exec /usr/bin/python3 -m crit "\$@"
EOF
    chmod 755 "$WRAP_CRIU.tmp" "$WRAP_CRIT.tmp"
    mv "$WRAP_CRIU.tmp" "$WRAP_CRIU"
    mv "$WRAP_CRIT.tmp" "$WRAP_CRIT"
    return 0
}

for suite in $SUITES; do
    log "Debian $VERSION_ID: installing criu from Debian $suite into $PREFIX"
    if install_suite "$suite"; then
        crit_ok || die "crit from $suite does not run (python3-protobuf missing?)"
        remember "$WRAP_CRIU"
        exit 0
    fi
done
die "no CRIU from suites '$SUITES' works here; see the messages above"
