"""Constants, address parsing and CRIU helpers both migration agents use."""
from __future__ import annotations

import os
import re
from typing import Dict, Tuple

import numpy as np

from statesync import proc
from statesync._consts import PAGE_SIZE
from statesync.criu import images as _criu_images
from statesync.errors import StateSyncError

STRATEGIES = ("auto", "cold", "precopy", "iterative")
DEFAULT_PORT = 7411
BATCH_PAGES = 1024             # pages per read/encode batch (4 MiB)
MAX_BATCH_PAGES = 8192         # largest batch a destination accepts in one frame
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


# --------------------------------------------------------------------------- CRIU


# A client connecting to a UNIX socket of the frozen tree from outside makes the dump
# fail (CRIU cannot dump half of a stream connection, nor an in-flight connection whose
# peer it cannot see); the next attempt usually finds no such connection.
_TRANSIENT_DUMP_ERRORS = ("Can't dump half of stream unix connection", "unix: Unix socket")


def _read_stats(path: str) -> Dict[str, int]:
    """CRIU's stats-dump / stats-restore (times in microseconds); {} if unreadable:
    the stats are informative, never a reason to fail a migration."""
    try:
        return {k: int(v) for k, v in _criu_images.read_stats(path).items()}
    except (StateSyncError, OSError, ValueError):
        return {}


def _present_pages_of(pagemap_path: str) -> Tuple[int, np.ndarray]:
    """(pages_id, addresses of the PE_PRESENT pages in pages-file order) of a
    pagemap image, decoded and validated by statesync.criu's reader (C)."""
    pm = _criu_images.Pagemap(pagemap_path, PAGE_SIZE)
    sel = (pm.flags & _criu_images.PE_PRESENT) != 0
    v, n = pm.vaddr[sel], pm.nr_pages[sel].astype(np.int64)
    total = int(n.sum())
    first = np.repeat(v, n)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    return int(pm.pages_id), first + within.astype(np.uint64) * np.uint64(PAGE_SIZE)


def _signal_all(pids, sig: int) -> None:
    """Send ``sig`` to each pid in order; pids already gone are skipped."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _ns_pid(pid: int) -> int:
    """pid as the innermost pid namespace sees it (CRIU names image files by it)."""
    nspid = proc.status(pid).get("NSpid")
    return int(nspid.split()[-1]) if nspid else pid


def _parse_hostport(text: str, default_host: str = "127.0.0.1") -> Tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]") or default_host
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"not HOST:PORT: {text!r}") from None
    if not 0 <= p < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, p
