"""Generated input sizes respect the model's stride (``graphopt.ir.strides``)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import helper

import graphopt
from graphopt.cli.commands import main
from graphopt.ir.inputs import generate_inputs, resolve_shapes
from graphopt.ir.strides import spatial_strides
from graphopt.testing import make_model


def _fpn():
    """x[N, 3, H, W] -> five stride-2 convs (c1..c5 at H/2..H/32), then an FPN top-down path:
    up(c5) + c4 -> up -> + c3 -> y. At H = 16 the maps are 8, 4, 2, 1, 1 and the second Add
    meets 4 by 2 (the PP-OCR detector's failure); at multiples of 32 every level divides."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], {}, "x"
    channels = 3
    for k in range(1, 6):
        inits[f"w{k}"] = rng.standard_normal((4, channels, 3, 3)).astype(np.float32) * 0.3
        nodes.append(helper.make_node("Conv", [prev, f"w{k}"], [f"c{k}"], kernel_shape=[3, 3],
                                      strides=[2, 2], pads=[1, 1, 1, 1]))
        prev, channels = f"c{k}", 4
    inits["scales"] = np.array([1, 1, 2, 2], np.float32)
    nodes += [
        helper.make_node("Resize", ["c5", "", "scales"], ["u5"], mode="nearest"),
        helper.make_node("Add", ["u5", "c4"], ["p4"]),
        helper.make_node("Resize", ["p4", "", "scales"], ["u4"], mode="nearest"),
        helper.make_node("Add", ["u4", "c3"], ["y"]),
    ]
    return make_model(nodes, {"x": ["N", 3, "H", "W"]}, ["y"], inits, opset=13)


def _up_then_down():
    """x -> Conv stride 2 -> Resize x2 -> Conv stride 2 -> y: the deepest stride is 2."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[1, 1], strides=[2, 2]),
        helper.make_node("Resize", ["a", "", "scales"], ["b"], mode="nearest"),
        helper.make_node("Conv", ["b", "w2"], ["y"], kernel_shape=[1, 1], strides=[2, 2]),
    ]
    inits = {"w1": rng.standard_normal((2, 3, 1, 1)).astype(np.float32),
             "w2": rng.standard_normal((2, 2, 1, 1)).astype(np.float32),
             "scales": np.array([1, 1, 2, 2], np.float32)}
    return make_model(nodes, {"x": ["N", 3, "H", "W"]}, ["y"], inits, opset=13)


def test_strides_follow_the_paths():
    """Five stride-2 convs give 32 per axis; an upsample in between divides its factor out."""
    assert spatial_strides(_fpn()) == (32, 32)
    assert spatial_strides(_up_then_down()) == (2, 2)


def test_generated_sizes_run_a_stride_32_model():
    """Free spatial dims become 32, not 16, and the generated feed runs; 16 itself does not."""
    model = _fpn()
    assert resolve_shapes(model) == {"x": (1, 3, 32, 32)}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, generate_inputs(model))[0].shape == (1, 4, 4, 4)
    bad = np.zeros((1, 3, 16, 16), np.float32)
    try:
        sess.run(None, {"x": bad})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's broadcast failure
        assert "broadcast" in str(exc).lower() or "shape" in str(exc).lower()
    else:
        raise AssertionError("the FPN unexpectedly ran at 16x16: the test lost its point")


def test_optimize_validate_without_input_shape(tmp_path, capsys):
    """``optimize --validate`` with no --input-shape on a stride-32 model runs (it stopped
    with "the reference fails: broadcast 2 by 4" when sides were generated at 16)."""
    src, out = tmp_path / "fpn.onnx", tmp_path / "out.onnx"
    graphopt.save(_fpn(), src)
    code = main(["optimize", str(src), "-o", str(out), "--pass", "cleanup", "--validate"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[1, 4, 4, 4]" in captured.out and out.exists()


def test_text_inputs_keep_16():
    """Inputs without strided ops keep the old defaults (rank-2 ids, no spatial axes)."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": ["batch", "seq", 8]},
                       ["y"])
    assert resolve_shapes(model) == {"x": (1, 16, 8)}
