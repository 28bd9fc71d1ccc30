"""prune-channels, prune-neurons and remove-zero-channels: configs, selection, importance,
skips, and the lossless pass; small hand-built graphs.

    x ─ Conv c1 (8) ─ BN ─ Relu ─ Conv c2 (6) ─ Relu ─ Conv c3 (4) ─ y
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from graphopt.analysis.coupling import coupled_groups
from graphopt.errors import ConfigError
from graphopt.prune.importance import select_units, unit_scores
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass, registered_passes
from graphopt.core.config import parse_pass_spec
from graphopt.passes.width import PruneChannels, PruneNeurons, RemoveZeroChannels
from graphopt.testing import assert_equivalent, make_model

N = helper.make_node
RNG = np.random.default_rng(1)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def chain(w1=None, gamma=None, w2=None, names=("c1", "c2", "c3"), beta=None):
    w1 = w1 if w1 is not None else _w(8, 3, 3, 3)
    nodes = [N("Conv", ["x", "w1"], ["a"], name=names[0], kernel_shape=[3, 3], pads=[1] * 4),
             N("BatchNormalization", ["a", "g", "be", "mu", "var"], ["n"], name="bn"),
             N("Relu", ["n"], ["r"]),
             N("Conv", ["r", "w2"], ["c"], name=names[1], kernel_shape=[1, 1]),
             N("Relu", ["c"], ["cr"]),
             N("Conv", ["cr", "w3"], ["y"], name=names[2], kernel_shape=[1, 1])]
    inits = {"w1": w1, "g": gamma if gamma is not None else np.abs(_w(8)) + 0.5,
             "be": beta if beta is not None else _w(8), "mu": _w(8), "var": np.abs(_w(8)) + 0.5,
             "w2": w2 if w2 is not None else _w(6, 8, 1, 1), "w3": _w(4, 6, 1, 1)}
    return make_model(nodes, {"x": [2, 3, 6, 6]}, ["y"], inits)


def _init(model, name):
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    raise KeyError(name)


def _run(p, model, ctx=None):
    out, report = PassManager([p]).run(model, ctx or Context())
    return out, report.passes[0]


# ----------------------------------------------------------------------------- config


def test_passes_are_registered_under_their_cli_names():
    """prune-channels, prune-neurons and remove-zero-channels are in the registry."""
    assert {"prune-channels", "prune-neurons", "remove-zero-channels"} <= set(
        registered_passes())


def test_cli_spelling_builds_the_config():
    """--pass prune-channels:ratio=0.5,scope=global,round_to=8,include=re:^c[12]$,exclude=c9"""
    name, options = parse_pass_spec(
        "prune-channels:ratio=0.5,importance=l2,scope=global,round_to=8,"
        "include=re:^c[12]$,c3,exclude=c9")
    p = build_pass(name, options)
    assert p.config.ratio == 0.5 and p.config.scope == "global" and p.config.round_to == 8
    assert p.config.include == ("re:^c[12]$", "c3") and p.config.exclude == ("c9",)


@pytest.mark.parametrize("options,message", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"),
    ({"importance": "taylor"}, "importance"), ({"scope": "layer"}, "scope"),
    ({"round_to": 0}, "round_to"), ({"min_keep": 0}, "min_keep"),
    ({"max_ratio": 1.5}, "max_ratio"), ({"include": "re:("}, "regular expression"),
    ({"rate": 0.5}, "unknown option"),
])
def test_bad_options_raise_config_error(options, message):
    """Out-of-range or unknown options raise ConfigError naming the option."""
    with pytest.raises(ConfigError, match=message):
        build_pass("prune-channels", options)


# ----------------------------------------------------------------------------- selection


def test_l1_removes_the_smallest_filters_and_report_counts(wt):
    """l1 importance: the filters scaled smallest go; counters count groups and units."""
    w1 = _w(8, 3, 3, 3) * np.array([5, 0.1, 4, 3, 0.2, 6, 7, 0.3], np.float32)[:, None, None,
                                                                           None]
    model = chain(w1=w1, w2=_w(6, 8, 1, 1) * 0 + 1)
    pruned, report, removal = wt.masked_equivalence(model, pass_obj=PruneChannels(ratio=0.375))
    group = next(g for g in coupled_groups(model) if g.source == "c1")
    assert removal[group.id].tolist() == [1, 4, 7]
    assert report.passes[0].counters["groups_pruned"] == 2  # c1 and c2 (c3 is the output)
    assert report.passes[0].counters["channels_removed"] == 3 + 2
    assert _init(pruned, "w1").shape == (5, 3, 3, 3) and _init(pruned, "g").shape == (5,)


def test_bn_scale_importance(wt):
    """bn_scale ranks channels by |gamma|."""
    gamma = np.array([1, 0.01, 1, 1, 0.02, 1, 1, 1], np.float32)
    # A positive shift keeps the small-gamma channels alive after the Relu whatever the
    # shared RNG drew before this test, so masking them changes the output (the oracle).
    model = chain(gamma=gamma, beta=np.full(8, 2.0, np.float32))
    _, _, removal = wt.masked_equivalence(
        model, pass_obj=PruneChannels(ratio=0.25, importance="bn_scale", include=("c1",)))
    assert list(removal.values())[0].tolist() == [1, 4]


def test_bn_scale_without_batchnorm_falls_back_to_l2():
    """A group with no BatchNorm is scored by l2 (same ranking as l2 itself)."""
    model = chain()
    from graphopt.analysis.coupling import analyze

    coupling = analyze(model)
    g = next(g for g in coupling.groups if g.source == "c2")
    bn = unit_scores(coupling, [g], "bn_scale")[g.id]
    l2 = unit_scores(coupling, [g], "l2")[g.id]
    np.testing.assert_allclose(bn, l2)
    assert abs(bn.mean() - 1.0) < 1e-9  # normalized to mean 1


def test_activation_and_apoz_importance_use_calibration_data(wt):
    """activation (mean |a|) and APoZ read the captured input of c2 through ORT."""
    w2 = _w(6, 8, 1, 1)
    model = chain(w2=w2)
    # channel 3 always zero after the Relu: BN shifts it far negative
    be = _init(model, "be").copy()
    be[3] = -100.0
    model.graph.initializer[[i.name for i in model.graph.initializer].index("be")].CopyFrom(
        numpy_helper.from_array(be, "be"))
    ctx = Context(calibration_batches=2)
    for importance in ("activation", "apoz"):
        _, _, removal = wt.masked_equivalence(
            model, pass_obj=PruneChannels(ratio=0.125, importance=importance, include=("c1",)),
            ctx=ctx, must_change=False)
        assert list(removal.values())[0].tolist() == [3]


def test_random_importance_is_seeded():
    """random importance gives the same choice for the same Context seed."""
    model = chain()
    a = PruneChannels(ratio=0.5, importance="random").plan(model, Context(seed=3)).removal
    b = PruneChannels(ratio=0.5, importance="random").plan(model, Context(seed=3)).removal
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}


def test_round_to_keeps_hardware_friendly_widths():
    """round_to=4: kept widths are multiples of 4 (rounded up), never zero."""
    model = chain()
    plan = PruneChannels(ratio=0.7, round_to=4).plan(model, Context())
    sizes = {g.id: g.size for g in plan.coupling.groups}
    for gid, units in plan.removal.items():
        kept = sizes[gid] - len(units)
        assert kept > 0 and kept % 4 == 0


def test_never_empties_a_group():
    """A ratio near 1 keeps at least min_keep units per group."""
    model = chain()
    plan = PruneChannels(ratio=0.99, min_keep=2).plan(model, Context())
    for gid, units in plan.removal.items():
        assert plan.coupling.group(gid).size - len(units) >= 2


def test_global_scope_ranks_across_groups_with_normalized_scores():
    """Global scope: one group's weights ×1000 do not make the other group lose everything;
    the per-group cap max_ratio holds."""
    model = chain(w1=_w(8, 3, 3, 3) * 1000)
    plan = PruneChannels(ratio=0.5, scope="global", max_ratio=0.75).plan(model, Context())
    removed = {plan.coupling.group(g).source: len(u) for g, u in plan.removal.items()}
    assert sum(removed.values()) == (8 + 6) // 2
    assert removed.get("c1", 0) <= 6 and removed.get("c2", 0) <= 4
    assert removed.get("c1", 0) > 0 and removed.get("c2", 0) > 0


def test_select_units_group_scope_floor():
    """Group scope removes floor(ratio × size) of the lowest scores."""
    from types import SimpleNamespace

    g = SimpleNamespace(id=0, size=10, unit_width=1)
    out = select_units([g], {0: np.arange(10, 0, -1.0)}, 0.35)
    assert out[0].tolist() == [7, 8, 9]


def test_include_exclude_patterns():
    """include (glob or re:) limits the groups; exclude removes matches; both are reported."""
    model = chain(names=("stem", "body.conv", "head"))
    plan = PruneChannels(ratio=0.5, include=("body.*",)).plan(model, Context())
    assert [plan.coupling.group(g).source for g in plan.removal] == ["body.conv"]
    plan = PruneChannels(ratio=0.5, exclude=("re:^st",)).plan(model, Context())
    assert [plan.coupling.group(g).source for g in plan.removal] == ["body.conv"]
    assert any("excluded" in s.reason for s in plan.skipped)


def test_unprunable_groups_are_reported_as_skips():
    """The output conv's group is a skip naming the graph output."""
    _, entry = _run(PruneChannels(ratio=0.5), chain())
    assert entry.status == "changed"
    assert any("c3" in s.site and "graph output 'y'" not in s.reason and "graph output" in
               s.reason for s in entry.skipped)
    assert entry.counters["groups_skipped"] == len(entry.skipped) == 1


def test_ratio_zero_changes_nothing():
    """ratio=0 leaves the model unchanged."""
    _, entry = _run(PruneChannels(ratio=0.0), chain())
    assert entry.status == "unchanged"


def test_prune_neurons_ignores_conv_groups_and_skips_head_blocks(wt):
    """prune-neurons touches Gemm/MatMul groups only; block units (heads) are skipped with a
    pointer to prune-heads."""
    assert _run(PruneNeurons(ratio=0.5), chain())[1].status == "unchanged"
    nodes = [N("MatMul", ["x", "wq"], ["q"], name="q"), N("Reshape", ["q", "split"], ["qh"]),
             N("Relu", ["qh"], ["qr"]), N("Reshape", ["qr", "merge"], ["m"]),
             N("MatMul", ["m", "wo"], ["o"], name="o"), N("MatMul", ["o", "w1"], ["h"], name="up"),
             N("Relu", ["h"], ["hr"]), N("MatMul", ["hr", "w2"], ["y"], name="down")]
    model = make_model(nodes, {"x": [2, 5, 16]}, ["y"],
                       {"wq": _w(16, 16), "wo": _w(16, 16), "w1": _w(16, 32),
                        "w2": _w(32, 16), "split": np.array([2, 5, 4, 4], np.int64),
                        "merge": np.array([2, 5, 16], np.int64)})
    pruned, report, removal = wt.masked_equivalence(model, pass_obj=PruneNeurons(ratio=0.5))
    entry = report.passes[0]
    assert any("prune-heads" in s.reason for s in entry.skipped)
    assert [report_group for report_group in removal] and entry.counters["neurons_removed"] == 24


# ----------------------------------------------------------------------------- lossless


def test_remove_zero_channels_is_lossless():
    """Channels whose consumer weights are exactly zero are removed; outputs are unchanged
    (the manager checks) and the weights shrink."""
    w2 = _w(6, 8, 1, 1)
    w2[:, [2, 5]] = 0.0
    model = chain(w2=w2)
    out, entry = _run(RemoveZeroChannels(), model)
    assert entry.status == "changed" and entry.counters["units_pruned"] == 2
    assert entry.max_abs_diff is not None and entry.max_abs_diff < 1e-5
    assert _init(out, "w1").shape[0] == 6
    assert_equivalent(model, out)


def test_remove_zero_channels_unchanged_without_zeros():
    """No exactly-zero unit: the pass reports unchanged."""
    assert _run(RemoveZeroChannels(), chain())[1].status == "unchanged"


def test_remove_zero_channels_drops_dead_channels():
    """Channels a Slice never reads are removed losslessly."""
    nodes = [N("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]),
             N("Slice", ["a", "st", "en", "ax"], ["s"]),
             N("Conv", ["s", "w2"], ["y"], name="c2", kernel_shape=[1, 1])]
    model = make_model(nodes, {"x": [1, 3, 4, 4]}, ["y"],
                       {"w1": _w(8, 3, 1, 1), "w2": _w(2, 4, 1, 1),
                        "st": np.array([2], np.int64), "en": np.array([6], np.int64),
                        "ax": np.array([1], np.int64)})
    out, entry = _run(RemoveZeroChannels(), model)
    assert entry.counters["units_pruned"] == 4 and _init(out, "w1").shape[0] == 4
    assert_equivalent(model, out)
