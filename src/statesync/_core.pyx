# cython: language_level=3
"""statesync._core: the one compiled binding module.

Converts Python/numpy types to the C core in csrc/, releases the GIL around C
work, and maps negative errno returns to OSError (the Python modules turn those
into statesync's own exceptions, with the pid or file they concern).

Each concern keeps its bindings in its own include file so that the areas can
grow independently; they are all compiled into this one module.
"""
import os

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cnp.import_array()


cdef int _check(long rc, what) except -1:
    """Raise OSError for a negative errno return of the C core."""
    if rc < 0:
        raise OSError(<int>-rc, f"{what}: {os.strerror(<int>-rc)}")
    return 0


include "_core_hash.pxi"
include "_core_proc.pxi"
include "_core_track.pxi"
include "_core_criu.pxi"
include "_core_codec.pxi"
include "_core_lazy.pxi"
