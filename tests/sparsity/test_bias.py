"""sparsify's bias correction (sparsegpt): the mean output shift of each sparsified layer
on the calibration inputs goes into the bias after it.

    x [b, s, 32] (mean 2) ─ MatMul w [32, 24] ─ Add bias [24] ─ y
    x2 [8, 16] (mean 1.5) ─ Gemm w2 [16, 8] (no C) ─ y2
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt.testing import detail_rows, make_model, run

from .test_sparsify import _init, _sparsify

N = helper.make_node


def _data(rng, n):
    mix = np.random.default_rng(5).standard_normal((32, 32)) * 0.4 + np.eye(32)
    return [{"x": (np.abs(rng.standard_normal((4, 8, 32)) @ mix) + 2.0).astype(np.float32),
             "x2": (rng.standard_normal((8, 16)) + 1.5).astype(np.float32)} for _ in range(n)]


def _model(rng):
    return make_model([N("MatMul", ["x", "w"], ["h"], name="fc"),
                       N("Add", ["h", "bias"], ["y"]),
                       N("Gemm", ["x2", "w2"], ["y2"], name="gemm")],
                      {"x": ["b", "s", 32], "x2": [8, 16]}, ["y", "y2"],
                      {"w": rng.standard_normal((32, 24)).astype(np.float32),
                       "bias": rng.standard_normal(24).astype(np.float32),
                       "w2": rng.standard_normal((16, 8)).astype(np.float32)})


def _err(model, out, feeds, name):
    num = den = 0.0
    for f in feeds:
        y0, y1 = run(model, f)[name].astype(np.float64), run(out, f)[name].astype(np.float64)
        num += float(((y1 - y0) ** 2).sum())
        den += float(((y0 - y0.mean()) ** 2).sum())
    return num / den


def test_mean_shift_goes_into_the_bias_and_lowers_held_out_error():
    """2:4 SparseGPT on inputs with a large mean: with bias=shift the Add's bias and a new
    Gemm bias input take the shift; held-out output errors drop below those without it
    (same weights: only biases differ), and the reported layer errors too."""
    rng = np.random.default_rng(0)
    model = _model(rng)
    calib, held = _data(rng, 6), _data(rng, 3)
    # mask_refit off: the refit of the kept weights would absorb most of the shift itself
    plain, plain_entry, _ = _sparsify(model, calib, pattern="2:4", method="sparsegpt",
                                      bias="off", mask_refit=False)
    fixed, entry, _ = _sparsify(model, calib, pattern="2:4", method="sparsegpt", bias="shift",
                                mask_refit=False)
    np.testing.assert_array_equal(_init(plain, "w"), _init(fixed, "w"))
    assert not np.array_equal(_init(plain, "bias"), _init(fixed, "bias"))
    gemm = next(n for n in fixed.graph.node if n.op_type == "Gemm")
    assert len(gemm.input) == 3 and len(plain.graph.node[2].input) == 2
    onnx.checker.check_model(fixed)
    for name in ("y", "y2"):
        assert _err(model, fixed, held, name) < 0.9 * _err(model, plain, held, name), name
    for a, b in zip(detail_rows(plain_entry), detail_rows(entry)):
        assert b.output_error < a.output_error and b.reason is None


def test_shift_not_absorbed_is_a_reason():
    """A MatMul whose output is also a graph output has no bias to take the shift: the
    weights are sparsified, the reason is in the layer's row."""
    rng = np.random.default_rng(1)
    model = make_model([N("MatMul", ["x", "w"], ["y"], name="fc")], {"x": ["b", "s", 32]},
                       ["y"], {"w": rng.standard_normal((32, 24)).astype(np.float32)})
    out, entry, p = _sparsify(model, _data(rng, 3), pattern="2:4", method="sparsegpt")
    (row,) = detail_rows(entry)
    assert row.sparsity == 0.5 and "not absorbed" in row.reason


def test_joint_refit_on_centered_statistics_is_no_worse_on_its_data():
    """bias=joint (default) fits weights and bias together (centered Gram): its layer errors
    on the calibration rows are at most those of bias=shift, which fixes the weights first
    and then only the bias."""
    rng = np.random.default_rng(2)
    model = _model(rng)
    calib = _data(rng, 6)
    _, shift, _ = _sparsify(model, calib, pattern="unstructured", ratio=0.5,
                            method="sparsegpt", bias="shift")
    out, joint, _ = _sparsify(model, calib, pattern="unstructured", ratio=0.5,
                              method="sparsegpt")
    onnx.checker.check_model(out)
    for a, b in zip(detail_rows(shift), detail_rows(joint)):
        assert b.output_error <= a.output_error * 1.05, (a, b)


def test_masked_refit_keeps_the_pattern_and_lowers_the_layer_error():
    """mask_refit (default): the same 2:4 mask as SparseGPT's, the kept weights refit;
    the layer errors on the calibration rows drop, the pattern holds."""
    rng = np.random.default_rng(3)
    model = _model(rng)
    calib = _data(rng, 6)
    base, e0, _ = _sparsify(model, calib, pattern="2:4", method="sparsegpt", mask_refit=False)
    out, e1, _ = _sparsify(model, calib, pattern="2:4", method="sparsegpt")
    np.testing.assert_array_equal(_init(base, "w") != 0, _init(out, "w") != 0)
    assert all(r.pattern_ok for r in detail_rows(e1))
    for a, b in zip(detail_rows(e0), detail_rows(e1)):
        assert b.output_error < a.output_error, (a, b)
