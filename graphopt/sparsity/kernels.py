"""Implementations of one sparse MatMul, built and timed on the target provider.

For a ``MatMul(X, W)`` with a constant 2-D ``W`` [K, N] and input X [..., K]:

1. ``dense``: the node as it is (MLAS on CPU; any provider).
2. ``sparse_to_dense`` (ORT CPU): ``com.microsoft::SparseToDenseMatMul`` takes its sparse
   operand first and 2-D, so ``Y = X W`` is computed as ``(Wᵀ Xᵀ)ᵀ``: X reshaped to [T, K]
   and transposed, ``SparseToDenseMatMul(Wᵀ, Xᵀ)`` = [N, T], transposed back and reshaped to
   [..., N]. ``Wᵀ`` must be a ``sparse_tensor`` graph input fed at run time as a COO
   ``SparseTensor`` (2-D indices): onnxruntime densifies ``sparse_initializer``s at load, so
   a model cannot carry the sparse weight itself.
3. ``tensorrt_matmul`` / ``tensorrt_gemm``: the weight kept dense in its 2:4 pattern, the
   engine built with the sparse-weights flag through Polygraphy's TensorRT backend, as the
   MatMul itself or as ``Reshape → Gemm → Reshape`` (the op form older TensorRT releases
   gave sparse tactics to); which layers got a sparse tactic is read from the engine
   inspector's layer information. TensorRT picks a sparse tactic only where it is faster.

``micro_model(kind, w, x_shape)`` is the one-node model of a candidate; ``time_candidates``
times them interleaved (``graphopt.runtime.benchmark.interleaved_times``) and checks their outputs
against dense.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

OPSET = 17


def _model(nodes, inputs, output, inits=(), ms_domain=False) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "candidate", inputs, [output], list(inits))
    opsets = [helper.make_opsetid("", OPSET)]
    if ms_domain:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def micro_model(kind: str, w: np.ndarray, x_shape: Sequence[int]) -> onnx.ModelProto:
    """The one-layer model of candidate ``kind`` for weight ``w`` and input shape."""
    k, n = w.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape[:-1]) + [n])
    lead = np.array(list(x_shape[:-1]) + [n], dtype=np.int64)
    flat = np.array([-1, k], dtype=np.int64)
    if kind in ("dense", "tensorrt_matmul"):
        return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")], [x], y,
                      [numpy_helper.from_array(w.astype(np.float32), "w")])
    if kind == "tensorrt_gemm":
        return _model([helper.make_node("Reshape", ["x", "flat"], ["x2"]),
                       helper.make_node("Gemm", ["x2", "w"], ["y2"], name="layer"),
                       helper.make_node("Reshape", ["y2", "lead"], ["y"])], [x], y,
                      [numpy_helper.from_array(w.astype(np.float32), "w"),
                       numpy_helper.from_array(flat, "flat"),
                       numpy_helper.from_array(lead, "lead")])
    if kind == "sparse_to_dense":
        wt = helper.make_sparse_tensor_value_info("wt", TensorProto.FLOAT, [n, k])
        return _model([helper.make_node("Reshape", ["x", "flat"], ["x2"]),
                       helper.make_node("Transpose", ["x2"], ["xt"], perm=[1, 0]),
                       helper.make_node("SparseToDenseMatMul", ["wt", "xt"], ["yt"],
                                        domain="com.microsoft", name="layer"),
                       helper.make_node("Transpose", ["yt"], ["y2"], perm=[1, 0]),
                       helper.make_node("Reshape", ["y2", "lead"], ["y"])], [x, wt], y,
                      [numpy_helper.from_array(flat, "flat"),
                       numpy_helper.from_array(lead, "lead")], ms_domain=True)
    raise ValueError(f"unknown candidate '{kind}'")


def sparse_feed(w: np.ndarray):
    """``Wᵀ`` as an onnxruntime COO ``SparseTensor`` OrtValue (2-D indices)."""
    import onnxruntime as ort

    wt = np.ascontiguousarray(w.T.astype(np.float32))
    idx = np.ascontiguousarray(np.argwhere(wt).astype(np.int64))
    values = np.ascontiguousarray(wt[idx[:, 0], idx[:, 1]])
    tensor = ort.SparseTensor.sparse_coo_from_numpy(list(wt.shape), values, idx,
                                                    ort.OrtDevice.make("cpu", 0))
    return ort.OrtValue.ort_value_from_sparse_tensor(tensor)


@dataclass
class Timing:
    kind: str
    median_ms: float | None = None
    max_abs_diff: float | None = None
    note: str | None = None


@dataclass
class Choice:
    """What ``sparse-ops`` decided for one layer, and the measurements behind it."""

    layer: str
    sparsity: float
    chosen: str
    reason: str
    timings: list[Timing] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "sparsity": self.sparsity, "chosen": self.chosen,
                "reason": self.reason,
                "timings": [t.__dict__ for t in self.timings]}


def time_cpu_candidates(w: np.ndarray, x: np.ndarray, *, warmup: int = 3, rounds: int = 10,
                        min_time: float = 0.2, threads: int | None = None) -> list[Timing]:
    """Median ms of ``dense`` and ``sparse_to_dense`` on ORT CPU for input ``x``, and the
    sparse kernel's largest difference from dense."""
    import onnxruntime as ort

    from graphopt.runtime.benchmark import interleaved_times
    from graphopt.runtime.session import ort_session

    dense = ort_session(micro_model("dense", w, x.shape), threads=threads)
    sparse = ort_session(micro_model("sparse_to_dense", w, x.shape), threads=threads)
    x_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x.astype(np.float32)))
    feeds = {"x": x_value, "wt": sparse_feed(w)}
    ref = dense.run(["y"], {"x": x.astype(np.float32)})[0]
    got = sparse.run_with_ort_values(["y"], feeds)[0].numpy()
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    times = interleaved_times([lambda: dense.run(["y"], {"x": x.astype(np.float32)}),
                               lambda: sparse.run_with_ort_values(["y"], feeds)],
                              warmup=warmup, rounds=rounds, min_time=min_time)
    return [Timing("dense", 1e3 * float(np.median(times[0]))),
            Timing("sparse_to_dense", 1e3 * float(np.median(times[1])), diff)]


# --------------------------------------------------------------------------- TensorRT


def tensorrt_unavailable() -> str | None:
    """None when TensorRT can build engines here (the ``tensorrt`` and ``polygraphy``
    packages import), else the one-line reason."""
    from graphopt.runtime.trt import INSTALL_HINT, import_tensorrt

    _, reason = import_tensorrt()
    if reason is None:
        try:
            import polygraphy.backend.trt  # noqa: F401
        except ImportError:
            reason = f"polygraphy package not installed; {INSTALL_HINT}"
    if reason:
        return f"TensorRT 2:4 candidates not built: {reason}"
    return None


def engine_loader(model: onnx.ModelProto, *, sparse: bool = True, fp16: bool = True):
    """Polygraphy's loader of a TensorRT engine for ``model``, not yet called (nothing is
    built, TensorRT is not imported): ``NetworkFromOnnxBytes`` -> ``EngineFromNetwork`` with
    ``CreateConfig(sparse_weights=sparse, fp16=fp16)``. Called, Polygraphy sets
    ``BuilderFlag.SPARSE_WEIGHTS`` on the builder config (``sparse=False``: the dense
    baseline) and, by default, ``ProfilingVerbosity.DETAILED``, so the engine inspector
    reports every layer's tactic."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxBytes

    config = CreateConfig(sparse_weights=sparse, fp16=fp16)
    return EngineFromNetwork(NetworkFromOnnxBytes(model.SerializeToString()), config=config)


def build_sparse_engine(model: onnx.ModelProto, *, sparse: bool = True, fp16: bool = True):
    """The engine of ``engine_loader``. Raises ``RuntimeError`` with the one-line reason when
    TensorRT is not usable here."""
    reason = tensorrt_unavailable()
    if reason:
        raise RuntimeError(reason)
    return engine_loader(model, sparse=sparse, fp16=fp16)()


def sparse_tactic_layers(info: Mapping) -> list[str] | None:
    """Names of the layers whose tactic is a sparse one, from the engine inspector's JSON
    (``get_engine_information(LayerInformationFormat.JSON)``): with DETAILED verbosity each
    entry of ``Layers`` is an object with ``Name`` and ``TacticName``, and TensorRT's sparse
    kernels carry ``sparse`` in their tactic name (e.g. ``sm80_xmma_gemm_..._sparse_...``;
    read from TensorRT's tactic naming, not verified on a GPU here). Only the tactic is
    read, never the layer name (a layer named ``sparse_fc`` is not a sparse tactic). None
    when the engine holds only layer names (built without DETAILED verbosity)."""
    layers = info.get("Layers", [])
    if layers and not any(isinstance(x, Mapping) for x in layers):
        return None
    out = []
    for layer in layers:
        if not isinstance(layer, Mapping):
            continue
        tactic = str(layer.get("TacticName") or layer.get("Tactic") or "")
        if "sparse" in tactic.lower():
            out.append(str(layer.get("Name", "")))
    return out


def sparse_layers(engine) -> list[str] | None:
    """``sparse_tactic_layers`` of a built engine (its engine inspector)."""
    import json

    import tensorrt as trt

    inspector = engine.create_engine_inspector()
    return sparse_tactic_layers(json.loads(
        inspector.get_engine_information(trt.LayerInformationFormat.JSON)))


def time_tensorrt_candidates(w: np.ndarray, x: np.ndarray, *, rounds: int = 20
                             ) -> list[Timing]:
    """Median ms of the dense engine and of the MatMul and Gemm forms built for sparse
    weights (all FP16: sparse tensor cores run reduced precision), which layers ran a
    sparse tactic (in ``note``), and each sparse engine's largest difference from the dense
    engine's output (same precision)."""
    from polygraphy.backend.trt import TrtRunner

    from graphopt.runtime.benchmark import interleaved_times

    out = []
    runners = []
    feed = {"x": x.astype(np.float32)}
    try:
        for kind in ("tensorrt_dense", "tensorrt_matmul", "tensorrt_gemm"):
            form = "dense" if kind == "tensorrt_dense" else kind
            engine = build_sparse_engine(micro_model(form, w, x.shape),
                                         sparse=kind != "tensorrt_dense")
            runner = TrtRunner(engine)
            runner.activate()
            runners.append(runner)
            ran = sparse_layers(engine)
            out.append(Timing(kind, note="sparse tactic: " + (
                "unknown (no layer details)" if ran is None else ", ".join(ran) or "none")))
        ys = [np.asarray(r.infer(feed)["y"], dtype=np.float64) for r in runners]
        for t, y in zip(out[1:], ys[1:]):
            t.max_abs_diff = float(np.abs(y - ys[0]).max()) if y.size else 0.0
        times = interleaved_times([lambda r=r: r.infer(feed) for r in runners], rounds=rounds)
    finally:
        for r in runners:
            r.deactivate()
    for t, ts in zip(out, times):
        t.median_ms = 1e3 * float(np.median(ts))
    return out
