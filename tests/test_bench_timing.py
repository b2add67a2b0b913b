"""lstm_cpu.bench.timing: latency statistics and interleaved rounds (expected values by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_cpu.bench.runners.base import Runner
from lstm_cpu.bench.timing import Progress, latency_stats, time_interleaved, warm_up


def test_latency_stats_by_hand():
    # 100 calls of 1, 2, ..., 100 µs, each call 2 time steps advancing 3 streams.
    ns = np.arange(1, 101, dtype=np.int64) * 1000
    s = latency_stats(ns, steps_per_call=2, batch=3)
    assert s["calls"] == 100
    # Per step: k/2 µs. Median of 1..100 is 50.5 -> 25.25; numpy's linear p90 sits at rank
    # 0.9 * 99 = 89.1 between 90 and 91 -> 90.1 -> 45.05.
    assert s["p50_us"] == pytest.approx(25.25)
    assert s["p90_us"] == pytest.approx(45.05)
    assert s["p99_us"] == pytest.approx((99 + 0.01) / 2)
    assert (s["min_us"], s["max_us"], s["mean_us"]) == pytest.approx((0.5, 50.0, 25.25))
    total_s = 5050 * 1000 / 1e9  # sum(1..100) µs
    assert s["steps_per_s"] == pytest.approx(200 / total_s)
    assert s["samples_per_s"] == pytest.approx(600 / total_s)


class _Fake(Runner):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def make_call(self):
        return lambda: self.log.append(("call", self.name))


def test_time_interleaved_rotates_blocks_and_pins_before_each():
    log = []
    runners = [_Fake(n, log) for n in ("a", "b", "c")]
    calls = {r.name: r.make_call() for r in runners}
    # 10 calls in 3 rounds: blocks of 4, 4, 2; each block has one extra untimed call.
    out = time_interleaved(runners, calls, steps=10, rounds=3, progress=Progress(30, False, ""),
                           pin=lambda r: log.append(("pin", r.name)))
    assert {k: v.size for k, v in out.items()} == {"a": 10, "b": 10, "c": 10}
    assert all((v > 0).all() for v in out.values())
    # The order of blocks rotates by one each round; every block starts with its runner's pin.
    pins = [name for kind, name in log if kind == "pin"]
    assert pins == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    for k, (kind, name) in enumerate(log):
        if kind == "pin":
            block = []
            for kind2, name2 in log[k + 1:]:
                if kind2 == "pin":
                    break
                block.append(name2)
            assert set(block) == {name}
    calls_per_block = [4 + 1] * 6 + [2 + 1] * 3
    block_sizes = []
    for kind, _ in log:
        if kind == "pin":
            block_sizes.append(0)
        else:
            block_sizes[-1] += 1
    assert block_sizes == calls_per_block


def test_warm_up_pins_and_calls_at_least_once():
    log = []
    runners = [_Fake("a", log), _Fake("b", log)]
    calls = {r.name: r.make_call() for r in runners}
    per_call = warm_up(runners, calls, 0, pin=lambda r: log.append(("pin", r.name)))
    assert log == [("pin", "a"), ("call", "a"), ("pin", "b"), ("call", "b")]
    assert set(per_call) == {"a", "b"} and all(v > 0 for v in per_call.values())
