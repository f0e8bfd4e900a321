"""Downtime measured from outside the migration engine.

Two observers, both independent of the engine's own clocks:

- :class:`HeartbeatObserver` binds a UNIX datagram socket at a path and records the
  arrival time of every heartbeat a workload sends (``workloads.spawn(...,
  heartbeat=PATH)``). The path is in the file system, which both network namespaces
  share, so the source copy and the restored copy send to the same observer. The
  service's downtime is the largest gap between two consecutive heartbeats within
  the migration window.
- :class:`RequestProber` calls a function (one request to a third-party service,
  e.g. a redis ``SET``/``GET`` over its UNIX socket) in a loop and records the time
  of every success; the downtime is the largest gap between consecutive successes.

Both run one daemon thread, are bounded in time (``max_seconds``) and are context
managers. Times are ``time.monotonic()`` seconds. Not thread-safe per instance
beyond ``start``/``stop`` from one thread and reads after ``stop``.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable, List, Optional

import numpy as np


def _max_gap(times: List[float], start: Optional[float], end: Optional[float]) -> dict:
    t = np.asarray(times, dtype=np.float64)
    if start is not None:
        # Keep the last event before the window: the gap that spans its start counts.
        i = max(0, int(np.searchsorted(t, start)) - 1)
        t = t[i:]
    if end is not None:
        j = int(np.searchsorted(t, end, side="right")) + 1
        t = t[:j]
    if t.size < 2:
        return {"gap_s": float("nan"), "gap_start": None, "events": int(t.size)}
    d = np.diff(t)
    k = int(np.argmax(d))
    return {"gap_s": float(d[k]), "gap_start": float(t[k]), "events": int(t.size)}


class HeartbeatObserver:
    """Receive heartbeat datagrams at ``path``; ``max_gap()`` is the measured downtime.

    Each datagram's payload (``b"<n> <time> <seq>"`` from the workload generator) is
    kept with its arrival time; ``last_payload`` gives the newest.
    """

    def __init__(self, path: str, max_seconds: float = 600.0):
        self.path = path
        self.max_seconds = max_seconds
        self.times: List[float] = []
        self.payloads: List[bytes] = []
        self._sock: Optional[socket.socket] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "HeartbeatObserver":
        if os.path.exists(self.path):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(self.path)
        s.settimeout(0.1)
        self._sock = s
        self._thread = threading.Thread(target=self._run, name="heartbeat-observer",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None  # start() connected it before starting this thread
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data = sock.recv(256)
            except socket.timeout:
                continue
            except OSError:
                break
            self.times.append(time.monotonic())
            self.payloads.append(data)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._sock:
            self._sock.close()
            self._sock = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def count_since(self, t: float) -> int:
        return len(self.times) - int(np.searchsorted(np.asarray(self.times), t))

    def wait_for_beats(self, n: int = 3, timeout: float = 10.0) -> bool:
        """Wait until ``n`` heartbeats arrived after now."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.count_since(t0) >= n:
                return True
            time.sleep(0.01)
        return False

    @property
    def last_payload(self) -> Optional[bytes]:
        return self.payloads[-1] if self.payloads else None

    def max_gap(self, start: Optional[float] = None, end: Optional[float] = None) -> dict:
        """``{"gap_s", "gap_start", "events"}``: the largest gap between consecutive
        heartbeats whose span touches [start, end] (monotonic seconds)."""
        return _max_gap(list(self.times), start, end)


class RequestProber:
    """Call ``request()`` every ``interval`` seconds; successes (no exception) are
    timestamped. ``max_gap()`` is the service's downtime as a client sees it.
    ``errors`` counts failed requests."""

    def __init__(self, request: Callable[[], object], interval: float = 0.002,
                 max_seconds: float = 600.0):
        self.request = request
        self.interval = interval
        self.max_seconds = max_seconds
        self.times: List[float] = []
        self.errors = 0
        self.requests = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "RequestProber":
        self._thread = threading.Thread(target=self._run, name="request-prober", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.requests += 1
            try:
                self.request()
            except Exception:
                self.errors += 1
            else:
                self.times.append(time.monotonic())
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def max_gap(self, start: Optional[float] = None, end: Optional[float] = None) -> dict:
        return _max_gap(list(self.times), start, end)
