"""Reconstruction after structural cuts: oracles on tiny graphs.

The oracle: units whose contribution is exactly linear in the kept units (or constant) can
be removed and the consumer refit so the pruned model reproduces the original outputs
(~1e-5 through onnxruntime), whatever the rest of the weights are.

MLP (no nonlinearity between the two layers, so hidden units combine linearly)::

    x[n,8] ─ W1[8,6] ─ +b1 ─ W2[6,3] ─ +b2 ─> y      h5 = h0 + 2·h1, h4 = 3 (constant)

Conv pair: ``Conv1(3→6, 3×3) ─ Conv2(6→4, 3×3, pad 1, stride 2)`` with filter 5 = filter 0 +
filter 1 (zero padding keeps the relation at the borders).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.data.gram import GramStats, accumulate, linear_sites
from graphopt.errors import ConfigError
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.prune.reconstruct import solve
from graphopt.testing import make_model, run

RNG = np.random.default_rng(0)


def _mlp(dependent: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(8, 6)).astype(np.float32)
    b1 = rng.normal(size=6).astype(np.float32)
    if dependent:
        w1[:, 5] = w1[:, 0] + 2 * w1[:, 1]
        b1[5] = b1[0] + 2 * b1[1]
    w1[:, 4] = 0
    b1[4] = 3
    w2 = rng.normal(size=(6, 3)).astype(np.float32)
    b2 = rng.normal(size=3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "W2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    return make_model(nodes, {"x": ["n", 8]}, ["y"], {"W1": w1, "b1": b1, "W2": w2, "b2": b2})


def _conv_pair() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    w1[5] = w1[0] + w1[1]
    w2 = rng.normal(size=(4, 6, 3, 3)).astype(np.float32)
    b2 = rng.normal(size=4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
             helper.make_node("Conv", ["c1", "W2", "B2"], ["y"], name="conv2", pads=[1, 1, 1, 1],
                              strides=[2, 2])]
    return make_model(nodes, {"x": ["n", 3, 8, 8]}, ["y"], {"W1": w1, "W2": w2, "B2": b2})


def _feeds(shape, count=3, seed=3):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(count)]


def _prune(model, name, options, feeds):
    pass_obj = build_pass(name, options)
    pruned, report = PassManager([pass_obj]).run(_copy(model), Context(calibration=feeds))
    assert report.ok, report.passes[0].error
    return pruned, report.passes[0], pass_obj


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _max_diff(a, b, feeds):
    return max(float(np.abs(run(a, f)["y"] - run(b, f)["y"]).max()) for f in feeds)


def test_obs_picks_linear_units_and_refit_reproduces_outputs():
    """prune-neurons with calibration: the constant unit and one of h0, h1, h5 (each is a
    combination of the other two) have OBS damage 0 and are picked; the lstsq refit of fc2
    gives back the original outputs."""
    model = _mlp()
    feeds = _feeds((16, 8))
    pruned, entry, pass_obj = _prune(model, "prune-neurons",
                                     {"ratio": 0.34, "damping": 1e-9}, feeds)
    plan = entry.plan
    assert plan.importance == "obs"
    (removed,) = [set(u.tolist()) for u in plan.removal.values()]
    assert 4 in removed and len(removed & {0, 1, 5}) == 1, removed
    assert entry.counters["sites_refit"] == 1
    fit = entry.details["reconstruction"][0]
    assert fit["site"] == "y0" and fit["error_before"] > 1e-2 and fit["error_after"] < 1e-9
    held_out = _feeds((16, 8), seed=9)
    assert _max_diff(model, pruned, held_out) < 1e-4
    unrefit, _, _ = _prune(model, "prune-neurons",
                           {"ratio": 0.34, "importance": "obs", "reconstruct": "none"}, feeds)
    assert _max_diff(model, unrefit, held_out) > 1e-1, "the oracle is vacuous"


def test_bias_mode_absorbs_a_constant_unit():
    """reconstruct=bias: removing the constant unit h4 = 3 is exact once fc2's bias takes
    3·W2[4]; the weights stay the cut ones."""
    model = _mlp(dependent=False)
    feeds = _feeds((16, 8))
    pruned, entry, pass_obj = _prune(model, "prune-neurons", {
        "ratio": 0.17, "importance": "obs", "reconstruct": "bias", "damping": 1e-9}, feeds)
    assert [list(u) for u in entry.plan.removal.values()] == [[4]]
    assert entry.details["reconstruct"] == "bias"
    assert _max_diff(model, pruned, _feeds((16, 8), seed=9)) < 1e-4


def test_conv_refit_im2col_reproduces_outputs():
    """prune-channels on a conv pair: one of channels 0, 1, 5 goes (zero OBS damage), the
    3×3 consumer is refit from its im2col Gram and the pruned model matches the original."""
    model = _conv_pair()
    feeds = _feeds((2, 3, 8, 8))
    pruned, entry, pass_obj = _prune(model, "prune-channels",
                                     {"ratio": 0.17, "damping": 1e-9}, feeds)
    (removed,) = [set(u.tolist()) for u in entry.plan.removal.values()]
    assert len(removed) == 1 and removed <= {0, 1, 5}, removed
    assert entry.details["reconstruction"][0]["error_after"] < 1e-9
    assert _max_diff(model, pruned, _feeds((2, 3, 8, 8), seed=9)) < 1e-4


def test_damping_to_infinity_gives_the_cut_weights():
    """λ → ∞: W is W₀; the undamped bias is the bias-only optimum (mean correction)."""
    x = RNG.normal(size=(50, 5))
    t = RNG.normal(size=(50, 2))
    stats = GramStats(np.zeros((6, 6)), np.zeros((6, 2)))
    stats.add(x, t)
    w0 = RNG.normal(size=(5, 2))
    b0 = np.zeros(2)
    w, b = solve(stats, w0, b0, "lstsq", 1e12)
    wb, bb = solve(stats, w0, b0, "bias", 0.0)
    np.testing.assert_allclose(w, w0, atol=1e-8)
    np.testing.assert_allclose(b, bb, atol=1e-8)
    np.testing.assert_allclose(bb, (t - x @ w0).mean(0), atol=1e-10)
    w_free, b_free = solve(stats, w0, b0, "lstsq", 0.0)
    ref = np.linalg.lstsq(np.c_[x, np.ones(50)], t, rcond=None)[0]
    np.testing.assert_allclose(np.r_[w_free, b_free[None]], ref, atol=1e-6)


@pytest.mark.parametrize("make,shape", [(_mlp, (12, 8)), (_conv_pair, (2, 3, 8, 8))])
def test_gram_over_batches_equals_one_big_batch(make, shape):
    """Sums over three feeds equal the sums over their concatenation (every site)."""
    model = make()
    feeds = _feeds(shape)
    big = [{"x": np.concatenate([f["x"] for f in feeds])}]
    sites = list(linear_sites(model).values())
    a = accumulate(model, sites, feeds, targets=True, max_rows=None)
    b = accumulate(model, sites, big, targets=True, max_rows=None)
    for s in sites:
        np.testing.assert_allclose(a[s.output].xtx, b[s.output].xtx, rtol=1e-10, atol=1e-8)
        np.testing.assert_allclose(a[s.output].xty, b[s.output].xty, rtol=1e-10, atol=1e-8)
        assert a[s.output].n == b[s.output].n


def test_im2col_rows_times_weight_is_the_conv_output():
    """Rows and target rows line up: X W + b equals the conv's output through ORT."""
    model = _conv_pair()
    feeds = _feeds((2, 3, 8, 8), count=1)
    stats = accumulate(model, [linear_sites(model)["y"]], feeds, targets=True)["y"]
    w2 = onnx.numpy_helper.to_array(model.graph.initializer[1]).reshape(4, -1).T
    b2 = onnx.numpy_helper.to_array(model.graph.initializer[2])
    assert stats.n == 2 * 3 * 3  # conv1 gives 6×6; pad 1, stride 2: 3×3
    assert stats.error(w2.astype(np.float64), b2.astype(np.float64)) < 1e-6 * stats.tt


def test_padding_tokens_are_left_out():
    """Rows whose attention mask is 0 do not enter the sums."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])
    m = helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, [2, 3])
    w = onnx.numpy_helper.from_array(RNG.normal(size=(4, 2)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]),
         helper.make_node("Cast", ["attention_mask"], ["mf"], to=onnx.TensorProto.FLOAT)],
        "g", [x, m], [helper.make_empty_tensor_value_info("y"),
                      helper.make_empty_tensor_value_info("mf")], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": RNG.normal(size=(2, 3, 4)).astype(np.float32),
            "attention_mask": np.array([[1, 1, 0], [1, 0, 0]], np.int64)}
    stats = accumulate(model, list(linear_sites(model).values()), [feed])["y"]
    assert stats.n == 3


@pytest.mark.parametrize("options", [{"reconstruct": "exact"}, {"damping": -1}])
def test_bad_reconstruct_options(options):
    with pytest.raises(ConfigError):
        build_pass("prune-neurons", options)


def _mha_with_duplicate_head() -> onnx.ModelProto:
    """x ─ Q/K/V ─ com.microsoft MultiHeadAttention (4 heads of 4) ─ Wo ─ +x; head 3 has
    head 0's Q, K and V weights, so its output equals head 0's exactly."""
    rng = np.random.default_rng(4)
    hid, hd = 16, 4
    w = {n: (rng.standard_normal((hid, hid)) * 0.5).astype(np.float32) for n in "qkvo"}
    for n in "qkv":
        w[n][:, 3 * hd:] = w[n][:, :hd]
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [n], name=f"{n}_proj") for n in "qkv"]
    nodes += [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["ctx"], num_heads=4,
                               domain="com.microsoft", name="mha"),
              helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
              helper.make_node("Add", ["o", "x"], ["y"])]
    return make_model(nodes, {"x": [2, 5, hid]}, ["y"], {f"w{n}": v for n, v in w.items()},
                      extra_opsets={"com.microsoft": 1})


def test_heads_refit_of_the_output_projection_reproduces_outputs():
    """prune-heads with calibration: head 0 or its duplicate goes (OBS damage 0) and the
    output projection's refit gives back the original outputs."""
    model = _mha_with_duplicate_head()
    feeds = _feeds((2, 5, 16))
    pruned, entry, pass_obj = _prune(model, "prune-heads", {"ratio": 0.25, "damping": 1e-9},
                                     feeds)
    (removed,) = [set(u.tolist()) for u in entry.plan.removal.values()]
    assert removed <= {0, 3} and len(removed) == 1, removed
    assert entry.counters["sites_refit"] == 1
    assert _max_diff(model, pruned, _feeds((2, 5, 16), seed=9)) < 1e-4


def _two_blocks() -> onnx.ModelProto:
    """x ─ W0 ─ s0 ─┬─ Wa ─ Relu ─ Wa2 ─ Add ─ s1 ─┬─ Wb ─ Wc ─ Add ─ s2 ─ Wn ─> y
                    └──────────────────────┘       └──────────┘
    The second block is linear: s2 = s1 (I + Wb Wc)."""
    rng = np.random.default_rng(5)
    h = 8
    w = {n: (rng.standard_normal((h, h)) * 0.4).astype(np.float32)
         for n in ("W0", "Wa", "Wa2", "Wb", "Wc", "Wn")}
    N = helper.make_node
    nodes = [N("MatMul", ["x", "W0"], ["s0"]), N("MatMul", ["s0", "Wa"], ["a1"]),
             N("Relu", ["a1"], ["a2"]), N("MatMul", ["a2", "Wa2"], ["a3"]),
             N("Add", ["s0", "a3"], ["s1"]), N("MatMul", ["s1", "Wb"], ["b1"]),
             N("MatMul", ["b1", "Wc"], ["b2"]), N("Add", ["s1", "b2"], ["s2"]),
             N("MatMul", ["s2", "Wn"], ["y"], name="head")]
    return make_model(nodes, {"x": ["n", h]}, ["y"], w)


def test_layer_removal_refits_the_next_weight_layer():
    """prune-layers removing the linear block: the head (the first weight layer reading the
    bypassed exit) is refit to Wn' = (I + Wb Wc) Wn, which reproduces the outputs."""
    model = _two_blocks()
    feeds = _feeds((32, 8))
    pruned, entry, _ = _prune(model, "prune-layers", {"indices": (1,), "damping": 1e-9}, feeds)
    assert [f["site"] for f in entry.details["reconstruction"]] == ["y"]
    assert _max_diff(model, pruned, _feeds((16, 8), seed=9)) < 1e-4
    unrefit, _, _ = _prune(model, "prune-layers", {"indices": (1,), "reconstruct": "none"},
                           feeds)
    assert _max_diff(model, unrefit, _feeds((16, 8), seed=9)) > 1e-2


def _as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every initializer made by a Constant node instead (as PP-OCR's
    exports carry their weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    nodes = consts + list(out.graph.node)
    del out.graph.initializer[:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_sequential_refit_sees_rewritten_constant_weights():
    """A residual ReLU chain refit at two levels toward the stream (``streams=True``: each
    capture runs the site itself, for its output and the residual sum), after a cut of W1:
    the second level's inputs run through the refit W2. With the weights in Constant nodes
    the refit writes those nodes, and the capture after it must not reuse a copy of W2's old
    value kept from the first level: the same weights as with initializers."""
    from onnx import numpy_helper

    from graphopt.prune.reconstruct import reconstruct

    rng = np.random.default_rng(4)
    d = 12
    ws = {f"W{i}": rng.normal(size=(d, d)).astype(np.float32) / 3 for i in (1, 2, 3)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "W2"], ["h2"]),
             helper.make_node("Add", ["h2", "a1"], ["s2"]),
             helper.make_node("Relu", ["s2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "W3"], ["h3"]),
             helper.make_node("Add", ["h3", "a2"], ["y"])]
    feeds = [{"x": rng.normal(size=(40, d)).astype(np.float32)} for _ in range(3)]
    fitted = []
    for convert in (lambda m: m, _as_constants):
        original = convert(make_model(nodes, {"x": ["n", d]}, ["y"], ws))
        cut = dict(ws, W1=ws["W1"] * (np.arange(d) % 3 != 0))  # a third of h1 gone
        pruned = convert(make_model(nodes, {"x": ["n", d]}, ["y"], cut))
        fits, skipped = reconstruct(original, pruned, ["h2", "h3"], feeds, damping=1e-3,
                                    streams=True)
        assert [f.site for f in fits] == ["h2", "h3"] and not skipped
        values = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
        values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                       for n in pruned.graph.node if n.op_type == "Constant"})
        fitted.append(values)
    for name in ("W2", "W3"):
        np.testing.assert_allclose(fitted[1][name], fitted[0][name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(fitted[0]["W2"], ws["W2"])  # the refit did rewrite W2
