"""Layer statistics for ``sparsify`` from the calibration Gram sums of ``graphopt.data.gram``.

Every criterion sees a layer's weight as ``Wt`` [outputs, reduction] in the column order of
``graphopt.sparsity.layers`` (for Conv: kernel position, then input channel, channel
fastest, so that N:M groups run along input channels as TensorRT needs). ``data.gram``
reads the same layer as a *site* whose im2col columns follow the weight's own order
(input channel, then kernel position). ``LayerStats`` holds the sums of one layer permuted
into ``Wt``'s order (``conv_columns``): nothing is accumulated twice.

1. ``layer_stats(model, layers, feeds)`` yields ``(layer, LayerStats)`` a chunk of layers at
   a time (``data.gram.chunked``: at most ``max_bytes`` of sums alive), so a caller that
   uses and drops each bounds memory. Layers reading the same input with the same geometry
   share one capture when no targets are asked for (Q, K and V of an attention block).
2. With ``reference`` (the original model), ``xt`` is ``Xᵀ(T − b)`` with T the layer's
   output in the reference on the same feeds and b the layer's bias (Gemm/Conv): what the
   error-correcting refit toward the original's outputs needs.
3. Grouped convolutions (``group`` > 1, depthwise included), which ``data.gram`` does not
   read as sites: group g's input channels form an independent layer, so the Gram is block
   diagonal and only the G blocks are accumulated, from ``data.gram.im2col`` of one image
   at a time; ``h`` is then [G, K_g, K_g]. No targets (the refit is not done for them).
4. Padding tokens (attention mask 0) are left out, as ``data.gram`` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.data.calibration import capture
from graphopt.data.gram import (
    LinearSite,
    accumulate,
    chunked,
    im2col,
    site_dims,
    site_for,
)
from graphopt.data.segments import prefix_model
from graphopt.errors import InputSpecError

from .layers import WeightLayer, initializers

Feed = Mapping[str, np.ndarray]


@dataclass
class LayerStats:
    """Gram sums of one layer in ``Wt``'s column order, divided by the row count ``n``.

    ``h`` = XᵀX/n ([K, K], or [G, K_g, K_g] for a grouped conv); with targets (module doc,
    2) ``xt`` = Xᵀ(T − b)/n [K, N], ``tt`` = ‖T − b‖²/n, and the means ``mean_x`` [K] of the
    inputs and ``mean_t`` [N] of T − b."""

    h: np.ndarray
    n: int
    xt: np.ndarray | None = None
    tt: float = 0.0
    mean_x: np.ndarray | None = None
    mean_t: np.ndarray | None = None

    def norms(self) -> np.ndarray:
        """‖X_j‖ per column over every row (Wanda); [G, K_g] for a grouped conv."""
        return np.sqrt(np.maximum(np.diagonal(self.h, axis1=-2, axis2=-1), 0) * self.n)


def conv_columns(channels: int, positions: int) -> np.ndarray:
    """``perm`` with ``Wt`` column j = im2col column ``perm[j]``: Wt orders (position,
    channel), im2col (channel, position)."""
    return np.arange(channels * positions).reshape(channels, positions).T.reshape(-1)


def site_of(model: onnx.ModelProto, layer: WeightLayer) -> tuple[LinearSite | None, str | None]:
    """The ``data.gram`` site of ``layer`` (None and the reason when it is not one); a
    grouped conv is read here instead (module doc, 3), so it gets (None, None)."""
    if layer.op == "Conv" and layer.group > 1:
        if len(layer.kernel) != 2:
            return None, f"a {len(layer.kernel)}-D grouped convolution"
        return None, None
    return site_for(model, layer.index)


def _key(site: LinearSite) -> tuple:
    return (site.input, site.op, site.kernel, site.strides, site.pads, site.dilations)


def _bias(model: onnx.ModelProto, layer: WeightLayer) -> np.ndarray | None:
    node = model.graph.node[layer.index]
    if layer.op in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
        t = initializers(model).get(node.input[2])
        if t is None:
            raise InputSpecError(f"{layer.describe()}: its bias is not an initializer")
        return numpy_helper.to_array(t).astype(np.float64).reshape(-1)
    return None


def _to_layer(model, layer: WeightLayer, got) -> LayerStats:
    n = max(got.n, 1)
    xtx = got.xtx
    h = xtx[:-1, :-1]
    xt = tt = t_sum = None
    col_sums = xtx[:-1, -1]
    if got.xty is not None:
        xt, tt, t_sum = got.xty[:-1], got.tt, got.xty[-1]
        b = _bias(model, layer)
        if b is not None:  # T − b: the refit leaves the bias as it is
            xt = xt - np.outer(col_sums, b)
            tt = tt - 2 * float(got.xty[-1] @ b) + got.n * float(b @ b)
            t_sum = t_sum - got.n * b
    if layer.op == "Conv":
        perm = conv_columns(layer.shape[1], int(np.prod(layer.kernel)))
        h = h[np.ix_(perm, perm)]
        xt = xt[perm] if xt is not None else None
        col_sums = col_sums[perm]
    if xt is None:
        return LayerStats(h / n, got.n)
    return LayerStats(h / n, got.n, xt / n, tt / n, col_sums / n, t_sum / n)


def layer_stats(model: onnx.ModelProto, layers: Sequence[WeightLayer], feeds: Sequence[Feed],
                *, reference: onnx.ModelProto | None = None,
                max_bytes: int = 256 * 2**20) -> Iterator[tuple[WeightLayer, LayerStats]]:
    """``(layer, LayerStats)`` for ``layers`` (module doc), in chunks; targets when
    ``reference`` is given. A layer that is neither a site nor a grouped conv raises
    ``InputSpecError`` with the reason (callers skip those first, ``site_of``)."""
    if not feeds:
        raise InputSpecError("sparsify needs calibration inputs for its statistics")
    targets = reference is not None
    sites: dict[str, LinearSite] = {}
    grouped: list[WeightLayer] = []
    for layer in layers:
        site, why = site_of(model, layer)
        if site is None and why is None:
            grouped.append(layer)
        elif site is None:
            raise InputSpecError(f"{layer.describe()}: {why}")
        else:
            sites[layer.name] = site
    if grouped:
        yield from grouped_stats(model, grouped, feeds, max_bytes=max_bytes)
    plain = [x for x in layers if x.name in sites]
    # one capture per distinct input when no targets are needed
    reps: dict[tuple, LinearSite] = {}
    for layer in plain:
        if not targets:
            reps.setdefault(_key(sites[layer.name]), sites[layer.name])
    todo = list(reps.values()) if not targets else [sites[x.name] for x in plain]
    dims = {s.output: site_dims(model, s) for s in todo}
    by_site = {}
    for layer in plain:
        s = sites[layer.name]
        by_site.setdefault(_key(s) if not targets else s.output, []).append(layer)
    for chunk in chunked(todo, dims, max_bytes):
        got = accumulate(model, chunk, feeds, targets=targets, reference=reference,
                         max_bytes=max_bytes)
        for s in chunk:
            for layer in by_site[_key(s) if not targets else s.output]:
                yield layer, _to_layer(model, layer, got[s.output])
        del got


class _GroupGram:
    """Reducer for ``capture``: block Grams of grouped convs (module doc, 3)."""

    def __init__(self, layers: Sequence[WeightLayer]):
        self.layers = list(layers)
        self.h = {x.name: np.zeros((x.group, x.columns, x.columns)) for x in self.layers}
        self.n = {x.name: 0 for x in self.layers}

    def __call__(self, name: str, value: np.ndarray) -> None:
        value = np.asarray(value)
        for layer in self.layers:
            if layer.activation != name:
                continue
            g = layer.group
            for i in range(value.shape[0]):
                rows = im2col(value[i:i + 1], layer.kernel, layer.strides, layer.pads,
                              layer.dilations)  # [pixels, C·kh·kw], channel-major
                rows = rows.reshape(rows.shape[0], g, -1).astype(np.float64)
                self.h[layer.name] += np.einsum("rgi,rgj->gij", rows, rows)
                self.n[layer.name] += rows.shape[0]

    def stats(self, layer: WeightLayer) -> LayerStats:
        perm = conv_columns(layer.shape[1], int(np.prod(layer.kernel)))
        n = max(self.n[layer.name], 1)
        h = self.h[layer.name][:, perm][:, :, perm]
        return LayerStats(h / n, self.n[layer.name])


def grouped_stats(model: onnx.ModelProto, layers: Sequence[WeightLayer], feeds: Sequence[Feed],
                  *, max_bytes: int = 256 * 2**20
                  ) -> Iterator[tuple[WeightLayer, LayerStats]]:
    """Block Grams of grouped convs, captured a chunk of ``max_bytes`` at a time."""
    graph_inputs = {i.name for i in model.graph.input}
    chunk: list[WeightLayer] = []
    used = 0

    def flush():
        acc = _GroupGram(chunk)
        names = list(dict.fromkeys(x.activation for x in chunk))
        direct = [t for t in names if t in graph_inputs]
        inner = [t for t in names if t not in graph_inputs]
        for feed in feeds:
            for t in direct:
                if t not in feed:
                    raise InputSpecError(f"calibration inputs lack '{t}'")
                acc(t, feed[t])
        if inner:
            capture(prefix_model(model, inner), feeds, inner, acc)
        return [(x, acc.stats(x)) for x in chunk]

    for layer in layers:
        size = 8 * layer.group * layer.columns ** 2
        if chunk and used + size > max_bytes:
            yield from flush()
            chunk, used = [], 0
        chunk.append(layer)
        used += size
    if chunk:
        yield from flush()
