"""Property tests: any valid observations, targets and round sequence give a Plan (or an
explicit Infeasible) and valid, repeatable decisions from every built-in scheduler."""
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statesync import scheduler as S
from statesync.errors import Infeasible, KpiInputError
from statesync.planning.kpi import (
    ABORT,
    CONTINUE,
    STOP_AND_COPY,
    Codec,
    Decision,
    Observations,
    Plan,
    RoundStats,
    Targets,
)

pos = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False, allow_infinity=False)
small = st.floats(min_value=0.0, max_value=2.0, allow_nan=False, allow_infinity=False)


@st.composite
def observations(draw):
    pages = draw(st.integers(min_value=1, max_value=2_000_000))
    ws = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=pages)))
    codecs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["lz4", "zstd", "xor"]),
                st.floats(min_value=0.5, max_value=10),
                st.floats(min_value=1e5, max_value=1e10),
            ),
            max_size=3,
            unique_by=lambda c: c[0],
        )
    )
    return Observations(
        state_bytes=pages * 4096,
        dirty_rate_pages_per_s=draw(st.floats(min_value=0, max_value=1e7)),
        bandwidth_bytes_per_s=draw(st.floats(min_value=1e3, max_value=1e11)),
        dump_fixed_s=draw(small),
        dump_s_per_mib=draw(st.floats(min_value=0, max_value=0.05)),
        restore_fixed_s=draw(small),
        restore_s_per_mib=draw(st.floats(min_value=0, max_value=0.05)),
        round_fixed_s=draw(st.floats(min_value=0, max_value=0.5)),
        rtt_s=draw(st.floats(min_value=0, max_value=0.2)),
        working_set_pages=ws,
        codecs=tuple(Codec(n, r, e) for n, r, e in codecs),
    )


@st.composite
def targets(draw):
    return Targets(
        max_downtime_s=draw(pos),
        max_total_time_s=draw(st.one_of(pos, st.just(math.inf))),
        max_bandwidth_bytes_per_s=draw(
            st.one_of(st.none(), st.floats(min_value=1e3, max_value=1e11))
        ),
        objective=draw(st.sampled_from(["min_downtime", "min_resources"])),
    )


rounds = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=1e4),
        st.integers(min_value=0, max_value=3_000_000),
        st.floats(min_value=0, max_value=1),
    ),
    min_size=1,
    max_size=12,
)


def drive(name, obs, tgt, rs):
    s = S.get(name)
    out = []
    try:
        p = s.plan(obs, tgt)
    except Infeasible as exc:
        assert exc.field.startswith("Targets")
        assert exc.best is not None and exc.best_downtime_s >= 0
        p = exc.best
    assert isinstance(p, Plan) and p.strategy in ("cold", "precopy", "hybrid")
    assert p.bandwidth_bytes_per_s > 0 and p.codec in ["none"] + [c.name for c in obs.codecs]
    out.append(p)
    if p.strategy == "cold":
        return out
    for i, (dur, dirty, frac) in enumerate(rs):
        r = RoundStats(
            index=i,
            duration_s=dur,
            pages_sent=obs.state_pages if i == 0 else rs[i - 1][1],
            bytes_sent=int(frac * 4096 * (obs.state_pages if i == 0 else rs[i - 1][1])),
            dirty_pages=dirty,
            transfer_s=dur * frac,
        )
        d = s.on_round(r)
        assert isinstance(d, Decision) and d.action in (CONTINUE, STOP_AND_COPY, ABORT)
        assert d.codec is None or d.codec in ["none"] + [c.name for c in obs.codecs]
        assert not (isinstance(d.predicted_downtime_s, float) and d.predicted_downtime_s < 0)
        out.append(d)
        if d.action is not CONTINUE:
            break
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    obs=observations(),
    tgt=targets(),
    rs=rounds,
    name=st.sampled_from(["adaptive", "mose", "qemu", "threshold"]),
)
def test_any_valid_input_gives_a_plan_and_repeatable_decisions(obs, tgt, rs, name):
    first = drive(name, obs, tgt, rs)
    assert drive(name, obs, tgt, rs) == first


@settings(max_examples=100, deadline=None)
@given(
    field=st.sampled_from(
        [
            "bandwidth_bytes_per_s",
            "dirty_rate_pages_per_s",
            "state_bytes",
            "rtt_s",
            "dump_fixed_s",
            "restore_s_per_mib",
        ]
    ),
    value=st.sampled_from([math.nan, -1.0, -math.inf, math.inf, "x", None]),
)
def test_bad_observation_values_always_name_the_field(field, value):
    base = dict(
        state_bytes=4096,
        dirty_rate_pages_per_s=1.0,
        bandwidth_bytes_per_s=1e6,
        dump_fixed_s=0.1,
        dump_s_per_mib=0.0,
        restore_fixed_s=0.1,
        restore_s_per_mib=0.0,
    )
    base[field] = value
    try:
        Observations(**base)
    except KpiInputError as exc:
        assert exc.field == f"Observations.{field}"
        assert isinstance(exc, ValueError)
    else:
        # only a value that is really valid may pass: rtt_s = inf is not, None is missing
        raise AssertionError(f"{field}={value!r} accepted")
