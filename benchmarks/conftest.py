"""Benchmarks follow the test suite's prerequisite rule: ``require(cond, reason)``
skips locally and FAILS with ``CI`` set, so a green CI run means every benchmark
really ran. The helpers are tests/conftest.py's own (loaded from that file under
another module name: both files are called conftest), not copies."""
import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "tests", "conftest.py")
_spec = importlib.util.spec_from_file_location("statesync_tests_conftest", _path)
_tests_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests_conftest)

IN_CI = _tests_conftest.IN_CI
require = _tests_conftest.require
have_root = _tests_conftest.have_root
find_program = _tests_conftest.find_program
