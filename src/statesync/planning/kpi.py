"""Migration targets, observations, plans, and the pre-copy cost model.

Everything a scheduler takes in or gives back is a small frozen dataclass whose
field names carry their units: ``_s`` seconds, ``_bytes`` bytes, ``_pages``
pages, ``_bytes_per_s`` bytes per second, ``_pages_per_s`` pages per second,
``_s_per_mib`` seconds per MiB (2**20 bytes). Constructing one validates it and
raises :class:`~statesync.errors.KpiInputError` (a ``ValueError``) naming the
field: ``Observations.bandwidth_bytes_per_s: must be > 0 (got -1.0)``.

:class:`CostModel` predicts a pre-copy migration (see docs/scheduler.md for the
equations and a worked example) and calibrates itself from measured rounds and
CRIU statistics. Instances are not thread-safe; use one per migration.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Dict, List, Mapping, Optional, Tuple, Union

from statesync.errors import Infeasible, KpiInputError

MIB = 1 << 20
GIB = 1 << 30
PAGE_SIZE = 4096

OBJECTIVES = ("min_downtime", "min_resources")
NO_CODEC = "none"


# --------------------------------------------------------------------------- validation

def _num(owner: str, name: str, value, *, positive=False, nonneg=False, allow_inf=False,
         allow_none=False, integer=False):
    where = f"{owner}.{name}"
    if value is None:
        if allow_none:
            return None
        raise KpiInputError(where, "is missing (None); measure it or pass an explicit value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np  # numpy scalars are fine
            if isinstance(value, np.generic):
                value = value.item()
            else:
                raise TypeError
        except TypeError:
            raise KpiInputError(
                where, f"must be a number (got {type(value).__name__} {value!r})"
            ) from None
    v = float(value)
    if math.isnan(v):
        raise KpiInputError(where, "is NaN; pass a measured value")
    if integer and math.isfinite(v) and not v.is_integer():
        raise KpiInputError(where, f"must be a whole number (got {value!r})")
    if math.isinf(v) and not allow_inf:
        raise KpiInputError(where, f"must be finite (got {v})")
    if positive and not v > 0:
        raise KpiInputError(where, f"must be > 0 (got {value!r})")
    if nonneg and v < 0:
        raise KpiInputError(where, f"must be >= 0 (got {value!r})")
    return int(v) if integer else value


# --------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Weights:
    """A weighted objective: the cost of a migration is
    ``per_downtime_s * downtime + per_total_time_s * total_time + per_gib_sent * GiB_on_wire``.
    Only ratios matter."""

    per_downtime_s: float = 1.0
    per_total_time_s: float = 0.0
    per_gib_sent: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            _num("Weights", f.name, getattr(self, f.name), nonneg=True)
        if self.per_downtime_s + self.per_total_time_s + self.per_gib_sent <= 0:
            raise KpiInputError("Weights", "at least one weight must be > 0")

    def cost(self, downtime_s: float, total_time_s: float, wire_bytes: float) -> float:
        return (self.per_downtime_s * downtime_s + self.per_total_time_s * total_time_s
                + self.per_gib_sent * wire_bytes / GIB)


@dataclass(frozen=True)
class Targets:
    """KPI targets of one migration.

    ``max_downtime_s``: longest the process may be frozen (freeze, final dump, final
    transfer, restore). ``max_total_time_s``: longest from the start of the first
    round to the restored process running (``math.inf``: no limit).
    ``max_bandwidth_bytes_per_s``: most the migration may use of the link (None: all of
    it). ``objective``: ``"min_downtime"`` (the paper's MD), ``"min_resources"`` (MR:
    least bandwidth reserved and bytes sent that still meets the targets) or a
    :class:`Weights`."""

    max_downtime_s: float
    max_total_time_s: float = math.inf
    max_bandwidth_bytes_per_s: Optional[float] = None
    objective: Union[str, Weights] = "min_downtime"

    def __post_init__(self):
        _num("Targets", "max_downtime_s", self.max_downtime_s, positive=True)
        _num("Targets", "max_total_time_s", self.max_total_time_s, positive=True, allow_inf=True)
        _num("Targets", "max_bandwidth_bytes_per_s", self.max_bandwidth_bytes_per_s,
             positive=True, allow_none=True)
        if not isinstance(self.objective, Weights) and self.objective not in OBJECTIVES:
            raise KpiInputError(
                "Targets.objective",
                f"must be one of {', '.join(OBJECTIVES)} or a Weights (got {self.objective!r})",
            )

    @property
    def weights(self) -> Weights:
        """The objective as weights (used to price one more round)."""
        if isinstance(self.objective, Weights):
            return self.objective
        if self.objective == "min_resources":
            return Weights(per_downtime_s=0.0, per_total_time_s=0.0, per_gib_sent=1.0)
        return Weights(per_downtime_s=1.0)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Targets":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class Codec:
    """A page codec the sender can use: ``name`` as ``stream.Encoder`` knows it,
    ``ratio`` = raw bytes / wire bytes (measured on a sample of this process's pages),
    encoder and decoder throughput in raw bytes per second."""

    name: str
    ratio: float
    encode_bytes_per_s: float
    decode_bytes_per_s: float = math.inf

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == NO_CODEC:
            raise KpiInputError(
                "Codec.name", f"must be a codec name other than {NO_CODEC!r} (got {self.name!r})"
            )
        _num("Codec", "ratio", self.ratio, positive=True)
        _num("Codec", "encode_bytes_per_s", self.encode_bytes_per_s, positive=True, allow_inf=True)
        _num("Codec", "decode_bytes_per_s", self.decode_bytes_per_s, positive=True, allow_inf=True)


@dataclass(frozen=True)
class Observations:
    """What is known about the process, the link and CRIU before the migration.

    ``dirty_rate_pages_per_s``: page writes per second (the slope of the dirty set at
    short windows; a tracker's ``len(collect())/interval``), measured over a window of
    ``dirty_rate_window_s`` (default 1 s; the model takes ``rate x window`` pages in that
    window as its first measured point). ``working_set_pages``:
    the pages the process writes at all, if known (bounds every round's dirty set).
    ``dirty_rate_peak_pages_per_s``: worst-case rate if known (the ``mose`` model uses it).
    CRIU costs: a dump costs ``dump_fixed_s + dump_s_per_mib * MiB dumped`` frozen; a restore
    costs ``restore_fixed_s + restore_s_per_mib * MiB of state``. ``round_fixed_s`` is the
    fixed cost of one live round (dirty scan, pre-dump). ``codecs``: usable page codecs;
    sending raw (``"none"``) is always possible."""

    state_bytes: int
    dirty_rate_pages_per_s: float
    bandwidth_bytes_per_s: float
    dump_fixed_s: Optional[float] = None
    dump_s_per_mib: Optional[float] = None
    restore_fixed_s: Optional[float] = None
    restore_s_per_mib: Optional[float] = None
    round_fixed_s: float = 0.0
    rtt_s: float = 0.0
    dirty_rate_window_s: float = 1.0
    page_size_bytes: int = PAGE_SIZE
    working_set_pages: Optional[int] = None
    dirty_rate_peak_pages_per_s: Optional[float] = None
    codecs: Tuple[Codec, ...] = ()

    def __post_init__(self):
        o = "Observations"
        _num(o, "state_bytes", self.state_bytes, positive=True, integer=True)
        _num(o, "page_size_bytes", self.page_size_bytes, positive=True, integer=True)
        _num(o, "dirty_rate_pages_per_s", self.dirty_rate_pages_per_s, nonneg=True)
        _num(o, "bandwidth_bytes_per_s", self.bandwidth_bytes_per_s, positive=True)
        for name in ("dump_fixed_s", "dump_s_per_mib", "restore_fixed_s", "restore_s_per_mib",
                     "round_fixed_s", "rtt_s"):
            _num(o, name, getattr(self, name), nonneg=True)
        _num(o, "dirty_rate_window_s", self.dirty_rate_window_s, positive=True)
        _num(
            o,
            "working_set_pages",
            self.working_set_pages,
            positive=True,
            integer=True,
            allow_none=True,
        )
        _num(o, "dirty_rate_peak_pages_per_s", self.dirty_rate_peak_pages_per_s, nonneg=True,
             allow_none=True)
        if self.working_set_pages is not None and self.working_set_pages > self.state_pages:
            raise KpiInputError(
                f"{o}.working_set_pages",
                f"{self.working_set_pages} pages exceeds the state ({self.state_pages} pages)",
            )
        if not isinstance(self.codecs, tuple):
            object.__setattr__(self, "codecs", tuple(self.codecs))
        seen = set()
        for c in self.codecs:
            if not isinstance(c, Codec):
                raise KpiInputError(f"{o}.codecs", f"items must be Codec (got {type(c).__name__})")
            if c.name in seen:
                raise KpiInputError(f"{o}.codecs", f"codec {c.name!r} listed twice")
            seen.add(c.name)

    @property
    def state_pages(self) -> int:
        return -(-int(self.state_bytes) // int(self.page_size_bytes))

    @classmethod
    def from_dict(cls, d: Mapping) -> "Observations":
        d = dict(d)
        if "codecs" in d:
            d["codecs"] = tuple(
                c if isinstance(c, Codec) else _from_dict(Codec, c) for c in d["codecs"]
            )
        return _from_dict(cls, d)


def _from_dict(cls, d: Mapping):
    if not isinstance(d, Mapping):
        raise KpiInputError(cls.__name__, f"expected a mapping (got {type(d).__name__})")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise KpiInputError(f"{cls.__name__}.{unknown[0]}", "unknown field")
    from dataclasses import MISSING
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in d:
            raise KpiInputError(f"{cls.__name__}.{f.name}", "is missing")
    return cls(**d)


@dataclass(frozen=True)
class RoundStats:
    """What one live pre-copy round measured. Round 0 is the first full copy.

    ``duration_s``: wall time of the round (scan + encode + transfer). ``pages_sent``:
    pages the round carried; ``bytes_sent``: bytes it put on the wire (after the codec).
    ``dirty_pages``: pages written during the round, i.e. what the next round (or the
    final copy) has to send. ``transfer_s``: time the transfer itself took (None: the
    bandwidth is not recalibrated from this round). ``elapsed_s``: time since the
    migration started, at the end of this round (None: the scheduler sums durations).
    ``codec``: codec this round used (None: the planned one)."""

    index: int
    duration_s: float
    pages_sent: int
    bytes_sent: int
    dirty_pages: int
    transfer_s: Optional[float] = None
    elapsed_s: Optional[float] = None
    codec: Optional[str] = None

    def __post_init__(self):
        o = "RoundStats"
        _num(o, "index", self.index, nonneg=True, integer=True)
        _num(o, "duration_s", self.duration_s, nonneg=True)
        _num(o, "pages_sent", self.pages_sent, nonneg=True, integer=True)
        _num(o, "bytes_sent", self.bytes_sent, nonneg=True, integer=True)
        _num(o, "dirty_pages", self.dirty_pages, nonneg=True, integer=True)
        _num(o, "transfer_s", self.transfer_s, nonneg=True, allow_none=True)
        _num(o, "elapsed_s", self.elapsed_s, nonneg=True, allow_none=True)
        if self.transfer_s is not None and self.transfer_s > self.duration_s * (1 + 1e-9):
            raise KpiInputError(
                f"{o}.transfer_s",
                f"{self.transfer_s} s is longer than the round ({self.duration_s} s)",
            )


# --------------------------------------------------------------------------- outputs

class Action(enum.Enum):
    CONTINUE = "continue"            # run another live round sending the dirty pages
    STOP_AND_COPY = "stop_and_copy"  # freeze, final dump of the dirty pages, transfer, restore
    ABORT = "abort"                  # give up; the source keeps running


CONTINUE = Action.CONTINUE
STOP_AND_COPY = Action.STOP_AND_COPY
ABORT = Action.ABORT


@dataclass(frozen=True)
class Plan:
    """A scheduler's plan. ``strategy`` is ``"cold"`` (freeze and copy everything, no
    live rounds: do not call ``on_round``), ``"precopy"`` (live rounds, round 0
    copies everything, then follow ``on_round``) or ``"hybrid"`` (as precopy for at
    most ``rounds`` rounds, then switch over before convergence: what is still dirty
    is fetched after the resume, post-copy). ``rounds``: planned live rounds
    (a forecast; ``on_round`` decides). ``bandwidth_bytes_per_s``: rate to reserve /
    cap the transfer at. ``codec``: ``"none"`` or a :class:`Codec` name. ``predicted_*``:
    the model's forecast of this plan. ``feasible``: whether it meets the targets."""

    strategy: str
    rounds: int
    bandwidth_bytes_per_s: float
    codec: str
    predicted_downtime_s: float
    predicted_total_time_s: float
    predicted_wire_bytes: float
    feasible: bool
    reason: str = ""
    scheduler: str = ""


@dataclass(frozen=True)
class Decision:
    """The answer to a finished round. ``codec`` / ``bandwidth_bytes_per_s`` apply from
    the next transfer on (the next round or the final copy); None means unchanged.
    ``predicted_*``: forecast of the whole migration if the action is followed."""

    action: Action
    reason: str
    predicted_downtime_s: float = math.nan
    predicted_total_time_s: float = math.nan
    codec: Optional[str] = None
    bandwidth_bytes_per_s: Optional[float] = None


@dataclass(frozen=True)
class Option:
    """One candidate of a look-ahead: stop after ``rounds`` more live rounds."""

    rounds: int
    downtime_s: float
    total_time_s: float
    wire_bytes: float
    final_pages: float
    # the part of downtime_s that scales with final_pages (dump + transfer)
    final_copy_s: float = 0.0


# --------------------------------------------------------------------------- the model

def _given(v: Optional[float]) -> float:
    """A CRIU cost of an Observations: __post_init__ refused None, so it is a number."""
    assert v is not None
    return float(v)


class CostModel:
    """Analytic model of a pre-copy migration, calibrated online.

    Round ``k`` sends the pages dirtied during round ``k-1`` (round 0 sends the whole
    state, ``N`` pages). With throughput ``R(codec, bw) = min(bw * ratio, encode, decode)``
    in raw bytes/s::

        t_k        = round_fixed + rtt + x_k * P / R
        x_{k+1}    = D(t_k)                           # pages dirtied during round k
        downtime   = dump_fixed + dump_per_byte * x * P + x * P / R + rtt
                     + restore_fixed + restore_per_byte * S
        total      = sum(t_k) + downtime;   wire bytes = sum(x_k * P / ratio) + x * P / ratio

    The dirty function before any measurement is ``D(t) = W * (1 - exp(-d t / W))`` (uniform
    writes at ``d`` pages/s over a working set of ``W`` pages; ``W = N`` when unknown).
    Every measured round adds a point (round duration, pages dirtied); ``D`` is then the
    piecewise-linear interpolation of the points in log-log space (slopes clamped to [0, 1],
    extrapolated from the nearest segment), starting from the probe's point
    (``dirty_rate_window_s``, rate x window). A new point drops older ones that contradict
    it, so a rising or bursty writer is followed rather than averaged. A first round that
    dirtied more than the prior predicts refits ``d``. Link bandwidth, codec ratio and
    encoder throughput, and the round fixed cost are EWMAs (weight 1/2 on the newest round);
    CRIU dump and restore costs are least-squares lines over (bytes, seconds) samples fed
    through :meth:`observe_dump` / :meth:`observe_restore` /
    :meth:`observe_criu_dump_stats`. docs/scheduler.md has the equations and a worked
    example.
    """

    ALPHA = 0.5

    def __init__(self, obs: Observations):
        if not isinstance(obs, Observations):
            raise KpiInputError("obs", f"expected Observations (got {type(obs).__name__})")
        self.page_size = int(obs.page_size_bytes)
        self.state_bytes = int(obs.state_bytes)
        self.state_pages = obs.state_pages
        self.dirty_rate = float(obs.dirty_rate_pages_per_s)
        self.working_set = float(obs.working_set_pages or self.state_pages)
        self.bandwidth = float(obs.bandwidth_bytes_per_s)
        self.rtt = float(obs.rtt_s)
        self.round_fixed = float(obs.round_fixed_s)
        self.dump_fixed = _given(obs.dump_fixed_s)
        self.dump_per_byte = _given(obs.dump_s_per_mib) / MIB
        self.restore_fixed = _given(obs.restore_fixed_s)
        self.restore_per_byte = _given(obs.restore_s_per_mib) / MIB
        # name -> [ratio, encode B/s, decode B/s]
        self.codecs: Dict[str, List[float]] = {NO_CODEC: [1.0, math.inf, math.inf]}
        for c in obs.codecs:
            self.codecs[c.name] = [
                float(c.ratio),
                float(c.encode_bytes_per_s),
                float(c.decode_bytes_per_s),
            ]
        # measured (window seconds, distinct dirty pages), sorted by window; starts with
        # what the probe measured: rate x window pages in its window
        self.probe_window = float(obs.dirty_rate_window_s)
        self._points: List[Tuple[float, float]] = []
        if self.dirty_rate > 0:
            self._points.append(
                (self.probe_window, min(self.dirty_rate * self.probe_window, self.working_set))
            )
        self.measured_rounds = 0
        self._dump_samples: List[Tuple[float, float]] = []
        self._restore_samples: List[Tuple[float, float]] = []

    # -- primitives -----------------------------------------------------------------------
    def throughput(self, codec: str, bandwidth: float) -> float:
        """Raw bytes per second moved with ``codec`` on a link of ``bandwidth`` bytes/s."""
        ratio, enc, dec = self.codecs[codec]
        return min(bandwidth * ratio, enc, dec)

    def _prior(self, t: float) -> float:
        w, d = self.working_set, self.dirty_rate
        return -w * math.expm1(-d * t / w)

    def _prior_slope(self, t: float) -> float:
        # d ln D / d ln t of the prior curve at t: 1 for t << W/d, -> 0 when saturated.
        z = self.dirty_rate * t / self.working_set
        if z < 1e-9:
            return 1.0
        if z > 50:
            return 0.0
        return z * math.exp(-z) / -math.expm1(-z)

    def dirty_pages(self, t: float) -> float:
        """Predicted distinct pages written during a window of ``t`` seconds."""
        if t <= 0:
            return 0.0
        pts = self._points
        if self.measured_rounds == 0 or not pts:
            return self._prior(t)
        cap = self.working_set
        if len(pts) == 1:
            (t0, x0), = pts
            return min(x0 * (t / t0) ** self._prior_slope(t0), max(cap, x0))
        lt = math.log(t)
        if t <= pts[0][0]:
            (ta, xa), (tb, xb) = pts[0], pts[1]
            anchor_t, anchor_x = ta, xa
        elif t >= pts[-1][0]:
            (ta, xa), (tb, xb) = pts[-2], pts[-1]
            anchor_t, anchor_x = tb, xb
        else:
            i = next(i for i in range(1, len(pts)) if pts[i][0] >= t)
            (ta, xa), (tb, xb) = pts[i - 1], pts[i]
            anchor_t, anchor_x = ta, xa
        slope = math.log(xb / xa) / math.log(tb / ta)
        slope = min(1.0, max(0.0, slope))   # a dirty set grows with the window, at most linearly
        return min(anchor_x * math.exp(slope * (lt - math.log(anchor_t))), max(cap, pts[-1][1]))

    def round_time(self, pages: float, codec: str, bandwidth: float) -> float:
        return (
            self.round_fixed + self.rtt + pages * self.page_size / self.throughput(codec, bandwidth)
        )

    def downtime(self, pages: float, codec: str, bandwidth: float) -> float:
        """Frozen time if the final copy has ``pages`` pages."""
        nbytes = pages * self.page_size
        return (
            self.dump_fixed
            + self.dump_per_byte * nbytes
            + nbytes / self.throughput(codec, bandwidth)
            + self.rtt
            + self.restore_fixed
            + self.restore_per_byte * self.state_bytes
        )

    def downtime_floor(self) -> float:
        """The physical minimum downtime: CRIU's fixed costs, the restore of the whole
        state and one round trip, with nothing left to copy."""
        return (
            self.dump_fixed
            + self.rtt
            + self.restore_fixed
            + self.restore_per_byte * self.state_bytes
        )

    def wire_bytes(self, pages: float, codec: str) -> float:
        return pages * self.page_size / self.codecs[codec][0]

    def lookahead(self, pending: float, codec: str, bandwidth: float, *, elapsed_s: float = 0.0,
                  sent_bytes: float = 0.0, max_rounds: int = 30,
                  time_limit_s: float = math.inf) -> List[Option]:
        """Options "stop after j more live rounds", j = 0, 1, ..., from ``pending`` dirty
        pages at time ``elapsed_s`` with ``sent_bytes`` already on the wire. Stops
        early once rounds no longer shrink the dirty set (later options are dominated) or
        the rounds alone overrun ``time_limit_s``."""
        fixed = self.downtime(0.0, codec, bandwidth)
        dt0 = self.downtime(pending, codec, bandwidth)
        out = [
            Option(
                0,
                dt0,
                elapsed_s + dt0,
                sent_bytes + self.wire_bytes(pending, codec),
                pending,
                dt0 - fixed,
            )
        ]
        x, t_acc, b_acc = float(pending), float(elapsed_s), float(sent_bytes)
        for j in range(1, max_rounds + 1):
            t = self.round_time(x, codec, bandwidth)
            t_acc += t
            b_acc += self.wire_bytes(x, codec)
            if t_acc > time_limit_s:
                break
            nx = self.dirty_pages(t)
            dt = self.downtime(nx, codec, bandwidth)
            out.append(
                Option(j, dt, t_acc + dt, b_acc + self.wire_bytes(nx, codec), nx, dt - fixed)
            )
            if nx >= x * 0.999 and j > 1:
                break
            x = nx
        return out

    # -- calibration ------------------------------------------------------------------------
    def observe_round(self, r: RoundStats, codec: str) -> None:
        """Fold a measured round in (dirty curve, bandwidth, codec ratio, round cost)."""
        a = self.ALPHA
        if codec not in self.codecs:
            raise KpiInputError(
                "RoundStats.codec", f"unknown codec {codec!r}; known: {sorted(self.codecs)}"
            )
        raw = r.pages_sent * self.page_size
        if r.transfer_s is not None and r.transfer_s > 1e-4 and r.bytes_sent > 0 and raw > 0:
            ratio, enc, dec = self.codecs[codec]
            raw_rate = raw / r.transfer_s
            wire_rate = r.bytes_sent / r.transfer_s
            if codec != NO_CODEC:
                self.codecs[codec][0] = (1 - a) * ratio + a * (raw / r.bytes_sent)
            if codec == NO_CODEC or raw_rate < 0.9 * min(enc, dec):
                self.bandwidth = (1 - a) * self.bandwidth + a * wire_rate   # link-bound
            else:  # codec-bound
                self.codecs[codec][1] = (
                    (1 - a) * enc + a * raw_rate if math.isfinite(enc) else raw_rate
                )
                self.bandwidth = max(self.bandwidth, wire_rate)
            overhead = max(0.0, r.duration_s - r.transfer_s - self.rtt)
            self.round_fixed = (1 - a) * self.round_fixed + a * overhead
        if r.duration_s >= 1e-6:  # an empty or instant round says nothing about the writer
            self._add_point(float(r.duration_s), float(r.dirty_pages))
            self.measured_rounds += 1

    def _add_point(self, t: float, x: float) -> None:
        """Add a measured (window, dirty pages) point. Older points that contradict it
        (a longer window with fewer pages, a shorter one with more, or about the same
        window) are dropped: the newest measurement wins, so a rate that rises or bursts
        is followed instead of averaged away."""
        x = max(x, 0.5)
        if self.measured_rounds == 0:
            self._refit_prior(t, x)
        keep = []
        for tp, xp in self._points:
            if abs(math.log(tp) - math.log(t)) < 0.05 or (tp < t and xp > x) or (tp > t and xp < x):
                continue
            keep.append((tp, xp))
        keep.append((t, x))
        keep.sort()
        self._points = keep[-8:] if len(keep) > 8 else keep

    def _refit_prior(self, t: float, x: float) -> None:
        """First measured round: if it dirtied more than the prior curve predicts, the
        writer is faster than the probe saw; refit the rate so the curve passes through
        (t, x). Fewer pages than predicted is not refitted into a smaller working set:
        a saturated set and a hot/cold split look the same after one round and call for
        opposite decisions, so the next round's measurement settles it (the exponent)."""
        w, d = self.working_set, self.dirty_rate
        pred = -w * math.expm1(-d * t / w) if d > 0 else 0.0
        if x > 1.05 * pred:
            self.dirty_rate = (-w * math.log1p(-x / w) / t) if x < w else 50.0 * w / t
            self._points = [(self.probe_window, self._prior(self.probe_window))]

    @staticmethod
    def _fit(samples, fixed, per_byte):
        if len({b for b, _ in samples}) >= 2:
            n = len(samples)
            mx = sum(b for b, _ in samples) / n
            my = sum(s for _, s in samples) / n
            sxx = sum((b - mx) ** 2 for b, _ in samples)
            sxy = sum((b - mx) * (s - my) for b, s in samples)
            slope = max(0.0, sxy / sxx)
            return max(0.0, my - slope * mx), slope
        b, s = samples[-1]
        return max(0.0, s - per_byte * b), per_byte

    def observe_dump(self, nbytes: float, seconds: float) -> None:
        """A CRIU dump of ``nbytes`` of memory froze the process for ``seconds``."""
        _num("observe_dump", "nbytes", nbytes, nonneg=True)
        _num("observe_dump", "seconds", seconds, nonneg=True)
        self._dump_samples.append((float(nbytes), float(seconds)))
        self.dump_fixed, self.dump_per_byte = self._fit(
            self._dump_samples, self.dump_fixed, self.dump_per_byte
        )

    def observe_restore(self, state_bytes: float, seconds: float) -> None:
        """A CRIU restore of a ``state_bytes`` process took ``seconds``."""
        _num("observe_restore", "state_bytes", state_bytes, nonneg=True)
        _num("observe_restore", "seconds", seconds, nonneg=True)
        self._restore_samples.append((float(state_bytes), float(seconds)))
        self.restore_fixed, self.restore_per_byte = self._fit(
            self._restore_samples, self.restore_fixed, self.restore_per_byte)

    def observe_criu_dump_stats(self, stats: Mapping) -> None:
        """Fold in CRIU's ``stats-dump`` (``frozen_time`` in microseconds and
        ``pages_written``), as decoded by ``crit`` or ``statesync.criu``."""
        for key in ("frozen_time", "pages_written"):
            if key not in stats:
                raise KpiInputError(f"stats-dump.{key}", "is missing")
        self.observe_dump(
            float(stats["pages_written"]) * self.page_size, float(stats["frozen_time"]) / 1e6
        )


def best_codec(model: CostModel, bandwidth: float) -> str:
    """The codec with the highest raw throughput on this link (ties within 2% go to
    the higher ratio: fewer bytes on the wire)."""
    rates = {name: model.throughput(name, bandwidth) for name in model.codecs}
    top = max(rates.values())
    near = [n for n, r in rates.items() if r >= 0.98 * top]
    return max(sorted(near), key=lambda n: (model.codecs[n][0], n == NO_CODEC))


__all__ = [
    "MIB", "GIB", "PAGE_SIZE", "OBJECTIVES", "NO_CODEC", "Weights", "Targets", "Codec",
    "Observations", "RoundStats", "Action", "CONTINUE", "STOP_AND_COPY", "ABORT", "Plan",
    "Decision", "Option", "CostModel", "best_codec", "Infeasible", "KpiInputError",
]
