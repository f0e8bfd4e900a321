"""Build of the one compiled module, statesync._core (Cython over csrc/).

Environment switches:
  STATESYNC_SANITIZE=1   build with -fsanitize=address,undefined (debugging; needs
                         LD_PRELOAD of libasan when loaded into a normal python)
  STATESYNC_DEBUG=1      -O0 -g
"""
import glob
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

csources = sorted(glob.glob(os.path.join("csrc", "ss_*.c")))
cflags = ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function"]
ldflags = []
if os.environ.get("STATESYNC_DEBUG"):
    cflags += ["-O0", "-g"]
else:
    cflags += ["-O3"]
if os.environ.get("STATESYNC_SANITIZE"):
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=address,undefined"]

ext = Extension(
    "statesync._core",
    sources=["src/statesync/_core.pyx"] + csources,
    include_dirs=["csrc", numpy.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("_GNU_SOURCE", "1")],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    # liblz4 (Debian liblz4-dev): LZ4 frames of the page stream, decoded in C into
    # reused buffers (python-lz4 decoded 4-5x slower here: docs/stream-format.md).
    libraries=["lz4"],
    depends=sorted(glob.glob(os.path.join("csrc", "*.h")))
    + sorted(glob.glob(os.path.join("src", "statesync", "*.pxi"))),
)

setup(
    ext_modules=cythonize(
        [ext],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "embedsignature": True},
    ),
)
