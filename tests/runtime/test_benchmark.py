"""graphopt.benchmark: ORT latency, A/B interleaving and the ratio's direction.

No assertion depends on real timings: structure and counts on real CPU sessions, order and
arithmetic through fake runners and an injected clock.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.runtime.benchmark import (
    BenchmarkResult,
    LatencyStats,
    benchmark,
    interleaved_times,
    round_order,
    round_ratio_error,
)
from graphopt.errors import ConfigError, InputSpecError, ProviderError
from graphopt.testing import make_model

pytestmark = pytest.mark.filterwarnings("ignore:Specified provider")


def _model(hidden: int = 16, input_name: str = "x"):
    """x[batch, 8] -> MatMul -> Relu -> y."""
    w = np.random.default_rng(hidden).standard_normal((8, hidden)).astype(np.float32)
    nodes = [helper.make_node("MatMul", [input_name, "W"], ["h"]),
             helper.make_node("Relu", ["h"], ["y"])]
    return make_model(nodes, {input_name: ["batch", 8]}, ["y"], {"W": w})


class _Clock:
    """A fake clock: runners advance it, the benchmark reads it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cpu_single_model_structure():
    """One model on CPU: stats for A only, positive numbers, runs == rounds, no ratio."""
    result = benchmark(_model(), warmup=1, rounds=4, min_time=0.0,
                       input_shapes={"x": (2, 8)})
    assert result.provider == "cpu" and result.session_providers == ["cpu"]
    assert result.b is None and result.ratio is None and not result.interleaved
    a = result.a
    assert a.runs == 4 == result.rounds and a.label == "model"
    assert 0 < a.min_ms <= a.median_ms <= a.p90_ms <= a.max_ms
    assert a.mean_ms > 0 and a.std_ms >= 0
    assert result.input_shapes == {"x": (2, 8)}
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["b"] is None and data["ratio"] is None and data["a"]["runs"] == 4


def test_ab_with_injected_timer():
    """With vs, both models get the same number of runs; a timer ticking 1 ms per call gives
    medians of exactly 1 ms and a ratio of 1."""
    ticks = iter(range(10_000))
    result = benchmark(_model(16), vs=_model(32), warmup=0, rounds=5, min_time=0.0,
                       timer=lambda: next(ticks) * 1e-3)
    assert result.interleaved and result.b is not None
    assert result.a.runs == result.b.runs == 5
    assert result.a.median_ms == pytest.approx(1.0) and result.b.median_ms == pytest.approx(1.0)
    assert result.ratio == pytest.approx(1.0)
    assert (result.a.label, result.b.label) == ("model", "vs")


def test_ratio_is_a_over_b():
    """ratio = a.median / b.median: A twice as fast as B gives 0.5."""
    a = LatencyStats.from_seconds("a", [0.001, 0.001, 0.002])
    b = LatencyStats.from_seconds("b", [0.002, 0.002, 0.004])
    result = BenchmarkResult(a=a, b=b, provider="cpu")
    assert result.ratio == pytest.approx(0.5)
    assert "a.median_ms / b.median_ms" in result.to_dict()["ratio_definition"]


def test_ratio_error_is_the_medians_standard_error():
    """The per-round ratios' error estimates the spread of the median ratio over repeated
    runs: 4000 simulated runs of 40 rounds with 5 % noise on A's times give medians whose
    standard deviation the one-run estimate matches to within 15 % (on average over runs);
    equal rounds give 0, one round None."""
    rng = np.random.default_rng(0)
    runs = 1.0 + 0.05 * rng.standard_normal((4000, 40))
    b = [1.0] * 40
    medians = np.median(runs, axis=1)
    estimates = [round_ratio_error(list(r), b) for r in runs]
    assert np.mean(estimates) == pytest.approx(np.std(medians) / np.mean(medians), rel=0.15)
    assert round_ratio_error([2.0] * 5, [1.0] * 5) == 0.0
    assert round_ratio_error([2.0], [1.0]) is None


def test_benchmark_reports_the_ratio_error():
    """A/B rounds whose A times alternate 1 and 3 ms against B's 2 ms: per-round ratios
    0.5 / 1.5, and the result's error is that of those ratios; in the JSON too."""
    def reads():  # a timed run reads the clock at its start (0) and end (its cost)
        for cost in [1e-3, 2e-3, 2e-3, 3e-3] * 4:  # ABBA: A1 B2 | B2 A3 | ...
            yield 0.0
            yield cost

    timer = reads().__next__
    result = benchmark(_model(16), vs=_model(32), warmup=0, rounds=8, min_time=0.0,
                       timer=timer)
    ratios = [0.5, 1.5] * 4
    assert result.ratio_error == pytest.approx(round_ratio_error(ratios, [1.0] * 8))
    assert result.ratio_error > 0
    assert result.to_dict()["ratio_error"] == result.ratio_error


def test_stats_from_seconds():
    """Median, p90 (linear interpolation), mean and min come out in milliseconds."""
    stats = LatencyStats.from_seconds("m", [0.001 * k for k in range(1, 11)])
    assert stats.runs == 10 and stats.min_ms == pytest.approx(1.0)
    assert stats.median_ms == pytest.approx(5.5) and stats.mean_ms == pytest.approx(5.5)
    assert stats.p90_ms == pytest.approx(9.1)


def test_abba_interleaving_order():
    """Warm-up and timed rounds alternate AB, BA, AB, ...; each run's time is its own."""
    clock, calls = _Clock(), []

    def runner(label: str, cost: float):
        def run():
            calls.append(label)
            clock.now += cost
        return run

    times = interleaved_times([runner("A", 0.002), runner("B", 0.001)], warmup=2, rounds=3,
                              timer=clock)
    assert calls == ["A", "B", "B", "A"] + ["A", "B", "B", "A", "A", "B"]
    assert times[0] == pytest.approx([0.002] * 3) and times[1] == pytest.approx([0.001] * 3)
    assert round_order(3, 1) == [2, 1, 0]


def test_min_time_extends_rounds():
    """Rounds continue until every model has min_time seconds of timed runs."""
    clock = _Clock()

    def cost(seconds):
        def run():
            clock.now += seconds
        return run

    times = interleaved_times([cost(0.002), cost(0.001)], warmup=0, rounds=1, min_time=0.01,
                              timer=clock)
    assert len(times[0]) == len(times[1]) == 10  # B needs 10 x 1 ms


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_here_is_provider_error(provider):
    """No GPU here: cuda and tensorrt are one-line ProviderErrors naming what is available."""
    with pytest.raises(ProviderError, match="cpu"):
        benchmark(_model(), provider=provider, rounds=1, warmup=0, min_time=0.0)


def test_auto_resolves_to_cpu():
    """auto falls back silently to CPU and says so in the notes."""
    result = benchmark(_model(), provider="auto", rounds=2, warmup=0, min_time=0.0)
    assert result.provider == "cpu" and "auto resolved to cpu" in result.notes


def test_threads_and_given_feeds():
    """threads is recorded; a given feed list is used (its first feed decides the shapes)."""
    feeds = [{"x": np.ones((3, 8), np.float32)}, {"x": np.ones((5, 8), np.float32)}]
    result = benchmark(_model(), feeds=feeds, threads=1, rounds=2, warmup=0, min_time=0.0)
    assert result.threads == 1 and result.input_shapes == {"x": (3, 8)}


def test_different_inputs_refused():
    """Comparing models with different input names is an InputSpecError."""
    with pytest.raises(InputSpecError, match="different inputs"):
        benchmark(_model(), vs=_model(input_name="z"), rounds=1, min_time=0.0)


def test_wrong_feed_shape_is_input_error():
    """A feed ORT cannot run is reported before timing starts, as an InputSpecError."""
    with pytest.raises(InputSpecError, match="failed to run model"):
        benchmark(_model(), feeds={"x": np.ones((2, 3), np.float32)}, rounds=1, min_time=0.0)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"rounds": 0}, "rounds"), ({"warmup": -1}, "warmup"), ({"min_time": -1.0}, "min_time"),
    ({"threads": 0}, "threads"), ({"provider": "gpu"}, "unknown provider"),
])
def test_bad_arguments(kwargs, fragment):
    """Out-of-range options are ConfigErrors."""
    with pytest.raises(ConfigError, match=fragment):
        benchmark(_model(), **kwargs)


def test_paths_and_package_export(tmp_path):
    """Models given as paths are labelled by path; graphopt.benchmark is this function."""
    a = graphopt.save(_model(16), tmp_path / "a.onnx")
    b = graphopt.save(_model(32), tmp_path / "b.onnx")
    assert graphopt.benchmark is benchmark
    result = benchmark(a, vs=b, rounds=2, warmup=0, min_time=0.0)
    assert (result.a.label, result.b.label) == (str(a), str(b))
