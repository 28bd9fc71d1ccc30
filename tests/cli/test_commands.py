"""The CLI: happy paths, and one clear error line with a non-zero exit for every bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.cli.commands import main
from graphopt.testing import make_model


@pytest.fixture()
def model_path(tmp_path):
    """x[batch, 3, 8, 8] -> Pad(1) -> Conv(4) -> BatchNorm -> Identity -> y"""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["xp"], mode="constant"),
        helper.make_node("Conv", ["xp", "w", "b"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
        helper.make_node("Identity", ["n"], ["y"]),
    ]
    inits = {
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "s": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "bb": rng.standard_normal(4).astype(np.float32),
        "m": rng.standard_normal(4).astype(np.float32),
        "v": rng.uniform(0.5, 1.5, 4).astype(np.float32),
    }
    path = tmp_path / "model.onnx"
    graphopt.save(make_model(nodes, {"x": ["batch", 3, 8, 8]}, ["y"], inits), path)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, f"expected one error line, got {err}"
    assert err[0].startswith("error: ")
    assert "Traceback" not in err[0]
    return err[0]


def test_optimize_happy_path(model_path, tmp_path, capsys):
    """optimize runs the passes, writes the model and a JSON report, validates within tolerance."""
    out = tmp_path / "out" / "opt.onnx"
    report = tmp_path / "report.json"
    code = main(["optimize", str(model_path), "-o", str(out), "--pass", "cleanup",
                 "--pass", "fold-pad", "--pass", "fold-batchnorm", "--report", str(report),
                 "--validate", "--input-shape", "x:2x3x8x8"])
    assert code == 0, capsys.readouterr()
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops == ["Conv"]
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]] == ["cleanup", "fold-pad", "fold-batchnorm"]
    assert data["ok"] and data["validation"]["ok"]
    out = capsys.readouterr().out
    assert "fold-batchnorm" in out and "batchnorms_folded=1" in out


def test_optimize_with_recipe(model_path, tmp_path):
    """--recipe reads passes from a YAML file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - cleanup\n  - fold-batchnorm\n")
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe",
                 str(recipe), "--json"]) == 0


def test_inspect_json(model_path, capsys):
    """inspect --json reports inputs, op histogram, params and MACs."""
    assert main(["inspect", str(model_path), "--input-shape", "x:1x3x8x8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"][0]["shape"] == ["batch", 3, 8, 8]
    assert info["op_histogram"]["Conv"] == 1
    assert info["cost"]["params"] == 4 * 3 * 3 * 3 + 4 * 5
    assert info["cost"]["macs"] == 4 * 8 * 8 * 27


def test_inspect_table(model_path, capsys):
    """inspect without --json prints tables naming the ops."""
    assert main(["inspect", str(model_path)]) == 0
    assert "BatchNormalization" in capsys.readouterr().out


def test_validate_identical_and_different(model_path, tmp_path, capsys):
    """validate exits 0 for the same model and 1 for a changed one."""
    assert main(["validate", str(model_path), str(model_path)]) == 0
    changed = onnx.load(str(model_path))
    for init in changed.graph.initializer:
        if init.name == "b":
            init.CopyFrom(onnx.numpy_helper.from_array(np.full(4, 9, np.float32), "b"))
    other = tmp_path / "changed.onnx"
    graphopt.save(changed, other)
    assert main(["validate", str(model_path), str(other), "--json"]) == 1


def test_passes_lists_registered(capsys):
    """passes lists the lossless passes with their kind."""
    assert main(["passes", "--json"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert {"cleanup", "fold-batchnorm", "fold-pad"} <= names


def test_input_never_modified(model_path, tmp_path):
    """The input file's bytes are identical after optimize."""
    before = model_path.read_bytes()
    main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--pass", "cleanup"])
    assert model_path.read_bytes() == before


@pytest.mark.parametrize("argv, fragment", [
    (["inspect", "{tmp}/missing.onnx"], "not found"),
    (["inspect", "{corrupt}"], "not an ONNX model"),
    (["inspect", "{model}", "--input-shape", "x:2x3"], "rank 2"),
    (["inspect", "{model}", "--input-shape", "nope:2x3"], "not a model input"),
    (["inspect", "{model}", "--input-shape", "x"], "expected NAME:D1xD2"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--pass", "nope"], "unknown pass 'nope'"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--pass", "cleanup:bogus=1"],
     "unknown option 'bogus'"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--pass", "cleanup:fold_constants=maybe"],
     "expected true or false"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx"], "either --recipe"),
    (["optimize", "{model}", "-o", "{model}", "--pass", "cleanup"], "refusing to overwrite"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--recipe", "{tmp}/none.yaml"], "not found"),
    (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--pass", "cleanup", "--calibration",
      "{tmp}/none.npz"], "not found"),
    (["optimize", "{missing_ext}", "-o", "{tmp}/o.onnx", "--pass", "cleanup"], "missing"),
    (["validate", "{model}", "{tmp}/missing.onnx"], "not found"),
    (["validate", "{model}", "{model}", "--tol", "y"], "bad --tol"),
    (["bench", "{model}", "--provider", "cuda"], "CUDA"),
    (["bench", "{model}", "--provider", "gpu"], "Invalid value"),
    (["bench", "{model}", "--threads", "0"], "Invalid value"),
    (["inspect", "{model}", "--bogus"], "No such option"),
    (["frobnicate"], "No such command"),
])
def test_user_errors_are_one_line(argv, fragment, model_path, tmp_path, capsys):
    """Bad paths, corrupt files, unknown passes, bad options: one error line, exit 2."""
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(model_path.read_bytes()[:40])
    ext = graphopt.save(onnx.load(str(model_path)), tmp_path / "ext" / "m.onnx",
                        external_data=True)
    w = onnx.load(str(ext), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in w.graph.initializer):
        (tmp_path / "ext" / "m.onnx.data").unlink()
        missing_ext = ext
    else:  # weights too small to go external: fake a missing data file
        w.graph.initializer[1].data_location = onnx.TensorProto.EXTERNAL
        w.graph.initializer[1].external_data.add(key="location", value="gone.data")
        w.graph.initializer[1].ClearField("raw_data")
        missing_ext = tmp_path / "ext" / "fake.onnx"
        missing_ext.write_bytes(w.SerializeToString())
    subs = {"tmp": str(tmp_path), "model": str(model_path), "corrupt": str(corrupt),
            "missing_ext": str(missing_ext)}
    code = main([a.format(**subs) for a in argv])
    assert code == 2
    assert fragment in _error_line(capsys)


def test_macs_counted_after_fold_with_symbolic_output(model_path, tmp_path, capsys):
    """MACs stay counted after a pass when the graph output has a symbolic batch dim."""
    report = tmp_path / "r.json"
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--pass",
                 "fold-batchnorm", "--input-shape", "x:2x3x8x8", "--report", str(report)]) == 0
    entry = json.loads(report.read_text())["passes"][0]
    assert entry["macs_after"] == entry["macs_before"] == 2 * 4 * 8 * 8 * 27


@pytest.mark.parametrize("ratio, warned", [(1.12, True), (0.8, False)])
def test_a_result_slower_than_the_original_is_said(ratio, warned):
    """The fidelity line's latency ratio above 1: a line says the result ran slower and
    points at the passes' notes (where prune names the widths off the NCHWc block)."""
    import io

    from rich.console import Console

    from graphopt.cli.render import _render_fidelity

    out = io.StringIO()
    _render_fidelity(Console(file=out, width=200), {
        "measured": True, "data": "held-out calibration (2 of 8 feeds)",
        "outputs": [{"name": "y", "cosine": 0.99, "top1_agreement": None}],
        "latency_ratio": ratio})
    text = out.getvalue()
    assert f"latency ratio {ratio:.3f}×" in text
    assert ("the result ran slower than the original here" in text) == warned
