"""Tests for passes/quantize.py: each mode on the smallest model that shows it, through the
manager (checker + ORT load), outputs compared through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.cli.commands import main
from graphopt.errors import PassError, UnsupportedModelError
from graphopt.ir.inputs import generate_inputs
from graphopt.ir.model import save
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.testing import make_model, op_types, run, tiny_cnn

F32 = np.float32


def _mlp() -> onnx.ModelProto:
    """x[batch, 64] -> MatMul(fc1) -> Relu -> MatMul(fc2) -> y[batch, 32]"""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    inits = {"W1": (rng.standard_normal((64, 128)) * 0.1).astype(F32),
             "W2": (rng.standard_normal((128, 32)) * 0.1).astype(F32)}
    return make_model(nodes, {"x": ["batch", 64]}, ["y"], inits)


def _cnn() -> onnx.ModelProto:
    """x[batch, 3, 16, 16] -> Conv(16) -> Relu -> Conv(32) -> Relu -> GAP -> Flatten -> Gemm"""
    return tiny_cnn((16, 32))


def _feeds(model, n=4, batch=8):
    return [generate_inputs(model, {model.graph.input[0].name: _shape(model, batch)}, seed=i)
            for i in range(n)]


def _shape(model, batch):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return (batch, *[d.dim_value for d in dims[1:]])


def _quantize(model, ctx=None, **options):
    work = onnx.ModelProto()
    work.CopyFrom(model)
    out, report = PassManager([build_pass("quantize", options)]).run(work, ctx or Context())
    entry = report.passes[0]
    assert entry.status == "changed", entry.error
    return out, entry


def _close(a: onnx.ModelProto, b: onnx.ModelProto, feeds, min_cos: float, rel: float):
    for feed in feeds:
        for name, ref in run(a, feed).items():
            got = run(b, feed)[name]
            assert got.dtype == ref.dtype and got.shape == ref.shape
            cos = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
            assert cos >= min_cos, (name, cos)
            assert np.abs(got - ref).max() <= rel * np.abs(ref).max(), name


def test_dynamic_int8_matmuls():
    """Dynamic mode: both MatMuls become MatMulInteger fed by DynamicQuantizeLinear, weights
    int8; outputs within 2 % of the float model's scale; the pass reports its cosine."""
    model = _mlp()
    out, entry = _quantize(model, mode="dynamic")
    ops = op_types(out)
    assert ops.count("MatMulInteger") == 2 and "DynamicQuantizeLinear" in ops
    assert "MatMul" not in ops
    int8 = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert {tuple(t.dims) for t in int8} >= {(64, 128), (128, 32)}
    _close(model, out, _feeds(model), 0.999, 0.02)
    assert entry.counters["MatMulInteger_nodes"] == 2
    assert 999_000 <= entry.counters["cosine_ppm_y"] <= 1_000_000


def test_static_qdq_per_channel_with_calibration():
    """Static mode on a CNN with calibration feeds: every Conv and the Gemm read their
    input and weight through DequantizeLinear; weight scales are per output channel
    (axis 0, one scale per filter); top-1 agrees with the float model."""
    model = _cnn()
    feeds = _feeds(model)
    out, entry = _quantize(model, Context(calibration=feeds), mode="static")
    assert not entry.skipped  # real calibration data: no note about generated inputs
    producer = {o: n for n in out.graph.node for o in n.output}
    inits = {t.name: t for t in out.graph.initializer}
    compute = [n for n in out.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(compute) == 3
    for node in compute:
        act, weight = (producer[node.input[0]], producer[node.input[1]])
        assert act.op_type == "DequantizeLinear" and weight.op_type == "DequantizeLinear"
        scale = numpy_helper.to_array(inits[weight.input[1]])
        assert inits[weight.input[0]].data_type == onnx.TensorProto.INT8
        channels = inits[weight.input[0]].dims[0]
        assert scale.shape == (channels,), node.name
    _close(model, out, feeds, 0.995, 0.1)
    ref = np.concatenate([run(model, f)["logits"].argmax(1) for f in feeds])
    got = np.concatenate([run(out, f)["logits"].argmax(1) for f in feeds])
    assert (ref == got).mean() >= 0.9


def test_static_without_calibration_says_so():
    """Without calibration data the ranges come from generated inputs: a skip says so."""
    _, entry = _quantize(_mlp(), mode="static")
    assert any("generated inputs" in s.reason for s in entry.skipped)


def test_fp16_keeps_io_float32():
    """fp16: weights become float16, the graph's inputs and outputs stay float32 (Casts at
    the edges), outputs within float16 rounding."""
    model = _cnn()
    out, entry = _quantize(model, mode="fp16")
    assert out.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    halves = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) == 6 and "Cast" in op_types(out)
    _close(model, out, _feeds(model, 2), 0.9999, 5e-3)


def test_exclude_keeps_a_node_float():
    """exclude=fc2 leaves the second MatMul in float."""
    out, _ = _quantize(_mlp(), mode="dynamic", exclude="fc2")
    assert op_types(out).count("MatMulInteger") == 1 and "MatMul" in op_types(out)


def test_already_quantized_is_refused():
    """Quantizing a quantized model: one error naming what was found, before any pass runs;
    a second quantize in the same recipe is rolled back with the same reason."""
    once, _ = _quantize(_mlp(), mode="dynamic")
    with pytest.raises(UnsupportedModelError,
                       match="already quantized .*MatMulInteger.*quantize the float"):
        PassManager([build_pass("quantize", {"mode": "static"})]).run(once, Context())
    twice = [build_pass("quantize", {"mode": "dynamic"}), build_pass("quantize", {"mode": "fp16"})]
    with pytest.raises(PassError, match="already quantized"):  # within one recipe
        PassManager(twice).run(_mlp(), Context())


def test_cli_already_quantized_one_line(tmp_path, capsys):
    """The CLI prints one error line, exits non-zero and writes nothing."""
    once, _ = _quantize(_mlp(), mode="fp16")
    src = tmp_path / "q.onnx"
    save(once, src)
    out = tmp_path / "qq.onnx"
    code = main(["optimize", str(src), "-o", str(out), "--pass", "quantize"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error: pass 'quantize': the model is already")


def test_pruned_model_stays_quantizable():
    """prune-channels then static quantize (the recipe order): the pruned Conv widths carry
    into per-channel scales, head/width metadata survives, the result checks and loads."""
    model = _cnn()
    feeds = _feeds(model)
    model.metadata_props.add(key="graphopt.layers", value="[0, 1]")
    passes = [build_pass("prune-channels", {"ratio": 0.5}),
              build_pass("quantize", {"mode": "static"})]
    work = onnx.ModelProto()
    work.CopyFrom(model)
    out, report = PassManager(passes).run(work, Context(calibration=feeds))
    assert [p.status for p in report.passes] == ["changed", "changed"], report.passes[-1].error
    conv1_weight = next(t for t in out.graph.initializer if t.dims[:1] == [8]
                        and t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4)
    assert list(conv1_weight.dims) == [8, 3, 3, 3]
    assert {p.key: p.value for p in out.metadata_props}["graphopt.layers"] == "[0, 1]"
    assert run(out, feeds[0])["logits"].shape == (8, 10)


def test_static_on_an_opset_12_model_converts_to_13():
    """Per-channel QDQ needs opset 13 (DequantizeLinear axis): an opset-12 model is
    converted first, with a note, and the result checks and loads (PP-OCRv4's case)."""
    model = tiny_cnn((8, 8), size=8)
    model.opset_import[0].version = 12
    onnx.checker.check_model(model)
    out, entry = _quantize(model, Context(calibration=_feeds(model, 2)), mode="static")
    assert out.opset_import[0].version >= 13
    assert any("opset 12 to 13" in s.reason for s in entry.skipped)
    axes = [a.i for n in out.graph.node if n.op_type == "DequantizeLinear"
            for a in n.attribute if a.name == "axis"]
    assert axes and set(axes) == {0}


def test_weights_from_constant_nodes_are_quantized():
    """A Conv whose weight comes from a Constant node (Paddle exports) is quantized: the
    pass hands onnxruntime the constant as an initializer."""
    model = tiny_cnn((8, 8), size=8)
    weight = next(t for t in model.graph.initializer if t.name == "W2")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W2"], value=weight))
    model.graph.initializer.remove(weight)
    out, entry = _quantize(model, mode="dynamic")
    assert op_types(out).count("ConvInteger") == 2
    assert any("Constant nodes made initializers" in s.reason for s in entry.skipped)
    _close(model, out, _feeds(model, 1), 0.99, 0.1)


def _mlp3_with_outlier() -> onnx.ModelProto:
    """x[batch, 64] -> fc1 -> Relu -> fc2 -> Relu -> fc3 -> y; fc2's weight has one outlier
    (per-tensor int8 then rounds its other weights to a few levels): the sensitive node."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "W3"], ["y"], name="fc3")]
    w2 = (rng.standard_normal((128, 128)) * 0.1).astype(F32)
    w2[0, 0] = 20.0
    inits = {"W1": (rng.standard_normal((64, 128)) * 0.1).astype(F32), "W2": w2,
             "W3": (rng.standard_normal((128, 32)) * 0.1).astype(F32)}
    return make_model(nodes, {"x": ["batch", 64]}, ["y"], inits)


def test_keep_float_excludes_the_most_sensitive_matmul():
    """keep_float=1 measures each MatMul quantized alone on the calibration feeds and keeps
    the most damaged one (fc2, the outlier weight) float; the skip lists its damage. Per-tensor
    scales: an outlier spoils its whole tensor's scale (per-channel, the default, confines it
    to one column, and fc2 is then not the worst)."""
    model = _mlp3_with_outlier()
    feeds = _feeds(model)
    full, _ = _quantize(model, Context(calibration=feeds), mode="dynamic", per_channel=False)
    out, entry = _quantize(model, Context(calibration=feeds), mode="dynamic", keep_float=1,
                           per_channel=False)
    kept = [n.name for n in out.graph.node if n.op_type == "MatMul"]
    assert kept == ["fc2"]
    assert op_types(out).count("MatMulInteger") == 2
    assert entry.counters["kept_float_nodes"] == 1
    skip = next(s for s in entry.skipped if s.site == "fc2")
    assert "kept float" in skip.reason and "damage" in skip.reason and "1 of 3" in skip.reason

    def cos(m):
        return min(float(np.dot(a := run(model, f)["y"].ravel(), b := run(m, f)["y"].ravel())
                         / np.linalg.norm(a) / np.linalg.norm(b)) for f in feeds)

    assert cos(out) > 0.999 and cos(out) > cos(full)  # keeping fc2 float is what helps
    with pytest.raises(Exception):
        build_pass("quantize", {"mode": "fp16", "keep_float": 1})


def test_static_keep_float_calibrates_once(monkeypatch):
    """Static keep_float=1: each MatMul is quantized alone with the ranges of one calibration
    (onnxruntime's calibration cache; its calibrator is built once for 3 trials and the final
    model) and the outlier's fc2 stays float, its input and weight without DequantizeLinear."""
    import importlib

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")

    made = []
    real = ort_quantize.create_calibrator
    monkeypatch.setattr(ort_quantize, "create_calibrator",
                        lambda *a, **k: made.append(1) or real(*a, **k))
    model = _mlp3_with_outlier()
    feeds = _feeds(model)
    out, entry = _quantize(model, Context(calibration=feeds), mode="static", keep_float=1,
                           per_channel=False)
    assert len(made) == 1
    producer = {o: n.op_type for n in out.graph.node for o in n.output}
    matmuls = {n.name: [producer.get(i) for i in n.input] for n in out.graph.node
               if n.op_type == "MatMul"}
    assert "DequantizeLinear" not in matmuls["fc2"]
    assert matmuls["fc1"] == matmuls["fc3"] == ["DequantizeLinear", "DequantizeLinear"]
    assert entry.counters["kept_float_nodes"] == 1
    assert "1 of 3" in next(s.reason for s in entry.skipped if s.site == "fc2")


@pytest.mark.parametrize("options, check", [
    ({"activations": "uint8"}, lambda zp, ops: zp == {onnx.TensorProto.UINT8}),
    ({"act_symmetric": True}, lambda zp, ops: zp == {onnx.TensorProto.INT8}),
    ({"format": "qoperator", "activations": "uint8"},
     lambda zp, ops: "QLinearConv" in ops and "DequantizeLinear" in ops),
])
def test_static_options_reach_onnxruntime(options, check):
    """activations/act_symmetric/format change what onnxruntime writes: the activation
    zero points' type, all-zero zero points, QLinearConv (QOperator) instead of QDQ pairs."""
    model = _cnn()
    feeds = _feeds(model, n=2)
    out, _ = _quantize(model, Context(calibration=feeds), mode="static", **options)
    inits = {t.name: t for t in out.graph.initializer}
    acts = [n for n in out.graph.node if n.op_type == "QuantizeLinear"]
    zp = {inits[n.input[2]].data_type for n in acts if len(n.input) > 2}
    if options.get("act_symmetric"):
        assert all(not numpy_helper.to_array(inits[n.input[2]]).any() for n in acts)
    assert check(zp, op_types(out)), (zp, op_types(out))
    _close(model, out, feeds, 0.99, 0.15)


def test_static_options_refused_elsewhere():
    """Static-only options on mode=dynamic are one ConfigError, before any work."""
    from graphopt.errors import ConfigError

    for options in ({"activations": "uint8"}, {"format": "qoperator"}, {"percentile": 0}):
        with pytest.raises(ConfigError):
            build_pass("quantize", {"mode": "dynamic" if "percentile" not in options
                                    else "static", **options})
