"""A unit is a head only when attention over it is proven, and importance rankings that fail
on a wrong ranking (torch-free, hand-built graphs).

Decomposed multi-head attention, as exporters write it::

    x ─ MatMul(wq) ─ Reshape[B,S,H,D] ─ Transpose ─┐
    x ─ MatMul(wk) ─ Reshape ─ Transpose(0,2,3,1) ─ MatMul ─ Mul ─ Softmax ─┐
    x ─ MatMul(wv) ─ Reshape ─ Transpose ─────────────────────────────── MatMul
                                   ─ Transpose ─ Reshape[B,S,E] ─ MatMul(wo) ─ Add(x) ─ y

and the same split without attention (a plain MLP that reshapes its hidden layer).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

from graphopt.analysis.coupling import analyze
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.passes.heads import HeadBlock, head_block, select_heads
from graphopt.testing import make_model

N = helper.make_node
B, S, H, D = 2, 5, 4, 4
E = H * D


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def decomposed_mha(seed: int = 0, kv_heads: int = H, weights: dict | None = None,
                   present: bool = False):
    """Q/K/V projections, QKᵀ → Softmax → ·V, output projection and residual; with
    ``kv_heads < H`` K/V are repeated to the query heads (repeat_kv:
    Unsqueeze → Expand → Reshape), as a GQA export does. ``weights`` replaces any of
    wq, wk, wv ([E, E] each) and wo. ``present``: K ``[B, kv_heads, S, D]`` is also a graph
    output (a decoder's KV cache)."""
    rng = np.random.default_rng(seed)
    rep = H // kv_heads
    nodes = [N("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             N("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             N("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             N("Reshape", ["q", "split_q"], ["q4"]),
             N("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
             N("Reshape", ["k", "split_kv"], ["k4"]),
             N("Transpose", ["k4"], ["kt0"], perm=[0, 2, 1, 3]),
             N("Reshape", ["v", "split_kv"], ["v4"]),
             N("Transpose", ["v4"], ["vt0"], perm=[0, 2, 1, 3])]
    inits = {"wq": _w(rng, E, E), "wk": _w(rng, E, kv_heads * D),
             "wv": _w(rng, E, kv_heads * D), "wo": _w(rng, E, E),
             "split_q": np.array([B, S, H, D], np.int64),
             "split_kv": np.array([B, S, kv_heads, D], np.int64),
             "merge": np.array([B, S, E], np.int64), "scale": np.array(D ** -0.5, np.float32)}
    inits.update(weights or {})
    if rep > 1:
        inits.update(ax2=np.array([2], np.int64),
                     rep_shape=np.array([B, kv_heads, rep, S, D], np.int64),
                     heads_shape=np.array([B, H, S, D], np.int64))
        for t in ("kt0", "vt0"):
            nodes += [N("Unsqueeze", [t, "ax2"], [t + "u"]),
                      N("Expand", [t + "u", "rep_shape"], [t + "e"]),
                      N("Reshape", [t + "e", "heads_shape"], [t + "r"])]
        kt, vt = "kt0r", "vt0r"
    else:
        kt, vt = "kt0", "vt0"
    nodes += [N("Transpose", [kt], ["ktt"], perm=[0, 1, 3, 2]),
              N("MatMul", ["qt", "ktt"], ["scores"], name="qk"),
              N("Mul", ["scores", "scale"], ["scaled"]),
              N("Softmax", ["scaled"], ["probs"], axis=-1),
              N("MatMul", ["probs", vt], ["ctx"], name="pv"),
              N("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              N("Reshape", ["ctxt", "merge"], ["ctx3"]),
              N("MatMul", ["ctx3", "wo"], ["o"], name="o_proj"),
              N("Add", ["o", "x"], ["y"])]
    return make_model(nodes, {"x": [B, S, E]}, ["y", "kt0"] if present else ["y"], inits)


def reshaped_mlp(seed: int = 0):
    """MatMul → Reshape[2,8,4,16] → Relu → Reshape → MatMul: a block split, no attention."""
    rng = np.random.default_rng(seed)
    nodes = [N("MatMul", ["x", "w1"], ["h"], name="up"),
             N("Reshape", ["h", "split"], ["h4"]), N("Relu", ["h4"], ["r"]),
             N("Reshape", ["r", "merge"], ["m"]), N("MatMul", ["m", "w2"], ["y"], name="down")]
    return make_model(nodes, {"x": [2, 8, 32]}, ["y"],
                      {"w1": _w(rng, 32, 64), "w2": _w(rng, 64, 32),
                       "split": np.array([2, 8, 4, 16], np.int64),
                       "merge": np.array([2, 8, 64], np.int64)})


def _feeds(seed: int, shape=(B, S, E)):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_reshaped_mlp_is_not_heads(meta):
    """The MLP's 4 blocks of 16 are a `block` group, not heads: prune-heads removes nothing,
    writes no graphopt.heads, and says why."""
    model = reshaped_mlp()
    group = next(g for g in analyze(model).groups if g.source == "up")
    assert group.unit == "block" and group.size == 4 and group.head_dim is None
    p = build_pass("prune-heads", {"ratio": 0.5})
    out, report = PassManager([p]).run(model, Context(calibration=[_feeds(1, (2, 8, 32))]))
    entry = report.passes[0]
    assert entry.status == "unchanged" and entry.counters["heads_removed"] == 0
    assert "graphopt.heads" not in meta(out)
    assert any("no attention heads found" in s.reason for s in entry.skipped)


def test_decomposed_mha_heads_are_proven():
    """The QKᵀ→Softmax core proves the Q/K/V/O group's units are heads of head_dim 4."""
    groups = [g for g in analyze(decomposed_mha()).groups if g.unit == "head"]
    assert len(groups) == 1
    g = groups[0]
    assert (g.size, g.head_dim, g.heads_per_unit, g.prunable) == (H, D, 1, True)
    assert g.to_dict()["unit"] == "head"


@pytest.mark.parametrize("kv_heads", [H, 2])
def test_decomposed_attention_masked_equivalence(kv_heads, oracle, meta):
    """Half of the units go (MHA: 2 heads; GQA 4q/2kv via repeat_kv: one KV head with its 2
    query heads); pruned and masked outputs match through ORT."""
    model = decomposed_mha(kv_heads=kv_heads)
    ctx = Context(calibration=[_feeds(1), _feeds(2)])
    pruned, report, p = oracle(model, {"ratio": 0.5}, feeds=_feeds(3), ctx=ctx)
    (block,) = report.passes[0].plan.blocks
    assert block.heads_per_unit == H // kv_heads and block.head_dim == D
    assert json.loads(meta(pruned)["graphopt.heads"]) == [H // 2]
    assert json.loads(meta(pruned)["graphopt.kv_heads"]) == [kv_heads // 2]


def test_kv_cache_output_is_reported():
    """A decoder exposing its keys (present key) as a graph output: the block is skipped,
    and the reason names the output, the KV cache and the fix (export without it)."""
    p = build_pass("prune-heads", {"ratio": 0.5, "importance": "magnitude"})
    out, report = PassManager([p]).run(decomposed_mha(present=True), Context())
    (skip,) = report.passes[0].skipped
    assert "graph output 'kt0'" in skip.reason and "KV cache" in skip.reason
    assert "use_cache=False" in skip.reason
    assert report.passes[0].counters["heads_removed"] == 0


# ---------------------------------------------------------------------------- rankings
# All heads share the same Q/K/V weights (one [E, D] block tiled), so they differ only by a
# per-head scale put on V (activation importance: the attention output of head h is scale_h
# times the common one) or on the output projection's rows (ablation: masking head h
# changes the output by scale_h times a common delta). The ranking must follow the scales.

SCALES = np.array([4.0, 0.25, 2.0, 1.0], np.float32)  # heads 1 and 3 are the weakest


def _identical_heads(v_scale=None, o_scale=None):
    rng = np.random.default_rng(4)
    block = (rng.standard_normal((E, D)) * 0.5).astype(np.float32)
    w = {k: np.tile(block, (1, H)) for k in ("wq", "wk", "wv")}
    wo = np.tile((rng.standard_normal((D, E)) * 0.5).astype(np.float32), (H, 1))
    if v_scale is not None:
        w["wv"] = w["wv"] * np.repeat(v_scale, D)[None, :]
    if o_scale is not None:
        wo = wo * np.repeat(o_scale, D)[:, None]
    w["wo"] = wo
    return decomposed_mha(weights=w)


@pytest.mark.parametrize("importance,where", [("activation", "v"), ("ablation", "o"),
                                              ("magnitude", "o")])
def test_ranking_follows_head_scales(importance, where, oracle):
    """activation (V scaled), ablation and magnitude (output rows scaled): the scores
    order the heads as the scales do, and ratio 0.5 removes heads 1 and 3."""
    model = _identical_heads(v_scale=SCALES if where == "v" else None,
                             o_scale=SCALES if where == "o" else None)
    ctx = Context(calibration=[_feeds(1), _feeds(2)])
    _, report, p = oracle(model, {"ratio": 0.5, "importance": importance}, feeds=_feeds(3),
                     ctx=ctx)
    plan = report.passes[0].plan
    (gid,) = plan.removal
    scores = np.asarray(plan.scores[gid])
    assert list(np.argsort(scores)) == list(np.argsort(SCALES)), scores
    assert list(plan.removal[gid]) == [1, 3]
    if importance != "magnitude":  # magnitude adds the equal Q/K/V norms to the rows'
        ratios = scores / scores[3]
        np.testing.assert_allclose(ratios, SCALES / SCALES[3], rtol=1e-3)


def _blocks(sizes_per_unit):
    """HeadBlocks over real groups of one model (ids 0..n-1), heads per unit as given."""
    group = next(g for g in analyze(decomposed_mha()).groups if g.unit == "head")
    out = []
    for gid, per_unit in enumerate(sizes_per_unit):
        g = type(group)(**{**group.__dict__, "id": gid})
        out.append(HeadBlock(g, D, per_unit))
    return out


def test_select_heads_layer_and_global():
    """scope=layer takes floor(ratio × units) lowest per block; scope=global ranks units of
    all blocks together (a unit of k heads counts k heads, its score per head) and keeps
    min_heads per block."""
    blocks = _blocks([1, 1])
    scores = {0: np.array([5.0, 1.0, 3.0, 0.5]), 1: np.array([0.1, 0.2, 9.0, 8.0])}
    layer = select_heads(blocks, scores, 0.5, "layer", 1)
    assert {k: list(v) for k, v in layer.items()} == {0: [1, 3], 1: [0, 1]}
    glob = select_heads(blocks, scores, 0.5, "global", 1)  # 4 of 8 heads: the 4 lowest
    assert {k: list(v) for k, v in glob.items()} == {0: [1, 3], 1: [0, 1]}
    capped = select_heads(blocks, scores, 0.75, "global", 3)  # each block keeps 3 heads
    assert {k: len(v) for k, v in capped.items()} == {0: 1, 1: 1}
    assert list(capped[0]) == [3] and list(capped[1]) == [0]


def test_select_heads_global_counts_kv_groups():
    """A GQA unit (2 query heads) spends 2 heads of the budget and is ranked by its score
    per head: with one budget of 2 heads, the MHA head scored 0.9 loses to the GQA unit
    scored 1.0 (0.5 per head)."""
    blocks = _blocks([1, 2])
    scores = {0: np.array([0.9, 5.0, 5.0, 5.0]), 1: np.array([1.0, 7.0, 7.0, 7.0])}
    out = select_heads(blocks, scores, 2 / 12, "global", 1)
    assert {k: list(v) for k, v in out.items()} == {1: [0]}
    assert head_block(blocks[1].group).heads_per_unit == 1  # the analysis' own value
