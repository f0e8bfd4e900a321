"""A container's writable root file system changes, taken from its overlay upper directory.

The changes a container made to its root file system are exactly what its overlay's upper
directory holds: new files, files copied up because the container modified them (also
those the image already had, which podman 4.3.1's ``rootfs-diff.tar`` drops whenever the
same path does not exist as a file on the checkpointing *host*: it stats the host's path),
changed directories, whiteouts (character devices 0:0) for deleted entries, and opaque
directories (xattr ``trusted.overlay.opaque=y``) that hide their lower content.

:func:`changes` reads an upper dir; :func:`write_diff_tar` writes podman's
``rootfs-diff.tar`` (every added or modified entry, directories included so that mode and
owner changes travel) and returns the deleted paths (podman's ``deleted.files``);
:func:`apply_diff_tar` replays both onto a root directory (or an upper dir).
"""
from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

from ..errors import CheckpointArchiveError

__all__ = ["RootfsChanges", "changes", "write_diff_tar", "apply_diff_tar"]

_OPAQUE = "trusted.overlay.opaque"


@dataclass
class RootfsChanges:
    """``changed``: paths (relative, no leading slash) of entries to carry (new or
    modified, directories included), in walk order (parents first); ``deleted``:
    absolute paths ("/etc/x") removed in the container; ``opaque``: directories
    whose lower content the container replaced."""

    changed: List[str] = field(default_factory=list)
    deleted: List[str] = field(default_factory=list)
    opaque: List[str] = field(default_factory=list)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, _OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def changes(upper: str, lowers: Sequence[str] = ()) -> RootfsChanges:
    """The changes recorded in overlay upper dir ``upper``; ``lowers`` (the image's
    layers, top first) resolve what an opaque directory hides."""
    upper = os.path.abspath(upper)
    out = RootfsChanges()
    for dirpath, dirnames, filenames in os.walk(upper):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, upper)
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir and _opaque(dirpath):
            out.opaque.append(rel_dir)
            present = set(dirnames) | set(filenames)
            hidden = set()
            for low in lowers:
                try:
                    hidden |= set(os.listdir(os.path.join(low, rel_dir)))
                except OSError:
                    pass
            out.deleted += sorted("/" + os.path.join(rel_dir, n) for n in hidden - present)
        for name in sorted(dirnames) + sorted(filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.join(rel_dir, name)
            st = os.lstat(p)
            if _is_whiteout(st):
                out.deleted.append("/" + rel)
                if name in dirnames:
                    dirnames.remove(name)
                continue
            out.changed.append(rel)
    return out


def write_diff_tar(upper: str, out_tar: str, lowers: Sequence[str] = ()) -> RootfsChanges:
    """Write ``out_tar`` (uncompressed, podman's ``rootfs-diff.tar`` layout: member
    names relative to the root) with every added or modified entry of ``upper``.
    Returns the changes (``deleted`` is what goes into ``deleted.files``)."""
    ch = changes(upper, lowers)
    upper = os.path.abspath(upper)
    with tarfile.open(out_tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for rel in ch.changed:
            tf.add(os.path.join(upper, rel), arcname=rel, recursive=False)
    return ch


def _safe_member(m: tarfile.TarInfo, path: str) -> None:
    name = m.name.lstrip("./") if m.name not in (".", "./") else ""
    if name.startswith("/") or ".." in name.split("/"):
        raise CheckpointArchiveError(f"member {m.name!r} escapes the root", path)
    if m.islnk() and (m.linkname.startswith("/") or ".." in m.linkname.split("/")):
        raise CheckpointArchiveError(
            f"hard link {m.name!r} -> {m.linkname!r} escapes the root", path
        )


def apply_diff_tar(tar_path: str, root: str, deleted: Iterable[str] = ()) -> int:
    """Extract ``tar_path`` over ``root`` and remove the ``deleted`` paths, the order
    podman's restore uses. Returns the number of members extracted."""
    import shutil
    n = 0
    with tarfile.open(tar_path, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            _safe_member(m, tar_path)
        for m in members:
            dest = os.path.join(root, m.name)
            if (
                not m.isdir()
                and os.path.lexists(dest)
                and (os.path.isdir(dest) and not os.path.islink(dest))
            ):
                shutil.rmtree(dest)
            elif not m.isdir() and os.path.lexists(dest):
                os.unlink(dest)
            tf.extract(m, root, set_attrs=True, numeric_owner=True)
            n += 1
    for d in deleted:
        p = os.path.join(root, d.lstrip("/"))
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.unlink(p)
    return n


def read_deleted(path: Optional[str]) -> List[str]:
    import json
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise CheckpointArchiveError("deleted.files is not a JSON list of paths", path)
    return data
