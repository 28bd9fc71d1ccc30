"""Tests for passes/nan_guard.py on a one-head attention built as transformers 5's SDPA
export builds it: ``Softmax(scores + Where(mask, 0, -inf))`` then ``Where(IsNaN(p), 0, p)``."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.passes.nan_guard import DropNanGuard
from graphopt.testing import make_model, op_types, run, run_pass, skip_reasons

F32 = np.float32
RNG = np.random.default_rng(0)
B, S, H = 3, 5, 8


def _attention(fill: float = -np.inf, float_mask: bool = False):
    w = {n: RNG.standard_normal((H, H)).astype(F32) for n in ("wq", "wk", "wv")}
    consts = {"scale": np.array(0.35, F32), "zero": np.array(0.0, F32),
              "fill": np.array(fill, F32), "axes": np.array([1], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", n], [n[1]]) for n in ("wq", "wk", "wv")]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["sc"]),
              helper.make_node("Mul", ["sc", "scale"], ["scaled"])]
    if float_mask:   # the caller passes the additive mask itself
        nodes.append(helper.make_node("Unsqueeze", ["mask", "axes"], ["bias"]))
    else:
        nodes += [helper.make_node("Cast", ["mask"], ["mb"], to=TensorProto.BOOL),
                  helper.make_node("Unsqueeze", ["mb", "axes"], ["mbu"]),
                  helper.make_node("Where", ["mbu", "zero", "fill"], ["bias"])]
    nodes += [helper.make_node("Add", ["scaled", "bias"], ["a"]),
              helper.make_node("Softmax", ["a"], ["s"], axis=-1),
              helper.make_node("IsNaN", ["s"], ["nan"]),
              helper.make_node("Where", ["nan", "zero", "s"], ["p"]),
              helper.make_node("MatMul", ["p", "v"], ["y"])]
    mask_type = TensorProto.FLOAT if float_mask else TensorProto.INT64
    return make_model(nodes, [("x", [B, S, H], TensorProto.FLOAT), ("mask", [B, S], mask_type)],
                      ["y"], {**w, **consts})


def _feed(mask):
    return {"x": RNG.standard_normal((B, S, H)).astype(F32), "mask": np.asarray(mask, np.int64)}


def test_guard_goes_and_outputs_match_through_the_manager():
    """The -inf fill becomes finfo.min and the guard goes; the manager verifies it on
    ragged masks (outputs equal to float rounding), and a batch row with no real token is
    the one place the outputs differ (uniform weights instead of zeros, no NaN)."""
    model = _attention()
    ragged = [_feed([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]]) for _ in range(2)]
    out, report = graphopt.optimize(model, ["drop-nan-guard"], calibration=ragged)
    (rep,) = report.passes
    assert rep.status == "changed" and rep.counters == {"nan_guards_removed": 1,
                                                        "mask_fills_made_finite": 1}
    assert "IsNaN" not in op_types(out) and op_types(out).count("Where") == 1
    for feed in ragged:
        np.testing.assert_allclose(run(out, feed)["y"], run(model, feed)["y"], atol=1e-6)
    empty = _feed([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    want, got = run(model, empty)["y"], run(out, empty)["y"]
    assert not np.isnan(got).any() and np.all(want[1] == 0) and not np.allclose(got[1], 0)
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], atol=1e-6)
    # compare_outputs leaves exactly that row out
    p = DropNanGuard()
    run_pass(p, model)
    ref, cand = p.compare_outputs(empty, {"y": want}, {"y": got})
    np.testing.assert_allclose(ref["y"], cand["y"], atol=1e-6)


def test_finite_fill_needs_no_rewrite():
    out = run_pass(DropNanGuard(), _attention(fill=float(np.finfo(F32).min)))
    assert out.counters == {"nan_guards_removed": 1, "mask_fills_made_finite": 0}


@pytest.mark.parametrize("kind, reason", [("float-mask", "float graph input 'mask'"),
                                          ("nan-fill", "is NaN or +inf")])
def test_guard_stays_when_the_softmax_input_may_be_nan(kind, reason):
    model = _attention(float_mask=True) if kind == "float-mask" else _attention(fill=np.nan)
    result = run_pass(DropNanGuard(), model)
    assert not result.modified and "IsNaN" in op_types(result.model)
    assert len(result.skipped) == 1 and reason in skip_reasons(result)[0]


# --------------------------------------------------------------------------- softmax-floor

def test_softmax_floor_keeps_outputs_through_the_manager():
    """softmax-floor on the masked attention (before and after drop-nan-guard): ReduceMax/
    Max in front of the Softmax, outputs equal on ragged masks, also with scores spread far
    beyond the floor of 80 (weights x20); an empty row stays what it was."""
    from graphopt.passes.softmax_floor import SoftmaxFloor

    model = _attention()
    for w in ("wq", "wk"):
        init = next(t for t in model.graph.initializer if t.name == w)
        init.raw_data = (np.frombuffer(init.raw_data, F32) * 20).astype(F32).tobytes()
    ragged = [_feed([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]]) for _ in range(2)]
    for passes in (["softmax-floor"], ["drop-nan-guard", "softmax-floor"]):
        out, report = graphopt.optimize(model, passes, calibration=ragged)
        assert report.passes[-1].status == "changed"
        assert report.passes[-1].counters == {"softmaxes_floored": 1}
        assert {"ReduceMax", "Max"} <= set(op_types(out))
        for feed in ragged:
            want, got = run(model, feed)["y"], run(out, feed)["y"]
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    w = {t.name: np.frombuffer(t.raw_data, F32).reshape(H, H) for t in model.graph.initializer
         if t.name in ("wq", "wk")}
    x = ragged[0]["x"]
    scores = 0.35 * (x @ w["wq"]) @ (x @ w["wk"]).transpose(0, 2, 1)
    assert (scores.max(-1) - scores.min(-1)).max() > 80  # real scores do reach the floor
    empty = _feed([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    floored = run_pass(SoftmaxFloor(), model).model
    np.testing.assert_array_equal(np.isnan(run(floored, empty)["y"]),
                                  np.isnan(run(model, empty)["y"]))
    # an unmasked softmax (the caller's float mask is not a constant fill) is left alone
    plain = run_pass(SoftmaxFloor(), _attention(float_mask=True))
    assert not plain.modified and "ReduceMax" not in op_types(plain.model)
