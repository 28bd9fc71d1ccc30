"""Sequential selection (``prune``'s ``select=sequential``, ``graphopt.prune.sequential``).

Oracles on tiny residual MLPs:

    x[n,4] ─ W1[4,2] ─ +b1 ─ Relu ─ W2[2,4] (fc2) ─ +c1 ─ + x ─> s
    s      ─ W3[4,3] ─ +b3 ─ Relu ─ W4[3,4] (fc4) ─ +c2 ─ + s ─> y

1. An upstream cut makes a downstream unit exactly expressible: the calibration rows are a
   product grid of (x0, x1) with x2 = x3 = 0, so relu(x0) and relu(x1) are exactly
   uncorrelated. Layer 1's neuron 0 (x0 into s2, the cheaper one) is cut; the refit of fc2
   cannot express it by the other neuron, so s2 becomes a constant, and layer 2's unit 0
   (relu of s2, the unit with the largest output row) becomes a constant the bias absorbs:
   damage 0, so the sequential choice must take it. The one-shot choice, on the original's
   activations, takes unit 2 (the smallest output row): the oracle is not vacuous.
2. With no upstream cut (one group) the sequential choice is the one-shot one.
3. Masked equivalence holds for a sequential choice (and a re-allocated one), and the
   budget is met to within one unit.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.api import optimize
from graphopt.core.contract import Context
from graphopt.core.registry import build_pass
from graphopt.testing import make_model, masked_equivalence

from .test_budget import _feeds as _mlp_feeds
from .test_budget import _mlp


def _two_layers() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    init = {"W1": np.array([[1, 0], [0, 1], [0, 0], [0, 0]], np.float32),
            "b1": np.zeros(2, np.float32),
            "W2": np.array([[0, 0, 1, 0], [0, 0, 0, 3]], np.float32),
            "c1": np.zeros(4, np.float32),
            "W3": np.array([[0, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 0]], np.float32),
            "b3": np.array([0.0, 0.2, 0.1], np.float32),
            "W4": (np.array([[2.0], [1.0], [0.3]]) * rng.normal(size=(3, 4)) +
                   np.array([[2.0], [1.0], [0.3]])).astype(np.float32),
            "c2": np.zeros(4, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a0"], name="fc1"),
             helper.make_node("Add", ["a0", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["p0"], name="fc2"),
             helper.make_node("Add", ["p0", "c1"], ["p1"]),
             helper.make_node("Add", ["p1", "x"], ["s"]),
             helper.make_node("MatMul", ["s", "W3"], ["g0"], name="fc3"),
             helper.make_node("Add", ["g0", "b3"], ["g1"]),
             helper.make_node("Relu", ["g1"], ["g"]),
             helper.make_node("MatMul", ["g", "W4"], ["q0"], name="fc4"),
             helper.make_node("Add", ["q0", "c2"], ["q1"]),
             helper.make_node("Add", ["q1", "s"], ["y"])]
    return make_model(nodes, {"x": ["n", 4]}, ["y"], init)


def _grid_feeds() -> list[dict[str, np.ndarray]]:
    """(x0, x1) on a product grid (relu(x0), relu(x1) exactly uncorrelated), x2 = x3 = 0."""
    values = np.linspace(-1.5, 2.0, 24)
    rows = np.array([[a, b, 0.0, 0.0] for a, b in itertools.product(values, values)],
                    np.float32)
    return [{"x": rows[i::4]} for i in range(4)]


def _cut(select: str, damping: float = 1e-6):
    """Both groups lose one unit (macs=0.6 of 40 MACs a row, 8 a unit; max_ratio 0.5)."""
    step = build_pass("prune", {"macs": 0.6, "kinds": ("neurons",), "select": select,
                                "damping": damping, "reconstruct": "none"})
    model = _two_layers()
    _, report = _run(model, step)
    plan = report.passes[0].plan
    by_size = {plan.coupling.group(g).size: set(u.tolist()) for g, u in plan.removal.items()}
    return by_size, report.passes[0]


def _run(model, step):
    from graphopt.core.manager import PassManager

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    pruned, report = PassManager([step]).run(copy, Context(calibration=_grid_feeds()))
    assert report.ok, report.passes[0].error
    return pruned, report


def test_an_upstream_cut_that_makes_a_unit_constant_gets_it_cut():
    once, _ = _cut("once")
    seq, entry = _cut("sequential")
    assert once == {2: {0}, 3: {2}}  # layer 1: the cheaper neuron; layer 2: the smallest row
    assert seq == {2: {0}, 3: {0}}  # relu(s2) is a constant once neuron 0 of layer 1 is cut
    assert any("1 of their 2 cut units differ" in n for n in entry.details["notes"])


def test_without_an_upstream_cut_the_choice_is_the_one_shot_one():
    feeds = _mlp_feeds()
    outs = {}
    for select in ("once", "sequential"):
        model, report = optimize(_mlp(), [f"prune:macs=0.5,select={select}"], calibration=feeds,
                                 input_shapes={"x": (16, 8)}, holdout=0)
        outs[select] = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        assert report.passes[0].counters["neurons_removed"] == 3
    assert outs["once"].keys() == outs["sequential"].keys()
    for name, value in outs["once"].items():
        np.testing.assert_allclose(outs["sequential"][name], value, rtol=1e-5, atol=1e-6)
    notes = report.passes[0].details["notes"]
    assert any("0 of their 3 cut units differ" in n for n in notes), notes


@pytest.mark.parametrize("select", ["sequential", "realloc"])
def test_sequential_choice_keeps_masked_equivalence_and_the_budget(select):
    step = build_pass("prune", {"macs": 0.6, "kinds": ("neurons",), "select": select,
                                "reconstruct": "none"})
    feeds = _grid_feeds()
    _, report, removal = masked_equivalence(_two_layers(), pass_obj=step,
                                            ctx=Context(calibration=feeds), feeds=feeds[0],
                                            must_prune=True)
    budget = report.passes[0].details["budget"]
    assert budget["removed"] >= 0.4 * budget["total"] - 1e-6
    assert budget["removed"] - 0.4 * budget["total"] < 8 * len(feeds[0]["x"])  # one unit
    assert sorted(len(u) for u in removal.values()) == [1, 1]
