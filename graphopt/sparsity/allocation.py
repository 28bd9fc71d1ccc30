"""How much sparsity each layer gets, from measurements.

1. ``measure_sensitivity``: each candidate layer is sparsified alone (by a cheap probe:
   magnitude or Wanda at the layer's own target), the model is run on the calibration
   feeds through onnxruntime, and the layer's sensitivity is the relative squared error of
   every float output, ``Σ‖y − y₀‖² / Σ‖y₀‖²``; the weight is restored afterwards.
2. ``sensitivity_ratios``: unstructured ratios that follow the measured sensitivity (the
   layer-wise allocation of OWL/DSA): layers are ranked, the most sensitive gets
   ``target − spread``, the least ``target + spread``, linearly in rank, then all are
   shifted so the parameter-weighted mean is exactly ``target``.
3. ``outlier_ratios``: OWL's allocation (Yin et al., 2024) from the layer-wise outlier
   density (share of scores above ``outlier`` × their mean): denser outliers, less sparsity.
4. ``global_ratios``: one threshold over every layer's scores, each layer's scores divided by
   their mean so layers of different scale compare.
5. ``most_sensitive``: the layers kept dense, the ``count`` most sensitive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from .layers import WeightLayer, initializers, write_weight

logger = logging.getLogger(__name__)

MAX_RATIO = 0.95


def _session(model: onnx.ModelProto):
    from graphopt.ir.model import initializer_bytes
    from graphopt.runtime.session import ort_session

    # Large models go through a temporary external-data file (one copy of the weights).
    return ort_session(model, lean=initializer_bytes(model) >= 256 * 2**20)


def run_outputs(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]
                ) -> list[list[np.ndarray]]:
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return [session.run(names, {k: v for k, v in f.items() if k in wanted}) for f in feeds]


def output_damage(reference: list[list[np.ndarray]], got: list[list[np.ndarray]],
                  feeds: Sequence[Mapping[str, np.ndarray]] | None = None) -> float:
    """``Σ‖y − y₀‖² / Σ‖y₀‖²`` over the float outputs; outputs that start with a feed's
    [batch, seq] attention mask count only at real tokens (padding outputs are not used)."""
    from graphopt.data.gram import token_mask

    num = den = 0.0
    for i, (ref_feed, got_feed) in enumerate(zip(reference, got)):
        mask = token_mask(feeds[i]) if feeds is not None else None
        for r, g in zip(ref_feed, got_feed):
            if not np.issubdtype(np.asarray(r).dtype, np.floating):
                continue
            r = np.asarray(r, dtype=np.float64)
            g = np.asarray(g, dtype=np.float64)
            if mask is not None and r.ndim >= 2 and r.shape[:2] == mask.shape:
                r, g = r[mask], g[mask]
            num += float(((g - r) ** 2).sum())
            den += float((r ** 2).sum())
    return num / den if den > 0 else num


def measure_sensitivity(model: onnx.ModelProto, layers: Sequence[WeightLayer],
                        prune: Callable[[WeightLayer, np.ndarray], np.ndarray],
                        feeds: Sequence[Mapping[str, np.ndarray]],
                        reference: list[list[np.ndarray]] | None = None) -> dict[str, float]:
    """Output damage of sparsifying each layer alone (``prune(layer, w) -> new w``)."""
    from onnx import numpy_helper

    inits = initializers(model)
    if reference is None:
        reference = run_outputs(model, feeds)
    out: dict[str, float] = {}
    for layer in layers:
        original = onnx.TensorProto()
        original.CopyFrom(inits[layer.weight])
        w = numpy_helper.to_array(original)
        try:
            write_weight(inits, layer.weight, prune(layer, w))
            out[layer.name] = output_damage(reference, run_outputs(model, feeds), feeds)
        finally:
            inits[layer.weight].CopyFrom(original)
        logger.debug("sensitivity of %s: %.3g", layer.name, out[layer.name])
    return out


def _balance(ratios: np.ndarray, params: np.ndarray, target: float) -> np.ndarray:
    """Shift ``ratios`` so their params-weighted mean is ``target``, within [0, MAX_RATIO]."""
    r = ratios.astype(np.float64)
    for _ in range(50):
        r = np.clip(r, 0.0, MAX_RATIO)
        gap = target - float((r * params).sum() / params.sum())
        if abs(gap) < 1e-6:
            break
        free = ((r > 0) | (gap > 0)) & ((r < MAX_RATIO) | (gap < 0))
        if not free.any():
            break
        r = r + gap * params.sum() / params[free].sum() * free
    return np.clip(r, 0.0, MAX_RATIO)


def sensitivity_ratios(sensitivity: Mapping[str, float], layers: Sequence[WeightLayer],
                       target: float, spread: float) -> dict[str, float]:
    names = [layer.name for layer in layers]
    if len(names) < 2:
        return {n: target for n in names}
    values = np.array([sensitivity[n] for n in names])
    rank = np.argsort(np.argsort(values, kind="stable"), kind="stable")  # 0 = least sensitive
    z = 1.0 - 2.0 * rank / (len(names) - 1)  # +1 least sensitive, -1 most
    params = np.array([layer.params for layer in layers], dtype=np.float64)
    ratios = _balance(target + spread * z, params, target)
    return dict(zip(names, ratios.tolist()))


def outlier_ratios(score_of: Mapping[str, np.ndarray], layers: Sequence[WeightLayer],
                   target: float, spread: float, outlier: float = 5.0) -> dict[str, float]:
    names = [layer.name for layer in layers]
    density = np.array([float((score_of[n] > outlier * score_of[n].mean()).mean())
                        for n in names])
    span = density.max() - density.min()
    z = (density - density.min()) / span if span > 0 else np.zeros_like(density)
    params = np.array([layer.params for layer in layers], dtype=np.float64)
    ratios = _balance(target - spread * 2 * (z - z.mean()), params, target)
    return dict(zip(names, ratios.tolist()))


def global_ratios(score_of: Mapping[str, np.ndarray], target: float) -> dict[str, float]:
    names = list(score_of)
    normalized = [score_of[n].ravel() / (score_of[n].mean() or 1.0) for n in names]
    everything = np.concatenate(normalized)
    k = int(everything.size * target)
    if k == 0:
        return {n: 0.0 for n in names}
    threshold = np.partition(everything, k - 1)[k - 1]
    return {n: min(float((v <= threshold).mean()), MAX_RATIO)
            for n, v in zip(names, normalized)}


def most_sensitive(sensitivity: Mapping[str, float], count: int) -> list[str]:
    order = sorted(sensitivity, key=lambda n: -sensitivity[n])
    return order[:count]
