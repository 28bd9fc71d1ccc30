"""The Gram sums by BLAS syrk (one triangle, mirrored when read), the general-product
fallback they mix with, the blocked triangle mirror, and the stream statistics that
``prune`` takes from one capture: each against the plain computation."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.data.gram import GramStats, mirror_lower
from graphopt.prune.streams import layer_damage, stream_stats
from graphopt.testing import make_model, run


@pytest.mark.parametrize("k", [1, 7, 256, 257, 600])
def test_mirror_lower_copies_the_lower_triangle_up(k):
    a = np.random.default_rng(k).normal(size=(k, k))
    want = np.tril(a) + np.tril(a, -1).T
    assert mirror_lower(a) is a
    np.testing.assert_array_equal(a, want)


def test_syrk_and_general_products_mix_and_read_between_flushes():
    rng = np.random.default_rng(3)
    k, n = 300, 2000
    x = rng.normal(size=(n, k)).astype(np.float32)
    t = rng.normal(size=(n, 4)).astype(np.float32)
    w = rng.uniform(0.2, 3.0, size=n)
    w[1500:1600] *= -1  # a negative weight sends that flush to the general product
    stats = GramStats(np.zeros((k + 1, k + 1)), np.zeros((k + 1, 4)))
    seen = []
    for i, part in enumerate(np.array_split(np.arange(n), 23)):
        stats.add(x[part], t[part], w[part])
        if i in (5, 15):  # reading mirrors; later flushes sum the lower triangle again
            seen.append(stats.xtx.copy())
        stats.add(x[:0], t[:0], w[:0])  # no rows
    xa = np.c_[x.astype(np.float64), np.ones(n)]
    np.testing.assert_allclose(stats.xtx, (xa * w[:, None]).T @ xa, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(stats.xty, (xa * w[:, None]).T @ t, rtol=1e-12, atol=1e-9)
    for got in seen:
        np.testing.assert_array_equal(got, got.T)
    plain = GramStats(np.zeros((k + 1, k + 1)))
    for part in np.array_split(np.arange(n), 9):
        plain.add(x[part])
    np.testing.assert_allclose(plain.xtx, xa.T @ xa, rtol=1e-12, atol=1e-9)


def test_single_products_are_float64_sums_to_float32_rounding():
    rng = np.random.default_rng(4)
    x = np.maximum(rng.normal(size=(3000, 200)), 0).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=3000)
    xa = np.c_[x.astype(np.float64), np.ones(3000)]
    for weights in (None, w):
        single = GramStats(np.zeros((201, 201)), single=True)
        for part in np.array_split(np.arange(3000), 11):
            single.add(x[part], None, None if weights is None else weights[part])
        want = (xa * (1.0 if weights is None else weights[:, None])).T @ xa
        assert single.xtx.dtype == np.float64
        np.testing.assert_allclose(single.xtx, want, rtol=1e-5, atol=1e-6 * want.max())
        assert single.xtx[-1, -1] == pytest.approx(want[-1, -1], rel=1e-12)


def _residual_mlp():
    """x ─ W1 ─ Relu ─ W2 ─(+x)─> s1 ─ W3 ─ Relu ─ W4 ─(+s1)─> s2 (tokens [2, t, 6])."""
    rng = np.random.default_rng(0)
    ws = {"W1": rng.normal(size=(6, 8)), "W2": rng.normal(size=(8, 6)) / 3,
          "W3": rng.normal(size=(6, 8)), "W4": rng.normal(size=(8, 6)) / 3}
    ws = {k: v.astype(np.float32) for k, v in ws.items()}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "W2"], ["f1"]),
             helper.make_node("Add", ["x", "f1"], ["s1"]),
             helper.make_node("MatMul", ["s1", "W3"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "W4"], ["f2"]),
             helper.make_node("Add", ["s1", "f2"], ["s2"])]
    inputs = [("x", [2, "t", 6], 1), ("attention_mask", [2, "t"], 7)]
    return make_model(nodes, inputs, ["s2"], ws)


def _masked_feeds():
    rng = np.random.default_rng(1)
    feeds = []
    for t in (3, 5):
        mask = np.ones((2, t), np.int64)
        mask[1, t - 1:] = 0
        feeds.append({"x": rng.normal(size=(2, t, 6)).astype(np.float32),
                      "attention_mask": mask})
    return feeds


class _Block:
    def __init__(self, entry, exit_):
        self.entry, self.exit = entry, exit_


def test_stream_norms_and_layer_damage_from_one_capture_match_numpy():
    from graphopt.analysis.coupling import analyze

    model = _residual_mlp()
    feeds = _masked_feeds()
    groups = [g for g in analyze(model).groups if g.prunable and g.kind == "neurons"]
    blocks = [_Block("x", "s1"), _Block("s1", "s2")]
    norms, damage = stream_stats(model, None, groups, feeds, blocks=blocks)
    vals = [run(_with_outputs(model, ["s1"]), f) for f in feeds]
    real = [f["attention_mask"].astype(bool) for f in feeds]

    def mean_energy(name):
        rows = np.concatenate([v[name][m] for v, m in zip(vals, real)]).astype(np.float64)
        return float((rows ** 2).sum(1).mean())

    assert norms == pytest.approx({"f1": mean_energy("s1"), "f2": mean_energy("s2")},
                                  rel=1e-6)
    for entry, exit_ in (("x", "s1"), ("s1", "s2")):
        d = e = 0.0
        for f, v, m in zip(feeds, vals, real):
            a = f["x"] if entry == "x" else v[entry]
            d += float(((v[exit_] - a)[m].astype(np.float64) ** 2).sum())
            e += float((v[exit_][m].astype(np.float64) ** 2).sum())
        assert damage[exit_] == pytest.approx(d / e, rel=1e-6)
    assert layer_damage(model, blocks, feeds) == damage


def _with_outputs(model, names):
    import onnx

    work = onnx.ModelProto()
    work.CopyFrom(model)
    for n in names:
        work.graph.output.add().name = n
    return work


def test_scores_with_observed_stream_stats_equal_a_capture_of_their_own():
    from graphopt.analysis.coupling import analyze
    from graphopt.prune.scores import data_scores
    from graphopt.prune.streams import StreamStats

    model = _residual_mlp()
    feeds = _masked_feeds()
    coupling = analyze(model)
    groups = [g for g in coupling.groups if g.prunable and g.kind == "neurons"]
    blocks = [_Block("x", "s1"), _Block("s1", "s2")]
    norms, damage = stream_stats(model, None, groups, feeds, blocks=blocks)
    want, _ = data_scores(model, coupling, groups, "obs", feeds, norms=norms)
    streams = StreamStats(model, groups, feeds, None, blocks)
    got, _ = data_scores(model, coupling, groups, "obs", feeds, norms=streams,
                         observe=streams.observers())
    assert streams.complete
    assert dict(streams) == pytest.approx(norms, rel=1e-6)
    assert streams.damage() == pytest.approx(damage, rel=1e-6)
    for gid in want:
        np.testing.assert_allclose(got[gid], want[gid], rtol=1e-6)
    streams.capture(model)  # complete: nothing runs again, nothing counted twice
    assert streams.damage() == pytest.approx(damage, rel=1e-6)
