"""How long do ``plan`` and ``on_round`` take? Target: <= 1 ms each for ``adaptive``.

The inputs are the hardest the built-ins meet in the default suite: a 4 GiB state, two
codecs besides raw (so ``adaptive`` evaluates three look-aheads of up to 30 rounds each),
and ``on_round`` late in a migration (round 5, five measured points in the dirty curve).
The four schedulers are measured side by side in one run; compare their ratios.

    .venv/bin/python -m pytest benchmarks/bench_scheduler.py --benchmark-only
"""
import pytest

from statesync import scheduler as S
from statesync.planning.kpi import Codec, Observations, RoundStats, Targets

OBS = Observations(
    state_bytes=4 << 30, dirty_rate_pages_per_s=20000.0, bandwidth_bytes_per_s=125e6,
    dump_fixed_s=0.05, dump_s_per_mib=0.002, restore_fixed_s=0.05, restore_s_per_mib=0.0001,
    round_fixed_s=0.005, rtt_s=0.001,
    codecs=(Codec("lz4", 2.0, 5e8, 3e9), Codec("zstd", 2.6, 1.5e8, 1e9)))
TARGETS = Targets(max_downtime_s=1.0, max_total_time_s=120.0)
PAGES = (4 << 30) // 4096
# a converging migration: what each round sent and left dirty
ROUNDS = [(PAGES, 36.0, 600000), (600000, 10.0, 180000), (180000, 3.1, 60000), (60000, 1.1, 22000),
          (22000, 0.45, 9000), (9000, 0.2, 4200)]
NAMES = ["adaptive", "mose", "qemu", "threshold"]


def _stats(i):
    sent, dur, dirty = ROUNDS[i]
    return RoundStats(
        index=i,
        duration_s=dur,
        pages_sent=sent,
        bytes_sent=sent * 2048,
        dirty_pages=dirty,
        transfer_s=dur * 0.98,
    )


@pytest.mark.parametrize("name", NAMES)
def test_plan(benchmark, name):
    s = S.get(name)
    plan = benchmark(s.plan, OBS, TARGETS)
    assert plan.strategy in ("cold", "precopy")


@pytest.mark.parametrize("name", NAMES)
def test_on_round(benchmark, name):
    last = len(ROUNDS) - 1

    def setup():
        s = S.get(name, max_rounds=40) if name != "mose" else S.get(name)
        s.plan(OBS, TARGETS)
        for i in range(last):
            s.on_round(_stats(i))
        return (s, _stats(last)), {}

    d = benchmark.pedantic(lambda s, r: s.on_round(r), setup=setup, rounds=300, iterations=1)
    assert d.action is not None
