"""A third-party scheduler registered through the ``statesync.schedulers`` entry-point
group is found by ``statesync.scheduler.get``: the example package in tests/plugins is
really built and installed (pip, into a temporary target directory put on sys.path of a
fresh interpreter), then used by the simulator."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = Path(__file__).parent / "plugins" / "statesync-example-scheduler"


def test_entry_point_plugin_is_picked_up(tmp_path):
    target = tmp_path / "site"
    src = tmp_path / "src"
    shutil.copytree(PLUGIN, src)  # pip builds in the source tree: keep the checkout clean
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(
            os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_CACHE_DIR=str(tmp_path / "cache")
        ),
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert list(target.glob("statesync_example_scheduler-*.dist-info"))

    script = textwrap.dedent("""
        import json
        from statesync import scheduler, sim
        names = scheduler.available()
        s = scheduler.get("example-shrink", min_shrink=0.3)
        results = [sim.run(sc, scheduler.get("example-shrink"), "example-shrink")
                   for sc in sim.suite("default", 12)]
        print(json.dumps({"names": names, "type": type(s).__module__ + "." + type(s).__name__,
                          "min_shrink": s.min_shrink, "rounds": [r.rounds for r in results],
                          "downtimes": [r.downtime_s for r in results]}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target)] + sys.path))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    import json
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "example-shrink" in got["names"] and "adaptive" in got["names"]
    assert got["type"] == "statesync_example_scheduler.ShrinkScheduler"
    assert got["min_shrink"] == 0.3
    assert all(r >= 1 for r in got["rounds"]) and all(d > 0 for d in got["downtimes"])

    # without the package on the path it is not there, and asking for it names what is
    script2 = "from statesync import scheduler; print('example-shrink' in scheduler.available())"
    out2 = subprocess.run(
        [sys.executable, "-c", script2], capture_output=True, text=True, timeout=60
    )
    assert out2.stdout.strip() == "False"


def test_broken_entry_point_is_reported(tmp_path):
    # a package whose entry point names a module that does not import
    dist = tmp_path / "site" / "broken_sched-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-sched\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[statesync.schedulers]\nbroken = no_such_module_xyz:Sched\n"
    )
    script = textwrap.dedent("""
        from statesync import scheduler
        from statesync.errors import StateSyncError
        assert "broken" in scheduler.available()
        try:
            scheduler.get("broken")
        except StateSyncError as e:
            print("ERR", e)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site")] + sys.path))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert (
        "ERR scheduler 'broken': loading entry point 'no_such_module_xyz:Sched' failed"
        in out.stdout
    )
