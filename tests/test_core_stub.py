"""src/statesync/_core.pyi matches the compiled module: every binding of the
_core_*.pxi files is in the stub with the runtime's parameters (mypy's stubtest)."""
import os
import subprocess
import sys

from conftest import require

HERE = os.path.dirname(os.path.abspath(__file__))


def test_core_stub_matches_the_compiled_module():
    try:
        import mypy.stubtest  # noqa: F401
    except ImportError:
        require(False, "mypy not installed (make build installs it)")
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "statesync._core",
                        "--allowlist", os.path.join(HERE, "core_stub_allowlist.txt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
