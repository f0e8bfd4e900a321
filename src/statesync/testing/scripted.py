"""Tiny scripted test servers: a Python program given as text, run as its own process,
that listens on an abstract unix socket named by its first argument and answers one
short request per connection (the shared-memory, process-tree and memfd targets of
tests/test_memsource.py and tests/test_criu.py, and benchmarks/bench_shmem.py).
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Optional, Sequence

PYTHON = "/usr/bin/python3"


def spawn_script(path: "os.PathLike[str] | str", source: str, name: str, *args: str,
                 wrap: Sequence[str] = (), quiet: bool = True) -> subprocess.Popen:
    """Write ``source`` to ``path`` and start ``[*wrap, python3, path, name, *args]`` in
    a new session with stdin from /dev/null (stdout and stderr too when ``quiet``).
    ``wrap`` is what runs it, e.g. ``unshare -p -f setsid`` for its own pid namespace."""
    with open(path, "w") as f:
        f.write(source)
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen([*wrap, PYTHON, os.fspath(path), name, *args],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            start_new_session=True)


def request(name: str, msg: str, *, timeout: float = 30.0,
            netns: Optional[str] = None) -> str:
    """Send ``msg`` to the server on the abstract unix socket ``name`` and return its
    reply (at most 100 bytes). The socket is created in network namespace ``netns``
    (a name under /run/netns) when given, as abstract sockets belong to one. While
    the server starts, connecting is retried every 50 ms for up to ``timeout`` seconds;
    then the last OSError is raised."""
    deadline = time.monotonic() + timeout
    while True:
        if netns is None:
            s = socket.socket(socket.AF_UNIX)
        else:
            from statesync.testing.testbed import socket_in_netns
            s = socket_in_netns(netns, socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect("\0" + name)
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        s.sendall(msg.encode())
        return s.recv(100).decode()
    finally:
        s.close()


#: The top of a scripted server's request loop, for the script sources to share (as
#: text: the script runs it as if written out). It listens on the abstract unix socket
#: named by argv[1] (the script imports ``socket`` and ``sys``) and leaves, for each
#: connection ``c``, the request's words in ``cmd``. The script's own lines follow it
#: on a new line, indented by four, and answer and close ``c``.
SERVE_LOOP = r'''s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0" + sys.argv[1]); s.listen()
while True:
    c, _ = s.accept()
    cmd = c.recv(100).decode().split()'''
