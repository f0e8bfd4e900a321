"""CRIU's kernel-feature cache (``/run/criu.kdat``) on hosts whose ``/run`` is not tmpfs.

Every ``criu`` run starts by probing the kernel (``kerndat_init``: netlink and netns
probes, vDSO parsing, userfaultfd and pagemap checks...). CRIU keeps the result in
``/run/criu.kdat`` and loads it on later runs, but it only *writes* that file when
``/run`` is a tmpfs (so that it cannot outlive a reboot into another kernel). On a
systemd host ``/run`` is a tmpfs and this module has nothing to do. On a host where
``/run`` lives on a disk (some container-style VMs, this project's CI machines) every
dump and every restore re-probes: measured here, 36-65 ms from CRIU's start to its
first real step without the cache, 0.9 ms with it, i.e. twice that in every
switch-over's downtime (one dump, one restore).

:func:`prime` produces the file the way CRIU itself would: it runs ``criu check`` in a
private mount namespace whose ``/run`` is a fresh tmpfs, takes the ``criu.kdat`` CRIU
wrote there, and installs it as ``/run/criu.kdat`` (atomic rename), with the boot id
it belongs to beside it (``/run/statesync-criu-kdat.boot``). CRIU's loader only checks
the file's magic numbers, so every later run loads it. :func:`drop_if_stale` (called
once per process before statesync's first CRIU run) removes a cache that statesync
installed during another boot: a disk-backed ``/run`` survives reboots, the cache
must not. CRIU would try to save a new cache only when it found new facts; on a
disk ``/run`` its save fails safely at ``criu.kdat.tmp`` (created empty here and left
in place: CRIU's save opens it ``O_EXCL`` and gives up, so it never unlinks ours).

Root only. ``make setup`` calls ``python -m statesync.criu.kdat --prime``;
``statesync check`` reports the state. Thread-safety: call from one thread; the
files are replaced atomically, so concurrent CRIU runs see the old or the new file.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Tuple

KDAT = "/run/criu.kdat"
KDAT_TMP = KDAT + ".tmp"
BOOT_STAMP = "/run/statesync-criu-kdat.boot"
_checked = False


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def run_is_tmpfs(path: str = "/run") -> bool:
    """True when ``path`` is on a tmpfs (CRIU then keeps its cache by itself)."""
    try:
        out = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return out == "tmpfs"


def status() -> Tuple[bool, str]:
    """(cache usable, one line saying why) for ``statesync check``."""
    if run_is_tmpfs():
        return True, "/run is a tmpfs: CRIU keeps its kernel-feature cache itself"
    if not os.path.exists(KDAT):
        return False, ("/run is not a tmpfs, so CRIU re-probes the kernel on every run "
                       "(~40 ms per dump and per restore, in the downtime); run "
                       "`python -m statesync.criu.kdat --prime` as root (make setup does)")
    try:
        with open(BOOT_STAMP) as f:
            stamp = f.read().strip()
    except OSError:
        stamp = ""
    if stamp and stamp != _boot_id():
        return False, (f"{KDAT} is from another boot; it will be removed before the next "
                       "CRIU run; prime it again (`python -m statesync.criu.kdat --prime`)")
    return True, f"{KDAT} installed for this boot (CRIU loads it instead of probing)"


def drop_if_stale() -> None:
    """Remove a cache statesync installed during another boot (once per process;
    microseconds when nothing is to do). Never raises."""
    global _checked
    if _checked:
        return
    _checked = True
    try:
        with open(BOOT_STAMP) as f:
            stamp = f.read().strip()
    except OSError:
        return
    if stamp == _boot_id():
        return
    for p in (KDAT, BOOT_STAMP):
        try:
            os.unlink(p)
        except OSError:
            pass


def prime(criu: Optional[str] = None, timeout: float = 120.0) -> str:
    """Install ``/run/criu.kdat`` for this boot (see the module docstring). Returns a
    one-line description of what was done. Raises :class:`~statesync.errors.CriuError`
    when CRIU's probe fails and ``PermissionError`` when not root."""
    from statesync.criu import driver
    from statesync.errors import CriuError
    if os.geteuid() != 0:
        raise PermissionError("priming CRIU's kernel-feature cache needs root")
    if run_is_tmpfs():
        return "nothing to do: /run is a tmpfs (CRIU keeps /run/criu.kdat itself)"
    criu = criu or driver._criu_or_raise()
    # In a private mount namespace: /run becomes an empty tmpfs, CRIU probes and writes
    # its cache there, we read it back on stdout. Nothing of the host's /run is touched.
    script = ('set -e; mount --make-rprivate /; mount -t tmpfs -o mode=0755 tmpfs /run; '
              '"$0" check >/dev/null 2>&1 || true; cat /run/criu.kdat')
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, criu], capture_output=True,
                       timeout=timeout)
    data = r.stdout
    if r.returncode != 0 or len(data) < 64 or len(data) > (1 << 20):
        raise CriuError(f"criu check in a private mount namespace wrote no kernel-feature "
                        f"cache ({r.stderr.decode(errors='replace').strip()[-200:] or 'no output'}"
                        f"); run `criu check` to see why")
    tmp = f"{KDAT}.statesync-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, KDAT)
    with open(BOOT_STAMP + ".new", "w") as f:
        f.write(_boot_id() + "\n")
    os.rename(BOOT_STAMP + ".new", BOOT_STAMP)
    # CRIU's own save, should it ever try on this disk-backed /run, stops at this
    # existing file (O_EXCL) instead of unlinking our cache.
    if not os.path.lexists(KDAT_TMP):
        os.close(os.open(KDAT_TMP, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    return f"installed {KDAT} ({len(data)} bytes) for boot {_boot_id()[:8]}"


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m statesync.criu.kdat",
                                 description="CRIU's kernel-feature cache on a host whose "
                                             "/run is not a tmpfs")
    ap.add_argument("--prime", action="store_true", help="install the cache for this boot")
    a = ap.parse_args(argv)
    if a.prime:
        try:
            print(f"statesync: {prime()}")
        except Exception as exc:    # one line, exit 1: set-up goes on without the cache
            print(f"statesync: CRIU kernel-feature cache not installed: {exc}", file=sys.stderr)
            return 1
        return 0
    ok, why = status()
    print(f"{'ok' if ok else 'missing'}: {why}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
