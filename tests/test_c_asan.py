"""Builds each C test program in csrc/tests/ together with the whole C core under
AddressSanitizer + UndefinedBehaviorSanitizer and runs it. A sanitizer report or a
failed check makes the test fail."""
import glob
import os
import subprocess

import pytest

from conftest import find_program, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
TESTS = sorted(glob.glob(os.path.join(CSRC, "tests", "test_*.c")))


@pytest.mark.parametrize("src", TESTS, ids=[os.path.basename(t) for t in TESTS])
def test_c_core_under_asan(src, tmp_path):
    cc = find_program("cc") or find_program("gcc")
    require(cc, "needs a C compiler")
    exe = tmp_path / os.path.basename(src)[:-2]
    core = sorted(glob.glob(os.path.join(CSRC, "ss_*.c")))
    build = subprocess.run(
        [cc, "-std=gnu11", "-O1", "-g", "-D_GNU_SOURCE", "-fsanitize=address,undefined",
         "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-I", CSRC, "-o", str(exe),
         src, *core, "-lpthread", "-llz4"],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, f"{os.path.basename(src)} failed:\n{res.stdout}\n{res.stderr}"
    assert "ERROR: AddressSanitizer" not in res.stderr
    assert "runtime error" not in res.stderr
