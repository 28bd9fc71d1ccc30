"""Latency on ONNX Runtime: one model, or two compared A/B in one process.

``benchmark(model, vs=other)`` times ``model`` (A) and ``other`` (B):

1. Both get sessions on the same provider (``cpu|cuda|tensorrt|auto``, see
   ``graphopt.runtime.providers``; ``auto`` resolves once, on A, and B uses what A got) and the
   same thread count, and run on the same inputs.
2. Each model runs once untimed (a wrong input is an ``InputSpecError`` here, not a
   crash mid-measurement), then ``warmup`` untimed rounds (at least one on TensorRT, whose
   engines are built on the first run), then timed rounds until there are ``rounds`` of
   them and each model has ``min_time`` seconds of timed runs.
3. Rounds interleave A and B in ABBA order (AB, BA, AB, ...), so slow drift such as
   thermal throttling or frequency scaling weighs on both models alike.
4. ``ratio = a.median_ms / b.median_ms``: below 1 means A (``model``) is faster than B
   (``vs``). ``graphopt bench optimized.onnx --vs original.onnx`` reads as "the optimized
   model takes 0.78x the original's time". ``ratio_error``: the relative standard error of
   the ratio, from the spread of the per-round ratios (A over B in the same round):
   1.2533 · σ / √n / median, σ = IQR / 1.349 (the median's standard error under a normal
   spread, robust to a few outlier rounds). It is the noise within one run; drift between
   separate runs comes on top.
5. On CUDA/TensorRT inputs are copied to the device once and outputs stay there
   (ORT I/O binding), so timings are the model's compute, not host-device copies.

Native TensorRT (the ``tensorrt`` package) lives in ``graphopt.runtime.trt``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt.errors import ConfigError, InputSpecError
from graphopt.ir.inputs import Shape, generate_inputs, resolve_shapes
from graphopt.ir.model import ModelLike, Opened, open_for_run
from graphopt.runtime.providers import SHORT_NAMES, ProviderOptions, create_session
from graphopt.runtime.validate import check_feeds, check_same_inputs

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
Timer = Callable[[], float]

MAX_ROUNDS = 100_000  # a stop for min_time on a model that takes (almost) no time


@dataclass
class LatencyStats:
    """Latency of one model over its timed runs, in milliseconds."""

    label: str
    runs: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float

    @classmethod
    def from_seconds(cls, label: str, times: Sequence[float]) -> LatencyStats:
        if not times:
            raise ValueError("no timed runs")
        ms = np.asarray(times, dtype=np.float64) * 1e3
        return cls(
            label=label,
            runs=int(ms.size),
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
            std_ms=float(ms.std()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "runs": self.runs, "median_ms": self.median_ms,
            "p90_ms": self.p90_ms, "mean_ms": self.mean_ms, "min_ms": self.min_ms,
            "max_ms": self.max_ms, "std_ms": self.std_ms,
        }


@dataclass
class BenchmarkResult:
    """``a`` is the benchmarked model, ``b`` the ``vs`` model (None without one).

    ``ratio = a.median_ms / b.median_ms`` (below 1: A is faster); None without B.
    ``provider`` is what ran (``auto`` resolved); ``session_providers`` lists the ORT
    providers of A's session, best first.
    """

    a: LatencyStats
    b: LatencyStats | None
    provider: str
    session_providers: list[str] = field(default_factory=list)
    threads: int | None = None
    input_shapes: dict[str, Shape] = field(default_factory=dict)
    warmup: int = 0
    rounds: int = 0
    interleaved: bool = False
    notes: list[str] = field(default_factory=list)
    ratio_error: float | None = None

    @classmethod
    def from_rounds(cls, stats: Sequence[LatencyStats], times: Sequence[Sequence[float]], *,
                    provider: str, session_providers: list[str], threads: int | None,
                    shapes: Mapping[str, Shape], warmup: int, notes: list[str]
                    ) -> BenchmarkResult:
        """A (and B when two models ran) from interleaved rounds."""
        return cls(a=stats[0], b=stats[1] if len(stats) > 1 else None, provider=provider,
                   session_providers=session_providers, threads=threads,
                   input_shapes=dict(shapes), warmup=warmup, rounds=len(times[0]),
                   interleaved=len(stats) > 1, notes=notes,
                   ratio_error=round_ratio_error(times[0], times[1]) if len(times) > 1
                   else None)

    @property
    def ratio(self) -> float | None:
        if self.b is None or self.b.median_ms <= 0:
            return None
        return self.a.median_ms / self.b.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "session_providers": list(self.session_providers),
            "threads": self.threads,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "warmup": self.warmup,
            "rounds": self.rounds,
            "interleaved": self.interleaved,
            "a": self.a.to_dict(),
            "b": self.b.to_dict() if self.b is not None else None,
            "ratio": self.ratio,
            "ratio_definition": "a.median_ms / b.median_ms (below 1: a is faster)",
            "ratio_error": self.ratio_error,
            "notes": list(self.notes),
        }


def round_ratio_error(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Relative standard error of the median of the per-round ratios ``a[i] / b[i]``
    (module doc, 4); None with fewer than 2 rounds."""
    r = np.asarray([x / y for x, y in zip(a, b) if y > 0])
    if len(r) < 2 or np.median(r) <= 0:
        return None
    q1, q3 = np.percentile(r, [25, 75])
    return float(1.2533 * (q3 - q1) / 1.349 / np.sqrt(len(r)) / np.median(r))


# --------------------------------------------------------------------------- timing core


def round_order(n: int, round_index: int) -> list[int]:
    """Which runner goes when in one round: ABBA interleaving (forward, then reversed)."""
    order = list(range(n))
    return order if round_index % 2 == 0 else order[::-1]


def interleaved_times(
    runners: Sequence[Callable[[], Any]],
    *,
    warmup: int = 5,
    rounds: int = 20,
    min_time: float = 0.0,
    timer: Timer = time.perf_counter,
) -> list[list[float]]:
    """Seconds per timed run for each runner, rounds interleaved (``round_order``).

    ``warmup`` untimed rounds first; then timed rounds until there are ``rounds`` of them
    and every runner has ``min_time`` seconds of timed runs (at most ``MAX_ROUNDS``).
    """
    n = len(runners)
    for i in range(warmup):
        for k in round_order(n, i):
            runners[k]()
    times: list[list[float]] = [[] for _ in range(n)]
    totals = [0.0] * n
    i = 0
    while i < rounds or min(totals) < min_time:
        for k in round_order(n, i):
            start = timer()
            runners[k]()
            elapsed = timer() - start
            times[k].append(elapsed)
            totals[k] += elapsed
        i += 1
        if i >= MAX_ROUNDS:
            logger.warning("stopped after %d rounds before reaching min_time", i)
            break
    return times


# --------------------------------------------------------------------------- ORT runners


def _runner(session, feed: Feed, provider: str, device_id: int) -> Callable[[], Any]:
    wanted = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in wanted}
    if provider == "cpu":
        return lambda: session.run(None, feed)
    import onnxruntime as ort

    binding = session.io_binding()
    device_values = []
    for name, value in feed.items():
        ort_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda",
                                                     device_id)
        device_values.append(ort_value)
        binding.bind_ortvalue_input(name, ort_value)
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", device_id)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run.device_values = device_values  # type: ignore[attr-defined]  # keep device copies alive
    return run


def _check_run(runner: Callable[[], Any], label: str) -> None:
    try:
        runner()
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise InputSpecError(
            f"onnxruntime failed to run {label} on the inputs: {first} (check --input-shape "
            "or the inputs file)"
        ) from exc


def pick_feed(
    model: onnx.ModelProto,
    feeds: Sequence[Feed] | Feed | None,
    input_shapes: Mapping[str, Shape] | None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, Shape]]:
    """The one feed a benchmark runs on: the first given, else a generated one."""
    if feeds is None:
        return generate_inputs(model, input_shapes, seed=seed), resolve_shapes(model,
                                                                              input_shapes)
    feed_list = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    if not feed_list:
        raise InputSpecError("no input sets given; pass at least one feed dict")
    check_feeds(model, feed_list[:1])
    feed = dict(feed_list[0])
    return feed, {k: tuple(np.shape(v)) for k, v in feed.items()}


def check_timing_args(warmup: int, rounds: int, min_time: float) -> None:
    if warmup < 0:
        raise ConfigError(f"warmup must be 0 or more, got {warmup}")
    if rounds < 1:
        raise ConfigError(f"rounds must be 1 or more, got {rounds}")
    if min_time < 0:
        raise ConfigError(f"min_time must be 0 or more seconds, got {min_time}")


def benchmark(
    model: ModelLike | Opened,
    *,
    vs: ModelLike | Opened | None = None,
    provider: str = "cpu",
    input_shapes: Mapping[str, Shape] | None = None,
    feeds: Sequence[Feed] | Feed | None = None,
    warmup: int = 5,
    rounds: int = 20,
    threads: int | None = None,
    trt_fp16: bool = False,
    trt_cache: str | os.PathLike | None = None,
    trt_sparse: bool = False,
    min_time: float = 1.0,
    seed: int = 0,
    timer: Timer = time.perf_counter,
) -> BenchmarkResult:
    """Time ``model`` (A), and ``vs`` (B) interleaved with it; see the module doc.

    ``feeds``: a feed dict or a list of them (the first is used); None generates one from
    A's input specs and ``input_shapes``. ``threads``: ``intra_op_num_threads``.
    ``trt_fp16``/``trt_cache``/``trt_sparse``: TensorRT EP FP16, engine cache folder and
    sparse weights (2:4 sparse tactics).
    ``timer`` is injectable for tests.
    """
    check_timing_args(warmup, rounds, min_time)
    options = ProviderOptions(
        threads=threads, trt_fp16=trt_fp16, trt_sparse=trt_sparse,
        trt_cache=os.fspath(trt_cache) if trt_cache is not None else None,
    )
    # A model file over 2 GB stays on disk (its outline here, onnxruntime reads the file).
    a = open_for_run(model, "model")
    a_model, a_label, a_run = a.model, a.label, a.runnable
    b_model = b_label = b_run = None
    if vs is not None:
        b = open_for_run(vs, "vs")
        b_model, b_label, b_run = b.model, b.label, b.runnable
        check_same_inputs(a_model, b_model, "model", "--vs model")
    feed, shapes = pick_feed(a_model, feeds, input_shapes, seed)

    a_session, resolved = create_session(a_run, provider, options, label=a_label)
    sessions = [(a_session, a_label)]
    if b_model is not None:
        b_session, _ = create_session(b_run, resolved, options, label=b_label)
        sessions.append((b_session, b_label))
    runners = [_runner(s, feed, resolved, options.device_id) for s, _ in sessions]
    for runner, (_, label) in zip(runners, sessions):
        _check_run(runner, label)
    if resolved == "tensorrt":
        warmup = max(warmup, 1)
    logger.info("benchmarking on %s: %d warm-up, %d+ rounds", resolved, warmup, rounds)
    times = interleaved_times(runners, warmup=warmup, rounds=rounds, min_time=min_time,
                              timer=timer)
    stats = [LatencyStats.from_seconds(label, t) for (_, label), t in zip(sessions, times)]
    notes = []
    if resolved != "cpu":
        notes.append("inputs placed on the device once; timings exclude host-device copies")
    if provider == "auto" and resolved != "tensorrt":
        notes.append(f"auto resolved to {resolved}")
    return BenchmarkResult.from_rounds(
        stats, times, provider=resolved,
        session_providers=[SHORT_NAMES.get(p, p) for p in a_session.get_providers()],
        threads=threads, shapes=shapes, warmup=warmup, notes=notes)


__all__ = [
    "BenchmarkResult", "LatencyStats", "benchmark", "interleaved_times", "round_order",
    "round_ratio_error",
]
