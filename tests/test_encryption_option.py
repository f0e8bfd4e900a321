"""The encryption setting, from the API and CLI down to the wire (issue 15).

- ``migrate(..., encryption=...)``, ``serve_destination(..., encryption=...)`` and the
  CLI's ``--no-encryption`` / ``--cipher`` check the setting before any process or
  port is touched.
- On the two-namespace testbed with real CRIU migrations: encryption off on both
  agents (the CLI flags) restores exactly, the report says ``hmac-sha256`` and the
  destination's log says the frames were NOT encrypted; the default reports
  aes-256-gcm (chacha20-poly1305 when asked); a mismatch in either direction is
  refused at the handshake (phase ``authenticate``), the source runs on and the
  destination keeps serving and holds nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import find_program, have_root, require
from statesync import migrate
from statesync.errors import MigrationError

SECRET = b"statesync-encryption-option-secret-0123"
OFF = "hmac-sha256"     # the cipher suite of authenticated-only frames (docs/wire-format.md)


# --------------------------------------------------------------------------- checks first


@pytest.mark.parametrize("bad", ["rot13", "hmac-sha256", 2, "ON"])
def test_bad_encryption_setting_fails_before_anything_is_touched(bad):
    import statesync
    from statesync.migration.destination import DestinationServer

    # pid 2**22 + 1 cannot exist: the setting is checked before the process is.
    with pytest.raises(ValueError, match="encryption setting"):
        statesync.Migration(2**22 + 1, "127.0.0.1:1", secret=SECRET, encryption=bad)
    with pytest.raises(ValueError, match="encryption setting"):
        migrate(2**22 + 1, "127.0.0.1:1", secret=SECRET, encryption=bad)
    with pytest.raises(ValueError, match="encryption setting"):
        statesync.serve_destination("127.0.0.1:0", "/nonexistent", SECRET, encryption=bad)
    with pytest.raises(ValueError, match="encryption setting"):
        DestinationServer("127.0.0.1:0", "/nonexistent", SECRET, encryption=bad)


def test_cli_cipher_and_no_encryption_exclude_each_other():
    r = subprocess.run([sys.executable, "-m", "statesync", "migrate", "--pid", "1", "--to",
                        "127.0.0.1:1", "--no-encryption", "--cipher", "aes-256-gcm"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not allowed with" in r.stderr, r.stderr
    for cmd in ("migrate", "receive"):
        r = subprocess.run([sys.executable, "-m", "statesync", cmd, "--help"],
                           capture_output=True, text=True, timeout=60)
        assert "--no-encryption" in r.stdout and "already" in r.stdout, r.stdout


def test_report_names_the_cipher_in_every_form():
    from statesync.migration.report import Report

    off = Report(pid=1, dest="h:1", strategy="cold", encryption=OFF)
    assert "encryption OFF" in off.table() and "in clear" in off.table()
    assert json.loads(off.to_json())["encryption"] == OFF
    on = Report(pid=1, dest="h:1", strategy="cold", encryption="aes-256-gcm")
    assert "encryption aes-256-gcm" in on.table()
    assert Report.from_dict(on.to_dict()).encryption == "aes-256-gcm"
    old = on.to_dict()
    del old["encryption"]           # a report written before the field existed
    assert Report.from_dict(old).encryption == ""
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest
    text = generate_latest(off.to_prometheus()).decode()
    assert 'encryption="hmac-sha256"' in text and "statesync_migration_info{" in text


# --------------------------------------------------------------------------- real migrations


def _prereqs():
    require(have_root(), "needs root (namespaces, ptrace, CRIU)")
    for prog in ("ip", "tc", "nsenter", "unshare"):
        require(find_program(prog), f"{prog} not installed (scripts/setup-system.sh)")


class Bed:
    def __init__(self, tb):
        self.tb = tb
        self.secret_file = os.path.join(tb.root, "secret")
        with open(os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                  "wb") as f:
            f.write(SECRET)
        self.dest = None
        self.port = None
        self.wl = None
        self.restored = []

    def start_dest(self, *extra):
        self.port = self.tb.free_port("b")
        self.dest = self.tb.python("b", ["receive", "--listen", f"{self.tb.addr_b}:{self.port}",
                                         "--images-dir", self.tb.dir_b,
                                         "--secret-file", self.secret_file,
                                         "--io-timeout", "5", *extra],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.tb.wait_port("b", self.port, proc=self.dest)

    def dest_output(self, terminate=False):
        """(results, log) of the destination agent once it ended."""
        if terminate:
            self.dest.terminate()
        out, err = self.dest.communicate(timeout=20)
        results = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
        return results, err.decode()

    def spawn(self, size="4M"):
        from statesync.testing import workloads
        self.wl = workloads.spawn(size=size, own_pidns=True, netns=self.tb.ns_a, paused=True,
                                  control=f"@ssm-enc-{os.getpid()}-{time.monotonic_ns()}")
        return self.wl

    def client(self, side):
        from statesync.testing.workloads import WorkloadClient
        return WorkloadClient(self.wl.control, netns=self.tb.ns(side))

    def migrate(self, **kw):
        kw.setdefault("io_timeout", 5.0)
        return migrate(self.wl.pid, f"{self.tb.addr_b}:{self.port}", secret=SECRET,
                       netns=self.tb.ns_a, **kw)

    def close(self):
        for p in self.restored:
            try:
                os.kill(p, 9)
            except (ProcessLookupError, TypeError):
                pass
        if self.wl:
            self.wl.kill()
        if self.dest is not None and self.dest.poll() is None:
            self.dest.kill()
            self.dest.wait()


@pytest.fixture
def bed(tmp_path, criu_ok, monkeypatch):
    _prereqs()
    monkeypatch.setenv("STATESYNC_STATE_DIR", str(tmp_path / "state"))
    from statesync.testing.testbed import Testbed
    with Testbed("1gbit") as tb:
        b = Bed(tb)
        try:
            yield b
        finally:
            b.close()


def test_migration_with_encryption_off_on_both_agents(bed):
    """`statesync receive --no-encryption` and `statesync migrate --no-encryption`: the
    process moves exactly; the report and the destination's log say it was not
    encrypted."""
    bed.start_dest("--no-encryption")
    bed.spawn()
    before = bed.client("a").checksum()
    out = os.path.join(bed.tb.root, "report.json")
    src = bed.tb.python("a", ["migrate", "--pid", str(bed.wl.pid), "--to",
                              f"{bed.tb.addr_b}:{bed.port}", "--secret-file", bed.secret_file,
                              "--strategy", "iterative", "--no-encryption", "--json", out,
                              "--calibration", "", "--quiet"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    so, se = src.communicate(timeout=120)
    assert src.returncode == 0, se.decode()[-2000:]
    from statesync.migration.report import Report
    with open(out) as f:
        rep = Report.from_dict(json.load(f))
    bed.restored.append(rep.restored_pid)
    assert rep.ok and rep.restored_pid and rep.encryption == OFF
    assert "encryption OFF" in so.decode()
    assert bed.client("b").checksum() == before, "restored memory differs from the source"
    assert bed.dest.wait(15) == 0
    results, log = bed.dest_output()
    assert results[-1]["ok"] and results[-1]["encryption"] == OFF
    assert f"({OFF})" in log and "NOT encrypted" in log, log[-2000:]


@pytest.mark.parametrize("cipher", [None, "chacha20-poly1305"], ids=["default", "chacha"])
def test_default_migration_is_encrypted_and_says_so(bed, cipher):
    bed.start_dest()
    bed.spawn()
    before = bed.client("a").checksum()
    rep = bed.migrate(strategy="cold", encryption=cipher)
    bed.restored.append(rep.restored_pid)
    want = cipher or "aes-256-gcm"
    assert rep.ok and rep.encryption == want
    assert bed.client("b").checksum() == before
    assert bed.dest.wait(15) == 0
    results, log = bed.dest_output()
    assert results[-1]["ok"] and results[-1]["encryption"] == want
    assert "authenticated source" in log and f"({want})" in log, log[-2000:]
    assert "NOT encrypted" not in log


@pytest.mark.parametrize("source_enc,dest_args", [(False, ()), (True, ("--no-encryption",))],
                         ids=["source-off-dest-on", "source-on-dest-off"])
def test_encryption_mismatch_is_refused_at_the_handshake(bed, source_enc, dest_args):
    bed.start_dest(*dest_args)
    bed.spawn(size="2M")
    before = bed.client("a").checksum()
    with pytest.raises(MigrationError) as ei:
        bed.migrate(strategy="cold", encryption=source_enc)
    assert ei.value.phase == "authenticate", ei.value
    msg = str(ei.value)
    assert "configure both sides the same" in msg and "encryption off" in msg, msg
    rep = ei.value.report
    assert rep is not None and not rep.ok and rep.encryption == ""
    # Nothing happened to the process; the destination serves on and holds nothing.
    assert bed.wl.alive() and bed.client("a").checksum() == before
    assert bed.dest.poll() is None
    assert os.listdir(bed.tb.dir_b) == []
    _, log = bed.dest_output(terminate=True)
    assert "refused" in log and "encryption off" in log, log[-2000:]


@pytest.mark.parametrize("dest_enc", [False, None], ids=["dest-off", "dest-on"])
def test_resolve_uses_the_migrations_setting(tmp_path, monkeypatch, dest_enc):
    """The handoff's RESOLVE (supervisor, `statesync recover`, a source reconnecting
    after COMMIT) speaks with the migration's encryption setting: a destination with
    encryption off answers a RESOLVE made with it off, and refuses one made with it on
    (and vice versa)."""
    import asyncio

    from statesync.migration.destination import DestinationServer
    from statesync.migration.supervisor import resolve_with_peer

    monkeypatch.setenv("STATESYNC_STATE_DIR", str(tmp_path / "state"))
    images = tmp_path / "images"
    images.mkdir(mode=0o700)
    logs = []

    async def go():
        srv = await DestinationServer("127.0.0.1:0", str(images), SECRET, once=False,
                                      encryption=dest_enc, log=logs.append).start()
        try:
            out = {}
            for enc in (False, True):
                out[enc] = await asyncio.to_thread(
                    resolve_with_peer, f"127.0.0.1:{srv.port}", None, SECRET,
                    "0123456789abcdef", "abort", 1.0, 2.0, logs.append, enc)
            return out
        finally:
            srv.server.cancel()
            srv._lsock.close()
            srv.close()

    out = asyncio.run(asyncio.wait_for(go(), 30))
    match = dest_enc is not False
    assert out[match] is not None and out[match]["state"] == "unknown", out
    assert out[not match] is None, out
    assert any("configure both sides the same" in m for m in logs), logs
