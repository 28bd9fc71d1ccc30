"""sparsify: N:M masks along the reduction axis (MatMul, Gemm transB, Conv), SparseGPT
against magnitude on a tiny layer, Wanda on 3-D activations, skips and bad options.

    x [4, 16, 32] ─ MatMul w1 [32, 48] ─ Relu ─ MatMul w2 [48, 8] ─ y
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from graphopt.cli.commands import main
from graphopt.errors import ConfigError
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.passes.sparsify import Sparsify
from graphopt.sparsity.layers import nm_violations
from graphopt.sparsity.masks import keep_mask, output_error
from graphopt.testing import detail_rows, make_model, run

N = helper.make_node
RNG = np.random.default_rng(7)


def _init(model, name):
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


MIX = np.random.default_rng(11).standard_normal((32, 32)) * 0.5 + np.eye(32)


def _feeds(n=6, shape=(4, 16, 32), scale=None):
    """Correlated (one fixed mixing), unevenly scaled features: where Hessian-aware criteria
    matter; calibration and held-out feeds come from the same distribution."""
    mix = MIX[:shape[-1], :shape[-1]]
    scale = scale if scale is not None else RNG.uniform(0.1, 4.0, shape[-1])
    return [{"x": ((RNG.standard_normal(shape) @ mix) * scale).astype(np.float32)}
            for _ in range(n)]


def mlp(k=32, h=48):
    return make_model([N("MatMul", ["x", "w1"], ["a"], name="fc1"), N("Relu", ["a"], ["r"]),
                       N("MatMul", ["r", "w2"], ["y"], name="fc2")],
                      {"x": ["b", "s", k]}, ["y"],
                      {"w1": RNG.standard_normal((k, h)).astype(np.float32),
                       "w2": RNG.standard_normal((h, 8)).astype(np.float32)})


def _sparsify(model, feeds=None, **options):
    """Run sparsify on a copy of ``model`` (the manager edits in place)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    p = Sparsify(**options)
    out, report = PassManager([p]).run(copy, Context(calibration=feeds))
    return out, report.passes[0], p


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_groups_along_matmul_reduction_axis(pattern, n, m, method):
    """MatMul W[K, N]: every group of M consecutive K entries of each column holds exactly N
    non-zeros (TensorRT's layout), for every method."""
    out, entry, p = _sparsify(mlp(), _feeds(), pattern=pattern, method=method)
    assert entry.status == "changed", entry.error
    for name in ("w1", "w2"):
        w = _init(out, name)
        groups = np.moveaxis(w, 0, -1).reshape(w.shape[1], -1, m)
        assert ((groups != 0).sum(-1) == n).all()
        assert nm_violations(w, 0, n, m) == 0
    assert [r.target for r in detail_rows(entry)] == [pattern, pattern]
    assert [row["target"] for row in entry.details["layers"]] == [pattern, pattern]
    assert all(abs(r.sparsity - (1 - n / m)) < 1e-9 for r in detail_rows(entry))


def test_nm_groups_for_gemm_trans_b_and_conv():
    """Gemm transB=1 (W[N, K]): groups along axis 1. Conv W[O, C, kh, kw]: groups along C
    for every output channel and kernel position."""
    gemm = make_model([N("Gemm", ["x", "w", "b"], ["y"], name="g", transB=1)],
                      {"x": [4, 16]}, ["y"],
                      {"w": RNG.standard_normal((6, 16)).astype(np.float32),
                       "b": RNG.standard_normal(6).astype(np.float32)})
    out, entry, _ = _sparsify(gemm, pattern="2:4")
    w = _init(out, "w")
    assert ((w.reshape(6, 4, 4) != 0).sum(-1) == 2).all()
    conv = make_model([N("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1])], {"x": [2, 8, 6, 6]}, ["y"],
                      {"w": RNG.standard_normal((5, 8, 3, 3)).astype(np.float32)})
    feeds = [{"x": RNG.standard_normal((2, 8, 6, 6)).astype(np.float32)} for _ in range(3)]
    for method in ("magnitude", "sparsegpt"):
        out, entry, _ = _sparsify(conv, feeds, pattern="2:4", method=method)
        w = _init(out, "w")
        groups = np.moveaxis(w, 1, -1).reshape(5, 3, 3, 2, 4)
        assert ((groups != 0).sum(-1) == 2).all(), method


def test_reduction_not_divisible_is_skipped_with_reason():
    """K = 30 is not a multiple of 4: fc1 is skipped with the reason, fc2 (K = 48) done."""
    out, entry, p = _sparsify(mlp(k=30), pattern="2:4")
    reasons = [s.reason for s in entry.skipped if "fc1" in s.site]
    assert reasons and "not a multiple of M=4" in reasons[0]
    assert [r.layer for r in detail_rows(entry)] == ["fc2"]


def _layer_error(model, sparse, feeds, name, w_name):
    """Relative output error of one layer on the feeds (its own inputs, original model)."""
    w0, w1 = _init(model, w_name), _init(sparse, w_name)
    x = np.concatenate([f["x"].reshape(-1, f["x"].shape[-1]) for f in feeds]).astype(np.float64)
    return float(((x @ (w0 - w1)) ** 2).sum() / ((x @ w0) ** 2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude(pattern):
    """At the same sparsity, SparseGPT's OBS updates give a smaller layer output error than
    magnitude and Wanda on correlated inputs (held-out rows): a wrong update would not."""
    model = make_model([N("MatMul", ["x", "w"], ["y"], name="fc")], {"x": ["b", "s", 32]},
                       ["y"], {"w": RNG.standard_normal((32, 24)).astype(np.float32)})
    scale = RNG.uniform(0.1, 4.0, 32)
    calib, held = _feeds(8, scale=scale), _feeds(4, scale=scale)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out, entry, p = _sparsify(model, calib, pattern=pattern, ratio=0.5, method=method)
        assert abs(detail_rows(entry)[0].sparsity - 0.5) < 1e-9
        errors[method] = _layer_error(model, out, held, "fc", "w")
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["wanda"], errors


def test_wanda_reads_3d_activations():
    """Wanda on a [batch, seq, K] input uses the per-feature norms over all tokens: with
    one feature 1000x larger, its 100x smaller weights survive where magnitude drops them."""
    scale = np.ones(32)
    scale[5] = 1000.0
    w = RNG.standard_normal((32, 24)).astype(np.float32)
    w[5] *= 0.01  # tiny weights on the loud feature
    model = make_model([N("MatMul", ["x", "w"], ["y"], name="fc")], {"x": ["b", "s", 32]},
                       ["y"], {"w": w})
    feeds = _feeds(4, scale=scale)
    by_mag = _init(_sparsify(model, pattern="2:4", method="magnitude")[0], "w")
    by_wanda = _init(_sparsify(model, feeds, pattern="2:4", method="wanda")[0], "w")
    assert (by_mag[5] == 0).mean() > 0.9
    assert (by_wanda[5] != 0).mean() > 0.8


def test_keep_dense_follows_measured_sensitivity():
    """keep_dense=0.5 of two layers keeps the one whose sparsification alone hurts the
    outputs more (measured), and reports it."""
    model = mlp()
    out, entry, p = _sparsify(model, _feeds(), pattern="2:4", method="magnitude",
                              keep_dense=0.5)
    dense = [r for r in detail_rows(entry) if r.target == "dense"]
    assert len(dense) == 1 and entry.counters["layers_dense"] == 1
    sens = {r.layer: r.sensitivity for r in detail_rows(entry)}
    assert sens[dense[0].layer] == max(sens.values())
    assert np.array_equal(_init(out, dense[0].weight), _init(model, dense[0].weight))


def test_sensitivity_allocation_keeps_mean_ratio():
    """allocation=sensitivity: per-layer ratios differ, the weighted mean stays 50%."""
    out, entry, p = _sparsify(mlp(), _feeds(), ratio=0.5, method="wanda",
                              allocation="sensitivity", spread=0.1)
    ratios = [r.sparsity for r in detail_rows(entry)]
    assert ratios[0] != ratios[1]
    weights = [32 * 48, 48 * 8]
    assert abs(np.average(ratios, weights=weights) - 0.5) < 0.01


def test_keep_mask_exact_counts():
    """keep_mask: N:M keeps N per group; unstructured drops exactly the ratio."""
    s = RNG.random((6, 16))
    assert (keep_mask(s, n=2, m=4).reshape(6, 4, 4).sum(-1) == 2).all()
    assert (~keep_mask(s, ratio=0.25)).sum() == 24
    assert ((~keep_mask(s, ratio=0.25, per_row=True)).sum(1) == 4).all()
    assert output_error(s, s, np.eye(16)) == 0.0


@pytest.mark.parametrize("options, fragment", [
    ({"ratio": 1.0}, "ratio must be in [0, 1)"),
    ({"ratio": -0.1}, "ratio must be in [0, 1)"),
    ({"method": "obs"}, "method must be one of"),
    ({"pattern": "2:3:4"}, "pattern must be"),
    ({"pattern": "4:2"}, "0 < N < M"),
    ({"allocation": "owl", "pattern": "2:4"}, "keep_dense instead"),
])
def test_bad_options_raise_config_error(options, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        build_pass("sparsify", options)
    assert fragment in str(err.value)


@pytest.mark.parametrize("spec, fragment", [
    ("sparsify:ratio=1.5", "ratio must be in [0, 1)"),
    ("sparsify:pattern=3of4", "pattern must be"),
    ("sparsify:method=fancy", "method must be one of"),
    ("sparse-ops:provider=gpu", "provider"),
])
def test_cli_bad_options_one_error_line(spec, fragment, tmp_path, capsys):
    """One 'error:' line, exit 2, nothing written."""
    import graphopt

    src = tmp_path / "m.onnx"
    graphopt.save(mlp(), src)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--pass", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not out.exists()


def test_sparsified_model_runs_and_matches_masked_weights():
    """The saved weights are what the model computes with (ORT, magnitude 50%)."""
    model = mlp()
    feeds = _feeds(1)
    out, entry, _ = _sparsify(model, pattern="unstructured", ratio=0.5)
    x = feeds[0]["x"]
    expect = np.maximum(x @ _init(out, "w1"), 0) @ _init(out, "w2")
    np.testing.assert_allclose(run(out, feeds[0])["y"], expect, rtol=1e-4, atol=1e-4)
