"""Helpers the tracking backends share: merging page sets, VMA selection."""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from statesync import _core
from statesync._consts import PAGE_SIZE
from statesync._util import sorted as _srt
from statesync.proc import Vma

_EMPTY = np.zeros(0, dtype=np.uint64)

# Sorted union of sorted uint64 arrays (no Python objects per page).
_merge = _srt.merge

# In an ``exclude`` mask of pagemap selection (_select, proc.present_pages): leave out
# PTE markers. A uffd-wp marker (which the uffd tracker's scans install on pages never
# populated) reads as "swapped" in pagemap but holds no memory; a reader allowed to see
# swap entries (CAP_SYS_ADMIN) can tell it by its swap type. Bit 60 of an entry is
# always zero, so it carries this request (see ss_pagemap_select_ex).
PM_MARKER = 1 << 60


def _in_sorted(x: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Boolean mask: which elements of x are in the sorted array sorted_set."""
    return _srt.member(x, sorted_set)


def _select(pm: int, ranges, mask: int, exclude: int = 0) -> np.ndarray:
    """Sorted addresses of the pages in ``ranges`` ([(start, end)], ascending and
    disjoint, as VMAs and runs of them are) whose pagemap entry (read through the
    descriptor pm) has any bit of mask and no bit of exclude."""
    parts = [_core.pagemap_select(pm, s, e, mask, PAGE_SIZE, exclude=exclude)
             for s, e in ranges]
    parts = [p for p in parts if p.size]
    if not parts:
        return _EMPTY
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _tracked(v: Vma) -> bool:
    """VMAs whose pages can change: every VMA but the kernel-special ones, whatever
    its protection now. A VMA read-only (or PROT_NONE) at a collect may have been
    written before an mprotect, or made writable, written and made read-only again
    between two collects (W^X JITs do exactly this): protection says nothing about
    what happened since the last collect."""
    return not v.special


def _uffd_candidate(v: Vma) -> bool:
    """What to try to register for async uffd-wp: every tracked VMA. With
    UFFD_FEATURE_WP_ASYNC the kernel accepts any memory type (anonymous, shmem,
    file-backed, read-only or PROT_NONE; only VMAs without VM_MAYWRITE, such as a
    MAP_SHARED map of a read-only file, or VM_DROPPABLE ones are refused)."""
    return _tracked(v)


def _hash_ranges(vmas) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """(private, shared) address ranges of vmas, ascending. In a private VMA only
    the anonymous pages (pagemap bit 61 clear) carry state of the process: a
    page-cache page of a private file mapping is the file's, and becomes the
    process's (anonymous) when written. In a shared VMA every page counts."""
    priv: List[Tuple[int, int]] = []
    shared: List[Tuple[int, int]] = []
    for v in sorted(vmas, key=lambda v: v.start):
        (shared if v.shared else priv).append((v.start, v.end))
    return priv, shared


def _read_mem(pid: int, addrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Contents of pages through /proc/PID/mem, which (unlike process_vm_readv)
    reads pages whatever their protection (PROT_NONE, PROT_WRITE-only) for a
    ptrace-capable reader. Contiguous pages are read in one pread. Returns
    (contents (n, page_size) uint8, ok (n,) bool)."""
    a = np.ascontiguousarray(addrs, dtype=np.uint64)
    out = np.zeros((a.size, PAGE_SIZE), dtype=np.uint8)
    ok = np.zeros(a.size, dtype=bool)
    if not a.size:
        return out, ok
    try:
        fd = os.open(f"/proc/{int(pid)}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return out, ok
    try:
        brk = np.flatnonzero(np.diff(a.astype(np.int64)) != PAGE_SIZE) + 1
        for lo, hi in zip(np.r_[0, brk], np.r_[brk, a.size]):
            lo, hi = int(lo), int(hi)
            while lo < hi:
                n = min(hi - lo, 256)
                try:
                    b = os.pread(fd, n * PAGE_SIZE, int(a[lo]))
                except OSError:
                    b = b""
                got = len(b) // PAGE_SIZE
                if got:
                    out[lo:lo + got] = np.frombuffer(b, np.uint8, got * PAGE_SIZE).reshape(
                        got, PAGE_SIZE)
                    ok[lo:lo + got] = True
                lo += max(got, 1)    # an unreadable page: skip it, go on after it
    finally:
        os.close(fd)
    return out, ok


def _read_any(pid: int, addrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """process_vm_readv (fast), then /proc/PID/mem for the pages it could not read
    (PROT_NONE and other unreadable protections)."""
    pages, ok = _core.read_pages(int(pid), np.ascontiguousarray(addrs, dtype=np.uint64),
                                 PAGE_SIZE)
    if not ok.all():
        miss = np.flatnonzero(~ok)
        p2, ok2 = _read_mem(pid, np.asarray(addrs, dtype=np.uint64)[miss])
        pages[miss[ok2]] = p2[ok2]
        ok[miss[ok2]] = True
    return pages, ok


def _hash_any(pid: int, addrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """128-bit hashes of pages (C, process_vm_readv), with the unreadable ones read
    through /proc/PID/mem and hashed here."""
    hashes, ok = _core.hash_remote(int(pid), addrs, PAGE_SIZE)
    if not ok.all():
        miss = np.flatnonzero(~ok)
        p2, ok2 = _read_mem(pid, np.asarray(addrs, dtype=np.uint64)[miss])
        if ok2.any():
            hashes[miss[ok2]] = _core.hash_pages(np.ascontiguousarray(p2[ok2]))
            ok[miss[ok2]] = True
    return hashes, ok
