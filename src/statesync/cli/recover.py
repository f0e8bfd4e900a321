"""``statesync recover``: settle the handoff records that dead agents left on this host."""
from __future__ import annotations

import os
import sys


def _cmd_recover(a) -> int:
    from statesync.migration import records
    from statesync.migration.records import DestState as D
    from statesync.migration.records import SourceState as S
    from statesync.migration.supervisor import kill_tree, resume_tree, settle_orphans

    base = records.state_dir(a.state_dir)
    secret = None
    if a.secret_file or os.environ.get("STATESYNC_SECRET"):
        from statesync.cli.migrate import _secret_arg
        secret = _secret_arg(a)
    lines = []
    if a.decide:
        # The operator's word for one session, when the peer is gone for good.
        session, _, what = a.decide.partition("=")
        for side in ("source", "dest"):
            path = os.path.join(base, side, f"{session}.json")
            r = records.read(path)
            if r is None:
                continue
            root, start = ((r.get("pid"), r.get("pid_start")) if side == "source"
                           else (r.get("restored_pid"), r.get("restored_start")))
            if what == "resume":
                n = resume_tree(root, start)
                records.transition(path, base, side, S.ABORTED if side == "source" else D.RESUMED,
                                   peer_told=True, operator=True)
                lines.append(f"session {session} ({side}): resumed pid {root} here ({n} processes)")
            elif what == "kill":
                n = kill_tree(root, start)
                records.transition(path, base, side, S.COMMITTED if side == "source" else D.ABORTED,
                                   peer_told=True, operator=True)
                lines.append(f"session {session} ({side}): killed pid {root} here ({n} processes)")
            else:
                print("statesync: --decide SESSION=resume|kill", file=sys.stderr)
                return 2
        if not lines:
            print(f"statesync: no record of session {session} in {base}", file=sys.stderr)
            return 1
    else:
        lines += settle_orphans(base, "source", None, secret, a.window)
        lines += settle_orphans(base, "dest", None)
    for r in records.all_records(base, "source") + records.all_records(base, "dest"):
        if r.get("state") in (S.IN_DOUBT.value, S.COMMITTING.value):
            lines.append(f"session {r['session']}: still IN DOUBT: pid {r.get('pid')} stopped; "
                         f"destination {r.get('dest')} unreachable. When you know where the "
                         f"service must run: --decide {r['session']}=resume (here) or =kill")
    for ln in lines or [f"nothing to recover in {base}"]:
        print(ln)
    doubt = any("IN DOUBT" in ln for ln in lines)
    return 3 if doubt else 0


def cli_register(sub) -> None:
    p = sub.add_parser("recover", help="settle switch-overs that dead agents left "
                       "(resume, kill, or ask the peer)")
    p.add_argument("--state-dir", default=None,
                   help="handoff records (default $STATESYNC_STATE_DIR or /var/lib/statesync)")
    p.add_argument("--secret-file", help="shared secret, to ask the destination about "
                   "in-doubt sessions (or STATESYNC_SECRET)")
    p.add_argument("--window", type=float, default=10.0,
                   help="seconds to keep asking an unreachable destination (default 10)")
    p.add_argument("--decide", metavar="SESSION=resume|kill",
                   help="operator decision for one session on this host")
    p.set_defaults(func=_cmd_recover)
