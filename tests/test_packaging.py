"""The package as a user installs it: ``python -m build --sdist`` gives an sdist that
carries everything the C build needs, ``pip install`` of it into a fresh venv builds
and works (``statesync --version``, the compiled core, the CLI), and without the
liblz4 development files the install fails with one line naming the package.

pip builds in isolation from the configured index (no network beyond it); the C
build uses STATESYNC_DEBUG=1 (-O0) to stay quick. One build for the module.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import have_root, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, timeout=600, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    require(shutil.which("gcc") or shutil.which("cc"), "needs a C compiler")
    try:
        import build  # noqa: F401
    except ImportError:
        require(False, "needs the 'build' package (pip install build; the test extra)")
    out = tmp_path_factory.mktemp("dist")
    r = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", out, ROOT],
             cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = [p for p in os.listdir(out) if p.endswith(".tar.gz")]
    return os.path.join(out, path)


def test_sdist_carries_the_c_build(sdist):
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for need in ("src/statesync/_core.pyx", "src/statesync/_core_codec.pxi", "setup.py",
                 "pyproject.toml", "csrc/ss_codec.c", "csrc/ss_codec.h", "README.md"):
        assert need in names, f"{need} missing from the sdist"
    for optional in ("src/statesync/py.typed", "src/statesync/_core.pyi"):
        if os.path.exists(os.path.join(ROOT, optional)):
            assert optional in names, f"{optional} missing from the sdist"
    assert not any(n.endswith(".so") for n in names)


def test_sdist_installs_into_a_fresh_venv(sdist, tmp_path):
    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", venv])
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    env = dict(os.environ, STATESYNC_DEBUG="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    r = _run([py, "-m", "pip", "install", "-q", sdist], env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _run([venv / "bin" / "statesync", "--version"], env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == _project_version(), r.stderr
    code = ("import statesync, statesync._core, numpy as np\n"
            "from statesync.migration.codec import PageCodec, decode_pages\n"
            "from statesync.migration.pagetable import PageTable\n"
            "a = np.arange(3, dtype=np.uint64) * np.uint64(4096)\n"
            "p = np.full((3, 4096), 7, np.uint8)\n"
            "t = PageTable(4096)\n"
            "assert decode_pages(PageCodec('lz4').encode(a, p), t) == 3\n"
            "import importlib.util as u\n"
            "assert u.find_spec('lz4') is None, 'lz4 is no longer a dependency'\n"
            "print(statesync.__file__)")
    r = _run([py, "-c", code], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(venv) in r.stdout, "imported the source tree, not the installed package"
    r = _run([venv / "bin" / "statesync", "sim", "--count", "1", "--json"], env=env,
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_without_liblz4_dev_the_install_fails_with_one_line(sdist, tmp_path):
    """liblz4's header and link library hidden (bind mounts in a private mount
    namespace): the build stops before compiling with one line naming the package."""
    require(have_root(), "needs root (a mount namespace hides the liblz4 files)")
    hide = [p for p in ("/usr/include/lz4frame.h", "/usr/include/lz4.h",
                        "/usr/lib/x86_64-linux-gnu/liblz4.so",
                        "/usr/lib/aarch64-linux-gnu/liblz4.so",
                        "/usr/lib/liblz4.so", "/usr/lib64/liblz4.so") if os.path.exists(p)]
    require(hide, "liblz4-dev is not installed here, nothing to hide")
    require(shutil.which("unshare"), "needs unshare (util-linux)")
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", venv]).returncode == 0
    mounts = "; ".join(f"mount --bind /dev/null {p}" for p in hide)
    script = f"{mounts}; exec {venv}/bin/python -m pip install {sdist}"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    r = _run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=env,
             timeout=900)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    hint = [ln for ln in out.splitlines() if "liblz4-dev" in ln]
    assert hint, out[-3000:]
    assert "statesync: cannot build" in hint[0] and "install liblz4-dev (Debian/Ubuntu)" in hint[0]
    assert "lz4frame.h: No such file" not in out and "fatal error" not in out, \
        "gcc ran on our sources before the check"


def _project_version() -> str:
    import re
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        m = re.search(r'^version = "([^"]+)"', f.read(), re.M)
    assert m
    return m.group(1)
