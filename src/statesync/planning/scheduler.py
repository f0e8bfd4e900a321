"""Pluggable migration schedulers.

A scheduler plans a migration from :class:`~statesync.planning.kpi.Observations` and
:class:`~statesync.planning.kpi.Targets`, then decides after every live round whether to
run another one, stop and copy, or abort::

    s = statesync.scheduler.get("adaptive")
    plan = s.plan(obs, targets)          # may raise Infeasible (with .best)
    if plan.strategy == "precopy":
        while True:
            stats = run_round(...)       # RoundStats(index=0, ...) first
            d = s.on_round(stats)
            if d.action is not CONTINUE:
                break

One instance serves one migration; instances are not thread-safe. Decisions are
deterministic: the same inputs in the same order give the same outputs.

Built-ins: ``adaptive`` (ours, model-predictive), ``mose`` (the MOSE paper's rules),
``qemu`` (QEMU's switch-over rule), ``threshold`` (P.Haul-style fixed rules). Third
parties add schedulers through the entry-point group ``statesync.schedulers``: the
entry point names a class or factory called with ``**options``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

from statesync.errors import Infeasible, KpiInputError, StateSyncError
from statesync.planning.kpi import (
    ABORT,
    CONTINUE,
    NO_CODEC,
    STOP_AND_COPY,
    Action,
    CostModel,
    Decision,
    Observations,
    Option,
    Plan,
    RoundStats,
    Targets,
)

ENTRY_POINT_GROUP = "statesync.schedulers"
# hybrid / post-copy plans (migration/postcopy.py runs them): at most this many live
# rounds, then the switch-over leaves what is still dirty at the source
HYBRID_MAX_ROUNDS = 3


@runtime_checkable
class Scheduler(Protocol):
    """What the migration engine calls. ``plan`` is called once, then ``on_round``
    after every live round (only for ``plan.strategy == "precopy"``)."""

    def plan(self, obs: Observations, targets: Targets) -> Plan: ...

    def on_round(self, round: RoundStats) -> Decision: ...


# --------------------------------------------------------------------------- base

class BaseScheduler:
    """Shared bookkeeping of the built-ins: input checks, the cost model, elapsed
    time and bytes, the physical-floor check. Subclasses implement ``_plan`` and
    ``_decide``."""

    name = "base"
    # set by plan() (through _reset); reading them before plan() raises AttributeError
    obs: Observations
    targets: Targets
    model: CostModel

    def __init__(self) -> None:
        self.current: Optional[Plan] = None
        self.codec = NO_CODEC
        self.bandwidth = math.nan
        self.elapsed_s = 0.0
        self.sent_bytes = 0.0
        self.rounds: List[RoundStats] = []

    @property
    def max_bandwidth(self) -> float:
        cap = self.targets.max_bandwidth_bytes_per_s
        return min(self.obs.bandwidth_bytes_per_s, cap) if cap else self.obs.bandwidth_bytes_per_s

    def plan(self, obs: Observations, targets: Targets) -> Plan:
        if not isinstance(obs, Observations):
            raise KpiInputError(
                "obs", f"expected statesync.planning.kpi.Observations (got {type(obs).__name__})"
            )
        if not isinstance(targets, Targets):
            raise KpiInputError(
                "targets", f"expected statesync.planning.kpi.Targets (got {type(targets).__name__})"
            )
        self._reset(obs, targets)
        try:
            p, infeasible = self._plan(), None
        except Infeasible as exc:
            p, infeasible = exc.best, exc
        self._adopt(p)
        floor = self.model.downtime_floor()
        if floor > targets.max_downtime_s:  # the plainest reason wins
            m = self.model
            raise Infeasible(
                "Targets.max_downtime_s",
                f"{targets.max_downtime_s:.3f} s is below the physical floor {floor:.3f} s "
                f"(CRIU dump fixed {m.dump_fixed:.3f} s + restore {m.restore_fixed:.3f} s "
                f"+ {m.restore_per_byte * m.state_bytes:.3f} s for {m.state_bytes} bytes "
                f"+ rtt {m.rtt:.3f} s); "
                "raise the target or lower the CRIU costs",
                best_downtime_s=infeasible.best_downtime_s if infeasible else floor,
                best_total_time_s=infeasible.best_total_time_s
                if infeasible
                else p.predicted_total_time_s,
                best=p,
                pareto=infeasible.pareto if infeasible else (),
            )
        if infeasible is not None:
            raise infeasible
        return p

    def _reset(self, obs, targets):
        self.obs, self.targets = obs, targets
        self.model = CostModel(obs)
        self.elapsed_s = 0.0
        self.sent_bytes = 0.0
        self.rounds = []
        self._waited = 0

    def _adopt(self, p: Plan) -> None:
        self.current = p
        self.codec = p.codec
        self.bandwidth = p.bandwidth_bytes_per_s

    def on_round(self, round: RoundStats) -> Decision:
        if self.current is None:
            raise StateSyncError(f"{self.name}: on_round() called before plan()")
        if not isinstance(round, RoundStats):
            raise KpiInputError(
                "round", f"expected statesync.planning.kpi.RoundStats (got {type(round).__name__})"
            )
        expected = len(self.rounds)
        if round.index != expected:
            raise KpiInputError("RoundStats.index", f"expected round {expected}, got {round.index}")
        codec = round.codec or self.codec
        self.model.observe_round(round, codec)
        self.elapsed_s = (
            round.elapsed_s if round.elapsed_s is not None else self.elapsed_s + round.duration_s
        )
        self.sent_bytes += round.bytes_sent
        self.rounds.append(round)
        return self._decide(round)

    # helpers for subclasses
    def _mkplan(self, strategy, rounds, bandwidth, codec, opt: Option, reason: str) -> Plan:
        t = self.targets
        ok = opt.downtime_s <= t.max_downtime_s and opt.total_time_s <= t.max_total_time_s
        return Plan(
            strategy,
            int(rounds),
            float(bandwidth),
            codec,
            opt.downtime_s,
            opt.total_time_s,
            opt.wire_bytes,
            ok,
            reason,
            self.name,
        )

    def _predict(self, rounds: int, codec: str, bandwidth: float) -> Option:
        """Model forecast of "round 0 plus rounds-1 more, then stop" (rounds=0: cold)."""
        opts = self.model.lookahead(self.model.state_pages, codec, bandwidth, max_rounds=rounds)
        o = opts[min(rounds, len(opts) - 1)]
        if (
            o.rounds < rounds
        ):  # the model stopped early (plateau): extend by repeating the last round
            extra = rounds - o.rounds
            t = self.model.round_time(o.final_pages, codec, bandwidth)
            o = Option(
                rounds,
                o.downtime_s,
                o.total_time_s + extra * t,
                o.wire_bytes + extra * self.model.wire_bytes(o.final_pages, codec),
                o.final_pages,
            )
        return o

    def _stop(self, reason, **kw) -> Decision:
        return Decision(STOP_AND_COPY, reason, **kw)

    def _continue(self, reason, **kw) -> Decision:
        return Decision(CONTINUE, reason, **kw)

    def _plan(self) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decide(self, r: RoundStats) -> Decision:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------- baselines

class ThresholdScheduler(BaseScheduler):
    """Fixed rules as CRIU-based tools use them (P.Haul's defaults): stop after
    ``max_rounds`` live rounds, or when fewer than ``min_pages`` pages are dirty, or
    when the dirty set grew by more than ``max_grow_fraction`` over the previous
    round. Always pre-copy, no codec, the whole allowed bandwidth."""

    name = "threshold"

    def __init__(self, max_rounds: int = 8, min_pages: int = 64, max_grow_fraction: float = 0.10):
        super().__init__()
        if int(max_rounds) < 1:
            raise KpiInputError("threshold.max_rounds", f"must be >= 1 (got {max_rounds})")
        self.max_rounds = int(max_rounds)
        self.min_pages = int(min_pages)
        self.max_grow_fraction = float(max_grow_fraction)

    def _plan(self) -> Plan:
        bw = self.max_bandwidth
        return self._mkplan("precopy", self.max_rounds, bw, NO_CODEC,
                            self._predict(self.max_rounds, NO_CODEC, bw), "fixed rules")

    def _decide(self, r: RoundStats) -> Decision:
        if r.index + 1 >= self.max_rounds:
            return self._stop(f"{self.max_rounds} rounds done")
        if r.dirty_pages < self.min_pages:
            return self._stop(f"{r.dirty_pages} dirty pages < {self.min_pages}")
        if r.index >= 1:
            prev = self.rounds[-2].dirty_pages
            if r.dirty_pages > prev * (1 + self.max_grow_fraction):
                return self._stop(f"dirty set grew {prev} -> {r.dirty_pages}")
        return self._continue("below thresholds")


class QemuScheduler(BaseScheduler):
    """QEMU's switch-over rule: stop and copy when the remaining bytes fit in the
    measured bandwidth times the downtime limit. QEMU itself iterates forever when
    this never holds; here ``max_rounds`` (default 30) ends such migrations.
    Always pre-copy, no codec, the whole allowed bandwidth."""

    name = "qemu"

    def __init__(self, max_rounds: int = 30):
        super().__init__()
        self.max_rounds = int(max_rounds)

    def _plan(self) -> Plan:
        bw = self.max_bandwidth
        # QEMU does not plan; the forecast is the model's "stop once it fits".
        m, t = self.model, self.targets
        opts = m.lookahead(m.state_pages, NO_CODEC, bw, max_rounds=self.max_rounds)
        pick = next(
            (o for o in opts[1:] if o.final_pages * m.page_size <= bw * t.max_downtime_s), opts[-1]
        )
        return self._mkplan(
            "precopy", max(1, pick.rounds), bw, NO_CODEC, pick, "switch over when remaining fits"
        )

    def _decide(self, r: RoundStats) -> Decision:
        bw = (
            (r.bytes_sent / r.transfer_s)
            if (r.transfer_s and r.bytes_sent)
            else self.model.bandwidth
        )
        remaining = r.dirty_pages * self.model.page_size
        if remaining <= bw * self.targets.max_downtime_s:
            return self._stop(
                f"{remaining} bytes remaining <= {bw:.0f} B/s x {self.targets.max_downtime_s} s"
            )
        if r.index + 1 >= self.max_rounds:
            return self._stop(f"round cap {self.max_rounds} reached")
        return self._continue("remaining does not fit the downtime limit yet")


class MoseScheduler(BaseScheduler):
    """The MOSE paper's rules over its analytic model (worst-case dirty rate).

    MR (``objective="min_resources"``): cold migration with the least bandwidth
    ``L = V / (max_downtime - T_dump - T_restore - T_net_extra)`` that meets the downtime
    target, else the maximum. MD (otherwise): iterative pre-copy with the largest number of
    iterations ``I = floor((max_total - T0 - T_down) / (T_dump + T_net))`` that meets the
    migration-time target, else cold. ``T_dump`` of an iteration is ``round_fixed_s``
    (CRIU pre-dump) and ``T_net`` the transfer of what the worst-case rate dirties during
    the initial copy ``T0``. Counting round 0 (the initial copy), MD runs ``1 + I`` live
    rounds. No codec. ``max_iterations`` caps I (default 30)."""

    name = "mose"

    def __init__(self, max_iterations: int = 30):
        super().__init__()
        self.max_iterations = int(max_iterations)
        self.iterations = 0

    def _worst_rate(self) -> float:
        o = self.obs
        return max(o.dirty_rate_pages_per_s, o.dirty_rate_peak_pages_per_s or 0.0)

    def _plan(self) -> Plan:
        m, t = self.model, self.targets
        P, S, W = m.page_size, m.state_bytes, m.working_set
        bw = self.max_bandwidth
        rate = self._worst_rate()
        if t.objective == "min_resources":
            t_dump = m.dump_fixed + m.dump_per_byte * S
            t_restore = m.restore_fixed + m.restore_per_byte * S
            budget = t.max_downtime_s - t_dump - t_restore - m.rtt
            need = S / budget if budget > 0 else math.inf
            L = need if need <= bw else bw
            reason = (f"MR: cold at the minimum bandwidth {L:.0f} B/s" if need <= bw
                      else "MR: cold at the maximum bandwidth (the minimum one exceeds it)")
            return self._mkplan("cold", 0, L, NO_CODEC, self._predict(0, NO_CODEC, L), reason)
        t0 = m.round_fixed + m.rtt + S / bw
        v_iter = min(W, rate * t0) * P                      # worst case per iteration
        t_iter = m.round_fixed + m.rtt + v_iter / bw        # T_dump + T_net
        t_down = m.dump_fixed + m.dump_per_byte * v_iter + v_iter / bw + m.rtt + m.restore_fixed \
            + m.restore_per_byte * S
        slack = t.max_total_time_s - t0 - t_down
        if slack < 0:
            return self._mkplan("cold", 0, bw, NO_CODEC, self._predict(0, NO_CODEC, bw),
                                "MD: even one pre-copy round overruns max total time: cold")
        if math.isinf(slack) or t_iter <= 0:   # free iterations (nothing dirtied, no round cost)
            iters = self.max_iterations
        else:
            iters = min(self.max_iterations, int(slack // t_iter))
        self.iterations = iters
        opt = Option(
            1 + iters, t_down, t0 + iters * t_iter + t_down, (S + (iters + 1) * v_iter), v_iter / P
        )
        return self._mkplan("precopy", 1 + iters, bw, NO_CODEC, opt,
                            f"MD: I={iters} iterations fit max total time")

    def _decide(self, r: RoundStats) -> Decision:
        cur = self.current
        assert cur is not None  # on_round() checked
        if r.index + 1 >= cur.rounds:
            return self._stop(f"planned {cur.rounds} rounds done (I={cur.rounds - 1})")
        return self._continue(f"round {r.index + 1} of {cur.rounds}")


# --------------------------------------------------------------------------- ours

class AdaptiveScheduler(BaseScheduler):
    """Model-predictive scheduler (ours); docs/scheduler.md describes it in full.

    ``plan`` evaluates every codec and every "stop after j rounds" option (j = 0 is
    cold) with :class:`~statesync.planning.kpi.CostModel` and picks by the objective among the
    options that meet the targets (forecasts with a safety ``margin``; ``safe_margin``
    for objectives that push to the edge of the targets). After every round ``on_round``
    recalibrates the model from what was measured and re-plans from the real dirty set:
    it keeps going only while the best reachable option is still ahead and lowers the
    predicted downtime by at least ``max(min_gain_s, min_gain_fraction * downtime)``
    (any gain near or over the target). Options are compared on ``downtime + risk *
    (final dump + copy)``; cold is chosen only when best outright. A bursty writer gets up
    to ``max_wait_rounds`` extra rounds to reach a quieter phase. The codec is re-chosen
    each round from raw throughput ``min(bandwidth x ratio, encoder, decoder)``.

    When no option meets both targets even without the cushion, ``plan`` raises
    :class:`~statesync.errors.Infeasible` with the best achievable downtime and total
    time and the Pareto choice for the objective as ``best`` (``min_downtime``: least
    downtime within the time target, else least downtime; otherwise least relative
    overrun); rounds then follow ``best``. With ``abort_when_infeasible=True``,
    ``on_round`` answers ABORT once the targets become unreachable mid-migration."""

    name = "adaptive"

    def __init__(
        self,
        min_gain_s: float = 0.002,
        min_gain_fraction: float = 0.02,
        margin: float = 0.05,
        risk: float = 0.25,
        safe_margin: float = 0.15,
        max_rounds: int = 30,
        max_wait_rounds: int = 8,
        abort_when_infeasible: bool = False,
        codecs: bool = True,
        hybrid: bool = True,
        hybrid_ratio: float = 0.65,
    ):
        super().__init__()
        # hybrid / post-copy (migration/postcopy.py): chosen when r = dirty rate /
        # throughput >= hybrid_ratio (pre-copy diverges) and the model predicts a lower
        # downtime for it than for the best pre-copy plan
        self.hybrid = bool(hybrid)
        self.hybrid_ratio = float(hybrid_ratio)
        self.risk = float(risk)
        self.safe_margin = float(safe_margin)
        self.max_wait_rounds = int(max_wait_rounds)
        self._waited = 0
        self._cushion = True
        self.min_gain_s = float(min_gain_s)
        self.min_gain_fraction = float(min_gain_fraction)
        self.margin = float(margin)
        self.max_rounds = int(max_rounds)
        self.abort_when_infeasible = bool(abort_when_infeasible)
        self.use_codecs = bool(codecs)

    # -- option enumeration -------------------------------------------------------------------
    def _codecs(self) -> List[str]:
        return sorted(self.model.codecs) if self.use_codecs else [NO_CODEC]

    def _options(self, pending: float, bandwidth: float) -> List[Tuple[str, Option]]:
        # no time limit here: an Infeasible report needs the least downtime at any time
        m = self.model
        out = []
        for c in self._codecs():
            for o in m.lookahead(
                pending,
                c,
                bandwidth,
                elapsed_s=self.elapsed_s,
                sent_bytes=self.sent_bytes,
                max_rounds=max(0, self.max_rounds - len(self.rounds)),
            ):
                out.append((c, o))
        return out

    def _meets(self, o: Option, exact: bool) -> bool:
        t = self.targets
        if not self._cushion:
            k = 1.0
        elif t.objective != "min_downtime":
            # these objectives push the plan to the edge of the targets (least bytes, least
            # bandwidth): keep the larger cushion, CRIU and codec figures are estimates
            k = 1.0 - self.safe_margin
        else:
            k = 1.0 if exact else 1.0 - self.margin
        return o.downtime_s <= t.max_downtime_s * k and o.total_time_s <= t.max_total_time_s * k

    def _choose(self, cands: List[Tuple[str, Option]], exact_first: bool, first: bool = False):
        """Pick (codec, option, feasible) by the objective; see the class docstring."""
        t = self.targets
        ok = [(c, o) for c, o in cands if self._meets(o, exact_first and o.rounds == 0)]
        key_tie = lambda co: (co[1].rounds, co[1].wire_bytes, co[0])  # noqa: E731

        def least_downtime(pool):
            # the copy part of a downtime is the uncertain part (link, CRIU per-MiB cost):
            # compare options as if it were `risk` longer, so a near-tie goes to the safer one
            rdt = {id(co): co[1].downtime_s + self.risk * co[1].final_copy_s for co in pool}
            best = min(rdt.values())
            safe = min(co[1].downtime_s for co in pool) <= t.max_downtime_s * (1 - self.safe_margin)
            # a gain too small to pay for a round is still worth it near or over the target
            tol = max(self.min_gain_s, self.min_gain_fraction * best) if safe else 1e-4
            near = [co for co in pool if rdt[id(co)] <= best + tol]
            # cold puts the whole copy into the downtime: only when it is the best outright
            if first:
                warm = [co for co in near if co[1].rounds > 0]
                cold = [rdt[id(co)] for co in pool if co[1].rounds == 0]
                if warm and (not cold or min(cold) > best):
                    near = warm
            return min(near, key=key_tie)

        if ok:
            obj = t.objective
            if obj == "min_downtime" or not self._cushion:  # tight: meeting the targets comes first
                return least_downtime(ok) + (True,)
            if obj == "min_resources":
                return min(ok, key=lambda co: (co[1].wire_bytes, co[1].rounds, co[0])) + (True,)
            w = t.weights  # obj is a Weights here (the two named objectives are handled above)
            return min(
                ok,
                key=lambda co: (
                    (w.cost(co[1].downtime_s, co[1].total_time_s, co[1].wire_bytes),) + key_tie(co)
                ),
            ) + (True,)
        if t.objective == "min_downtime":
            # downtime comes first: the least one within max total time, else the least one
            in_time = [
                co for co in cands if co[1].total_time_s <= t.max_total_time_s * (1 - self.margin)
            ]
            return least_downtime(in_time or cands) + (False,)

        def overrun(co):
            o = co[1]
            return max(o.downtime_s / t.max_downtime_s, o.total_time_s / t.max_total_time_s)
        return min(cands, key=lambda co: (round(overrun(co), 9),) + key_tie(co)) + (False,)

    # -- plan ---------------------------------------------------------------------------------
    def _plan(self) -> Plan:
        try:
            p, infeasible = self._plan_precopy(), None
        except Infeasible as exc:
            p, infeasible = exc.best, exc
        h = self._hybrid_plan(p) if p is not None else None
        if h is not None:
            return h
        if infeasible is not None:
            raise infeasible
        return p

    def _hybrid_plan(self, p: Plan) -> Optional[Plan]:
        """The hybrid plan, when the writer outruns the link (r >= hybrid_ratio: every
        round takes about as long as the one before, the dirty set never shrinks to
        what fits the downtime) and the model predicts less downtime for it than for
        ``p``, the best pre-copy plan. Its downtime does not grow with the dirty set:
        the dump of everything but the lazy pages, the cheap part of the dirty set
        (5 ms of link), one round trip, and a lazy restore (``restore_fixed``)."""
        if not self.hybrid:
            return None
        m, t = self.model, self.targets
        bw = self.max_bandwidth
        thr = m.throughput(p.codec if p.codec in m.codecs else NO_CODEC, bw)
        r = m.dirty_rate * m.page_size / max(thr, 1.0)
        if r < self.hybrid_ratio:
            return None
        down = m.dump_fixed + m.rtt + m.restore_fixed + 0.005
        if down >= p.predicted_downtime_s:
            return None
        # round 0 moves the state; post-copy then moves what was written meanwhile
        t0 = m.round_time(m.state_pages, p.codec, bw)
        post = min(m.dirty_pages(t0), m.state_pages) * m.page_size / max(thr, 1.0)
        total = t0 + down + post
        wire = m.wire_bytes(m.state_pages + min(m.dirty_pages(t0), m.state_pages), p.codec)
        ok = down <= t.max_downtime_s and total <= t.max_total_time_s
        return Plan("hybrid", HYBRID_MAX_ROUNDS, float(bw), p.codec, down, total, wire, ok,
                    f"hybrid: dirty rate / throughput r = {r:.2f} >= {self.hybrid_ratio:g}, "
                    f"pre-copy does not converge (best predicted downtime "
                    f"{p.predicted_downtime_s:.3f} s); switch over after at most "
                    f"{HYBRID_MAX_ROUNDS} rounds with post-copy: predicted downtime "
                    f"{down:.3f} s, post-copy {post:.3f} s", self.name)

    def _plan_precopy(self) -> Plan:
        m, t = self.model, self.targets
        bw = self.max_bandwidth
        cands = self._options(m.state_pages, bw)
        codec, opt, ok = self._choose(cands, exact_first=False, first=True)
        tight = ""
        if not ok:
            # nothing meets the targets with the safety cushion; is anything inside them at all?
            self._cushion = False
            try:
                codec2, opt2, ok2 = self._choose(cands, exact_first=False, first=True)
            finally:
                self._cushion = True
            if ok2:
                codec, opt, ok = codec2, opt2, True
                tight = " (tight: inside the targets only without the safety margin)"
        if ok and t.objective == "min_resources" and not tight:
            bw = self._least_bandwidth(codec, opt.rounds, bw)
            opt = m.lookahead(m.state_pages, codec, bw, max_rounds=opt.rounds)[-1]
        strategy = "cold" if opt.rounds == 0 else "precopy"
        p = self._mkplan(strategy, opt.rounds, bw, codec, opt,
                         f"{strategy} with {codec}: predicted downtime {opt.downtime_s:.3f} s, "
                         f"total {opt.total_time_s:.3f} s{tight}")
        if not ok:
            best_dt = min(cands, key=lambda co: co[1].downtime_s)[1]
            best_tt = min(cands, key=lambda co: co[1].total_time_s)[1]
            dt_ok = best_dt.downtime_s <= t.max_downtime_s
            tt_ok = best_tt.total_time_s <= t.max_total_time_s
            if not dt_ok:
                fld, msg = (
                    "Targets.max_downtime_s",
                    (
                        f"{t.max_downtime_s:.3f} s cannot be met; the least "
                        f"predicted downtime is {best_dt.downtime_s:.3f} s"
                    ),
                )
            elif not tt_ok:
                fld, msg = (
                    "Targets.max_total_time_s",
                    (
                        f"{t.max_total_time_s:.3f} s cannot be met; the least "
                        f"predicted total time is {best_tt.total_time_s:.3f} s"
                    ),
                )
            else:
                fld, msg = (
                    "Targets",
                    (
                        "max_downtime_s and max_total_time_s conflict: no plan meets both; "
                        "best holds the least relative overrun"
                    ),
                )
            front = _pareto([o for _, o in cands])
            raise Infeasible(fld, msg, best_downtime_s=best_dt.downtime_s,
                             best_total_time_s=best_tt.total_time_s, best=p, pareto=front)
        return p

    def _least_bandwidth(self, codec: str, rounds: int, bw_max: float) -> float:
        """Smallest bandwidth (bisection, 12 steps) at which ``rounds`` still meets the targets."""
        m = self.model
        lo, hi = bw_max / 1024.0, bw_max
        for _ in range(12):
            mid = math.sqrt(lo * hi)
            o = m.lookahead(m.state_pages, codec, mid, max_rounds=rounds)
            if o[-1].rounds == rounds and self._meets(o[-1], False):
                hi = mid
            else:
                lo = mid
        return hi

    # -- rounds -------------------------------------------------------------------------------
    def _decide(self, r: RoundStats) -> Decision:
        m = self.model
        x = float(r.dirty_pages)
        bws = [self.bandwidth]
        if self.bandwidth < self.max_bandwidth:
            bws.append(self.max_bandwidth)
        choice: Optional[Tuple[float, str, Option, bool]] = None
        for bw in bws:
            # the link may be slower than the reservation: predict with what was measured
            eff = min(bw, m.bandwidth)
            codec, opt, ok = self._choose(self._options(x, eff), exact_first=True)
            choice = (bw, codec, opt, ok)
            if ok:
                break
        assert choice is not None  # bws is never empty
        bw, codec, opt, ok = choice
        self.bandwidth, self.codec = bw, codec
        kw: Dict[str, Any] = dict(predicted_downtime_s=opt.downtime_s,
                                  predicted_total_time_s=opt.total_time_s,
                                  codec=codec, bandwidth_bytes_per_s=bw)
        if not ok and self.abort_when_infeasible:
            return Decision(
                ABORT,
                f"targets unreachable: best predicted downtime {opt.downtime_s:.3f} s, "
                f"total {opt.total_time_s:.3f} s",
                **kw,
            )
        tag = "" if ok else "infeasible, least overrun: "
        if opt.rounds == 0 and len(self.rounds) < self.max_rounds:
            wait = self._quieter_phase(x, codec, min(bw, m.bandwidth), opt)
            if wait is not None:
                return self._continue(wait, **kw)
        if opt.rounds == 0 or len(self.rounds) >= self.max_rounds:
            return self._stop(
                f"{tag}stop now: {int(x)} pages, predicted downtime {opt.downtime_s:.3f} s", **kw
            )
        return self._continue(f"{tag}{opt.rounds} more round(s) lower predicted downtime to "
                              f"{opt.downtime_s:.3f} s", **kw)


    def _quieter_phase(self, x: float, codec: str, bw: float, now: Option) -> Optional[str]:
        """A bursty writer: the model (fitted to the latest rounds) says stop, but an earlier
        live round left far fewer dirty pages. If time allows, one more round may land in a
        quieter phase; a steadily rising writer (the dirty set grew over the last rounds)
        is not waited for. Only for objectives that value downtime."""
        t = self.targets
        if (
            t.objective == "min_resources"
            or len(self.rounds) < 3
            or self._waited >= self.max_wait_rounds
        ):
            return None
        seen = [r.dirty_pages for r in self.rounds[1:]]
        best = min(seen)
        last3 = [r.dirty_pages for r in self.rounds[-3:]]
        if last3[0] < last3[1] < last3[2]:
            return None  # rising
        m = self.model
        gain = now.downtime_s - m.downtime(best, codec, bw)
        if gain <= max(self.min_gain_s, self.min_gain_fraction * now.downtime_s):
            return None
        worst_end = self.elapsed_s + m.round_time(x, codec, bw) + now.downtime_s
        if worst_end > t.max_total_time_s * (1 - self.margin):
            return None
        self._waited += 1
        return (
            f"waiting for a quieter phase: {int(x)} dirty pages now, {best} after an earlier round "
            f"(downtime {now.downtime_s:.3f} s vs {now.downtime_s - gain:.3f} s)"
        )


def _pareto(opts: List[Option]) -> Tuple[Option, ...]:
    """Options not dominated in (downtime, total time)."""
    front: List[Option] = []
    for o in sorted(opts, key=lambda o: (o.downtime_s, o.total_time_s)):
        if not front or o.total_time_s < front[-1].total_time_s:
            front.append(o)
    return tuple(front)


# --------------------------------------------------------------------------- registry

BUILTINS: Dict[str, Callable[..., Scheduler]] = {
    "adaptive": AdaptiveScheduler,
    "mose": MoseScheduler,
    "qemu": QemuScheduler,
    "threshold": ThresholdScheduler,
}
_registered: Dict[str, Callable[..., Scheduler]] = {}


def register(name: str, factory: Callable[..., Scheduler]) -> None:
    """Register a scheduler factory in this process (entry points do it for installed
    packages). Built-in names cannot be replaced."""
    if name in BUILTINS:
        raise ValueError(f"scheduler name {name!r} is a built-in and cannot be replaced")
    _registered[name] = factory


def _entry_points():
    from importlib import metadata
    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=ENTRY_POINT_GROUP))
    return list(eps.get(ENTRY_POINT_GROUP, ()))  # Python 3.9


def available() -> List[str]:
    """Names of every scheduler ``get`` can make: built-ins, registered ones and
    those installed packages declare in the ``statesync.schedulers`` entry-point group."""
    names = set(BUILTINS) | set(_registered)
    names |= {ep.name for ep in _entry_points()}
    return sorted(names)


def get(name: str, **options) -> Scheduler:
    """A new scheduler instance by name; ``options`` go to its constructor."""
    factory = BUILTINS.get(name) or _registered.get(name)
    if factory is None:
        for ep in _entry_points():
            if ep.name == name:
                try:
                    factory = ep.load()
                except Exception as exc:
                    raise StateSyncError(f"scheduler {name!r}: loading entry point {ep.value!r} "
                                         f"failed: {exc}") from exc
                break
    if factory is None:
        raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(available())}")
    try:
        s = factory(**options)
    except TypeError as exc:
        raise ValueError(f"scheduler {name!r}: bad options {sorted(options)}: {exc}") from exc
    if not isinstance(s, Scheduler):
        raise StateSyncError(
            f"scheduler {name!r}: {factory!r} made a {type(s).__name__}, which has no "
            "plan(obs, targets) and on_round(round) methods"
        )
    return s


__all__ = [
    "Scheduler", "BaseScheduler", "AdaptiveScheduler", "MoseScheduler", "QemuScheduler",
    "ThresholdScheduler", "get", "available", "register", "ENTRY_POINT_GROUP", "BUILTINS",
    "Action", "CONTINUE", "STOP_AND_COPY", "ABORT", "Plan", "Decision", "Infeasible",
]
