"""Input specs: --input-shape parsing, generated feeds, .npz loading."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.errors import InputSpecError
from graphopt.ir.inputs import generate_inputs, load_inputs, parse_input_shape, resolve_shapes
from graphopt.testing import make_model


def _text_model() -> onnx.ModelProto:
    """input_ids -> Gather(embedding[50, 4]) ; attention_mask, token_type_ids -> Cast -> Add"""
    emb = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "ax"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["y"]),
        helper.make_node("Cast", ["token_type_ids"], ["t"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Identity", ["t"], ["t_out"]),
    ]
    i64 = onnx.TensorProto.INT64
    return make_model(nodes, [("input_ids", ["batch", "seq"], i64),
                              ("attention_mask", ["batch", "seq"], i64),
                              ("token_type_ids", ["batch", "seq"], i64)], ["y", "t_out"],
                      {"emb": emb, "ax": np.array([2], np.int64)})


def test_parse_input_shape():
    """NAME:8x128 parses; names may contain colons (the last one splits)."""
    assert parse_input_shape("input_ids:8x128") == ("input_ids", (8, 128))
    assert parse_input_shape("a:b:1x3x224x224") == ("a:b", (1, 3, 224, 224))


@pytest.mark.parametrize("text", ["input_ids", "input_ids:", ":8x128", "x:8xq", "x:0x3"])
def test_parse_input_shape_errors(text):
    """Malformed shapes are InputSpecError with an example of the right form."""
    with pytest.raises(InputSpecError):
        parse_input_shape(text)


def test_generated_text_inputs():
    """Token ids fall inside the embedding table; masks are ones; token types zeros."""
    model = _text_model()
    feeds = generate_inputs(model, {"input_ids": (3, 7)})
    assert feeds["input_ids"].shape == (3, 7) and feeds["attention_mask"].shape == (3, 7)
    assert feeds["input_ids"].dtype == np.int64
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 50
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()


def test_ragged_masks_pad_the_tail():
    """ragged=True keeps a prefix of ones in each row, zeros after."""
    feeds = generate_inputs(_text_model(), {"input_ids": (6, 16)}, ragged=True, seed=3)
    mask = feeds["attention_mask"]
    for row in mask:
        ones = int(row.sum())
        assert ones >= 1 and (row[:ones] == 1).all() and (row[ones:] == 0).all()
    assert len({int(r.sum()) for r in mask}) > 1


def test_shared_symbols_resolve_together():
    """Inputs sharing a symbolic dim get the same value as the one the user fixed."""
    shapes = resolve_shapes(_text_model(), {"input_ids": (2, 9)})
    assert shapes["attention_mask"] == (2, 9) and shapes["token_type_ids"] == (2, 9)


@pytest.mark.parametrize("shapes, message", [
    ({"nope": (1, 2)}, "not a model input"),
    ({"input_ids": (1, 2, 3)}, "rank 3"),
])
def test_wrong_input_shapes(shapes, message):
    """Unknown input names and wrong ranks are refused with the model's inputs listed."""
    with pytest.raises(InputSpecError, match=message):
        resolve_shapes(_text_model(), shapes)


def test_fixed_dim_mismatch():
    """A given dim that contradicts a fixed dim is refused."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [1, 3]}, ["y"])
    with pytest.raises(InputSpecError, match="fixed shape"):
        resolve_shapes(model, {"x": (1, 4)})


def test_load_inputs_npz_and_folder(tmp_path):
    """An .npz is one feed; a folder of .npz files is one feed per file; names are checked."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [1, 3]}, ["y"])
    np.savez(tmp_path / "a.npz", x=np.ones((1, 3), np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros((1, 3), np.float32))
    assert len(load_inputs(tmp_path / "a.npz", model)) == 1
    assert len(load_inputs(tmp_path, model)) == 2
    np.savez(tmp_path / "bad.npz", z=np.ones(3))
    with pytest.raises(InputSpecError, match="not model inputs"):
        load_inputs(tmp_path / "bad.npz", model)
    with pytest.raises(InputSpecError, match="not found"):
        load_inputs(tmp_path / "missing.npz", model)
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    with pytest.raises(InputSpecError, match="cannot read"):
        load_inputs(tmp_path / "corrupt.npz", model)
