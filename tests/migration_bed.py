"""What the migration tests share: a source and a destination agent in the two-host
testbed (statesync.testing.testbed), a workload in the source host, and the checks of
where its copies run. Each test module subclasses :class:`MigrationBed` for its own
defaults."""
from __future__ import annotations

import os
import subprocess
import time

from statesync import migrate


class MigrationBed:
    """``tb``: a running Testbed. ``secret``: the shared secret (bytes), written to a
    0600 file in the testbed's root (the agents refuse one others can read)."""

    control_prefix = "ss-test"

    def __init__(self, tb, secret: bytes):
        self.tb = tb
        self.secret = secret
        self.secret_file = os.path.join(tb.root, "secret")
        with open(os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                  "wb") as f:
            f.write(secret)
        os.chmod(self.secret_file, 0o600)
        self.dest = None
        self.port = None
        self.wl = None
        self.restored: list = []

    def start_dest(self, io_timeout=5.0, env=None, port=None, extra=(),
                   stdout=subprocess.PIPE):
        """`statesync receive` in host b; returns its Popen once it listens."""
        self.port = port or self.tb.free_port("b")
        self.dest = self.tb.python("b", ["receive", "--listen", f"{self.tb.addr_b}:{self.port}",
                                         "--images-dir", self.tb.dir_b,
                                         "--secret-file", self.secret_file,
                                         "--io-timeout", str(io_timeout), *extra],
                                   stdout=stdout, stderr=subprocess.PIPE, env=env)
        self.tb.wait_port("b", self.port, proc=self.dest)
        return self.dest

    @property
    def addr(self) -> str:
        return f"{self.tb.addr_b}:{self.port}"

    def spawn(self, size="6M", **kw):
        """The workload generator in its own pid namespace in host a."""
        from statesync.testing import workloads
        self.wl = workloads.spawn(size=size, own_pidns=True, netns=self.tb.ns_a,
                                  control=f"@{self.control_prefix}-{os.getpid()}-"
                                          f"{time.monotonic_ns()}", **kw)
        return self.wl

    def client(self, side):
        from statesync.testing.workloads import WorkloadClient
        return WorkloadClient(self.wl.control, netns=self.tb.ns(side))

    def migrate(self, pid=None, port=None, **kw):
        """statesync.migrate of the workload (or ``pid``) from host a to the agent."""
        kw.setdefault("io_timeout", 5.0)
        return migrate(pid or self.wl.pid, f"{self.tb.addr_b}:{port or self.port}",
                       secret=self.secret, netns=self.tb.ns_a, **kw)

    def procs_with_control(self):
        """pids of python processes whose command line names our workload's control."""
        from statesync.testing.workloads import copies
        return copies(self.wl.control)

    python_procs_with_control = procs_with_control

    def close(self):
        for p in self.restored:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
        if self.wl:
            self.wl.kill()
