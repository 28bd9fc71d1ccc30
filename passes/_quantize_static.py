"""``quantize:mode=static``'s calls into onnxruntime's ``quantize_static`` (no pass here).

1. Options map onto onnxruntime's own: ``calibrate`` (MinMax, Entropy, Percentile with
   ``percentile``), ``activations``/``weights`` (QInt8 or QUInt8), ``per_channel``,
   ``format`` (QDQ, or QOperator: QLinearConv/QLinearMatMul written out), and its
   ``extra_options``: ``ActivationSymmetric`` (``act_symmetric``), ``WeightSymmetric``
   (``weight_symmetric``), ``CalibMovingAverage`` (``moving_average``), ``CalibPercentile``,
   ``MatMulConstBOnly`` (always: a transformer with every activation quantized, Softmax and
   LayerNorm inputs included, falls apart).
2. Calibration runs once: the ranges go to onnxruntime's calibration cache
   (``calibration_cache_path``, a JSON file in the pass's temporary folder), and every later
   ``quantize_static`` call reads them from there instead of running the feeds again.
3. ``keep_float`` for static: each candidate node is quantized alone (every other candidate
   in ``nodes_to_exclude``) with the cached ranges, and ``quantize._sensitivity`` measures
   the output damage. PP-OCRv4's detector (benchmarks/FRONTIER.md) loses most in the stem
   convolutions, whose inputs are the raw image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np


class _Feeds:
    """A ``CalibrationDataReader`` over feed dicts (onnxruntime calls ``get_next`` until
    None); each feed keeps only the inputs the model reads."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]):
        self._feeds = [{k: np.asarray(v) for k, v in f.items() if k in names} for f in feeds]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _reader(feeds, names):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Feeds, CalibrationDataReader):
        pass

    return Reader(feeds, names)



def static_kwargs(cfg) -> dict:
    """``quantize_static`` keywords for a ``QuantizeConfig`` (module doc, 1)."""
    from onnxruntime import quantization as q

    types = {"int8": q.QuantType.QInt8, "uint8": q.QuantType.QUInt8}
    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[cfg.calibrate]
    extra = {"MatMulConstBOnly": True, "ActivationSymmetric": cfg.act_symmetric,
             "WeightSymmetric": cfg.weight_symmetric, "CalibMovingAverage": cfg.moving_average}
    if cfg.calibrate == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    return dict(quant_format=q.QuantFormat.QOperator if cfg.format == "qoperator"
                else q.QuantFormat.QDQ,
                per_channel=cfg.per_channel is not False,
                activation_type=types[cfg.activations], weight_type=types[cfg.weights],
                calibrate_method=method, extra_options=extra)


def quantize_static(source, out: Path, cfg, feeds: Sequence[Mapping[str, np.ndarray]],
                    names: Sequence[str], cache: Path, common: Mapping) -> None:
    """onnxruntime's quantize_static on ``source`` into ``out``; the first call for a
    ``cache`` path calibrates on ``feeds`` and writes the ranges there, later calls read them
    (module doc, 2)."""
    from onnxruntime import quantization as q

    reader = None if cache.is_file() else _reader(feeds, names)
    q.quantize_static(source, out, reader, calibration_cache_path=cache,
                      **static_kwargs(cfg), **common)


def one_node_quantizer(source, cfg, feeds, names, cache: Path, common: Mapping
                       ) -> Callable[[str, list[str], Path], None]:
    """For ``keep_float``: ``quantize(node, others, out)`` writes ``source`` with only
    ``node`` quantized (``nodes_to_quantize``: with ``op_types`` beyond Conv/MatMul/Gemm the
    Adds and Muls stay float too, so each trial measures its node alone), from the cached
    ranges (module doc, 3)."""
    def quantize(node: str, others: list[str], out: Path) -> None:
        opts = {**common, "nodes_to_quantize": [node], "nodes_to_exclude": None}
        quantize_static(source, out, cfg, feeds, names, cache, opts)
    return quantize
