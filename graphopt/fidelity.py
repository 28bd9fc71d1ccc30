"""Fidelity of a lossy run, measured on data the passes did not see.

1. ``split_holdout(feeds, fraction)``: the last ``ceil(fraction × n)`` calibration feeds
   are kept apart for validation (at least one feed stays for calibration); a single feed
   is split along its batch axis when every input has the same batch of 2 or more.
2. ``measure(original, optimized, feeds, source)``: per output, the cosine of the
   flattened outputs and the top-1 agreement where an output has classes
   (``graphopt.runtime.validate``); per-token outputs of a model with an attention mask are
   compared on real tokens only. With ``latency=True`` also the latency ratio of the
   optimized model to the original, A/B interleaved (``graphopt.runtime.benchmark``).
3. ``not_measured(reason)``: what the report says when there was no data to measure on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from .ir.model import Opened

Feed = Mapping[str, np.ndarray]


def split_holdout(feeds: Sequence[Feed], fraction: float
                  ) -> tuple[list[dict], list[dict]]:
    """(calibration, held-out) feeds; held-out is empty when nothing can be spared."""
    feeds = [dict(f) for f in feeds]
    if fraction <= 0 or not feeds:
        return feeds, []
    if len(feeds) >= 2:
        held = min(max(1, math.ceil(fraction * len(feeds))), len(feeds) - 1)
        return feeds[:-held], feeds[-held:]
    feed = feeds[0]
    batches = {np.shape(v)[0] if np.ndim(v) else 0 for v in feed.values()}
    if len(batches) != 1 or (batch := batches.pop()) < 2:
        return feeds, []
    held = min(max(1, math.ceil(fraction * batch)), batch - 1)
    return ([{k: v[:-held] for k, v in feed.items()}],
            [{k: v[-held:] for k, v in feed.items()}])


def check_feeds_match(model: onnx.ModelProto, feeds: Sequence[Feed], what: str) -> None:
    """Every feed has every model input, with the input's rank, element type and fixed
    dims: else one ``InputSpecError`` naming the first mismatch (raised before any pass
    runs; onnxruntime would refuse the feed mid-run)."""
    from .errors import InputSpecError
    from .ir.inputs import input_specs

    specs = input_specs(model)
    if not feeds:
        raise InputSpecError(f"{what} data holds no input sets")
    for i, feed in enumerate(feeds):
        missing = [s.name for s in specs if s.name not in feed]
        if missing:
            raise InputSpecError(
                f"{what} input set {i} lacks {', '.join(missing)} (model inputs: "
                f"{', '.join(s.name for s in specs)}; it has {', '.join(sorted(feed)) or 'none'})")
        for s in specs:
            value = np.asarray(feed[s.name])
            if value.ndim != len(s.dims):
                raise InputSpecError(
                    f"{what} input set {i}: '{s.name}' has rank {value.ndim}, the "
                    f"model takes rank {len(s.dims)}")
            if value.dtype != s.dtype:
                raise InputSpecError(
                    f"{what} input set {i}: '{s.name}' is {value.dtype}, the model takes "
                    f"{s.dtype}")
            fixed = [(k, d, n) for k, (d, n) in enumerate(zip(s.dims, value.shape))
                     if isinstance(d, int) and d > 0 and d != n]
            if fixed:
                k, d, n = fixed[0]
                raise InputSpecError(
                    f"{what} input set {i}: '{s.name}' has {n} on axis {k}, the model takes "
                    f"{d} there (shape {list(value.shape)})")


def _mask_input(model: onnx.ModelProto, feed: Feed) -> str | None:
    for vi in model.graph.input:
        value = feed.get(vi.name)
        if value is not None and "mask" in vi.name.lower() and np.ndim(value) == 2 and \
                np.issubdtype(np.asarray(value).dtype, np.integer):
            return vi.name
    return None


def measure(original: onnx.ModelProto | Opened, optimized: onnx.ModelProto, feeds: Sequence[Feed],
            source: str, *, latency: bool = False, provider: str = "cpu",
            input_shapes=None) -> dict[str, Any]:
    """``original``: a ModelProto, or a file opened by ``ir.model.open_for_run``."""
    from .ir.model import open_for_run
    from .runtime.validate import validate

    feeds = list(feeds)
    original = open_for_run(original)
    mask = _mask_input(original.model, feeds[0])
    result = validate(original, optimized, feeds, input_shapes=input_shapes, mask=mask)
    outputs = [{"name": o["name"], "cosine": o["cosine"], "top1_agreement": o["top1_agreement"],
                "max_abs": o["max_abs"]} for o in result.to_dict()["outputs"]]
    out: dict[str, Any] = {"measured": True, "data": source, "feeds": len(feeds),
                           "outputs": outputs, "mask": mask}
    if latency:
        out["latency_ratio"] = latency_ratio(original, optimized, feeds[0], provider)
    return out


def latency_ratio(original: onnx.ModelProto | Opened, optimized: onnx.ModelProto, feed: Feed,
                  provider: str = "cpu") -> float:
    """Latency of ``optimized`` over ``original`` on one feed, A/B interleaved: after one
    untimed run of each and one warm-up round (BERT-base on CPU: the round after the
    untimed run was 3-5 % slow, the ones after it not; three were run before), rounds until
    each model has ``LATENCY_TIME`` seconds of timed runs, at least ``LATENCY_ROUNDS`` of
    them: a 1 ms model gets hundreds of rounds, a 0.5 s one ten. Ten, not fewer: on
    BERT-base (batch 16, 2 cores, quiet) the ratio of 5-round windows spread by sd 0.016
    against 0.010 for 10, and at load 4-5 one 5-round figure came out 0.233 where the ratio
    is ~0.50 (benchmarks/README.md, "Speed, session 9")."""
    from .ir.model import open_for_run
    from .runtime.benchmark import benchmark

    return benchmark(optimized, vs=open_for_run(original), provider=provider, feeds=feed,
                     warmup=1, rounds=LATENCY_ROUNDS, min_time=LATENCY_TIME).ratio


#: ``latency_ratio``'s budget: seconds of timed runs per model, and the fewest rounds.
LATENCY_TIME = 0.5
LATENCY_ROUNDS = 10


def not_measured(reason: str) -> dict[str, Any]:
    return {"measured": False, "reason": reason}
