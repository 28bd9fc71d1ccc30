"""Model I/O: loading, saving, external data, and the errors a user can cause."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.errors import (
    ExternalDataError,
    GraphoptError,
    ModelFormatError,
    ModelNotFoundError,
    UnsafePathError,
    UnsupportedModelError,
)
from graphopt.ir.model import constant_value, max_ir_version
from graphopt.testing import make_model, run


def _matmul_model(rows: int = 64, cols: int = 32) -> onnx.ModelProto:
    """x[batch, rows] -> MatMul(w) -> Relu -> y"""
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        {"x": ["batch", rows]}, ["y"], {"w": w})


def test_load_missing_file(tmp_path):
    """A path that does not exist is ModelNotFoundError naming the path."""
    with pytest.raises(ModelNotFoundError, match="not found"):
        graphopt.load(tmp_path / "nope.onnx")


def test_load_folder_is_not_a_file(tmp_path):
    """A folder given as the model is refused."""
    with pytest.raises(ModelNotFoundError, match="not a file"):
        graphopt.load(tmp_path)


def test_load_garbage_file(tmp_path):
    """A text file is not an ONNX model."""
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not protobuf at all\n" * 10)
    with pytest.raises(ModelFormatError):
        graphopt.load(bad)


def test_load_truncated_file(tmp_path):
    """A model cut off halfway is reported as not an ONNX model or truncated."""
    path = tmp_path / "m.onnx"
    graphopt.save(_matmul_model(), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError):
        graphopt.load(cut)


def test_load_empty_file(tmp_path):
    """An empty file parses as an empty proto and is refused, not accepted."""
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="not an ONNX model"):
        graphopt.load(empty)


def test_save_sets_ir_version_ort_can_read(tmp_path):
    """onnx writes IR 14; the saved file carries an IR version onnxruntime loads."""
    model = _matmul_model()
    model.ir_version = onnx.IR_VERSION
    path = graphopt.save(model, tmp_path / "m.onnx")
    saved = onnx.load(str(path))
    assert saved.ir_version <= max_ir_version()
    assert model.ir_version == onnx.IR_VERSION, "the caller's proto is left unchanged"
    run(saved, {"x": np.ones((2, 64), np.float32)})


def test_save_refuses_input_file(tmp_path):
    """Saving onto a protected (input) path raises before anything is written."""
    path = tmp_path / "m.onnx"
    graphopt.save(_matmul_model(), path)
    before = path.read_bytes()
    with pytest.raises(GraphoptError, match="refusing to overwrite"):
        graphopt.save(_matmul_model(8, 8), path, protect=(path,))
    assert path.read_bytes() == before


def test_save_is_atomic_no_temp_left(tmp_path):
    """After a save only the target exists in the folder (the temp file was renamed)."""
    graphopt.save(_matmul_model(), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_save_failure_keeps_old_file(tmp_path, monkeypatch):
    """A save that fails midway leaves the previous file intact and no temp file."""
    path = tmp_path / "m.onnx"
    graphopt.save(_matmul_model(), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        graphopt.save(_matmul_model(8, 8), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_external_data_roundtrip(tmp_path):
    """external_data=True writes <name>.data beside the model; it loads back and runs."""
    model = _matmul_model(256, 128)
    path = graphopt.save(model, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    assert path.stat().st_size < 4096, "weights are not inside the .onnx file"
    assert model.graph.initializer[0].HasField("raw_data"), "the caller's proto keeps its data"
    loaded = graphopt.load(path)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))
    feeds = {"x": np.ones((2, 256), np.float32)}
    np.testing.assert_array_equal(run(loaded, feeds)["y"], run(model, feeds)["y"])


def test_external_data_missing_file(tmp_path):
    """A model whose .data file is gone gives ExternalDataError naming the file."""
    path = graphopt.save(_matmul_model(256, 128), tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ExternalDataError, match="ext.onnx.data"):
        graphopt.load(path)


def test_external_data_path_traversal_refused(tmp_path):
    """A location like ../secret is refused before anything is read."""
    path = graphopt.save(_matmul_model(256, 128), tmp_path / "ext.onnx", external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside.write_bytes(b"\0" * (256 * 128 * 4))
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = f"../{outside.name}"
        if entry.key == "offset":
            entry.value = "0"
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(model.SerializeToString())
    try:
        with pytest.raises(UnsafePathError, match="outside the model's folder"):
            graphopt.load(evil)
    finally:
        outside.unlink()


def test_external_data_absolute_path_refused(tmp_path):
    """An absolute external-data location is refused too."""
    path = graphopt.save(_matmul_model(256, 128), tmp_path / "ext.onnx", external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "/etc/passwd"
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(model.SerializeToString())
    with pytest.raises(UnsafePathError):
        graphopt.load(evil)


def test_large_model_saved_with_external_data(tmp_path, monkeypatch):
    """Over the 2 GB limit (lowered here), save switches to external data by itself."""
    monkeypatch.setattr("graphopt.ir.model._EXTERNAL_THRESHOLD", 10_000)
    path = graphopt.save(_matmul_model(256, 128), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    with pytest.raises(GraphoptError, match="exceed 2 GB"):
        graphopt.save(_matmul_model(256, 128), tmp_path / "big2.onnx", external_data=False)
    graphopt.load(path)


def test_opset_too_new(tmp_path):
    """A default-domain opset newer than onnx knows is UnsupportedModelError."""
    model = _matmul_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    path = tmp_path / "new.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(UnsupportedModelError, match="opset"):
        graphopt.load(path)


def test_load_modelproto_is_a_copy():
    """Loading a ModelProto returns a copy: changing it leaves the caller's proto alone."""
    model = _matmul_model()
    loaded = graphopt.load(model)
    loaded.graph.node.pop()
    assert len(model.graph.node) == 2


def test_constant_node_weights():
    """A weight stored as a Constant node is found like an initializer."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w))
    model = make_model([const, helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": [1, 2]}, ["y"])
    np.testing.assert_array_equal(constant_value(model.graph, "w"), w)
    from graphopt.analysis import count_cost

    assert count_cost(model).params == 6


def test_dynamic_dims_survive_save(tmp_path):
    """Dynamic input dims stay symbolic through save and load."""
    path = graphopt.save(_matmul_model(), tmp_path / "m.onnx")
    dim = graphopt.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
