"""Build of the one compiled module, statesync._core (Cython over csrc/).

Environment switches:
  STATESYNC_SANITIZE=1   build with -fsanitize=address,undefined (debugging; needs
                         LD_PRELOAD of libasan when loaded into a normal python)
  STATESYNC_DEBUG=1      -O0 -g
"""
import glob
import os
import shutil
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# What to install for the C build, per distribution family (one line each).
_LZ4_HINT = ("statesync: cannot build: the liblz4 development files (lz4frame.h, liblz4.so) "
             "are missing: install liblz4-dev (Debian/Ubuntu), lz4-devel (Fedora/RHEL) or "
             "lz4-dev (Alpine), then retry")


def _probe_lz4(cc, include_dirs) -> bool:
    """Compile and link a one-line program against liblz4 with the build's compiler."""
    d = tempfile.mkdtemp(prefix="statesync-probe-")
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(devnull, 1)     # the compiler's complaints about the probe are not news
    os.dup2(devnull, 2)
    try:
        src = os.path.join(d, "probe.c")
        with open(src, "w") as f:
            f.write("#include <lz4frame.h>\nint main(void){return (int)LZ4F_getVersion()==0;}\n")
        objs = cc.compile([src], output_dir=d, include_dirs=include_dirs,
                          extra_postargs=["-Werror=implicit-function-declaration"])
        cc.link_executable(objs, os.path.join(d, "probe"), libraries=["lz4"])
        return True
    except Exception:
        return False
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)


class _BuildExt(build_ext):
    """build_ext that checks for liblz4 before compiling anything, so a missing
    header is one line naming the package, not pages of gcc output."""

    def build_extensions(self):
        if not os.environ.get("STATESYNC_SKIP_LZ4_CHECK") and not _probe_lz4(
                self.compiler, self.include_dirs or []):
            raise SystemExit(_LZ4_HINT)
        super().build_extensions()


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
    cmdclass={"build_ext": _BuildExt},
    ext_modules=cythonize(
        [ext],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "embedsignature": True},
    ),
)
