"""``statesync check``: the preflight both hosts run before migrating (and that
``statesync receive`` runs at start): root, CRIU works, kernel features, tmpfs space
for the dump / the received image set, and the versions the two hosts must share.

Compare two hosts with ``statesync check --json > host-a.json`` on one and
``statesync check --compare host-a.json`` on the other: the versions that must match
(statesync, CRIU, the kernel's page size, the CPU's flags that a restored process may
use) are reported side by side.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import List, Optional

from statesync.cli._common import (
    EXIT_PREREQ,
    add_json,
    check_output_file,
    check_pid,
    input_file,
    pid_arg,
    write_json,
)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _free_bytes(path: str) -> Optional[int]:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _fs_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mounts)."""
    best, fstype = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                under = real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")
                if under and len(parts[1]) >= len(best):
                    best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


def _state_bytes(pid: int) -> int:
    """Resident memory of pid and its descendants (what a dump holds, roughly)."""
    from statesync import proc
    total = 0
    for p in [pid] + proc.descendants(pid):
        try:
            total += int(proc.status(p).get("VmRSS", "0 kB").split()[0]) * 1024
        except Exception:
            pass
    return total


def _cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def versions() -> dict:
    """What must match (or be compatible) on both hosts."""
    from statesync import __version__
    from statesync import criu
    from statesync._consts import PAGE_SIZE
    info = criu.check()
    return {"statesync": __version__, "python": platform.python_version(),
            "kernel": platform.release(), "machine": platform.machine(),
            "criu": info.version, "criu_path": info.path, "page_size": PAGE_SIZE,
            "cpu_flags": _cpu_flags()}


def preflight(*, images_dir: Optional[str] = None, work_dir: Optional[str] = None,
              pid: Optional[int] = None, restore: bool = True) -> List[dict]:
    """The checks, each ``{"name", "ok", "detail", "required"}``. ``required`` ones
    failing mean this host cannot migrate (exit status 3)."""
    from statesync import criu, tracking
    checks: List[dict] = []

    def add(name, ok, detail, required=True):
        checks.append({"name": name, "ok": bool(ok), "detail": detail, "required": required})

    add("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else
        "CRIU and ptrace need root: run as root (or under sudo / a root systemd unit)")
    info = criu.check()
    add("criu", info.ok, f"CRIU {info.version} at {info.path}, criu check passed" if info.ok
        else f"{info.reasons.get('criu', 'criu check failed')}; install CRIU >= 4 "
             f"(scripts/install-criu.sh) and run `criu check` as root", required=restore)
    for feat, ok in sorted(info.features.items()):
        add(f"criu feature {feat}", ok, "yes" if ok else info.reasons.get(feat, "missing"),
            required=False)
    from statesync.criu import kdat
    kd_ok, kd_why = kdat.status()
    add("criu kernel-feature cache", kd_ok, kd_why, required=False)
    methods = tracking.tracking_methods(pid)
    live = [m for m, (ok, _) in methods.items() if ok and m != "hash"]
    add("dirty-page tracking", bool(live),
        f"{', '.join(live)} available" if live else
        "only content hashing works (no uffd write-protect, no soft-dirty): pre-copy "
        "rounds will cost a full read of the memory each", required=False)
    for m, (ok, why) in methods.items():
        add(f"tracker {m}", ok, why, required=False)
    need = _state_bytes(pid) if pid else 0
    for label, path in (("dump dir", work_dir or "/dev/shm"), ("images dir", images_dir)):
        if not path:
            continue
        free = _free_bytes(path)
        fstype = _fs_type(path)
        if free is None:
            add(f"{label} {path}", False, f"{path} does not exist or cannot be read")
            continue
        detail = f"{_mib(free)} free on {fstype}"
        if fstype not in ("tmpfs", "ramfs"):
            detail += " (not tmpfs: the image write is in the downtime)"
        ok = True
        if need:
            ok = free >= need * 1.1
            detail += f", pid {pid} needs about {_mib(need)}"
            if not ok:
                detail += ": too little; free space or grow the tmpfs (mount -o remount,size=...)"
        add(f"{label} {path}", ok, detail)
    if pid:
        try:
            check_pid(pid)
            add(f"pid {pid}", True, f"{_mib(need)} resident (with descendants)")
        except Exception as exc:
            add(f"pid {pid}", False, str(exc))
    return checks


def _cmd_check(a) -> int:
    check_output_file(a.json, "--json")
    checks = preflight(images_dir=a.images_dir, work_dir=a.work_dir, pid=a.pid,
                       restore=True)
    ver = versions()
    diffs = []
    if a.compare:
        try:
            with open(a.compare) as f:
                other = json.load(f).get("versions", {})
        except (OSError, ValueError, AttributeError) as exc:
            from statesync.errors import UsageError
            raise UsageError(f"{a.compare}: not the JSON of `statesync check --json` ({exc})",
                             "--compare") from None
        for k in ("statesync", "criu", "page_size", "machine"):
            if other.get(k) != ver.get(k):
                diffs.append(f"{k}: here {ver.get(k)}, there {other.get(k)}")
        missing = sorted(set(other.get("cpu_flags", [])) - set(ver.get("cpu_flags", [])))
        if missing:
            diffs.append(f"CPU flags the other host has and this one lacks (a process "
                         f"restored here may fault): {' '.join(missing[:12])}"
                         + (" ..." if len(missing) > 12 else ""))
        checks.append({"name": f"same as {a.compare}", "ok": not diffs,
                       "detail": "; ".join(diffs) or "versions and CPU match",
                       "required": True})
    failed = [c for c in checks if c["required"] and not c["ok"]]
    if a.json is not None:
        write_json({"ok": not failed, "checks": checks, "versions": ver}, a.json)
    else:
        for c in checks:
            mark = "ok  " if c["ok"] else ("FAIL" if c["required"] else "warn")
            print(f"{mark}  {c['name']}: {c['detail']}")
        print(f"versions: statesync {ver['statesync']}, CRIU {ver['criu']}, kernel "
              f"{ver['kernel']} {ver['machine']}, page size {ver['page_size']}, "
              f"Python {ver['python']}")
    if failed:
        print(f"statesync check: error: {failed[0]['name']}: {failed[0]['detail']}"
              + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""), file=sys.stderr)
        return EXIT_PREREQ
    return 0


def cli_register(sub) -> None:
    p = sub.add_parser("check", help="preflight: can this host migrate or receive?",
                       description="Check root, CRIU, kernel features and tmpfs space; "
                       "print the versions both hosts must share. Exit status 3 when a "
                       "required check fails. Run it on both hosts; `statesync receive` "
                       "runs it at start.")
    p.add_argument("--pid", type=pid_arg, help="also check this process and the space its "
                   "dump needs")
    p.add_argument("--images-dir", help="the receiver's --images-dir to check")
    p.add_argument("--work-dir", help="the dump directory of `migrate --work-dir` "
                   "(default /dev/shm)")
    p.add_argument("--compare", type=input_file, metavar="FILE",
                   help="the other host's `statesync check --json` output: compare versions")
    add_json(p)
    p.set_defaults(func=_cmd_check)
