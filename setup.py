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
        self._build_injector()

    def _build_injector(self):
        """csrc/injector_main.c + ss_ptrace.c -> statesync/statesync-injector next to the
        module: tracking/uffd.py runs each ptrace injection in it (a process of its own,
        which an OOM kill of the tracker does not take along; docs/tracking.md). Optional:
        without it the injections run in an in-process task, so a failure only warns."""
        out_dir = os.path.dirname(self.get_ext_fullpath("statesync._core"))
        self._injector = os.path.join(out_dir, "statesync-injector")
        tmp = os.path.join(self.build_temp, "injector")
        try:
            objs = self.compiler.compile(
                [os.path.join("csrc", "injector_main.c"), os.path.join("csrc", "ss_ptrace.c")],
                output_dir=tmp, include_dirs=["csrc"], macros=[("_GNU_SOURCE", "1")],
                extra_postargs=["-std=gnu11", "-O2"])
            try:   # static: no dynamic loading at each exec (~0.2 ms of the spawn)
                self.compiler.link_executable(objs, "statesync-injector", output_dir=out_dir,
                                              extra_postargs=["-static"])
            except Exception:
                self.compiler.link_executable(objs, "statesync-injector", output_dir=out_dir)
        except Exception as exc:  # the module itself is built: warn, do not fail
            print(f"statesync: warning: the injector helper was not built ({exc}); ptrace "
                  "injections will run in-process (an OOM kill of the tracker inside one "
                  "can then crash the target, docs/tracking.md)", file=sys.stderr)
            self._injector = None

    def copy_extensions_to_source(self):
        """In-place and editable builds: the helper goes next to the module too."""
        super().copy_extensions_to_source()
        if getattr(self, "_injector", None) and os.path.exists(self._injector):
            pkg_dir = self.get_finalized_command("build_py").get_package_dir("statesync")
            self.copy_file(self._injector, os.path.join(pkg_dir, "statesync-injector"))


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
