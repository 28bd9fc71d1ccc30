"""Shape inference: no side effects in the working folder, concrete dims from input shapes."""

from __future__ import annotations

from onnx import helper

from graphopt.analysis.shapes import infer_shapes, tensor_shapes
from graphopt.testing import make_model


def test_incomplete_inference_writes_no_files(tmp_path, monkeypatch):
    """Incomplete symbolic inference leaves nothing in the current folder (ORT's own
    ``infer_shapes`` dumps sym_shape_infer_temp.onnx and .data files there), and onnx's
    inference still fills the shapes."""
    from graphopt.analysis.shapes import _symbolic_class

    cls = _symbolic_class()
    original = cls._infer_impl

    def incomplete(self, *args, **kwargs):
        original(self, *args, **kwargs)
        return False  # what ORT reports when some shape stayed unknown

    monkeypatch.setattr(cls, "_infer_impl", incomplete)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    model = make_model(nodes, {"x": ["batch", 4]}, {"y": ["batch", 4]})
    monkeypatch.chdir(tmp_path)
    infer_shapes(model, {"x": (2, 4)})
    assert list(tmp_path.iterdir()) == []
    assert any(vi.name == "r" for vi in model.graph.value_info)


def test_tensor_shapes_concrete_with_input_shapes():
    """Given input shapes, inner tensors and outputs get concrete dims."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    model = make_model(nodes, {"x": ["batch", 4]}, {"y": ["batch", 4]})
    shapes = tensor_shapes(model, {"x": (3, 4)})
    assert shapes["r"] == (3, 4) and shapes["y"] == (3, 4)
