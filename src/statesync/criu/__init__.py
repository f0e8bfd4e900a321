"""CRIU: driving it, reading and writing its image sets, deltas between dumps.

Driving CRIU (root needed)::

    info = statesync.criu.check()            # CriuInfo: path, version, ok, features, reasons
    r = statesync.criu.dump(pid, "img1", leave_running=True)
    r.stats["frozen_time"]                    # microseconds, from stats-dump
    p = statesync.criu.restore("img1")        # RestoreResult: .pid (in our pid namespace)

A failing CRIU call raises :class:`~statesync.errors.CriuError` carrying the command,
exit status and the tail of CRIU's log.

Images (no root, no CRIU binary needed; our own reader/writer, see
:mod:`statesync.criu.images`)::

    s = statesync.criu.ImageSet("img2")       # resolves the ``parent`` chain
    s.addresses()                             # uint64 page addresses (sorted)
    s.pages()                                 # (n, page_size) uint8, mmap view for a full dump
    d = statesync.criu.diff("img1", "img2")   # DirtySet of the pages of img2 that differ
    statesync.criu.write_incremental("img2", "img1", "inc")   # PE_PARENT where unchanged
    statesync.criu.flatten("inc", "full")     # one self-contained image set

Which CRIU: ``$STATESYNC_CRIU`` when set, else the one scripts/install-criu.sh installed
and probed (recorded in /var/lib/statesync/criu-ok), else the first ``criu`` of version
>= 4 on PATH (then /usr/local/sbin, /usr/sbin, /sbin), else the first ``criu`` found.

Modules: :mod:`~statesync.criu.driver` (running CRIU), :mod:`~statesync.criu.images`
(the protobuf image files), :mod:`~statesync.criu.imageset` (a pagemap resolved across
a parent chain, atomic directories), :mod:`~statesync.criu.writer` (diffs, incremental
and flattened sets, assembly from a page store).
"""
from __future__ import annotations

from statesync.criu import images as _img  # noqa: F401  (the image codec, for statesync's own use)
from statesync.criu.driver import (
                                   FEATURES,
                                   MIN_VERSION,
                                   CriuInfo,
                                   DumpResult,
                                   RestoreResult,
                                   check,
                                   dump,
                                   find_criu,
                                   netns_of,
                                   restore,
)
from statesync.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT, VMA_DTYPE
from statesync.criu.writer import (
                                   ImageSet,
                                   WriteResult,
                                   diff,
                                   flatten,
                                   info,
                                   write_image_set,
                                   write_image_set_pages,
                                   write_incremental,
)

__all__ = ["CriuInfo", "DumpResult", "RestoreResult", "ImageSet", "find_criu", "check", "dump",
           "restore", "diff", "write_incremental", "flatten", "write_image_set", "info",
           "write_image_set_pages",
           "PE_PARENT", "PE_LAZY", "PE_PRESENT", "VMA_DTYPE", "WriteResult", "netns_of",
           "FEATURES", "MIN_VERSION"]
