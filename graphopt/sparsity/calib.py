"""Calibration capture of weight layers' input Grams (``graphopt.data.calibration.capture`` with
a ``GramAccumulator``).

1. Inputs that are graph inputs are read from the feeds directly.
2. Padding is not data: when a feed has a 2-D attention mask (an input named ``*mask*``) and
   a captured activation starts with the same [batch, seq] dims, only the rows of real
   tokens (mask != 0) enter the Gram. Batches padded to their longest sentence hold many
   padding rows whose activations no real input produces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from graphopt.data.calibration import capture
from graphopt.data.gram import prefix_model
from ..errors import InputSpecError
from .gram import GramAccumulator
from .layers import WeightLayer


def token_mask(feed: Mapping[str, np.ndarray]) -> np.ndarray | None:
    for name, value in feed.items():
        value = np.asarray(value)
        if "mask" in name.lower() and value.ndim == 2:
            return value != 0
    return None


class _RealTokens:
    """Wraps the accumulator: the k-th tensor of a name comes from feed k (``capture`` runs
    the feeds in order for every chunk of names)."""

    def __init__(self, acc: GramAccumulator, masks: list[np.ndarray | None]):
        self.acc, self.masks, self.seen = acc, masks, {}

    def __call__(self, name: str, value: np.ndarray) -> None:
        k = self.seen.get(name, 0)
        self.seen[name] = k + 1
        mask = self.masks[k] if k < len(self.masks) else None
        value = np.asarray(value)
        if mask is not None and value.ndim == 3 and value.shape[:2] == mask.shape:
            value = value[mask][None]
        self.acc(name, value)


def capture_grams(model: onnx.ModelProto, layers: Sequence[WeightLayer],
                  feeds: Sequence[Mapping[str, np.ndarray]], *,
                  diagonal_only: bool = False) -> GramAccumulator:
    acc = GramAccumulator(list(layers), diagonal_only=diagonal_only)
    if not feeds:
        raise InputSpecError("sparsify needs calibration inputs for its statistics")
    reducer = _RealTokens(acc, [token_mask(f) for f in feeds])
    graph_inputs = {i.name for i in model.graph.input}
    direct = [t for t in acc.tensors if t in graph_inputs]
    inner = [t for t in acc.tensors if t not in graph_inputs]
    for feed in feeds:
        for t in direct:
            if t not in feed:
                raise InputSpecError(f"calibration inputs lack '{t}'")
            reducer(t, feed[t])
    if inner:
        capture(prefix_model(model, inner), feeds, inner, reducer)
    return acc


def chunks_by_gram_bytes(layers: Sequence[WeightLayer], max_bytes: int = 256 * 2**20
                         ) -> list[list[WeightLayer]]:
    """``layers`` (in order) in chunks whose float64 Grams fit ``max_bytes`` together (at
    least one layer a chunk): capturing a chunk at a time bounds memory."""
    from .gram import gram_key

    out: list[list[WeightLayer]] = [[]]
    seen: set[tuple] = set()
    used = 0
    for layer in layers:
        key = gram_key(layer)
        size = 0 if key in seen else 8 * layer.columns ** 2
        if out[-1] and used + size > max_bytes:
            out.append([])
            seen, used = set(), 0
            size = 8 * layer.columns ** 2
        out[-1].append(layer)
        seen.add(key)
        used += size
    return [c for c in out if c]


def capture_pair_grams(model: onnx.ModelProto, reference: onnx.ModelProto,
                       layers: Sequence[WeightLayer],
                       feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[tuple, "PairGram"]:
    """``PairGram`` per distinct layer input: each feed runs through ``model`` and
    ``reference`` (same graph, other weights) and the layer inputs of both are paired row by
    row (real tokens only, as above)."""
    from graphopt.data.calibration import _session_with_outputs
    from .gram import PairGram, gram_key, input_rows

    by_key: dict[tuple, WeightLayer] = {}
    for layer in layers:
        by_key.setdefault(gram_key(layer), layer)
    names = list(dict.fromkeys(layer.activation for layer in by_key.values()))
    graph_inputs = {i.name for i in model.graph.input}
    inner = [t for t in names if t not in graph_inputs]
    sessions = [_session_with_outputs(prefix_model(m, inner), inner, ("CPUExecutionProvider",))
                for m in (model, reference)] if inner else []
    out: dict[tuple, PairGram] = {key: PairGram() for key in by_key}
    for feed in feeds:
        mask = token_mask(feed)
        values = []
        for session in sessions:
            wanted = {i.name for i in session.get_inputs()}
            got = session.run(inner, {k: v for k, v in feed.items() if k in wanted})
            values.append(dict(zip(inner, got)))
        for key, layer in by_key.items():
            pair = []
            for k in range(2):
                v = np.asarray(feed[layer.activation] if layer.activation in graph_inputs
                               else values[k][layer.activation])
                if mask is not None and v.ndim == 3 and v.shape[:2] == mask.shape:
                    v = v[mask][None]
                pair.append(list(input_rows(layer, v)))
            for x, r in zip(*pair):
                out[key].add(x, r)
    return out
