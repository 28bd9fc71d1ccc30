"""Gram matrices ``XᵀX`` of weight layers' inputs, accumulated over calibration batches.

``GramAccumulator`` is a reducer for ``graphopt.data.calibration.capture``: each captured input
tensor is turned into the layer's input matrix ``X`` [rows, reduction] (the column order of
``graphopt.sparsity.layers``) and added to a running float64 ``XᵀX`` and row count, so
memory holds one batch of activations and one [K, K] matrix per distinct input, never the
activations of the calibration set.

1. MatMul/Gemm: the last axis is the feature axis; every other axis (batch, sequence) is
   rows, so 3-D ``[batch, seq, hidden]`` activations count every token (Gemm ``transA``
   inputs are transposed first).
2. Conv (group 1): im2col rows, one per output pixel, columns ordered (kernel position,
   input channel), taken one image at a time to bound the im2col buffer.
3. ``diagonal_only=True`` keeps only the column sums of squares (what Wanda reads: its
   ``‖X_j‖`` is the square root of the Gram diagonal), O(K) memory per input.

Layers reading the same tensor with the same column layout share one entry (Q, K and V of
an attention block have one Gram).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .layers import WeightLayer


def gram_key(layer: WeightLayer) -> tuple:
    """Layers with equal keys have equal input matrices."""
    if layer.op == "Conv":
        return (layer.activation, "conv", layer.kernel, layer.strides, layer.pads,
                layer.dilations)
    return (layer.activation, "T" if layer.trans_input else "")


def input_rows(layer: WeightLayer, value: np.ndarray) -> Iterable[np.ndarray]:
    """The layer's input matrix ``X`` from a captured tensor, in chunks of rows."""
    value = np.asarray(value)
    if layer.op != "Conv":
        if layer.trans_input:
            value = value.T
        yield value.reshape(-1, value.shape[-1])
        return
    for n in range(value.shape[0]):
        yield im2col(value[n], layer.kernel, layer.strides, layer.pads, layer.dilations)


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """One image [C, *spatial] -> [output pixels, prod(kernel) * C], channel fastest."""
    nd = len(kernel)
    begin, end = pads[:nd], pads[nd:]
    xp = np.pad(x, [(0, 0)] + [(b, e) for b, e in zip(begin, end)])
    out = [(xp.shape[1 + d] - dilations[d] * (kernel[d] - 1) - 1) // strides[d] + 1
           for d in range(nd)]
    cols = []
    for pos in itertools.product(*(range(k) for k in kernel)):
        sl = tuple(slice(p * dilations[d], p * dilations[d] + strides[d] * (out[d] - 1) + 1,
                         strides[d]) for d, p in enumerate(pos))
        patch = xp[(slice(None),) + sl]  # [C, *out]
        cols.append(patch.reshape(x.shape[0], -1).T)  # [pixels, C]
    return np.concatenate(cols, axis=1)


@dataclass
class Gram:
    """Running ``XᵀX`` (or only its diagonal) and the number of rows seen."""

    rows: int = 0
    xtx: np.ndarray | None = None
    sq: np.ndarray | None = None

    def add(self, x: np.ndarray, diagonal_only: bool) -> None:
        x = x.astype(np.float64, copy=False)
        self.rows += x.shape[0]
        sq = np.einsum("ij,ij->j", x, x)
        self.sq = sq if self.sq is None else self.sq + sq
        if not diagonal_only:
            g = x.T @ x
            self.xtx = g if self.xtx is None else self.xtx + g

    def norms(self) -> np.ndarray:
        """``‖X_j‖`` per column (Wanda's activation norm), over every row seen."""
        return np.sqrt(self.sq) if self.sq is not None else np.zeros(0)

    def hessian(self) -> np.ndarray:
        """``XᵀX / rows``: the layer Hessian up to a constant factor."""
        if self.xtx is None:
            raise ValueError("only the diagonal was accumulated")
        return self.xtx / max(self.rows, 1)


@dataclass
class GramAccumulator:
    """Reducer for ``capture``: ``layers`` name the tensors it accepts and how to read them."""

    layers: list[WeightLayer]
    diagonal_only: bool = False
    grams: dict[tuple, Gram] = field(default_factory=dict)

    def __post_init__(self):
        self._by_tensor: dict[str, list[WeightLayer]] = {}
        for layer in self.layers:
            self._by_tensor.setdefault(layer.activation, []).append(layer)

    @property
    def tensors(self) -> list[str]:
        return list(self._by_tensor)

    def __call__(self, name: str, value: np.ndarray) -> None:
        done = set()
        for layer in self._by_tensor.get(name, []):
            key = gram_key(layer)
            if key in done:
                continue
            done.add(key)
            gram = self.grams.setdefault(key, Gram())
            for chunk in input_rows(layer, value):
                gram.add(chunk, self.diagonal_only)

    def of(self, layer: WeightLayer) -> Gram | None:
        return self.grams.get(gram_key(layer))


@dataclass
class PairGram:
    """Grams of one layer's input in the current model (X) and in a reference model (X0)
    on the same rows: ``XᵀX``, ``XᵀX0`` and ``X0ᵀX0`` (all divided by the row count)."""

    rows: int = 0
    xx: np.ndarray | None = None
    xr: np.ndarray | None = None
    rr: np.ndarray | None = None

    def add(self, x: np.ndarray, r: np.ndarray) -> None:
        x = x.astype(np.float64, copy=False)
        r = r.astype(np.float64, copy=False)
        self.rows += x.shape[0]
        parts = (x.T @ x, x.T @ r, r.T @ r)
        if self.xx is None:
            self.xx, self.xr, self.rr = parts
        else:
            self.xx += parts[0]
            self.xr += parts[1]
            self.rr += parts[2]

    def scaled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = max(self.rows, 1)
        return self.xx / n, self.xr / n, self.rr / n
