"""How much a model downsamples its inputs: the multiple a free spatial side must be.

A CNN with a stride-32 backbone and skip connections (a U-Net, an FPN, PP-OCR's DB
detector) runs only at sides divisible by 32: at 16 the deepest map rounds to 1, its 2×
upsample is 2 and the skip it is added to is 1 ("Add: broadcast 2 by 4"). ``spatial_strides``
walks the graph once in its stored order:

1. each tensor carries one stride per spatial axis (the axes after batch and channels);
2. Conv, ConvTranspose's inverse, pooling and their quantized forms multiply it by their
   ``strides``; Resize and Upsample with constant ``scales`` divide it by their spatial
   factors (``sizes`` or computed scales leave it as it is); ConvTranspose divides by its
   ``strides``;
3. any other node's output carries the largest stride of its inputs, per axis;
4. the result is, per axis, the largest stride any tensor reached (at least 1, at most
   1024): sides that are multiples of it divide exactly at every depth.

``free_dim_multiple(strides, rank, axis)`` is what ``graphopt.ir.inputs`` rounds a generated
dynamic dim up to: the stride of spatial axis ``axis - 2`` for inputs of rank 3 and more
(``[N, C, L]``, ``[N, C, H, W]``, ...), 1 for every other axis.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from graphopt.ir.graph import GraphIndex, attr

_DOWN = {"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
         "NhwcConv", "FusedConv"}
_UP = {"ConvTranspose"}
_RESIZE = {"Resize": 2, "Upsample": 1}  # op -> input slot of ``scales``
_LIMIT = 1024


def _value(idx: GraphIndex, name: str) -> np.ndarray | None:
    t = idx.initializers.get(name)
    if t is not None and t.data_location == onnx.TensorProto.EXTERNAL:
        return None  # an outline: the bytes stay on disk
    try:
        return idx.value(name)
    except Exception:  # noqa: BLE001 - an outline without its bytes
        return None


def spatial_strides(model: onnx.ModelProto) -> tuple[int, ...]:
    """The largest stride each spatial axis reaches (module doc); ``()`` without strides."""
    idx = GraphIndex(model.graph, model.ir_version)
    stride: dict[str, tuple[float, ...]] = {}
    best: list[float] = []

    def widest(values):
        width = max((len(v) for v in values), default=0)
        return tuple(max((v[i] for v in values if i < len(v)), default=1.0)
                     for i in range(width))

    for node in model.graph.node:
        here = list(widest([stride[i] for i in node.input if i in stride]))
        factors: list[float] = []
        if node.op_type in _DOWN:
            factors = [float(s) for s in attr(node, "strides", [])]
        elif node.op_type in _UP:
            factors = [1.0 / s for s in attr(node, "strides", []) if s > 0]
        elif node.op_type in _RESIZE and len(node.input) > _RESIZE[node.op_type]:
            scales = _value(idx, node.input[_RESIZE[node.op_type]])
            if scales is not None and scales.size > 2 and np.all(scales > 0):
                factors = [1.0 / float(s) for s in scales.ravel()[2:]]
        if factors:
            here += [1.0] * (len(factors) - len(here))
            here = [h * f for h, f in zip(here, factors)] + here[len(factors):]
        if not here:
            continue
        for out in node.output:
            stride[out] = tuple(here)
        best += [1.0] * (len(here) - len(best))
        best = [max(b, h) for b, h in zip(best, here)] + best[len(here):]
    return tuple(min(_LIMIT, max(1, math.ceil(b - 1e-6))) for b in best)


def total_stride(model: onnx.ModelProto) -> int:
    """The largest stride of any spatial axis (at least 1)."""
    return max(spatial_strides(model), default=1)


def free_dim_multiple(strides: tuple[int, ...], rank: int, axis: int) -> int:
    """The multiple a generated dynamic dim ``axis`` of a rank-``rank`` input is rounded to."""
    if rank >= 3 and axis >= 2 and axis - 2 < len(strides):
        return strides[axis - 2]
    return 1
