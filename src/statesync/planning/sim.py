"""Scenario simulator for migration schedulers.

A :class:`Scenario` is the ground truth of one migration: the state size, how the
process writes (:class:`DirtyProcess`: constant, bursty, hot/cold working set, rising
rate), how the link behaves (:class:`LinkTrace`: constant, truncated normal per round as
in the MOSE paper, drops), the true CRIU and codec costs, the targets, and what a
scheduler is told beforehand (:meth:`Scenario.observations`: measured with noise, the way
a real pre-migration probe would be). :func:`run` drives any scheduler through the
rounds and returns a :class:`Result`; :func:`oracle` finds, with hindsight, whether any
fixed plan could have met the targets. :func:`suite` makes the seeded scenario suites
(``default``: 240 scenarios, ``holdout``: 240 more from another seed).

Everything is deterministic: randomness comes from ``random.Random`` seeded by strings
derived from the scenario seed, so the same suite is built on every machine.
Simulated time only; nothing sleeps.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from statesync.errors import Infeasible, StateSyncError
from statesync.planning.kpi import (
    ABORT,
    MIB,
    NO_CODEC,
    PAGE_SIZE,
    STOP_AND_COPY,
    Codec,
    Observations,
    RoundStats,
    Targets,
)

MAX_ENGINE_ROUNDS = 60   # the simulated engine's own cap: a scheduler that never stops is stopped


def _rng(*parts) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


def _logu(r: random.Random, lo: float, hi: float) -> float:
    return math.exp(r.uniform(math.log(lo), math.log(hi)))


# --------------------------------------------------------------------------- ground truth

@dataclass(frozen=True)
class DirtyProcess:
    """How the process writes. ``rate_pages_per_s`` page writes per second spread
    uniformly over ``working_set_pages``; ``hotcold`` sends ``hot_fraction`` of them to
    ``hot_pages``; ``bursty`` writes at ``rate * burst_factor`` for ``duty`` of every
    ``period_s`` and at ``rate * 0.1`` otherwise; ``rising`` at ``rate * (1 + t /
    doubling_s)``. Distinct pages dirtied in a window follow from the integral Λ of the
    rate: ``|set| * (1 - exp(-Λ_set / |set|))`` per uniformly written set."""

    kind: str
    rate_pages_per_s: float
    working_set_pages: int
    hot_pages: int = 0
    hot_fraction: float = 0.0
    burst_factor: float = 1.0
    duty: float = 1.0
    period_s: float = 1.0
    phase_s: float = 0.0
    doubling_s: float = math.inf

    def writes(self, a: float, b: float) -> float:
        """Page writes (with repeats) in [a, b]."""
        r = self.rate_pages_per_s
        if b <= a:
            return 0.0
        if self.kind == "rising":
            g = 0.0 if math.isinf(self.doubling_s) else 1.0 / self.doubling_s
            return r * ((b - a) + g * (b * b - a * a) / 2)
        if self.kind == "bursty":
            on, off = r * self.burst_factor, r * 0.1
            return self._on_time(a, b) * (on - off) + (b - a) * off
        return r * (b - a)

    def _on_time(self, a: float, b: float) -> float:
        per, d = self.period_s, self.duty * self.period_s

        def cum(t):  # on-time in [-phase, t]
            u = t + self.phase_s
            n = math.floor(u / per)
            return n * d + min(u - n * per, d)
        return cum(b) - cum(a)

    def distinct(self, a: float, b: float) -> float:
        lam = self.writes(a, b)
        w = float(self.working_set_pages)
        if self.kind == "hotcold" and 0 < self.hot_pages < w:
            h, c = float(self.hot_pages), w - self.hot_pages
            return (-h * math.expm1(-lam * self.hot_fraction / h)
                    - c * math.expm1(-lam * (1 - self.hot_fraction) / c))
        return -w * math.expm1(-lam / w)


@dataclass(frozen=True)
class LinkTrace:
    """The link. ``constant``: always ``bandwidth_bytes_per_s``. ``tnormal``: each round
    (and the final copy) draws its rate from a normal of mean ``mean_fraction`` x
    nominal and sd ``sigma_fraction`` x nominal, truncated to [0.1, 1] x nominal.
    ``drop``: nominal except ``drop_factor`` x nominal during [drop_start_s, drop_end_s]."""

    kind: str
    bandwidth_bytes_per_s: float
    mean_fraction: float = 1.0
    sigma_fraction: float = 0.0
    drop_start_s: float = math.inf
    drop_end_s: float = math.inf
    drop_factor: float = 1.0

    def base(self, seed, k: int) -> float:
        b = self.bandwidth_bytes_per_s
        if self.kind != "tnormal":
            return b
        r = _rng(seed, "bw", k)
        for _ in range(100):  # rejection sampling of the truncated normal
            v = r.gauss(self.mean_fraction, self.sigma_fraction)
            if 0.1 <= v <= 1.0:
                return v * b
        return self.mean_fraction * b

    def transfer_time(self, raw_bytes: float, start: float, base: float, cap: float, ratio: float,
                      codec_rate: float) -> float:
        """Seconds to move ``raw_bytes`` from ``start`` (piecewise-constant rate)."""
        if raw_bytes <= 0:
            return 0.0

        def rate(inside):
            link = min(base * (self.drop_factor if inside else 1.0), cap)
            return min(link * ratio, codec_rate)
        t, left = start, float(raw_bytes)
        d0, d1 = self.drop_start_s, self.drop_end_s
        while True:
            inside = d0 <= t < d1
            end = d1 if inside else (d0 if t < d0 else math.inf)
            r = rate(inside)
            if math.isinf(end) or left <= r * (end - t):
                return t + left / r - start
            left -= r * (end - t)
            t = end


@dataclass(frozen=True)
class CodecTruth:
    name: str
    ratio: float
    encode_bytes_per_s: float
    decode_bytes_per_s: float


@dataclass(frozen=True)
class Scenario:
    """Ground truth of one migration (see the module docstring)."""

    name: str
    seed: str
    state_bytes: int
    dirty: DirtyProcess
    link: LinkTrace
    rtt_s: float
    dump_fixed_s: float
    dump_s_per_mib: float
    restore_fixed_s: float
    restore_s_per_mib: float
    round_fixed_s: float
    codecs: Tuple[CodecTruth, ...]
    max_downtime_s: float
    max_total_time_s: float
    objective: str = "min_downtime"
    working_set_known: bool = False
    obs_noise: float = 0.1

    @property
    def pages(self) -> int:
        return -(-self.state_bytes // PAGE_SIZE)

    def targets(self) -> Targets:
        return Targets(max_downtime_s=self.max_downtime_s, max_total_time_s=self.max_total_time_s,
                       objective=self.objective)

    def observations(self, codecs: bool = True) -> Observations:
        """What a pre-migration probe would report: the dirty rate over the second before
        the start, the nominal link rate, codec figures from a page sample and CRIU costs
        from an earlier dump, each off by up to ``obs_noise`` (relative)."""
        r = _rng(self.seed, "obs")
        e = self.obs_noise

        def noisy(v, scale=1.0):
            return v * (1 + scale * e * r.uniform(-1, 1))
        rate = noisy(self.dirty.distinct(-1.0, 0.0))
        return Observations(
            state_bytes=self.state_bytes,
            page_size_bytes=PAGE_SIZE,
            dirty_rate_pages_per_s=rate,
            working_set_pages=self.dirty.working_set_pages if self.working_set_known else None,
            bandwidth_bytes_per_s=noisy(self.link.bandwidth_bytes_per_s, 0.5),
            rtt_s=self.rtt_s,
            dump_fixed_s=noisy(self.dump_fixed_s, 2),
            dump_s_per_mib=noisy(self.dump_s_per_mib, 2),
            restore_fixed_s=noisy(self.restore_fixed_s, 2),
            restore_s_per_mib=noisy(self.restore_s_per_mib, 2),
            round_fixed_s=noisy(self.round_fixed_s),
            codecs=tuple(
                Codec(
                    c.name,
                    max(0.5, noisy(c.ratio, 1.5)),
                    noisy(c.encode_bytes_per_s, 1.5),
                    c.decode_bytes_per_s,
                )
                for c in self.codecs
            )
            if codecs
            else (),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scenario":
        d = dict(d)
        d["dirty"] = DirtyProcess(**d["dirty"])
        d["link"] = LinkTrace(**d["link"])
        d["codecs"] = tuple(CodecTruth(**c) for c in d["codecs"])
        return cls(**d)


# --------------------------------------------------------------------------- running

@dataclass
class Result:
    """Outcome of one scheduler on one scenario. ``attained``: both targets met.
    ``declared_infeasible``: ``plan`` raised Infeasible (the run then followed its
    ``best``). ``aborted``: the scheduler answered ABORT (no downtime, not attained).
    ``forced_stop``: the engine's round cap ended the pre-copy."""

    scenario: str
    scheduler: str
    strategy: str
    rounds: int
    codec: str
    downtime_s: float
    total_time_s: float
    wire_bytes: float
    attained: bool
    declared_infeasible: bool = False
    aborted: bool = False
    forced_stop: bool = False
    reason: str = ""


class _World:
    """The true dynamics of a scenario, independent of who schedules."""

    def __init__(self, sc: Scenario):
        self.sc = sc
        self.codecs = {NO_CODEC: (1.0, math.inf, math.inf)}
        for c in sc.codecs:
            self.codecs[c.name] = (c.ratio, c.encode_bytes_per_s, c.decode_bytes_per_s)

    def ratio(self, codec: str, k: int) -> float:
        base = self.codecs[codec][0]
        if codec == NO_CODEC:
            return 1.0
        return base * (1 + 0.05 * _rng(self.sc.seed, "ratio", k).uniform(-1, 1))

    def send(
        self, pages: float, start: float, codec: str, cap: float, k: int
    ) -> Tuple[float, float]:
        """(transfer seconds, wire bytes) of ``pages`` pages sent from ``start``."""
        ratio = self.ratio(codec, k)
        _, enc, dec = self.codecs[codec]
        raw = pages * PAGE_SIZE
        t = self.sc.link.transfer_time(
            raw, start, self.sc.link.base(self.sc.seed, k), cap, ratio, min(enc, dec)
        )
        return t, raw / ratio

    def dirtied(self, a: float, b: float, k: int) -> int:
        x = self.sc.dirty.distinct(a, b) * (
            1 + 0.05 * _rng(self.sc.seed, "dirty", k).uniform(-1, 1)
        )
        return int(round(min(max(x, 0.0), self.sc.dirty.working_set_pages)))

    def round(self, pages: float, start: float, codec: str, cap: float, k: int):
        sc = self.sc
        t = start + sc.round_fixed_s + sc.rtt_s
        tx, wire = self.send(pages, t, codec, cap, k)
        end = t + tx
        return end, tx, wire, self.dirtied(start, end, k)

    def final(
        self, pages: float, start: float, codec: str, cap: float, k: int
    ) -> Tuple[float, float]:
        """(downtime, wire bytes) of the stop-and-copy of ``pages`` at ``start``."""
        sc = self.sc
        dump = sc.dump_fixed_s + sc.dump_s_per_mib * pages * PAGE_SIZE / MIB
        tx, wire = self.send(pages, start + dump, codec, cap, k)
        restore = sc.restore_fixed_s + sc.restore_s_per_mib * sc.state_bytes / MIB
        return dump + tx + sc.rtt_s + restore, wire


def run(sc: Scenario, scheduler, name: str = "", codecs: bool = True) -> Result:
    """Drive ``scheduler`` (anything with ``plan`` / ``on_round``) through ``sc``."""
    w = _World(sc)
    targets = sc.targets()
    declared = False
    try:
        plan = scheduler.plan(sc.observations(codecs=codecs), targets)
    except Infeasible as exc:
        declared = True
        plan = exc.best
        if plan is None:
            raise StateSyncError(f"{name}: Infeasible without a best plan on {sc.name}") from exc
    codec, cap = plan.codec, plan.bandwidth_bytes_per_s
    if codec not in w.codecs:
        raise StateSyncError(f"{name}: planned codec {codec!r} that {sc.name} does not offer")
    n = sc.pages
    t, sent, k = 0.0, 0.0, 0
    pending = n
    forced = aborted = False
    reason = plan.reason
    if plan.strategy != "cold":
        while True:
            end, tx, wire, dirty = w.round(pending, t, codec, cap, k)
            stats = RoundStats(
                index=k,
                duration_s=end - t,
                pages_sent=int(pending),
                bytes_sent=int(round(wire)),
                dirty_pages=dirty,
                transfer_s=tx,
                elapsed_s=end,
                codec=codec,
            )
            t, sent = end, sent + wire
            d = scheduler.on_round(stats)
            reason = d.reason
            codec = d.codec or codec
            cap = d.bandwidth_bytes_per_s or cap
            k += 1
            pending = dirty
            if d.action is ABORT:
                aborted = True
                break
            if d.action is STOP_AND_COPY:
                break
            if k >= MAX_ENGINE_ROUNDS:
                forced = True
                break
    if aborted:
        return Result(
            sc.name,
            name,
            plan.strategy,
            k,
            codec,
            math.nan,
            t,
            sent,
            False,
            declared,
            True,
            False,
            reason,
        )
    dt, wire = w.final(pending, t, codec, cap, k)
    total = t + dt
    ok = dt <= sc.max_downtime_s and total <= sc.max_total_time_s
    return Result(
        sc.name,
        name,
        plan.strategy,
        k,
        codec,
        dt,
        total,
        sent + wire,
        ok,
        declared,
        False,
        forced,
        reason,
    )


@dataclass
class OracleResult:
    feasible: bool
    best_downtime_s: float  # least downtime of any fixed plan (meeting max total time if any does)
    codec: str
    rounds: int


def oracle(sc: Scenario, codecs: bool = True, max_rounds: int = 30) -> OracleResult:
    """With hindsight: could any fixed plan (a codec, "stop after k rounds", the whole
    link) meet both targets in this scenario's realised world?"""
    w = _World(sc)
    best: Optional[Tuple[float, str, int]] = None
    best_any = (math.inf, NO_CODEC, 0)
    for codec in (list(w.codecs) if codecs else [NO_CODEC]):
        t, pending = 0.0, sc.pages
        for k in range(max_rounds + 1):
            dt, _ = w.final(pending, t, codec, math.inf, k)
            if dt < best_any[0]:
                best_any = (dt, codec, k)
            if dt <= sc.max_downtime_s and t + dt <= sc.max_total_time_s:
                if best is None or dt < best[0]:
                    best = (dt, codec, k)
            if t > sc.max_total_time_s:
                break
            t, _, _, pending = w.round(pending, t, codec, math.inf, k)
    if best is not None:
        return OracleResult(True, best[0], best[1], best[2])
    return OracleResult(False, best_any[0], best_any[1], best_any[2])


# --------------------------------------------------------------------------- suites

SUITE_SEEDS = {"default": 20251128, "holdout": 777}
SUITE_SIZE = 240


def make_scenario(seed, i: int) -> Scenario:
    """Scenario ``i`` of the suite seeded ``seed``. The ranges aim at realistic edges:
    states from 0.5 MiB to 4 GiB, links from 10 Mbit/s to 10 Gbit/s with RTTs to 50 ms,
    writers from idle to faster than the link, CRIU costs as measured here and in the
    MOSE paper (pre-dump rounds of up to 0.5 s), incompressible pages, codecs slower than
    fast links, targets from below the physical floor to loose, and noisy probes."""
    r = _rng("suite", seed, i)
    S = int(_logu(r, 2 ** 19, 2 ** 32)) // PAGE_SIZE * PAGE_SIZE
    n = S // PAGE_SIZE
    B = _logu(r, 1.25e6, 1.25e9)
    rtt = _logu(r, 1e-4, 0.05)
    link_pages = B / PAGE_SIZE
    rate = max(1.0, _logu(r, 0.003, 3.0) * link_pages)
    kind = r.choice(["constant", "bursty", "hotcold", "rising"])
    if kind == "hotcold":
        ws = max(2, int(n * r.uniform(0.3, 1.0)))
        hot = max(1, int(ws * _logu(r, 0.003, 0.1)))
        dirty = DirtyProcess(kind, rate, ws, hot_pages=hot, hot_fraction=r.uniform(0.8, 0.98))
    else:
        ws = max(1, int(n * _logu(r, 0.02, 1.0)))
        if kind == "bursty":
            period = r.uniform(0.5, 5.0)
            dirty = DirtyProcess(
                kind,
                rate,
                ws,
                burst_factor=r.uniform(3, 10),
                duty=r.uniform(0.1, 0.4),
                period_s=period,
                phase_s=r.uniform(0, period),
            )
        elif kind == "rising":
            dirty = DirtyProcess(kind, rate, ws, doubling_s=r.uniform(2, 20))
        else:
            dirty = DirtyProcess(kind, rate, ws)
    lk = r.random()
    full = S / B
    if lk < 0.4:
        link = LinkTrace("constant", B)
    elif lk < 0.75:
        link = LinkTrace(
            "tnormal", B, mean_fraction=r.uniform(0.75, 0.95), sigma_fraction=r.uniform(0.05, 0.25)
        )
    else:
        start = r.uniform(0, 2 * full)
        link = LinkTrace(
            "drop",
            B,
            drop_start_s=start,
            drop_end_s=start + r.uniform(0.5, 3) * full + 0.2,
            drop_factor=r.uniform(0.1, 0.5),
        )
    dump_f, dump_m = _logu(r, 0.02, 0.5), _logu(r, 5e-4, 8e-3)
    rest_f, rest_m = _logu(r, 0.02, 0.4), _logu(r, 3e-4, 4e-3)
    round_f = r.uniform(0.1, 0.5) if r.random() < 0.2 else _logu(r, 5e-4, 0.02)
    if r.random() < 0.25:
        lz_ratio = r.uniform(1.0, 1.1)
    else:
        lz_ratio = r.uniform(1.3, 4.0)
    codecs = (
        CodecTruth("lz4", lz_ratio, r.uniform(0.25e9, 0.8e9), r.uniform(2e9, 4e9)),
        CodecTruth(
            "zstd",
            lz_ratio * r.uniform(1.1, 1.4),
            r.uniform(0.05e9, 0.2e9),
            r.uniform(0.5e9, 1.2e9),
        ),
    )
    floor = dump_f + rest_f + rest_m * S / MIB + rtt
    cold = floor + dump_m * S / MIB + full
    u = r.random()
    if u < 0.05:
        max_dt = floor * r.uniform(0.5, 0.95)            # below the physical floor
    else:
        max_dt = floor + _logu(r, 0.01, 1.5) * (cold - floor)
    if r.random() < 0.1:
        max_total = math.inf
    else:
        max_total = (full + cold) * _logu(r, 1.1, 10)
    return Scenario(
        name=f"{seed}-{i:03d}-{kind}-{link.kind}",
        seed=f"{seed}:{i}",
        state_bytes=S,
        dirty=dirty,
        link=link,
        rtt_s=rtt,
        dump_fixed_s=dump_f,
        dump_s_per_mib=dump_m,
        restore_fixed_s=rest_f,
        restore_s_per_mib=rest_m,
        round_fixed_s=round_f,
        codecs=codecs,
        max_downtime_s=max_dt,
        max_total_time_s=max_total,
        working_set_known=r.random() < 0.3,
    )


def suite(name: str = "default", count: Optional[int] = None) -> List[Scenario]:
    """A named seeded suite (``default``, ``holdout``), ``seed:N`` for any seed, or a
    path to a JSON list of scenarios (:meth:`Scenario.to_dict`)."""
    if name in SUITE_SEEDS:
        seed = SUITE_SEEDS[name]
    elif name.startswith("seed:"):
        seed = int(name.split(":", 1)[1])
    else:
        try:
            with open(name) as f:
                items = json.load(f)
        except OSError as exc:
            raise StateSyncError(
                f"scenario suite {name!r}: not a suite name ({', '.join(SUITE_SEEDS)}, "
                f"seed:N) and not a readable JSON file: {exc}"
            ) from exc
        return [Scenario.from_dict(d) for d in items][:count]
    return [make_scenario(seed, i) for i in range(count or SUITE_SIZE)]


def suite_digest(scenarios: Sequence[Scenario]) -> str:
    import hashlib
    blob = json.dumps([s.to_dict() for s in scenarios], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- evaluation

@dataclass
class Summary:
    scheduler: str
    scenarios: int
    feasible: int
    attained_feasible: int
    attained_all: int
    mean_downtime_s: float
    median_downtime_s: float
    mean_total_time_s: float
    mean_wire_bytes: float
    declared_infeasible: int
    declared_wrongly: int      # declared infeasible though the oracle found a plan
    aborted: int
    mean_downtime_vs_oracle: float = math.nan  # mean of downtime / hindsight-best downtime

    @property
    def attainment(self) -> float:
        return self.attained_feasible / self.feasible if self.feasible else math.nan


def evaluate(scenarios: Sequence[Scenario], schedulers: Sequence[str], codecs: bool = True,
             options: Optional[Dict[str, dict]] = None):
    """Run every scheduler on every scenario. Returns (summaries, results by scheduler,
    oracle results)."""
    from statesync.planning import scheduler as sched_mod
    options = options or {}
    oracles = [oracle(sc, codecs=codecs) for sc in scenarios]
    results: Dict[str, List[Result]] = {}
    summaries = []
    for name in schedulers:
        rs = [
            run(sc, sched_mod.get(name, **options.get(name, {})), name, codecs=codecs)
            for sc in scenarios
        ]
        results[name] = rs
        dts = sorted(r.downtime_s for r in rs if not r.aborted)
        summaries.append(
            Summary(
                scheduler=name,
                scenarios=len(rs),
                feasible=sum(o.feasible for o in oracles),
                attained_feasible=sum(r.attained and o.feasible for r, o in zip(rs, oracles)),
                attained_all=sum(r.attained for r in rs),
                mean_downtime_s=sum(dts) / len(dts) if dts else math.nan,
                median_downtime_s=dts[len(dts) // 2] if dts else math.nan,
                mean_total_time_s=sum(r.total_time_s for r in rs) / len(rs),
                mean_wire_bytes=sum(r.wire_bytes for r in rs) / len(rs),
                declared_infeasible=sum(r.declared_infeasible for r in rs),
                declared_wrongly=sum(
                    r.declared_infeasible and o.feasible for r, o in zip(rs, oracles)
                ),
                aborted=sum(r.aborted for r in rs),
                mean_downtime_vs_oracle=_mean(
                    [r.downtime_s / o.best_downtime_s for r, o in zip(rs, oracles) if not r.aborted]
                ),
            )
        )
    return summaries, results, oracles


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def format_table(summaries: Sequence[Summary]) -> str:
    head = (
        "scheduler",
        "attained (feasible)",
        "attained (all)",
        "mean downtime s",
        "median downtime s",
        "downtime / hindsight best",
        "mean total s",
        "mean MiB sent",
        "said infeasible (wrongly)",
    )
    rows = []
    for s in summaries:
        rows.append(
            (
                s.scheduler,
                f"{s.attained_feasible}/{s.feasible} = {100 * s.attainment:.1f}%",
                f"{s.attained_all}/{s.scenarios}",
                f"{s.mean_downtime_s:.3f}",
                f"{s.median_downtime_s:.3f}",
                f"{s.mean_downtime_vs_oracle:.3f}",
                f"{s.mean_total_time_s:.2f}",
                f"{s.mean_wire_bytes / MIB:.1f}",
                f"{s.declared_infeasible} ({s.declared_wrongly})",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join(
        [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    )


def plot(
    results: Dict[str, List[Result]], path: str, oracles: Optional[Sequence[OracleResult]] = None
) -> None:
    """Save a scatter of downtime against total migration time, one colour per
    scheduler; with ``oracles``, a second panel with the distribution of downtime over
    the hindsight-best downtime of each scenario."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise StateSyncError(
            f"--plot needs matplotlib ({exc}); pip install 'statesync[plot]'"
        ) from exc
    panels = 2 if oracles is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
    ax = axes[0][0]
    for name, rs in results.items():
        pts = [(r.total_time_s, r.downtime_s) for r in rs if not r.aborted]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, alpha=0.6, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total migration time (s)")
    ax.set_ylabel("downtime (s)")
    ax.set_title("downtime vs total time, one point per scenario")
    ax.legend()
    if oracles is not None:
        ax = axes[0][1]
        for name, rs in results.items():
            ratios = sorted(
                r.downtime_s / o.best_downtime_s for r, o in zip(rs, oracles) if not r.aborted
            )
            ax.plot(ratios, [(i + 1) / len(ratios) for i in range(len(ratios))], label=name)
        ax.set_xscale("log")
        ax.set_xlabel("downtime / hindsight-best downtime")
        ax.set_ylabel("fraction of scenarios")
        ax.set_title("how far from the best fixed plan")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
