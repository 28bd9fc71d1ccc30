"""The TensorRT 2:4 path up to the point an engine or session would be created (no GPU or
TensorRT here): NVIDIA's own 2:4 checker (Polygraphy's) accepts what sparsify writes; the
engine loader carries the sparse-weights flag; the ORT TensorRT EP gets
``trt_sparsity_enable``; which layers ran sparse is read from the inspector's tactics; a
TensorRT that cannot build is one skip line.

    x [4, 32] ─ MatMul w [32, 24] ─ y1     x [4, 16] ─ Gemm w [6, 16] (transB) ─ y2
    img [2, 8, 6, 6] ─ Conv w [5, 8, 3, 3] ─ y3
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.passes.sparse_ops import SparseOps
from graphopt.runtime.providers import ProviderOptions, ort_providers
from graphopt.sparsity import kernels
from graphopt.testing import detail_rows, make_model

from .test_sparsify import _sparsify

N = helper.make_node
RNG = np.random.default_rng(33)


def three_layers():
    return make_model(
        [N("MatMul", ["x", "w1"], ["y1"], name="fc"),
         N("Gemm", ["x2", "w2"], ["y2"], name="gemm", transB=1),
         N("Conv", ["img", "w3"], ["y3"], name="conv", kernel_shape=[3, 3])],
        {"x": [4, 32], "x2": [4, 16], "img": [2, 8, 6, 6]}, ["y1", "y2", "y3"],
        {"w1": RNG.standard_normal((32, 24)).astype(np.float32),
         "w2": RNG.standard_normal((6, 16)).astype(np.float32),
         "w3": RNG.standard_normal((5, 8, 3, 3)).astype(np.float32)})


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_polygraphy_checker_accepts_the_2_4_weights(method):
    """Polygraphy's SparsityPruner.check (the checker of ``polygraphy inspect sparsity``,
    which walks MatMul B along axis 0, Gemm B along its K axis, Conv W along input
    channels) finds every weight sparsify wrote in 2:4, and none of the dense originals."""
    sparse_tool = pytest.importorskip("polygraphy.tools.sparse")
    model = three_layers()
    feeds = [{"x": RNG.standard_normal((4, 32)).astype(np.float32),
              "x2": RNG.standard_normal((4, 16)).astype(np.float32),
              "img": RNG.standard_normal((2, 8, 6, 6)).astype(np.float32)} for _ in range(3)]
    out, entry, p = _sparsify(model, feeds if method != "magnitude" else None,
                              pattern="2:4", method=method)
    assert [r.pattern_ok for r in detail_rows(entry)] == [True] * 3
    dense = sparse_tool.SparsityPruner(model)
    dense.check()
    assert dense.sparse_tensors == set()
    checker = sparse_tool.SparsityPruner(out)
    checker.check()
    assert checker.sparse_tensors == {"w1", "w2", "w3"}


def test_engine_loader_sets_the_sparse_weights_flag():
    """The Polygraphy loader chain is built without TensorRT: the config asks for sparse
    weights (and FP16, where sparse tensor cores run), the dense baseline does not, and the
    network is parsed from the candidate model's bytes."""
    pytest.importorskip("polygraphy.backend.trt")
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    model = kernels.micro_model("tensorrt_gemm", w, (2, 3, 16))
    sparse = kernels.engine_loader(model)
    assert sparse._config.sparse_weights is True and sparse._config.fp16 is True
    assert sparse._network._model_bytes == model.SerializeToString()
    dense = kernels.engine_loader(model, sparse=False)
    assert dense._config.sparse_weights is False


def test_sparse_tactics_read_from_the_inspector_json():
    """Only tactic names count (a layer named like 'sparse' with a dense tactic does not);
    an engine with layer names only gives None (unknown), not 'no sparse layer'."""
    info = {"Layers": [
        {"Name": "layer", "LayerType": "CaskGemm",
         "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_sparse"},
        {"Name": "sparse_fc", "LayerType": "CaskGemm",
         "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64"},
        {"Name": "reformat", "LayerType": "Reformat", "TacticValue": "0x0"}]}
    assert kernels.sparse_tactic_layers(info) == ["layer"]
    assert kernels.sparse_tactic_layers({"Layers": ["layer", "reformat"]}) is None
    assert kernels.sparse_tactic_layers({"Layers": []}) == []


def test_ort_tensorrt_ep_gets_sparsity_enable():
    """The TensorRT EP options carry trt_sparsity_enable only when asked."""
    (name, opts), *_ = ort_providers("tensorrt", ProviderOptions(trt_sparse=True))
    assert name == "TensorrtExecutionProvider" and opts["trt_sparsity_enable"] == "True"
    assert "trt_sparsity_enable" not in ort_providers("tensorrt")[0][1]


def test_cli_bench_trt_sparse_without_tensorrt_is_one_error_line(tmp_path, capsys):
    """bench --provider tensorrt --trt-sparse on a machine without TensorRT: one error line."""
    import graphopt
    from graphopt.cli.commands import main

    src = tmp_path / "m.onnx"
    graphopt.save(make_model([N("MatMul", ["x", "w"], ["y"])], {"x": [2, 8]}, ["y"],
                             {"w": np.ones((8, 4), np.float32)}), src)
    code = main(["bench", str(src), "--provider", "tensorrt", "--trt-sparse", "--rounds", "1",
                 "--min-time", "0"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    if code == 0:
        pytest.skip("a working TensorRT EP is present here")
    assert code != 0 and len(err) == 1 and err[0].startswith("error:"), err


def test_tensorrt_that_cannot_build_is_one_skip_line(monkeypatch):
    """TensorRT importable but no usable GPU: the builder's error becomes one skip line and
    a dense choice per layer with the reason; the model is unchanged."""
    monkeypatch.setattr(kernels, "tensorrt_unavailable", lambda: None)

    def fail(w, x, rounds):
        raise RuntimeError("no CUDA-capable device is detected")

    monkeypatch.setattr(kernels, "time_tensorrt_candidates", fail)
    w = RNG.standard_normal((32, 16)).astype(np.float32)
    w[RNG.random(w.shape) < 0.7] = 0
    model = make_model([N("MatMul", ["x", "w"], ["h"], name="a"),
                        N("MatMul", ["h", "w2"], ["y"], name="b")], {"x": [4, 32]}, ["y"],
                       {"w": w, "w2": w[:16].copy()})
    p = SparseOps(provider="tensorrt")
    out, report = PassManager([p]).run(model, Context())
    entry = report.passes[0]
    assert entry.status == "unchanged"
    lines = [s for s in entry.skipped if "TensorRT" in s.reason]
    assert len(lines) == 1 and "no CUDA-capable device" in lines[0].reason
    assert [c.chosen for c in detail_rows(entry)] == ["dense", "dense"]
    assert all("could not build" in c.reason for c in detail_rows(entry))
