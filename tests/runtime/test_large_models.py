"""Models over 2 GB, on small models: ``GRAPHOPT_EXTERNAL_BYTES`` lowers the threshold, so the
path a > 2 GB model takes (external data on save, onnxruntime sessions from files, outlines
instead of loaded weights) runs in seconds. ``serialized`` is made to fail: no session may be
built from a model's bytes on that path. The > 2 GB figures are in benchmarks/bench_large.py.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.cli.commands import main
from graphopt.ir import model as model_io
from graphopt.ir.model import is_outline, open_for_run
from graphopt.runtime.session import ort_session, run_model, session_source

HIDDEN, FFN = 32, 1024  # 128 KB weights: above the 64 KB an outline loads


def _mlp(layers: int = 2) -> onnx.ModelProto:
    """x[batch, 32] -> (x + W2 relu(W1 x + b1) + b2) x layers -> y"""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        p = f"l{i}."
        for name, shape, scale in ((p + "w1", (HIDDEN, FFN), HIDDEN ** -0.5),
                                   (p + "b1", (FFN,), 0.1),
                                   (p + "w2", (FFN, HIDDEN), FFN ** -0.5),
                                   (p + "b2", (HIDDEN,), 0.1)):
            value = (rng.standard_normal(shape) * scale).astype(np.float32)
            inits.append(numpy_helper.from_array(value, name))
        nodes += [helper.make_node("MatMul", [x, p + "w1"], [p + "h"]),
                  helper.make_node("Add", [p + "h", p + "b1"], [p + "hb"]),
                  helper.make_node("Relu", [p + "hb"], [p + "a"]),
                  helper.make_node("MatMul", [p + "a", p + "w2"], [p + "m"]),
                  helper.make_node("Add", [p + "m", p + "b2"], [p + "mb"]),
                  helper.make_node("Add", [x, p + "mb"], [p + "out"])]
        x = p + "out"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture()
def large(tmp_path, monkeypatch):
    """The MLP saved with external data, with the 2 GB threshold lowered to 64 KB and
    ``serialized`` (model -> bytes for a session) failing."""
    path = tmp_path / "src" / "mlp.onnx"
    graphopt.save(_mlp(), path, external_data=True)
    monkeypatch.setenv(model_io.EXTERNAL_ENV, str(64 * 1024))

    def refuse(model):
        raise AssertionError("a model over the threshold was serialized for a session")

    monkeypatch.setattr(model_io, "serialized", refuse)
    return path


def _feed(batch: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, HIDDEN)).astype(np.float32)}


def _data_files(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def test_open_for_run_leaves_large_weights_on_disk(large):
    """A file over the threshold opens as an outline (big tensors still external, biases
    loaded) and runs from its path; below the threshold it loads whole."""
    opened = open_for_run(large)
    assert is_outline(opened.model) and opened.runnable == large
    external = {t.name for t in opened.model.graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    assert external == {"l0.w1", "l0.w2", "l1.w1", "l1.w2"}
    os.environ[model_io.EXTERNAL_ENV] = str(2**31)
    whole = open_for_run(large)
    assert not is_outline(whole.model) and whole.runnable == large


def test_session_from_a_large_proto_goes_through_a_file(large):
    """An in-memory model over the threshold gets its session from a temporary folder with
    external weights (never its bytes), removed afterwards; outputs equal a bytes session's."""
    model = graphopt.load(large)
    with session_source(model) as source:
        assert isinstance(source, str) and os.path.isfile(source)
        folder = os.path.dirname(source)
        assert os.path.getsize(os.path.join(folder, "weights.bin")) >= 4 * HIDDEN * FFN * 4
    assert not os.path.exists(folder)
    got = run_model(ort_session(model), _feed())
    os.environ[model_io.EXTERNAL_ENV] = str(2**31)
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got["y"], run_model(want, _feed())["y"])


def test_cli_end_to_end_over_the_threshold(large, tmp_path, capsys):
    """optimize (a lossless and a pruning pass), validate and bench on the large path: the
    outputs are written with their .data files (mode as open() gives), cleanup matches the
    input, the pruned model is smaller and runs."""
    clean = tmp_path / "out" / "clean.onnx"
    pruned = tmp_path / "out" / "pruned.onnx"
    assert main(["optimize", str(large), "-o", str(clean), "--pass", "cleanup"]) == 0, \
        capsys.readouterr()
    assert main(["optimize", str(large), "-o", str(pruned), "--pass",
                 "prune-neurons:ratio=0.25,importance=l1", "--validate", "--atol", "1e3"]) == 0, \
        capsys.readouterr()
    assert _data_files(clean) == ["clean.onnx", "clean.onnx.data"]
    assert _data_files(pruned) == ["pruned.onnx", "pruned.onnx.data"]
    umask = os.umask(0)
    os.umask(umask)
    for p in (clean, clean.with_name("clean.onnx.data")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    for p in (clean, pruned):  # the .onnx holds no large tensor itself
        assert p.stat().st_size < 16 * 1024
    import onnxruntime as ort

    runs = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, _feed())[0]
            for p in (large, clean, pruned)}
    np.testing.assert_allclose(runs[clean], runs[large], rtol=1e-5, atol=1e-5)
    assert runs[pruned].shape == runs[large].shape
    w1 = {t.name: list(t.dims) for t in onnx.load(str(pruned), load_external_data=False)
          .graph.initializer}
    assert w1["l0.w1"] == [HIDDEN, FFN * 3 // 4]
    capsys.readouterr()
    assert main(["validate", str(large), str(clean), "--count", "1"]) == 0, capsys.readouterr()
    assert main(["bench", str(pruned), "--vs", str(large), "--rounds", "2", "--warmup", "0",
                 "--min-time", "0"]) == 0, capsys.readouterr()
    assert "pruned.onnx" in capsys.readouterr().out


def test_api_keeps_one_copy_of_a_large_file(large, monkeypatch):
    """graphopt.optimize on a file over the threshold loads it once (the passes' copy): the
    original is measured from the file, not held in memory beside it."""
    loads = []
    real = model_io.load

    def counting(source, **kw):
        if kw.get("load_external", True):
            loads.append(source)
        return real(source, **kw)

    monkeypatch.setattr("graphopt.api.load", counting)
    monkeypatch.setattr(model_io, "load", counting)
    optimized, report = graphopt.optimize(large, ["prune-neurons:ratio=0.25,importance=l1"],
                                          validate={"atol": 1e3, "rtol": 1e3})
    assert report.validation is not None and report.validation.ok
    assert len(loads) == 1, loads


def test_inspect_reads_a_large_file_as_its_outline(large, monkeypatch):
    """inspect (without --groups) reports the same for a file over the threshold without
    loading its weights."""
    from graphopt.analysis import inspect as inspect_module

    os.environ[model_io.EXTERNAL_ENV] = str(2**31)
    whole = inspect_module.inspect_model(large)
    os.environ[model_io.EXTERNAL_ENV] = str(64 * 1024)

    def refuse(*args, **kwargs):
        raise AssertionError("inspect loaded the whole model")

    monkeypatch.setattr(inspect_module, "load", refuse)
    assert inspect_module.inspect_model(large) == whole


def test_a_file_newer_than_onnxruntime_reads_is_loaded_and_lowered(large, tmp_path):
    """A file whose IR version onnxruntime does not read cannot be given to it by path: it
    is loaded (whole, even over the threshold) and written lowered; validate runs."""
    from graphopt.runtime.validate import validate

    newer = tmp_path / "newer" / "mlp.onnx"
    model = graphopt.load(large)
    model.ir_version = model_io.max_ir_version() + 1
    graphopt.save(model, newer, external_data=True)
    raw = onnx.load(str(newer), load_external_data=False)
    raw.ir_version = model_io.max_ir_version() + 1  # save lowers it; put it back
    newer.write_bytes(raw.SerializeToString())
    opened = open_for_run(newer)
    assert isinstance(opened.runnable, onnx.ModelProto) and not is_outline(opened.model)
    assert validate(newer, large, count=1).ok
