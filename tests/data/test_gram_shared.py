"""Sites reading the same rows share one X̃ᵀX̃ sum (``graphopt.data.site_rows.same_rows``):
each site's sums from a shared capture against a capture of that site alone.

Attention-like fan-out (three weight layers on one masked input, one joining a stream)::

    x[2,t,6] ─┬─ Wq ─> q ─ +bq ─> qb
              ├─ Wk ─> k
              └─ Wv ─> v ─(+x)─> s
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.data.gram import GramStats, accumulate, linear_sites
from graphopt.data.site_rows import same_rows
from graphopt.prune.scores import _inverse, damping_diagonal
from graphopt.testing import make_model


def _fan_out(seed: int = 0):
    rng = np.random.default_rng(seed)
    ws = {"Wq": rng.normal(size=(6, 4)), "Wk": rng.normal(size=(6, 5)),
          "Wv": rng.normal(size=(6, 6)), "bq": rng.normal(size=4)}
    ws = {k: v.astype(np.float32) for k, v in ws.items()}
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"]),
             helper.make_node("Add", ["q", "bq"], ["qb"]),
             helper.make_node("MatMul", ["x", "Wk"], ["k"]),
             helper.make_node("MatMul", ["x", "Wv"], ["v"]),
             helper.make_node("Add", ["v", "x"], ["s"])]
    inputs = [("x", [2, "t", 6], 1), ("attention_mask", [2, "t"], 7)]
    return make_model(nodes, inputs, ["qb", "k", "s"], ws)


def _feeds():
    rng = np.random.default_rng(1)
    feeds = []
    for t in (3, 5, 4):
        mask = np.ones((2, t), np.int64)
        mask[1, t - 1:] = 0
        feeds.append({"x": rng.normal(size=(2, t, 6)).astype(np.float32),
                      "attention_mask": mask})
    return feeds


def _same(a: GramStats, b: GramStats) -> None:
    np.testing.assert_array_equal(a.xtx, b.xtx)
    np.testing.assert_allclose(a.xty, b.xty, rtol=1e-12, atol=1e-12)
    assert a.tt == b.tt and a.n == b.n


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("folds", [None, [0, 1, 0]])
def test_shared_sums_equal_each_site_captured_alone(single, folds):
    """Q, K and V read ``x``: one product of its rows, and per site the X̃ᵀT, ‖T‖² and fold
    parts a capture of that site alone makes (targets from another model, V's through
    the stream it joins; padding left out)."""
    model, reference = _fan_out(), _fan_out(seed=5)
    sites = list(linear_sites(model).values())
    assert [len(g) for g in same_rows(sites)] == [3]
    args = dict(targets=True, reference=reference, streams={"v": "s"}, folds=folds,
                single=single)
    early = {} if folds is None else None
    shared = accumulate(model, sites, _feeds(), upto=2, early=early, **args)
    if folds is None:  # one array, read by all three
        assert shared["q"].xtx is shared["k"].xtx is shared["v"].xtx
    for site in sites:
        alone_early = {} if folds is None else None
        alone = accumulate(model, [site], _feeds(), upto=2, early=alone_early, **args)
        _same(shared[site.output], alone[site.output])
        for a, b in zip(shared[site.output].parts, alone[site.output].parts):
            _same(a, b)
        assert len(shared[site.output].parts) == (2 if folds else 0)
        if folds is None:
            _same(early[site.output], alone_early[site.output])


def test_rows_are_shared_only_when_read_the_same_way():
    """Two 3×3 convs on one input share; a strided one, a 1×1 one and a conv whose rows
    are weighted by another tensor do not."""
    from graphopt.data.gram import LinearSite

    def conv(out, strides=(1, 1), kernel=(3, 3)):
        return LinearSite(out, "x", f"W{out}", "Conv", 0, kernel=kernel, strides=strides)

    a, b, c, d, e = conv("a"), conv("b"), conv("c", strides=(2, 2)), conv("d", kernel=(1, 1)), \
        conv("e")
    groups = same_rows([a, b, c, d, e], {"e": "s"})
    assert [[s.output for s in g] for g in groups] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_single_target_products_are_float64_sums_to_float32_rounding():
    """``single``: X̃ᵀT's products in float32 too, summed in float64."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2000, 50)).astype(np.float32)
    t = rng.normal(size=(2000, 7)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=2000)
    xa = np.c_[x.astype(np.float64), np.ones(2000)]
    for weights in (None, w):
        single = GramStats(np.zeros((51, 51)), np.zeros((51, 7)), single=True)
        for part in np.array_split(np.arange(2000), 7):
            single.add(x[part], t[part], None if weights is None else weights[part])
        want = (xa * (1.0 if weights is None else weights[:, None])).T @ t
        assert single.xty.dtype == np.float64
        np.testing.assert_allclose(single.xty, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("k", [1, 40, 300])
def test_obs_inverse_is_the_inverse(k):
    """``scores._inverse`` (Cholesky inverse on one BLAS thread) against the general
    inverse; bitwise symmetric."""
    rng = np.random.default_rng(k)
    x = np.c_[np.maximum(rng.normal(size=(3 * k + 5, k)), 0), np.ones(3 * k + 5)]
    h = x.T @ x  # with the ones column, as the scores' sums
    d = damping_diagonal(h, 0.1)
    got = _inverse(h, d)
    want = np.linalg.inv(h + np.diag(d))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    np.testing.assert_array_equal(got, got.T)
