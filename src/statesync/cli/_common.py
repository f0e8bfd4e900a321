"""What every ``statesync`` command shares: the exit statuses, the one-line error
format, argument types that validate before anything runs, output-path and
optional-dependency checks, the target-pid check, ``--json`` output and the
progress line.

Exit statuses (documented in ``statesync --help`` and docs/operating.md):

====  =====================================================================
 0    success
 1    the command ran and failed (corrupt file, failed check, process error)
 2    usage error: a bad argument or output path; nothing was touched
 3    prerequisite missing: root, CRIU, a kernel feature, a Python package
 4    migration aborted; the source process runs on with its state intact
 5    migration failed and the source process is NOT known to run: check it
 130  interrupted (Ctrl-C); a migration was aborted as in 4
====  =====================================================================
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from typing import Any, Optional, TextIO

from statesync.errors import NoSuchProcess, ProcessError, UsageError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREREQ = 3
EXIT_ABORTED = 4
EXIT_SOURCE_UNKNOWN = 5
EXIT_INTERRUPTED = 130

EXIT_TABLE = """exit status:
  0    success
  1    the command ran and failed (corrupt file, failed check, process error)
  2    usage error: bad argument or output path; nothing was touched
  3    prerequisite missing: root, CRIU, a kernel feature, a Python package
  4    migration aborted; the source process runs on with its state intact
  5    migration failed and the source process is NOT known to run: check it
  130  interrupted (Ctrl-C); a migration in progress was aborted as in 4"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``statesync track: error: argument --interval:
    must be > 0 (got '0'); see statesync track --help``) and defaults in the help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or action.default in (None, False, argparse.SUPPRESS) \
                or action.default == [] or not h:
            return h
        return h + " (default: %(default)s)"


# --------------------------------------------------------------------------- argument types


def _number(kind, text: str, *, minimum=None, strict=False):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: "
                                         f"{text!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
    if minimum is not None and (v <= minimum if strict else v < minimum):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum} "
                                         f"(got {text!r})")
    return v


def positive_float(text: str) -> float:
    return _number(float, text, minimum=0, strict=True)


def nonneg_float(text: str) -> float:
    return _number(float, text, minimum=0)


def positive_int(text: str) -> int:
    return _number(int, text, minimum=0, strict=True)


def nonneg_int(text: str) -> int:
    return _number(int, text, minimum=0)


def pid_arg(text: str) -> int:
    return _number(int, text, minimum=1)


def hostport(text: str) -> str:
    """``HOST:PORT`` with a numeric port in 0..65535 (checked, returned as given)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT with a port 0..65535: {text!r}")
    return text


def input_file(text: str) -> str:
    """A readable regular file."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable (permission denied)")
    return text


def input_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    return text


# --------------------------------------------------------------------------- checks before work


def _parent_writable(path: str, option: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{path}: directory {parent} does not exist; create it first", option)
    # os.access says yes to root on any directory; a probe file says what the kernel says.
    probe = os.path.join(parent, f".statesync-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"{path}: cannot create files in {parent} "
                         f"({exc.strerror or exc}); choose another path", option) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Optional[str], option: str) -> None:
    """``path`` can be written (``None`` and ``-``, stdout, pass)."""
    if path is None or path == "-":
        return
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory; give a file name", option)
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{path}: not writable (permission denied)", option)
        return
    _parent_writable(path, option)


def check_new_dir(path: str, option: str) -> None:
    """``path`` does not exist (or is an empty directory) and can be created."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{path}: exists and is not a directory; give a new directory",
                             option)
        if os.listdir(path):
            raise UsageError(f"{path}: directory exists and is not empty; give a new "
                             f"directory or remove it", option)
        return
    _parent_writable(path, option)


def require_module(module: str, option: str, extra: str) -> None:
    """An optional dependency ``module`` is importable, or PrerequisiteMissing saying
    which extra to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        from statesync.errors import PrerequisiteMissing
        raise PrerequisiteMissing(f"{option} needs the Python package {module!r}: "
                                  f"pip install 'statesync[{extra}]'") from None


def check_pid(pid: int) -> None:
    """The target process exists and can be worked on: not a zombie, and its
    thread-group leader has not exited. Raises NoSuchProcess / ProcessError with
    what to do."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except FileNotFoundError:
        raise NoSuchProcess(pid, "no such process; check the pid (ps -p PID)") from None
    except OSError as exc:
        raise ProcessError(pid, f"cannot read /proc/{pid}/status: {exc.strerror}") from None
    if status.get("Tgid", str(pid)).strip() != str(pid):
        raise ProcessError(pid, f"is a thread of process {status['Tgid'].strip()}, not a "
                                f"process; give that pid")
    state = status.get("State", "").strip()
    if state.startswith(("Z", "X")):
        threads = int(status.get("Threads", "1").strip() or 1)
        if threads > 1:
            raise ProcessError(pid, f"its main thread exited while {threads - 1} other "
                                    f"thread(s) run on; the kernel no longer shows its memory "
                                    f"through /proc/{pid} and CRIU cannot dump it: restart "
                                    f"the service so that its main thread stays alive")
        ppid = status.get("PPid", "?").strip()
        raise NoSuchProcess(pid, f"is a zombie (it exited; its parent, pid {ppid}, has not "
                                 f"reaped it): there is nothing left to track or migrate")


# --------------------------------------------------------------------------- output


def add_json(p, help_text: str = "print the result as JSON (or write it to FILE)") -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help=help_text)


def write_json(obj: Any, dest: Optional[str], indent: Optional[int] = 2) -> None:
    """``obj`` as JSON to stdout (``-``) or into ``dest`` (atomically replaced)."""
    text = json.dumps(obj, indent=indent, default=str) + "\n"
    if dest is None or dest == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    tmp = f"{dest}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, dest)


def one_line(exc: BaseException) -> str:
    """An error as one line: its first line, plus the last line of a CRIU log tail
    (what CRIU itself said) when there is one."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else text
    tail = (getattr(exc, "log_tail", "") or "").strip().splitlines()
    if tail:
        first += f" (criu: {tail[-1].strip()})"
    return first


class Progress:
    """A progress line on stderr for long transfers: bytes, rate and ETA, redrawn at
    most 5 times a second with a carriage return. Silent when stderr is not a
    terminal (logs and pipes get the per-round lines only)."""

    def __init__(self, stream: Optional[TextIO] = None, enabled: Optional[bool] = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._t0 = time.monotonic()
        self._shown = False
        self._width = 0

    def start(self) -> None:
        self._t0 = time.monotonic()

    def update(self, label: str, done: int, total: int, nbytes: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and done < total:
            return
        self._last = now
        dt = max(now - self._t0, 1e-6)
        rate = nbytes / dt
        frac = done / total if total else 1.0
        eta = (dt / frac - dt) if frac > 0 else math.inf
        eta_s = f"{eta:5.1f} s" if math.isfinite(eta) else "  ?"
        line = (f"{label}: {frac:6.1%} {done}/{total} pages, {nbytes / 1e6:8.1f} MB, "
                f"{rate / 1e6:7.1f} MB/s, ETA {eta_s}")
        self._width = max(self._width, len(line))
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._shown = False
