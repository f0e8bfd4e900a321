"""A forking service, for real: Debian's nginx (a master and 2 worker processes) in its
own pid namespace in the testbed's source namespace, live-migrated with iterative
pre-copy to the destination agent in the other namespace, and serving a static file
there afterwards.

nginx listens on 0.0.0.0: CRIU restores a listening socket bound to a specific address
only where that address exists, and the destination namespace has another one. The
HTTP checks therefore connect to 127.0.0.1 from inside each namespace.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import find_program, have_root, require
from statesync import migrate

SECRET = b"statesync-nginx-test-secret-0123"
WORKERS = 2


def _netns_ino(pid) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _cmdline(pid) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _ppid(pid) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _nginx_procs(ns_ino: int) -> list:
    """pids whose network namespace is ``ns_ino`` and whose command line starts with
    nginx (the master's and workers' titles: "nginx: master process ...")."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if _cmdline(d).startswith(b"nginx") and _netns_ino(d) == ns_ino:
                out.append(int(d))
        except OSError:
            continue
    return out


def _http_get(tb, side: str, port: int, path: str, timeout: float = 5.0) -> bytes:
    """The body of ``GET path`` on 127.0.0.1:port inside a side (HTTP/1.0: the server
    closes the connection after the response)."""
    s = tb.socket(side)
    s.settimeout(timeout)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return body


def _write_conf(d: str, port: int) -> str:
    for sub in ("html", "tmp"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    tmp = os.path.join(d, "tmp")
    with open(conf, "w") as f:
        f.write(f"""daemon off;
master_process on;
worker_processes {WORKERS};
user root;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 0.0.0.0:{port};
        root {d}/html;
    }}
}}
""")
    return conf


def test_migrate_nginx_master_and_workers_iterative(tmp_path, criu_ok, monkeypatch):
    require(have_root(), "needs root (namespaces, ptrace, CRIU)")
    for prog in ("ip", "tc", "nsenter", "unshare", "setsid"):
        require(find_program(prog), f"{prog} not installed (scripts/setup-system.sh)")
    nginx = find_program("nginx")
    require(nginx, "nginx not installed (scripts/setup-system.sh installs nginx-light)")
    monkeypatch.setenv("STATESYNC_STATE_DIR", str(tmp_path / "state"))
    from statesync.testing.testbed import Testbed

    with Testbed("1gbit") as tb:
        ino_a = os.stat(f"/run/netns/{tb.ns_a}").st_ino
        ino_b = os.stat(f"/run/netns/{tb.ns_b}").st_ino
        secret_file = os.path.join(tb.root, "secret")
        with open(os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(SECRET)
        web = str(tmp_path / "nginx")
        os.makedirs(web)
        os.chmod(tmp_path, 0o755)
        http_port = tb.free_port("a")
        conf = _write_conf(web, http_port)
        content = os.urandom(200_000)
        with open(os.path.join(web, "html", "file"), "wb") as f:
            f.write(content)
        # As statesync.testing.services.spawn_redis: init of its own pid namespace and
        # session, in the source's network namespace.
        popen = tb.popen("a", ["unshare", "-p", "-f", "setsid", nginx, "-p", web, "-c", conf],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while True:
                procs = _nginx_procs(ino_a)
                if len(procs) == 1 + WORKERS:
                    try:
                        if _http_get(tb, "a", http_port, "/file", timeout=1.0) == content:
                            break
                    except (OSError, AssertionError):
                        pass
                assert popen.poll() is None, f"nginx exited ({popen.returncode}): {popen.args}"
                assert time.monotonic() < deadline, f"nginx not serving on :{http_port}: {procs}"
                time.sleep(0.05)
            master = [p for p in procs if _cmdline(p).startswith(b"nginx: master")][0]

            port = tb.free_port("b")
            dest = tb.python("b", ["receive", "--listen", f"{tb.addr_b}:{port}",
                                   "--images-dir", tb.dir_b, "--secret-file", secret_file,
                                   "--io-timeout", "30"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            tb.wait_port("b", port, proc=dest)

            t0 = time.monotonic()
            rep = migrate(master, f"{tb.addr_b}:{port}", strategy="iterative", secret=SECRET,
                          netns=tb.ns_a, io_timeout=30)
            took = time.monotonic() - t0
            assert rep.ok, f"{rep.error} (phase {rep.failed_phase})\n{rep.table()}"

            # The whole tree moved: master + workers in b, nothing left in a.
            moved = _nginx_procs(ino_b)
            assert len(moved) == 1 + WORKERS, moved
            assert _nginx_procs(ino_a) == []
            masters = [p for p in moved if _cmdline(p).startswith(b"nginx: master")]
            assert len(masters) == 1, moved
            assert sorted(_ppid(p) for p in moved if p != masters[0]) == [masters[0]] * WORKERS
            assert _http_get(tb, "b", http_port, "/file") == content

            assert rep.state_pages > 0
            share = (rep.state_pages - rep.final_pages) / rep.state_pages
            print(f"nginx migration: {took:.2f}s, switchover={rep.switchover}, "
                  f"rounds={len(rep.rounds)}, precopy_pages={rep.precopy_pages}, "
                  f"state_pages={rep.state_pages}, final_pages={rep.final_pages}, "
                  f"pre-copied share={share:.4f}, downtime={rep.downtime_s:.3f}s")
            assert share >= 0.95, rep.table()
        finally:
            for ino in (ino_a, ino_b):
                for p in _nginx_procs(ino):
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
