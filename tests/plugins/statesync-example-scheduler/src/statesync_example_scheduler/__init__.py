"""Example plugin: pre-copy until a round shrinks the dirty set by less than ``min_shrink``.

Written against the public API only (``statesync.kpi``), without the built-ins' base class,
to show what a scheduler needs: ``plan(obs, targets) -> Plan`` and ``on_round(round) -> Decision``.
"""
from statesync.planning.kpi import CONTINUE, STOP_AND_COPY, Decision, Plan


class ShrinkScheduler:
    def __init__(self, min_shrink=0.25, max_rounds=20):
        self.min_shrink = float(min_shrink)
        self.max_rounds = int(max_rounds)
        self.last = None

    def plan(self, obs, targets):
        self.last = obs.state_pages
        bw = obs.bandwidth_bytes_per_s
        if targets.max_bandwidth_bytes_per_s:
            bw = min(bw, targets.max_bandwidth_bytes_per_s)
        return Plan(
            strategy="precopy",
            rounds=self.max_rounds,
            bandwidth_bytes_per_s=bw,
            codec="none",
            predicted_downtime_s=float("nan"),
            predicted_total_time_s=float("nan"),
            predicted_wire_bytes=float("nan"),
            feasible=True,
            reason="shrink rule",
            scheduler="example-shrink",
        )

    def on_round(self, round):
        shrunk = round.dirty_pages <= self.last * (1 - self.min_shrink)
        self.last = round.dirty_pages
        if shrunk and round.index + 1 < self.max_rounds:
            return Decision(CONTINUE, "dirty set still shrinking")
        return Decision(STOP_AND_COPY, "dirty set stopped shrinking")
