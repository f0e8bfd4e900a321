"""The ``statesync`` command as a user meets it: every bad input gives ONE line on
stderr (what, which pid/file, what to do) and the documented exit status, before any
process is touched; no traceback anywhere. Subprocesses, real processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port, have_root, require
from statesync import tracking

ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(tracking.__file__)))
SECRET = b"statesync-cli-test-secret-012345"


def ss(*args, code=None, timeout=120, env=None, **kw):
    """Run ``statesync ARGS`` (or a Python snippet ``code`` that calls main)."""
    cmd = [sys.executable, "-m", "statesync", *map(str, args)] if code is None else \
        [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or ENV, **kw)


def one_line_error(r, rc, *needles):
    assert r.returncode == rc, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"not one line on stderr: {r.stderr!r}"
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- usage (rc 2)


@pytest.mark.parametrize("args,needles", [
    (["track", "--pid", "1", "--interval", "0"], ["--interval", "must be > 0"]),
    (["track", "--pid", "1", "--interval", "-1"], ["--interval", "must be > 0"]),
    (["track", "--pid", "1", "--count", "-1"], ["--count", "must be >= 0"]),
    (["track", "--pid", "abc"], ["--pid", "not an integer"]),
    (["stream", "stats", "/nope"], ["/nope", "no such file"]),
    (["stream", "stats", "/"], ["/", "is a directory"]),
    (["stream", "stats", "/etc/hostname", "--max-block-mib", "-1"], ["--max-block-mib"]),
    (["sim", "--count", "-3"], ["--count", "must be > 0"]),
    (["sim", "--scenarios", "seed:x"], ["--scenarios", "seed:N"]),
    (["receive", "--listen", "0.0.0.0:notaport"], ["--listen", "HOST:PORT"]),
    (["migrate", "--pid", "1", "--to", "nowhere"], ["--to", "HOST:PORT"]),
    (["migrate", "--pid", "1", "--to", "h:1", "--max-rounds", "0"], ["--max-rounds"]),
    (["migrate", "--pid", "1", "--to", "h:1", "--link-rate", "fast"], ["--link-rate"]),
    (["criu", "flatten", "/nope", "-o", "/tmp/x"], ["/nope", "no such directory"]),
    (["nosuchcommand"], ["invalid choice"]),
])
def test_usage_errors_are_one_line_with_status_2(args, needles):
    one_line_error(ss(*args), 2, *needles)


def test_output_paths_are_checked_before_work(tmp_path):
    d = tmp_path / "full"
    d.mkdir()
    (d / "f").write_text("x")
    one_line_error(ss("criu", "incremental", str(tmp_path), "--parent", str(tmp_path),
                      "-o", str(d)), 2, "--output", str(d), "not empty")
    one_line_error(ss("criu", "flatten", str(tmp_path), "-o", "/proc/nope"), 2,
                   "--output", "/proc/nope", "cannot create")
    t0 = time.monotonic()
    one_line_error(ss("sim", "--plot", str(tmp_path / "missing" / "p.png")), 2,
                   "--plot", "does not exist")
    assert time.monotonic() - t0 < 20, "the plot path was checked after the run"
    one_line_error(ss("track-methods", "--json", str(tmp_path / "no" / "x.json")), 2,
                   "--json", "does not exist")


def test_sim_scenarios_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    one_line_error(ss("sim", "--scenarios", str(bad)), 2, str(bad), "not valid JSON", "line 1")
    bad.write_text('[{"x": 1}]')
    one_line_error(ss("sim", "--scenarios", str(bad)), 2, str(bad), "not a JSON list of "
                   "scenarios")
    one_line_error(ss("sim", "--scenarios", str(tmp_path / "none.json")), 2, "none.json")


def test_stream_stats_of_a_non_stream_names_file_and_offset(tmp_path):
    f = tmp_path / "junk.bin"
    f.write_bytes(b"abc")
    one_line_error(ss("stream", "stats", str(f)), 1, str(f), "byte")


def test_workload_help_is_the_generators_help():
    r = ss("workload", "--help")
    assert r.returncode == 0 and "--size" in r.stdout and "--control" in r.stdout, r.stderr


def test_help_texts_show_defaults_and_the_exit_status_table():
    r = ss("--help")
    assert r.returncode == 0 and "exit status" in r.stdout and "prerequisite missing" in r.stdout
    r = ss("migrate", "--help")
    assert "(default: auto)" in r.stdout and "(default: 10)" in r.stdout
    assert "(default: 1.0)" in ss("track", "--help").stdout


# --------------------------------------------------------------------------- processes


def _zombie():
    """A zombie child of a sleeping parent: (parent Popen, zombie pid)."""
    code = ("import os, sys, time\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
            "print(pid, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    zpid = int(p.stdout.readline())
    for _ in range(100):
        with open(f"/proc/{zpid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.02)
    return p, zpid


def _leader_exited():
    """A process whose main thread exited while another thread runs."""
    code = ("import ctypes, os, threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()\n"
            "print(os.getpid(), flush=True)\nctypes.CDLL(None).pthread_exit(None)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline())
    time.sleep(0.2)
    return p, pid


def test_zombie_and_exited_leader_are_told_apart_from_no_such_process():
    p, z = _zombie()
    try:
        one_line_error(ss("track", "--pid", z, "--count", "1"), 1, f"pid {z}", "zombie",
                       f"parent, pid {p.pid}")
        one_line_error(ss("track-methods", "--pid", z), 1, "zombie")
    finally:
        p.kill()
        p.wait()
    p, pid = _leader_exited()
    try:
        one_line_error(ss("track", "--pid", pid, "--count", "1"), 1, f"pid {pid}",
                       "main thread exited", "1 other thread")
    finally:
        p.kill()
        p.wait()


def test_track_methods_of_a_missing_pid_fails():
    one_line_error(ss("track-methods", "--pid", 999999), 1, "pid 999999", "no such process")


def test_track_json_rows(spawn_workload):
    wl = spawn_workload(size="4M", rate=500)
    r = ss("track", "--pid", wl.pid, "--interval", "0.1", "--count", "2", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["pid"] == wl.pid and "dirty_pages" in rows[0]


def test_json_output_of_reporting_commands(tmp_path):
    r = ss("track-methods", "--json")
    assert set(json.loads(r.stdout)["methods"]) == {"uffd", "softdirty", "hash"}
    r = ss("sim", "--count", "1", "--scheduler", "adaptive", "--json")
    assert json.loads(r.stdout)[0]["scheduler"] == "adaptive"
    out = tmp_path / "check.json"
    r = ss("criu", "check", "--json", out)
    assert r.returncode in (0, 3) and "version" in json.loads(out.read_text())


# --------------------------------------------------------------------------- migrate / receive


def test_migrate_metrics_file_without_prometheus_fails_before_migrating(spawn_workload,
                                                                          tmp_path):
    wl = spawn_workload(size="2M", rate=100)
    secret = tmp_path / "s"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "from statesync.cli import main; sys.exit(main(sys.argv[1:]))")
    r = ss("migrate", "--pid", wl.pid, "--to", f"127.0.0.1:{free_port()}", "--secret-file",
           secret, "--metrics-file", tmp_path / "m.prom", code=code)
    one_line_error(r, 3, "--metrics-file", "prometheus_client", "statesync[metrics]")
    r = ss("migrate", "--pid", wl.pid, "--to", f"127.0.0.1:{free_port()}", "--secret-file",
           secret, "--json", tmp_path / "missing" / "r.json")
    one_line_error(r, 2, "--json", "does not exist")
    r = ss("migrate", "--pid", wl.pid, "--to", f"127.0.0.1:{free_port()}")
    one_line_error(r, 2, "secret")
    assert wl.alive() and wl.client.status()["seq"] >= 0


def test_migrate_to_nobody_is_an_abort_with_the_source_running(spawn_workload, tmp_path):
    require(have_root(), "needs root")
    wl = spawn_workload(size="2M", rate=100)
    secret = tmp_path / "s"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    r = ss("migrate", "--pid", wl.pid, "--to", f"127.0.0.1:{free_port()}", "--secret-file",
           secret, "--io-timeout", "2", "--quiet", "--calibration", "")
    one_line_error(r, 4, "cannot connect", f"pid {wl.pid}")
    assert wl.alive()


def _receiver(port, secret, tmp_path, *extra):
    p = subprocess.Popen([sys.executable, "-m", "statesync", "receive", "--listen",
                          f"127.0.0.1:{port}", "--images-dir", str(tmp_path / "img"),
                          "--secret-file", str(secret), "--forever", "--io-timeout", "5",
                          *map(str, extra)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    line = p.stdout.readline()
    assert line.startswith("listening on"), (line, p.stderr.read() if p.poll() else "")
    return p


def test_wrong_secret_is_clear_at_the_source_and_counted_by_the_receiver(spawn_workload,
                                                                           tmp_path):
    require(have_root(), "needs root (receiver preflight, CRIU)")
    pytest.importorskip("prometheus_client")
    import urllib.request
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(SECRET)
    good.chmod(0o600)
    bad.write_bytes(b"x" * 32)
    bad.chmod(0o600)
    port, mport = free_port(), free_port()
    rx = _receiver(port, good, tmp_path, "--metrics-listen", f"127.0.0.1:{mport}")
    try:
        wl = spawn_workload(size="2M", rate=100)
        r = ss("migrate", "--pid", wl.pid, "--to", f"127.0.0.1:{port}", "--secret-file", bad,
               "--quiet", "--calibration", "")
        one_line_error(r, 4, "same secret", "nothing of pid")
        assert wl.alive()
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
        text = text.decode()
        assert "statesync_receiver_connections_refused_total 1.0" in text, text
        assert "statesync_receiver_migrations_received_total 0.0" in text
    finally:
        rx.terminate()
        rx.wait(10)


def test_receiver_preflight_fails_with_status_3(tmp_path):
    require(have_root(), "needs root")
    secret = tmp_path / "s"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    env = dict(ENV, STATESYNC_CRIU="/bin/false")
    r = ss("receive", "--listen", f"127.0.0.1:{free_port()}", "--images-dir", tmp_path / "i",
           "--secret-file", secret, env=env, timeout=60)
    one_line_error(r, 3, "preflight", "criu")


# --------------------------------------------------------------------------- real migrations


@pytest.fixture(scope="module")
def slow_bed(criu_ok):
    require(have_root(), "needs root")
    from statesync.testing.testbed import Testbed
    with Testbed("20mbit") as tb:
        secret = os.path.join(tb.root, "secret")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(SECRET)
        port = tb.free_port("b")
        rx = tb.python("b", ["receive", "--listen", f"{tb.addr_b}:{port}", "--images-dir",
                             tb.dir_b, "--secret-file", secret, "--forever", "--io-timeout", "5"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tb.wait_port("b", port, proc=rx)
        yield tb, f"{tb.addr_b}:{port}", secret


def _spawn_in(tb, size):
    from statesync.testing import workloads
    return workloads.spawn(size=size, rate=200.0, own_pidns=True, netns=tb.ns_a,
                           control=f"@ssc-test-{os.getpid()}-{time.monotonic_ns()}")


def test_migrate_json_to_stdout_and_sigterm_aborts_safely(slow_bed, tmp_path):
    tb, dest, secret = slow_bed
    wl = _spawn_in(tb, "2M")
    restored = None
    try:
        r = subprocess.run(tb.wrap("a", [sys.executable, "-m", "statesync", "migrate", "--pid",
                                         str(wl.pid), "--to", dest, "--secret-file", secret,
                                         "--strategy", "precopy", "--json", "--calibration",
                                         "", "--max-downtime", "30"]),
                           capture_output=True, text=True, timeout=120, env=ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        rep = json.loads(r.stdout)
        restored = rep["restored_pid"]
        assert rep["ok"] and rep["kpi"]["max_downtime_s"]["met"] is True
        assert "round" in r.stderr       # the human output went to stderr
    finally:
        wl.kill()
        if restored:
            try:
                os.kill(restored, 9)
            except ProcessLookupError:
                pass
    # SIGTERM in the middle of round 0 (16 MB at 20 Mbit: ~6 s): exit status 4, the
    # source runs on, the destination keeps nothing.
    wl = _spawn_in(tb, "16M")
    try:
        p = subprocess.Popen(tb.wrap("a", [sys.executable, "-m", "statesync", "migrate",
                                           "--pid", str(wl.pid), "--to", dest, "--secret-file",
                                           secret, "--strategy", "iterative",
                                           "--calibration", ""]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        line = p.stdout.readline()
        assert line.startswith("plan:"), line
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err), 4,
                       "interrupted by SIGTERM", "the source runs on")
        assert wl.alive()
        c = wl.client
        s0 = c.status()["seq"]
        time.sleep(0.1)
        assert c.status()["seq"] > s0
        deadline = time.monotonic() + 10
        while os.listdir(tb.dir_b) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(tb.dir_b) == []
    finally:
        wl.kill()


def test_check_json_and_compare_mismatch(tmp_path):
    require(have_root(), "needs root (criu check)")
    mine = tmp_path / "here.json"
    r = ss("check", "--json", mine)
    assert r.returncode in (0, 3), r.stderr
    d = json.loads(mine.read_text())
    assert {"ok", "checks", "versions"} <= set(d) and d["versions"]["page_size"] == 4096
    d["versions"]["criu"] = "0.1"
    d["versions"]["cpu_flags"] = d["versions"]["cpu_flags"] + ["madeupflag"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    r = ss("check", "--compare", other)
    line = one_line_error(r, 3, "criu: here", "there 0.1", "madeupflag")
    assert "same as" in line
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    one_line_error(ss("check", "--compare", bad), 2, "--compare", "statesync check --json")


def test_progress_line_has_bytes_rate_and_eta_and_is_quiet_off_a_tty():
    import io

    from statesync.cli._common import Progress
    buf = io.StringIO()
    p = Progress(stream=buf, enabled=True)
    p.start()
    time.sleep(0.05)
    p.update("round 0", 512, 1024, 2 << 20)
    p.clear()
    text = buf.getvalue()
    assert "round 0" in text and "512/1024 pages" in text and "MB/s" in text and "ETA" in text
    assert text.endswith("\r")
    quiet = io.StringIO()                      # a StringIO is not a terminal
    Progress(stream=quiet).update("round 0", 1, 2, 4096)
    assert quiet.getvalue() == ""


def test_receive_images_dir_default_is_not_the_working_directory():
    r = ss("receive", "--help", env=dict(ENV, STATESYNC_IMAGES_DIR="", STATE_DIRECTORY=""))
    assert "/var/lib/statesync/images" in r.stdout
