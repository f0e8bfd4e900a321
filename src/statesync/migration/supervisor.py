"""The handoff supervisor: a small process that outlives its migration agent.

Each agent (source or destination) starts one at the beginning of its work
(:meth:`Supervisor.spawn`): ``python -m statesync.migration.supervisor ROLE STATE_DIR
AGENT_PID``, in its own session (terminal signals do not reach it), holding the read
end of a pipe whose write end only the agent holds. The agent writes one JSON line
first (the shared secret, so the supervisor can tell the peer an outcome), and
``bye`` when everything it owns is settled. When the pipe closes without ``bye`` the
agent died (SIGKILL, OOM, a crash, a cancelled task that could not finish): the
supervisor reads the agent's durable records (:mod:`statesync.migration.records`) and
settles each one the way the state machine says (docs/migrate.md):

source   PRECOPY                   nothing is frozen: drop the dump directory
         FREEZING                  wait until no ``criu dump`` of the tree runs, then as FROZEN
         FROZEN                    resume the whole frozen tree (SIGCONT), tell the
                                   destination to drop its copy (RESOLVE abort)
         COMMITTING / IN_DOUBT     ask the destination (RESOLVE commit) until it answers or
                                   the resolve window ends: RESUMED -> kill our copy;
                                   ABORTED/unknown -> resume ours; no answer -> stay frozen,
                                   record IN_DOUBT (``statesync recover`` resolves it)
         ABORTED, peer not told    RESOLVE abort
dest     RECEIVING                 remove the partial image set
         RESTORING / PREPARED      kill the (stopped, never resumed) restored tree, drop images
         COMMITTED                 resume the restored tree (COMMIT was received)
         COMMITTED / RESUMED, lazy restore not filled: kill the incomplete copy (the
                                   source still holds its frozen one and resumes it)

While the agent lives, the source supervisor also enforces the switch-over deadline:
a record still FREEZING/FROZEN past ``deadline`` + a grace is aborted by the
supervisor (under the records lock, so the agent's commit and this abort cannot both
win), and the tree resumes even if the agent hangs.

The same settle functions serve ``statesync recover`` and the agents' start-up sweep.
"""
from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

from statesync.migration import records as rec
from statesync.migration.records import DestState as D
from statesync.migration.records import SourceState as S

DEADLINE_GRACE_S = 2.0


def _log_default(msg: str) -> None:
    try:
        print(f"statesync supervisor: {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- process trees


def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def tree(root: int) -> List[int]:
    """root and every descendant, parents first (read now: call it once the tree is
    frozen to get exactly what CRIU froze; children forked before the freeze included)."""
    seen: List[int] = []
    todo = [root]
    while todo:
        p = todo.pop(0)
        if p in seen or not os.path.exists(f"/proc/{p}"):
            continue
        seen.append(p)
        todo += _children(p)
    return seen


def _state(pid: int) -> Optional[str]:
    return rec._proc_state(pid)


def resume_tree(root: Optional[int], start: Optional[int] = None) -> int:
    """SIGCONT the whole tree under ``root`` (walked now, repeatedly until no task of
    it is stopped). Returns how many processes were resumed; 0 if root is gone or is
    no longer the process that started at ``start``."""
    if not root or not rec.same_process(root, start):
        return 0
    n = 0
    for attempt in range(5):
        pids = tree(root)
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        n = max(n, len(pids))
        if not any(_state(p) in ("T", "t") for p in tree(root)):
            break
        time.sleep(0.001 * (attempt + 1))
    return n


def kill_tree(root: Optional[int], start: Optional[int] = None, timeout: float = 10.0) -> int:
    """SIGKILL the tree under ``root`` (if root is still the process that started at
    ``start``) and wait until none of it runs. Returns the number of processes."""
    if not root or not rec.same_process(root, start):
        return 0
    pids = tree(root)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [p for p in pids if _state(p) not in (None, "Z", "X")]
        for p in pids:
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
        if not live:
            break
        time.sleep(0.005)
    return len(pids)


def criu_running(*needles: str) -> List[int]:
    """pids of criu processes (or nsenter/setpriv wrappers about to exec it) whose
    command line holds every one of ``needles`` as an argument."""
    from statesync import proc

    def match(args: List[str]) -> bool:
        return (any(os.path.basename(a) == "criu" or a.endswith("/criu") for a in args)
                and all(n in args for n in needles))
    return [p for p in proc.find_by_cmdline(match) if _state(p) not in ("Z", "X", None)]


def wait_criu_gone(needles, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not criu_running(*needles):
            return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------- talking to the peer


async def _resolve_once(dest: str, netns: Optional[str], secret: bytes, session: str,
                        decision: str, timeout: float, encryption=None) -> Dict:
    """One RESOLVE exchange with the destination agent at ``dest``: tell it our
    decision for ``session``; returns its STATUS ({"state": ...})."""
    from statesync.migration import protocol as wire
    from statesync.migration.common import _parse_hostport
    host, port = _parse_hostport(dest)
    if netns:
        from statesync.testing.testbed import socket_in_netns
        sock = socket_in_netns(netns)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)),
                                   timeout)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        chan = await wire.Channel.client(reader, writer, secret, timeout,
                                         **wire.encryption_options(encryption))
        await chan.send_json(wire.RESOLVE, {"session": session, "decision": decision})
        _, payload = await chan.expect(wire.STATUS, timeout=timeout)
        info, _ = wire.unpack_json(payload)
        if info.get("state") in ("resumed", "aborted", "unknown"):
            try:
                await chan.send_json(wire.DONE, {"session": session})
            except Exception:
                pass
        return info
    finally:
        writer.close()


def resolve_with_peer(dest: str, netns: Optional[str], secret: bytes, session: str,
                      decision: str, window: float, io_timeout: float,
                      log: Callable[[str], None] = _log_default,
                      encryption=None) -> Optional[Dict]:
    """Ask until the destination answers or ``window`` seconds passed; None then.
    Blocking, with a private event loop per attempt: call it from a thread that runs
    no event loop (the supervisor, ``statesync recover``, the agents' start-up sweeps,
    which run in a worker thread).
    ``encryption``: the migration's setting (a destination with encryption off refuses
    an encrypting peer, and vice versa)."""
    deadline = time.monotonic() + window
    last = ""
    while True:
        try:
            t = min(io_timeout, max(0.5, deadline - time.monotonic()))
            info = asyncio.run(_resolve_once(dest, netns, secret, session, decision, t,
                                             encryption))
            if info.get("state") != "pending":
                return info
            last = "the destination is still restoring it"
        except Exception as exc:  # link down, agent not running, ...
            last = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            log(f"session {session}: destination {dest} unreachable for {window:.0f} s ({last})")
            return None
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------- settling records


def settle_source(r: Dict, base: str, secret: Optional[bytes], window: float,
                  log: Callable[[str], None] = _log_default) -> str:
    """Bring one source record whose agent is gone to a final state; returns what was done."""
    path = r.get("_path") or rec.record_path(base, "source", r["session"])
    sess, root, start = r["session"], r.get("pid"), r.get("pid_start")
    st = r.get("state")
    io_timeout = float(r.get("io_timeout") or 10.0)
    if st == S.FREEZING:
        if not wait_criu_gone(["dump", "-t", str(root)], 300.0):
            return f"session {sess}: criu dump of pid {root} still running; left as is"
    msg = ""
    if st in (S.PRECOPY, S.FREEZING, S.FROZEN):
        n = _resume_source(r, log)
        # The agent may have sent FINAL: tell the destination (it answers "unknown"
        # for a session it never prepared).
        rec.transition(path, base, "source", S.ABORTED, peer_told=st == S.PRECOPY)
        msg = f"session {sess}: resumed pid {root} ({n} processes) at the source"
        st = S.ABORTED
        r = rec.read(path) or r
    if st in (S.COMMITTING, S.IN_DOUBT):
        info = None
        if secret is not None and r.get("dest"):
            info = resolve_with_peer(r["dest"], r.get("netns"), secret, sess, "commit",
                                     window, io_timeout, log, r.get("encryption"))
        if info is None:
            rec.transition(path, base, "source", S.IN_DOUBT)
            _drop_dump_dir(r)
            return (f"session {sess}: IN DOUBT: pid {root} stays stopped here; the destination "
                    f"{r.get('dest')} did not answer; run `statesync recover` when it is reachable")
        if info.get("state") == "resumed":
            n = kill_tree(root, start)
            rec.transition(path, base, "source", S.COMMITTED)
            msg = (f"session {sess}: destination runs it (pid {info.get('pid')}); killed the "
                   f"stopped source copy ({n} processes)")
        else:
            n = _resume_source(r, log)
            rec.transition(path, base, "source", S.ABORTED, peer_told=True)
            msg = (f"session {sess}: destination says {info.get('state')}; resumed pid {root} "
                   f"({n} processes) at the source")
        st = None
    elif st == S.ABORTED and not r.get("peer_told"):
        if secret is not None and r.get("dest"):
            info = resolve_with_peer(r["dest"], r.get("netns"), secret, sess, "abort",
                                     window, io_timeout, log, r.get("encryption"))
            if info is not None:
                rec.transition(path, base, "source", S.ABORTED, peer_told=True)
                msg = (msg + "; " if msg else f"session {sess}: ") + \
                    f"destination told to drop its copy ({info.get('state')})"
    _drop_dump_dir(r)
    r = rec.read(path) or {}
    if r.get("state") in (S.COMMITTED, S.ABORTED) and r.get("peer_told", True):
        rec.remove(path)
    return msg or f"session {sess}: {r.get('state', 'gone')}, nothing to do"


def _resume_source(r: Dict, log) -> int:
    """resume_tree, or for a container the runtime's way (migration/target.py)."""
    from statesync.migration.target import resume_source
    return resume_source(r, log)


def _settle_dest_target(r: Dict, log, committed: bool = False) -> None:
    from statesync.migration.target_dest import settle_dest_target
    settle_dest_target(r, log, committed)


def _drop_dump_dir(r: Dict) -> None:
    d = r.get("dump_dir")
    if d and os.path.basename(d).startswith("statesync-dump-"):
        shutil.rmtree(d, ignore_errors=True)


def settle_dest(r: Dict, base: str, log: Callable[[str], None] = _log_default) -> str:
    """Bring one destination record whose agent is gone to a final state: before
    COMMIT (RECEIVING, RESTORING, PREPARED: the record is not rewritten between them)
    the restored copy, if any, never ran: kill it, drop the set; COMMITTED: resume it."""
    path = r.get("_path") or rec.record_path(base, "dest", r["session"])
    sess, st = r["session"], r.get("state")
    if st in (D.RECEIVING, D.RESTORING, D.PREPARED):
        if r.get("final_dir"):
            # a restore outlives its agent (destination._restore_stopped): as long as
            # the agent itself would have waited for it
            wait_criu_gone(["restore", "-D", r["final_dir"]], 300.0)
        pid, start = r.get("restored_pid"), r.get("restored_start")
        if not pid and r.get("pidfile"):
            try:
                with open(r["pidfile"]) as f:
                    pid, start = int(f.read().strip()), None
            except (OSError, ValueError):
                pid = None
        n = kill_tree(pid, start)
        _settle_dest_target(r, log)     # a container: runtime state, bundle, IP, lock copy
        drop_images(r)
        rec.transition(path, base, "dest", D.ABORTED)
        if pid:
            return (f"session {sess}: killed the unconfirmed restored copy (pid {pid}, "
                    f"{n} processes)")
        return f"session {sess}: removed the partial image set"
    if st in (D.COMMITTED, D.RESUMED) and r.get("lazy") and not r.get("filled"):
        # A lazy restore whose daemon died with the agent before every page was placed:
        # the missing pages would read as zeros. The source still holds its frozen
        # copy (it kills it only after RESUMED, sent after the fill): drop ours, so the
        # source's RESOLVE finds ABORTED and resumes its own.
        n = kill_tree(r.get("restored_pid"), r.get("restored_start"))
        drop_images(r)
        rec.transition(path, base, "dest", D.ABORTED)
        return (f"session {sess}: the lazy fill of pid {r.get('restored_pid')} did not finish: "
                f"killed the incomplete copy ({n} processes); the source resumes its own")
    if st == D.COMMITTED:
        _settle_dest_target(r, log, committed=True)     # a container: its lock copy lifted
        n = resume_tree(r.get("restored_pid"), r.get("restored_start"))
        rec.transition(path, base, "dest", D.RESUMED)
        drop_images(r)
        return f"session {sess}: COMMIT was received: resumed pid {r.get('restored_pid')} ({n})"
    drop_images(r)
    return f"session {sess}: {st}, nothing to do"


def drop_images(r: Dict) -> None:
    if r.get("keep_images") and r.get("state") == D.RESUMED:
        return
    for k in ("tmp_dir", "final_dir"):
        d = r.get(k)
        if d and os.path.basename(d).startswith((".incoming-", "migrated-")):
            shutil.rmtree(d, ignore_errors=True)


def settle_orphans(base: str, side: str, supervisor_pid: Optional[int] = None,
                   secret: Optional[bytes] = None, window: float = 0.0,
                   log: Callable[[str], None] = _log_default) -> List[str]:
    """Settle every non-final record of ``side`` that supervisor ``supervisor_pid``
    watches (its agent died), or, when None, every one whose agent and supervisor are
    both gone (a restarted agent, ``statesync recover``). One line per record."""
    out = []
    for r in rec.all_records(base, side):
        if supervisor_pid is not None and r.get("supervisor_pid") != supervisor_pid:
            continue
        if supervisor_pid is None and (rec.alive(r.get("agent_pid"), r.get("agent_start"))
                                  or rec.alive(r.get("supervisor_pid"), r.get("supervisor_start"))):
            continue
        if side == "source":
            if r.get("state") == S.COMMITTED or (
                    r.get("state") == S.ABORTED and r.get("peer_told", True)):
                _drop_dump_dir(r)
                rec.remove(r["_path"])
                continue
            out.append(settle_source(r, base, secret, window, log))
        else:
            # (a lazy or post-copy RESUMED whose fill never finished is not final:
            # settle_dest kills that copy)
            unfilled = r.get("lazy") and not r.get("filled")
            if r.get("state") == D.ABORTED or (r.get("state") == D.RESUMED and not unfilled):
                drop_images(r)
                continue
            out.append(settle_dest(r, base, log))
    return out


# --------------------------------------------------------------------------- the process


class Supervisor:
    """The agent's handle on its supervisor process."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid
        self.start = rec.start_time(popen.pid)

    @classmethod
    def spawn(cls, role: str, base: str, secret: Optional[bytes]) -> "Supervisor":
        env = dict(os.environ)
        p = subprocess.Popen([sys.executable, "-c",
                              "import sys; from statesync.migration.supervisor import main; "
                              "sys.exit(main(sys.argv[1:]))", role, base, str(os.getpid())],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True, env=env)
        assert p.stdin is not None
        p.stdin.write(json.dumps({"secret": secret.hex() if secret else None}).encode() + b"\n")
        p.stdin.flush()
        return cls(p)

    def bye(self) -> None:
        """Everything settled: the supervisor exits without acting."""
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(b"bye\n")
            self.popen.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def detach(self) -> None:
        """Close our end without ``bye``: the supervisor settles what is left."""
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        except (OSError, ValueError):
            pass


def _deadline_watch(base: str, agent_pid: int, log) -> None:
    now = time.time()
    for r in rec.all_records(base, "source"):
        if r.get("supervisor_pid") != os.getpid() or r.get("state") not in (S.FREEZING, S.FROZEN):
            continue
        dl = r.get("deadline")
        if dl and now > dl + DEADLINE_GRACE_S:
            if r.get("state") == S.FREEZING and criu_running("dump", "-t", str(r.get("pid"))):
                continue
            done = rec.transition(r["_path"], base, "source", S.ABORTED,
                                  expect=(S.FROZEN, S.FREEZING),
                                  peer_told=False)
            if done is not None:
                n = _resume_source(r, log)
                log(f"session {r['session']}: switch-over budget exceeded by the agent "
                    f"(pid {agent_pid}); resumed pid {r.get('pid')} ({n} processes)")


def main(argv: List[str]) -> int:
    role, base, agent_pid = argv[0], argv[1], int(argv[2])
    side = "source" if role == "source" else "dest"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    fd = sys.stdin.fileno()
    buf = b""
    secret: Optional[bytes] = None
    got_hello = False
    while True:
        r, _, _ = select.select([fd], [], [], 0.25)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not got_hello:
                    got_hello = True
                    try:
                        h = json.loads(line)
                        secret = bytes.fromhex(h["secret"]) if h.get("secret") else None
                    except (ValueError, KeyError):
                        pass
                elif line.strip() == b"bye":
                    return 0
        elif side == "source":
            _deadline_watch(base, agent_pid, _log_default)
    # The agent is gone without saying bye: settle what it left.
    for msg in settle_orphans(base, side, os.getpid(), secret,
                              window=_window(base, side, os.getpid())):
        _log_default(msg)
    return 0


def _window(base: str, side: str, supervisor_pid: int) -> float:
    w = 0.0
    for r in rec.all_records(base, side):
        if r.get("supervisor_pid") == supervisor_pid:
            w = max(w, float(r.get("resolve_window") or 0.0))
    return w or 30.0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
