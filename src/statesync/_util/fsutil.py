"""Durable file replacement shared by the stream file targets and the CRIU image writer.

The pattern: write a new version under a temporary name created with ``O_EXCL``
in the same directory as the final name, fsync it, rename it over the final name,
then fsync the directory so the rename itself survives a crash. Readers see the
old or the new version, never a mix. Not thread-safe for the same final name.
"""
from __future__ import annotations

import os
import tempfile
from typing import Tuple


def fsync_dir(path) -> None:
    """fsync the directory ``path`` (itself, not its parent): makes entries created,
    renamed or removed in it durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_beside(final) -> Tuple[int, str]:
    """Create a new empty file next to ``final`` (same directory, so a rename is
    atomic) with ``O_CREAT | O_EXCL`` and mode 0600; returns ``(fd, path)``. The
    caller owns both: :func:`atomic_replace` or :func:`discard` them."""
    final = os.path.abspath(os.fspath(final))
    return tempfile.mkstemp(prefix="." + os.path.basename(final) + ".", suffix=".tmp",
                            dir=os.path.dirname(final))


def atomic_replace(tmp, final, fd=None) -> None:
    """Make ``tmp`` the file (or directory) ``final``: fsync ``fd`` (tmp's open
    descriptor, closed here) when given, rename ``tmp`` over ``final`` and fsync
    their directory. If this fails before the rename, ``tmp`` is removed (a file)
    and ``final`` is untouched."""
    final = os.path.abspath(os.fspath(final))
    try:
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        if not os.path.isdir(tmp):
            discard(tmp)
        raise
    fsync_dir(os.path.dirname(final))


def discard(tmp, fd=None) -> None:
    """Close ``fd`` (if given) and remove ``tmp`` (if it still exists)."""
    if fd is not None:
        os.close(fd)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
