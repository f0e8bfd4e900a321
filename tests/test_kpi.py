"""statesync.kpi: input validation and the pre-copy cost model against hand-worked cases."""
import math

import pytest

from statesync.errors import KpiInputError
from statesync.planning.kpi import (
    MIB,
    Codec,
    CostModel,
    Observations,
    RoundStats,
    Targets,
    Weights,
    best_codec,
)


def obs(**kw):
    base = dict(
        state_bytes=1000 * 4096,
        dirty_rate_pages_per_s=100.0,
        bandwidth_bytes_per_s=1000 * 4096.0,
        dump_fixed_s=0.1,
        dump_s_per_mib=0.0,
        restore_fixed_s=0.2,
        restore_s_per_mib=0.0,
    )
    base.update(kw)
    return Observations(**base)


# ---------------------------------------------------------------- validation names the field

@pytest.mark.parametrize("field,value,needle", [
    ("bandwidth_bytes_per_s", 0, "> 0"),
    ("bandwidth_bytes_per_s", -5.0, "> 0"),
    ("dirty_rate_pages_per_s", math.nan, "NaN"),
    ("dirty_rate_pages_per_s", -1, ">= 0"),
    ("state_bytes", 0, "> 0"),
    ("dump_fixed_s", None, "missing"),
    ("restore_s_per_mib", math.inf, "finite"),
    ("working_set_pages", 5000, "exceeds"),
    ("rtt_s", "fast", "number"),
])
def test_bad_observation_names_the_field(field, value, needle):
    with pytest.raises(ValueError) as ei:
        obs(**{field: value})
    assert isinstance(ei.value, KpiInputError)
    assert ei.value.field == f"Observations.{field}"
    assert f"Observations.{field}" in str(ei.value) and needle in str(ei.value)


def test_missing_observation_from_dict_names_the_field():
    d = dict(state_bytes=4096, bandwidth_bytes_per_s=1e6)
    with pytest.raises(KpiInputError, match=r"Observations\.dirty_rate_pages_per_s: is missing"):
        Observations.from_dict(d)
    with pytest.raises(KpiInputError, match=r"Observations\.bogus"):
        Observations.from_dict(dict(d, dirty_rate_pages_per_s=1.0, bogus=1))


@pytest.mark.parametrize("kw,fld", [
    (dict(max_downtime_s=0), "Targets.max_downtime_s"),
    (dict(max_downtime_s=math.nan), "Targets.max_downtime_s"),
    (dict(max_downtime_s=1, max_total_time_s=-1), "Targets.max_total_time_s"),
    (dict(max_downtime_s=1, max_bandwidth_bytes_per_s=0), "Targets.max_bandwidth_bytes_per_s"),
    (dict(max_downtime_s=1, objective="fastest"), "Targets.objective"),
])
def test_bad_targets_name_the_field(kw, fld):
    with pytest.raises(KpiInputError) as ei:
        Targets(**kw)
    assert ei.value.field == fld


def test_bad_round_stats_and_codec():
    with pytest.raises(KpiInputError, match="RoundStats.duration_s"):
        RoundStats(0, -1.0, 1, 1, 1)
    with pytest.raises(KpiInputError, match="RoundStats.dirty_pages: is NaN"):
        RoundStats(0, 1.0, 1, 1, math.nan)
    with pytest.raises(KpiInputError, match="RoundStats.transfer_s"):
        RoundStats(0, 1.0, 1, 1, 1, transfer_s=2.0)
    with pytest.raises(KpiInputError, match="Codec.ratio"):
        Codec("lz4", 0.0, 1e9)
    with pytest.raises(KpiInputError, match="Observations.codecs"):
        obs(codecs=(Codec("lz4", 2, 1e9), Codec("lz4", 3, 1e9)))
    assert Targets(1.0).max_total_time_s == math.inf
    assert Weights(per_gib_sent=1).cost(1.0, 2.0, 2 * 2**30) == 1.0 + 2.0


# ---------------------------------------------------------------- hand-worked model cases

def test_round_and_downtime_hand_worked():
    # N = 1000 pages, 1000 pages/s link, d = 100 pages/s over W = N:
    # round 0 takes 1 s, dirties 1000 * (1 - e^-0.1) = 95.1626 pages;
    # downtime = 0.1 (dump) + 95.1626 / 1000 (copy) + 0.2 (restore) = 0.395163 s.
    m = CostModel(obs())
    assert m.round_time(1000, "none", m.bandwidth) == pytest.approx(1.0)
    x1 = m.dirty_pages(1.0)
    assert x1 == pytest.approx(1000 * (1 - math.exp(-0.1)))
    assert m.downtime(x1, "none", m.bandwidth) == pytest.approx(0.3 + 0.0951626, rel=1e-6)
    opts = m.lookahead(1000, "none", m.bandwidth, max_rounds=2)
    cold, one = opts[0], opts[1]
    assert cold.downtime_s == pytest.approx(0.1 + 1.0 + 0.2)
    assert cold.total_time_s == cold.downtime_s and cold.wire_bytes == 1000 * 4096
    assert one.total_time_s == pytest.approx(1.0 + 0.3 + x1 / 1000, rel=1e-6)
    assert one.wire_bytes == pytest.approx((1000 + x1) * 4096)
    # round 1 takes x1/1000 s and dirties 1000 * (1 - exp(-0.1 * 0.0951626)) = 9.47 pages
    two = opts[2]
    x2 = 1000 * (1 - math.exp(-0.1 * x1 / 1000))
    assert two.final_pages == pytest.approx(x2)
    assert two.downtime_s == pytest.approx(0.3 + x2 / 1000)


def test_per_mib_costs_and_floor():
    m = CostModel(obs(dump_s_per_mib=0.01, restore_s_per_mib=0.02, rtt_s=0.005))
    # 256 pages = 1 MiB: dump 0.1 + 0.01, copy 0.256 s, rtt, restore 0.2 + 0.02 * 3.90625 MiB
    dt = m.downtime(256, "none", m.bandwidth)
    assert dt == pytest.approx(0.1 + 0.01 + 0.256 + 0.005 + 0.2 + 0.02 * 1000 * 4096 / MIB)
    assert m.downtime_floor() == pytest.approx(0.1 + 0.005 + 0.2 + 0.02 * 1000 * 4096 / MIB)


def test_codec_throughput_and_choice():
    # 1 MB/s link; lz4 3x at 2 MB/s encode -> 2 MB/s raw; zstd 4x at 0.5 MB/s -> 0.5 MB/s
    o = obs(bandwidth_bytes_per_s=1e6, codecs=(Codec("lz4", 3.0, 2e6), Codec("zstd", 4.0, 5e5)))
    m = CostModel(o)
    assert m.throughput("none", 1e6) == 1e6
    assert m.throughput("lz4", 1e6) == 2e6
    assert m.throughput("zstd", 1e6) == 5e5
    assert best_codec(m, 1e6) == "lz4"
    # on a 1 GB/s link neither codec keeps up: raw wins
    assert best_codec(m, 1e9) == "none"
    assert m.wire_bytes(3, "lz4") == pytest.approx(4096)


def test_working_set_bounds_the_dirty_set():
    m = CostModel(obs(working_set_pages=50, dirty_rate_pages_per_s=1000.0))
    assert m.dirty_pages(100.0) == pytest.approx(50.0)
    assert m.dirty_pages(0.001) == pytest.approx(50 * (1 - math.exp(-1000 * 0.001 / 50)))


def test_dirty_curve_calibrates_from_rounds():
    m = CostModel(obs())
    # prior: 100 writes/s over 1000 pages -> 95.16 pages in 1 s, 181.3 in 2 s
    assert m.dirty_pages(2.0) == pytest.approx(1000 * (1 - math.exp(-0.2)))
    # round 0: 2 s dirtied 300 pages, more than the prior says: the rate is refitted to
    # d = -1000 ln(1 - 0.3) / 2 = 178.34 /s and the curve passes through the point
    m.observe_round(RoundStats(0, 2.0, 1000, 4096000, 300, transfer_s=2.0), "none")
    d = -1000 * math.log(0.7) / 2
    assert m.dirty_rate == pytest.approx(d)
    p1 = 1000 * (1 - math.exp(-d / 1000))  # 163.3 pages in 1 s
    assert m.dirty_pages(2.0) == pytest.approx(300)
    assert m.dirty_pages(1.0) == pytest.approx(p1)
    # in between: linear in log-log
    slope = math.log(300 / p1) / math.log(2)
    assert m.dirty_pages(1.5) == pytest.approx(p1 * 1.5 ** slope)
    assert m.dirty_pages(4.0) == pytest.approx(300 * 2 ** slope)
    # round 1: half a second dirtied 300 pages as well: a saturated hot set; the 1 s point
    # (fewer pages over a longer window) contradicts it and goes, the curve is flat
    m.observe_round(RoundStats(1, 0.5, 300, 300 * 4096, 300, transfer_s=0.3), "none")
    assert m.dirty_pages(1.0) == pytest.approx(300)
    assert m.dirty_pages(0.25) == pytest.approx(300)
    # round 2: a writer that speeds up: 0.3 s dirtied 400 pages; older points contradict it
    m.observe_round(RoundStats(2, 0.3, 300, 300 * 4096, 400, transfer_s=0.3), "none")
    assert m.dirty_pages(0.3) == pytest.approx(400)
    assert m.dirty_pages(0.6) >= 400


def test_bandwidth_ratio_and_round_cost_calibrate():
    o = obs(bandwidth_bytes_per_s=1e6, codecs=(Codec("lz4", 2.0, 1e9),))
    m = CostModel(o)
    # 1000 pages raw = 4,096,000 B sent as 1,365,333 B (3x) in 2 s of transfer: link 682,667 B/s
    m.observe_round(RoundStats(0, 2.5, 1000, 1365333, 10, transfer_s=2.0), "lz4")
    assert m.codecs["lz4"][0] == pytest.approx(0.5 * 2.0 + 0.5 * 3.0, rel=1e-5)
    assert m.bandwidth == pytest.approx(0.5 * 1e6 + 0.5 * 1365333 / 2.0)
    assert m.round_fixed == pytest.approx(0.25)


def test_criu_costs_least_squares():
    m = CostModel(obs())
    m.observe_dump(1 * MIB, 0.11)
    assert m.dump_fixed == pytest.approx(
        0.11
    )  # one sample: keeps the slope (0), moves the intercept
    m.observe_dump(11 * MIB, 0.21)
    assert m.dump_fixed == pytest.approx(0.1) and m.dump_per_byte * MIB == pytest.approx(0.01)
    m.observe_criu_dump_stats({"frozen_time": 160000, "pages_written": 6 * 256})
    assert m.dump_fixed == pytest.approx(0.1, abs=1e-9) and m.dump_per_byte * MIB == pytest.approx(
        0.01
    )
    with pytest.raises(KpiInputError, match="stats-dump.frozen_time"):
        m.observe_criu_dump_stats({"pages_written": 1})
    m.observe_restore(4 * MIB, 0.3)
    assert m.restore_fixed == pytest.approx(0.3)
