"""``sparse-ops`` and ``store-sparse`` (lossless): sparse kernels where they are measured to
pay, and sparse storage where it makes the file smaller.

``sparse-ops``: for every MatMul whose constant 2-D weight is at least ``min_sparsity``
sparse, the implementations the target provider has (``graphopt.sparsity.kernels``) are
built and timed on that provider with the layer's real input shape, and one is kept:

1. ``provider=cpu``: ``dense`` (MLAS) against ``com.microsoft::SparseToDenseMatMul``. The
   sparse kernel takes its weight only as a ``sparse_tensor`` fed at run time (onnxruntime
   densifies sparse initializers at load), so even where it wins the rewrite would change
   the model's interface: it is reported with the times and not applied.
2. ``provider=tensorrt``: the dense engine against engines built with the sparse-weights flag
   for the MatMul and for its ``Reshape → Gemm → Reshape`` form; the Gemm form is written
   into the model only when its engine is faster than both others. Without TensorRT (no
   GPU), one skip line says so and the model is unchanged.
3. A candidate must beat dense by ``margin`` (relative) and match its outputs; otherwise the
   layer stays dense. The report lists every layer: the choice, why, the measured times.

``store-sparse``: initializers whose sparsity is above the break-even point (values plus
int64 linearized indices smaller than the dense bytes, with ``min_saving`` to spare) move to
``graph.sparse_initializer``. onnxruntime densifies them at load, so the model runs
unchanged; the file is smaller. Run it last: later passes read dense initializers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.errors import ConfigError
from graphopt.core.contract import Context, Pass, PassResult, Skip
from graphopt.core.registry import register
from graphopt.sparsity import kernels
from graphopt.sparsity.kernels import Choice, Timing
from graphopt.sparsity.layers import initializers, read_weight, sparsity, weight_layers


@dataclass(frozen=True)
class SparseOpsConfig:
    """``provider``: cpu or tensorrt. ``min_sparsity``: layers below are left dense unmeasured.
    ``margin``: how much faster (relative) a sparse kernel must be. ``rounds``/``min_time``:
    timing per candidate (interleaved)."""

    provider: Literal["cpu", "tensorrt"] = "cpu"
    min_sparsity: float = 0.5
    margin: float = 0.05
    rounds: int = 10
    min_time: float = 0.2

    def __post_init__(self):
        if self.provider not in ("cpu", "tensorrt"):
            raise ConfigError(f"provider must be cpu or tensorrt, got '{self.provider}'")
        if not 0.0 <= self.min_sparsity < 1.0:
            raise ConfigError(f"min_sparsity must be in [0, 1), got {self.min_sparsity}")
        if not 0.0 <= self.margin < 1.0:
            raise ConfigError(f"margin must be in [0, 1), got {self.margin}")
        if self.rounds < 1 or self.min_time < 0:
            raise ConfigError("rounds must be 1 or more and min_time 0 or more")


def _first_inputs(model, layers, ctx: Context) -> dict[str, np.ndarray]:
    from graphopt.data.calibration import capture

    graph_inputs = {i.name for i in model.graph.input}
    feed = ctx.sample_feeds(model, 1)[0]
    got: dict[str, np.ndarray] = {}
    inner = [x.activation for x in layers if x.activation not in graph_inputs]
    for x in layers:
        if x.activation in graph_inputs:
            got[x.activation] = np.asarray(feed[x.activation])
    if inner:
        capture(model, [feed], inner, lambda name, value: got.setdefault(name, value))
    return got


@register
class SparseOps(Pass[SparseOpsConfig], name="sparse-ops", lossless=True):
    """Sparse kernels for sparse MatMuls where measured faster (see the module doc)."""

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg = self.config
        layers, refused = weight_layers(model, ("MatMul",))
        skipped = [Skip(r.site, r.reason) for r in refused]
        inits = initializers(model)
        choices: list[Choice] = []
        measured = []
        for layer in layers:
            s = sparsity(read_weight(inits, layer))
            if s < cfg.min_sparsity:
                choices.append(Choice(layer.name, s, "dense",
                                      f"sparsity {100 * s:.1f}% < min_sparsity"))
            else:
                measured.append((layer, s))
        trt_reason = kernels.tensorrt_unavailable() if cfg.provider == "tensorrt" else None
        if trt_reason and measured:
            skipped.append(Skip("sparse-ops provider=tensorrt", trt_reason))
            choices += [Choice(x.name, s, "dense", trt_reason) for x, s in measured]
            measured = []
        inputs = _first_inputs(model, [x for x, _ in measured], ctx) if measured else {}
        rewrite = []
        for layer, s in measured:
            w = read_weight(inits, layer).astype(np.float32)
            x = np.asarray(inputs[layer.activation], dtype=np.float32)
            if cfg.provider == "cpu":
                timings = kernels.time_cpu_candidates(w, x, rounds=cfg.rounds,
                                                      min_time=cfg.min_time)
            else:
                try:
                    timings = kernels.time_tensorrt_candidates(w, x, rounds=cfg.rounds)
                except Exception as exc:  # noqa: BLE001 - TensorRT present, no usable GPU
                    why = f"TensorRT could not build or run the candidates: {exc}"
                    if not any(k.site == "sparse-ops provider=tensorrt" for k in skipped):
                        skipped.append(Skip("sparse-ops provider=tensorrt", why))
                    choices.append(Choice(layer.name, s, "dense", why))
                    continue
            choice = self._choose(layer.name, s, timings, w, x)
            choices.append(choice)
            if choice.chosen == "tensorrt_gemm":
                rewrite.append(layer)
        for layer in sorted(rewrite, key=lambda x: -x.index):
            matmul_as_gemm(model, layer.index)
        order = {x.name: i for i, x in enumerate(layers)}
        choices.sort(key=lambda c: order.get(c.layer, 0))
        counters = {"layers": len(layers), "measured": len(measured),
                    "rewritten": len(rewrite), "dense": len(choices) - len(rewrite)}
        return PassResult(model, bool(rewrite), counters, skipped,
                          details={"layers": [c.to_dict() for c in choices]})

    def _choose(self, name: str, s: float, timings: list[Timing], w, x) -> Choice:
        cfg = self.config
        base = timings[0]
        scale = max(float(np.abs(x).max()) * float(np.abs(w).sum(0).max()), 1e-6)
        best = base
        for t in timings[1:]:
            # TensorRT candidates run FP16 against an FP16 dense engine: FP16 rounding
            tol = (1e-2 if t.kind.startswith("tensorrt") else 1e-4) * scale
            if t.max_abs_diff is not None and t.max_abs_diff > tol:
                t.note = "; ".join(filter(None, [t.note,
                                                 f"outputs differ by {t.max_abs_diff:.3g}"]))
                continue
            if t.median_ms is not None and t.median_ms < best.median_ms * (1 - cfg.margin):
                best = t
        times = ", ".join(f"{t.kind} {t.median_ms:.3f} ms" for t in timings
                          if t.median_ms is not None)
        if best is base:
            return Choice(name, s, "dense", f"no sparse kernel faster by {cfg.margin:.0%} "
                                            f"({times})", timings)
        if best.kind == "sparse_to_dense":
            return Choice(name, s, "dense",
                          f"SparseToDenseMatMul is faster ({times}) but needs the weight fed "
                          "as a sparse_tensor input at run time (onnxruntime densifies sparse "
                          "initializers at load); not applied", timings)
        if best.kind == "tensorrt_matmul":
            return Choice(name, s, "tensorrt_matmul",
                          f"the MatMul already gets a faster sparse engine ({times}); "
                          "build with sparse weights", timings)
        return Choice(name, s, best.kind, f"fastest ({times})", timings)


def matmul_as_gemm(model: onnx.ModelProto, index: int) -> None:
    """Rewrite node ``index`` (``MatMul(X, W)``, W [K, N]) as ``Reshape(X, [-1, K]) → Gemm →
    Reshape(Y, shape(X)[:-1] + [N])``: the same values, in the form older TensorRT releases
    give sparse tactics to."""
    graph = model.graph
    node = graph.node[index]
    w = read_weight(model, next(x for x in weight_layers(model, ("MatMul",))[0]
                                if x.index == index))
    k, n = w.shape
    base = (node.name or node.output[0]).replace("/", "_")
    names = {key: f"{base}__gemm_{key}" for key in ("flat", "x2", "y2", "shape", "lead",
                                                   "n", "out_shape", "start", "end")}
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1, k], np.int64), names["flat"]),
        numpy_helper.from_array(np.array([n], np.int64), names["n"]),
        numpy_helper.from_array(np.array([0], np.int64), names["start"]),
        numpy_helper.from_array(np.array([-1], np.int64), names["end"])])
    new = [helper.make_node("Reshape", [node.input[0], names["flat"]], [names["x2"]]),
           helper.make_node("Gemm", [names["x2"], node.input[1]], [names["y2"]],
                            name=node.name or None),
           helper.make_node("Shape", [node.input[0]], [names["shape"]]),
           helper.make_node("Slice", [names["shape"], names["start"], names["end"]],
                            [names["lead"]]),
           helper.make_node("Concat", [names["lead"], names["n"]], [names["out_shape"]],
                            axis=0),
           helper.make_node("Reshape", [names["y2"], names["out_shape"]], [node.output[0]])]
    del graph.node[index]
    for offset, n_ in enumerate(new):
        graph.node.insert(index + offset, n_)


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class StoreSparseConfig:
    """``min_saving``: share of a tensor's bytes the sparse form must save (0.1 = 10%).
    ``min_bytes``: smaller tensors stay dense."""

    min_saving: float = 0.1
    min_bytes: int = 4096

    def __post_init__(self):
        if not 0.0 <= self.min_saving < 1.0:
            raise ConfigError(f"min_saving must be in [0, 1), got {self.min_saving}")
        if self.min_bytes < 0:
            raise ConfigError(f"min_bytes must be 0 or more, got {self.min_bytes}")


def sparse_bytes(nnz: int, itemsize: int) -> int:
    """Bytes of a sparse tensor: the values and int64 linearized indices."""
    return nnz * (itemsize + 8)


@register
class StoreSparse(Pass[StoreSparseConfig], name="store-sparse", lossless=True):
    """Move initializers above break-even sparsity to sparse_initializer (smaller files)."""

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg = self.config
        graph = model.graph
        moved, saved = [], 0
        for i in reversed(range(len(graph.initializer))):
            t = graph.initializer[i]
            if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                   onnx.TensorProto.DOUBLE):
                continue
            value = numpy_helper.to_array(t)
            dense = value.nbytes
            if dense < cfg.min_bytes or value.ndim == 0:
                continue
            flat = value.reshape(-1)
            idx = np.flatnonzero(flat)
            small = sparse_bytes(len(idx), value.itemsize)
            if small > dense * (1 - cfg.min_saving):
                continue
            sparse = helper.make_sparse_tensor(
                numpy_helper.from_array(flat[idx], t.name),
                numpy_helper.from_array(idx.astype(np.int64), f"{t.name}__indices"),
                list(value.shape))
            moved.append(sparse)
            saved += dense - small
            del graph.initializer[i]
        graph.sparse_initializer.extend(reversed(moved))
        return PassResult(model, bool(moved), {"tensors_stored_sparse": len(moved),
                                               "bytes_saved": int(saved)})
