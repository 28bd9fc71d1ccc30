"""The measured width response of ``latency=`` budgets (``graphopt.prune.latency``): the
kernel-to-node attribution, the interpolation, and the budget met on an injected table.
No timing is asserted: the real profiles only have to produce a table of the right shape.

    x[1,3,8,8] ─ Conv c1 (8 out) ─ Relu ─ Conv c2 (8 → 4) ─ + x2 ─> y       (conv net)
    x[n,8] ─ W1[8,6] ─ +b1 ─ Relu ─ W2[6,3] ─ +b2 ─> y                     (the MLP)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.analysis.coupling import analyze
from graphopt.api import optimize
from graphopt.cli.commands import main
from graphopt.core.registry import build_pass
from graphopt.errors import ConfigError
from graphopt.prune.budget import unit_shares
from graphopt.prune.latency import (
    LatencyTable,
    attribute,
    indexed,
    kept_fractions,
    measure,
    monotone,
    uniform_counts,
)
from graphopt.testing import make_model

from .test_budget import _mlp


def _convnet() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
             "b1": rng.normal(size=8).astype(np.float32),
             "w2": rng.normal(size=(4, 8, 1, 1)).astype(np.float32),
             "skip": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"]),
             helper.make_node("Add", ["c2", "skip"], ["y"])]
    return make_model(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)


def _event(name, op, dur, ts):
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur, "ts": ts,
            "args": {"op_name": op}}


def test_indexed_names_every_node_and_output_by_its_original_index():
    model = _convnet()
    work = indexed(model, {n.output[0]: i for i, n in enumerate(model.graph.node)})
    assert [n.name for n in work.graph.node] == ["gn0x", "gn1x", "gn2x", "gn3x"]
    assert list(work.graph.node[2].input) == ["gt1x0", "w2"]
    assert work.graph.output[0].name == "gt3x0"
    onnx.checker.check_model(work)
    assert model.graph.node[0].output[0] == "c1"  # the original is untouched


def test_fused_kernels_are_charged_to_the_node_they_came_from():
    """A Conv kernel named after the Relu it absorbed goes to the Conv; a kernel that names
    no node (a layout reorder) and the time between kernels are the overhead."""
    nodes = list(_convnet().graph.node)
    events = []
    for r, t0 in enumerate((0, 1000)):
        events += [{"cat": "Session", "name": "model_run", "ts": t0, "dur": 100 + r},
                   _event("gt1x0_nchwc", "Conv", 40, t0 + 1),  # Conv+Relu, NCHWc
                   _event("gn2x", "FusedConv", 30, t0 + 50),    # Conv+Add fused
                   _event("ReorderOutput", "ReorderOutput", 10, t0 + 90)]
    per_node, other, wall = attribute(events, nodes)
    assert per_node.tolist() == [40.0, 0.0, 30.0, 0.0]
    assert other == 10.0
    # outside the kernels: 100 - 80 = 20 and 101 - 80 = 21; the lower quartile is 20.25
    assert wall == pytest.approx(80 + 20.25)


def test_monotone_pools_adjacent_violators():
    assert monotone([1.0, 2.0, 3.0]).tolist() == [1.0, 2.0, 3.0]
    assert monotone([3.0, 1.0, 2.0]).tolist() == [2.0, 2.0, 2.0]
    assert monotone([1.0, 4.0, 2.0, 5.0]).tolist() == [1.0, 3.0, 3.0, 5.0]


def test_time_interpolates_between_measured_widths():
    table = LatencyTable(full=np.array([10.0, 7.0]),
                         points={0: (np.array([0.25, 0.5, 1.0]), np.array([1.0, 3.0, 10.0]))})
    assert table.time(0, 1.0) == 10.0
    assert table.time(0, 0.75) == pytest.approx(6.5)
    assert table.time(0, 0.125) == pytest.approx(0.5)  # linear toward 0 below the last
    assert table.time(1, 0.5) == pytest.approx(3.5)  # no points: the linear share
    # a chunk's cost is the response's difference at its ends
    assert table.chunk_cost({0: 0.125}, 2, 2) == pytest.approx(6.5 - 3.0)


def test_overlapping_cuts_multiply_kept_fractions():
    """A node touched by two cut groups keeps the product of their kept shares; a removed
    layer's nodes go whole."""
    shares = {1: {0: 0.25, 1: 0.25}, 2: {1: 0.5}}
    assert kept_fractions(shares, {1: 2, 2: 1}) == {0: 0.5, 1: 0.25}
    table = LatencyTable(full=np.array([8.0, 8.0, 5.0]))
    assert table.removed(shares, {1: [0, 1], 2: [0]}, {2}) == pytest.approx(4 + 6 + 5)


def test_the_time_outside_kernels_shrinks_with_the_nodes():
    """Overhead measured at 1 µs when the nodes keep half their time, 2 µs at full: a cut
    that halves the one node's 4 µs saves 2 + 1."""
    table = LatencyTable(full=np.array([4.0]), overhead=2.0,
                         overhead_points=(np.array([0.5, 1.0]), np.array([1.0, 2.0])))
    assert table.overhead_at(0.75) == pytest.approx(1.5)
    assert table.overhead_at(0.25) == pytest.approx(0.5)
    assert table.removed({1: {0: 0.25}}, {1: [0, 1]}, set()) == pytest.approx(3.0)


def test_uniform_levels_respect_the_step_and_min_keep():
    class G:
        def __init__(self, gid, size):
            self.id, self.size = gid, size

    counts = uniform_counts([G(0, 64), G(1, 10), G(2, 3)], 0.25, {0: 8, 1: 4}, 2)
    assert counts == {0: 48, 1: 6, 2: 1}  # keeps 16, 4 (ceil to the step), 2 (min_keep)


def test_measure_profiles_the_levels_and_attributes_every_conv():
    """A real profile of the conv net at kept 1 and 0.5 of c1's channels: both Convs get
    time at both levels, their kept fractions are the uniform cut's (c1 loses half its
    outputs, c2 half its inputs)."""
    model = _convnet()
    coupling = analyze(model, {"x": (1, 3, 8, 8)})
    groups = [g for g in coupling.groups if g.prunable and g.kind == "channels"]
    assert [g.size for g in groups] == [8]
    feed = {"x": np.ones((1, 3, 8, 8), np.float32)}
    table = measure(model, coupling, groups, feed, "cpu", 1, levels=(1.0, 0.5), runs=2)
    assert [lv["keep"] for lv in table.levels] == [1.0, 0.5]
    assert table.full.shape == (4,) and table.full[0] > 0 and table.full[2] > 0
    for conv in (0, 2):
        xs, ts = table.points[conv]
        assert xs.tolist() == [0.5, 1.0] and all(t > 0 for t in ts)
    assert table.report()["threads"] == 1 and table.seconds > 0


def _fake_table(model, coupling, groups, feed, provider, threads, **kw):
    """A response where a unit costs more the narrower its layer already is: the
    node keeps half its time at a sixth of its width, 80 % at half."""
    full = np.array([6.0, 1.0, 1.0, 3.0, 1.0])
    xs = np.array([1 / 6, 0.5, 1.0])
    points = {n: (xs, full[n] * np.array([0.5, 0.8, 1.0])) for n in (0, 1, 2, 3)}
    return LatencyTable(full=full, points=points, overhead=0.5, provider=provider,
                        threads=threads)


@pytest.mark.parametrize("keep", [0.9, 0.75, 0.6])
def test_latency_budget_on_an_injected_table_is_met_within_one_unit(monkeypatch, keep):
    """prune:latency=F on the MLP, with the table injected: the cut removes, on the
    table's response, at least (1 - F) of its total and less than one unit's cost more."""
    monkeypatch.setattr("graphopt.passes.prune.measure_latency", _fake_table)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.normal(size=(16, 8)).astype(np.float32)} for _ in range(3)]
    model = _mlp()
    shares = unit_shares(analyze(model, {"x": (16, 8)}), next(
        g for g in analyze(model, {"x": (16, 8)}).groups if g.prunable), np.ones(5),
        "latency")
    _, report = optimize(model, [f"prune:latency={keep},checks=0"], calibration=feeds,
                         input_shapes={"x": (16, 8)})
    entry = report.passes[0]
    table = _fake_table(None, None, None, None, "cpu", None)
    gone = entry.counters["neurons_removed"]
    removed = sum(table.full[n] - table.time(n, 1 - gone * s) for n, s in shares.items())
    need = (1 - keep) * table.total
    one_unit = max(table.chunk_cost(shares, k, 1) for k in range(5))
    assert entry.details["budget"]["removed"] == pytest.approx(removed)
    assert need - 1e-9 <= removed < need + one_unit
    assert entry.details["latency_table"]["provider"] == "cpu"
    assert any("latency table" in n for n in entry.details["notes"])


def test_latency_budget_on_a_missing_provider_is_one_error_line(tmp_path, capsys):
    from graphopt.runtime.providers import working_providers

    if "cuda" in working_providers():
        pytest.skip("CUDA works here: the refusal cannot be shown")
    src, out = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    onnx.save(_mlp(), src)
    code = main(["optimize", str(src), "-o", str(out), "--pass",
                 "prune:latency=0.5,provider=cuda", "--input-shape", "x:16x8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error:") and "cuda" in err[0], err


@pytest.mark.parametrize("spec, extra", [
    ("prune:latency=0.5", []),             # the budget's table is timed on --provider
    ("prune:macs=0.5", []),                # the report's latency ratio is timed on it
])
def test_cli_provider_is_where_latency_is_timed(tmp_path, capsys, spec, extra):
    """``--provider cuda`` where CUDA does not start: one error line before any work,
    whether the budget's latency table or the report's ratio would be timed on it; with
    ``--no-latency`` a MACs budget runs (nothing is timed)."""
    from graphopt.runtime.providers import working_providers

    if "cuda" in working_providers():
        pytest.skip("CUDA works here: the refusal cannot be shown")
    src, out = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    onnx.save(_mlp(), src)
    code = main(["optimize", str(src), "-o", str(out), "--pass", spec, "--provider", "cuda",
                 "--input-shape", "x:16x8", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error:") and "'cuda'" in err[0], err
    if spec == "prune:macs=0.5":
        code = main(["optimize", str(src), "-o", str(out), "--pass", spec, "--provider",
                     "cuda", "--input-shape", "x:16x8", "--no-latency"])
        assert code == 0 and out.exists()


def test_optimize_provider_reaches_a_pass_left_at_the_default():
    """The pass's ``provider`` option left at its default takes ``optimize``'s; one given
    another value keeps it; the recipe given is not changed."""
    from graphopt.api import _on_provider
    from graphopt.core.recipe import Recipe

    default, own = build_pass("prune", {"macs": 0.5}), build_pass(
        "prune", {"macs": 0.5, "provider": "tensorrt"})
    recipe = Recipe([default, own])
    got = _on_provider(recipe, "cuda", latency=False)
    assert [p.config.provider for p in got.passes] == ["cuda", "tensorrt"]
    assert [p.config.provider for p in recipe.passes] == ["cpu", "tensorrt"]
    assert _on_provider(recipe, "cpu", latency=True).passes[0] is default


def test_negative_threads_are_refused():
    with pytest.raises(ConfigError, match="threads"):
        build_pass("prune", {"latency": 0.5, "threads": -1})


def _wide_convnet(width=40) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = {"w1": rng.normal(size=(width, 3, 3, 3)).astype(np.float32),
             "w2": rng.normal(size=(4, width, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"])]
    return make_model(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)


@pytest.mark.parametrize("budget", ["latency=0.5,checks=0", "latency=0.5,round_to=1,checks=0",
                                    "macs=0.5"])
def test_automatic_round_to_keeps_conv_channels_on_the_nchwc_block(monkeypatch, budget):
    """round_to=0 (the default): under latency= on the CPU, conv channels are cut in
    blocks (here 8: 40 -> 24 or 16 kept, never 20); round_to=1 or a MACs budget cut
    exactly half (20)."""
    monkeypatch.setattr("graphopt.passes.prune.nchwc_block", lambda: 8)
    monkeypatch.setattr("graphopt.passes.prune.measure_latency",
                        lambda model, *a, **k: LatencyTable(full=np.array([4.0, 1.0, 1.0])))
    _, report = optimize(_wide_convnet(), [f"prune:{budget}"],
                         input_shapes={"x": (1, 3, 8, 8)})
    removed = report.passes[0].counters["channels_removed"]
    if budget == "latency=0.5,checks=0":
        assert removed % 8 == 0 and removed in (16, 24)
    else:
        assert removed == 20


@pytest.mark.parametrize("budget, noted", [("macs=0.5", True), ("macs=0.5,round_to=8", False),
                                           ("macs=0.5,round_to=1", False),
                                           ("latency=0.5,checks=0", False)])
def test_a_macs_cut_off_the_nchwc_block_is_noted(monkeypatch, budget, noted):
    """macs= with round_to=0 cuts 40 -> 20 conv channels, off the (here 8-channel) NCHWc
    block the original was on: the report says so and names round_to=8. Rounded cuts, a
    round_to the user chose, and latency= budgets (rounded by themselves) have no note."""
    monkeypatch.setattr("graphopt.passes.prune.nchwc_block", lambda: 8)
    monkeypatch.setattr("graphopt.passes.prune.measure_latency",
                        lambda model, *a, **k: LatencyTable(full=np.array([4.0, 1.0, 1.0])))
    _, report = optimize(_wide_convnet(), [f"prune:{budget}"],
                         input_shapes={"x": (1, 3, 8, 8)})
    notes = [n for n in report.passes[0].details["notes"] if "NCHWc block" in n]
    assert bool(notes) == noted
    if noted:
        assert notes[0].startswith("conv channels were cut to widths off the CPU's NCHWc "
                                   "block of 8 in 1 group (40->20)")
        assert "round_to=8 keeps widths on the block" in notes[0]


def test_a_cut_the_table_misjudged_is_timed_and_allocated_again(monkeypatch):
    """checks=2: the first cut measures 0.8625, 15 % over latency=0.75, so the pass asks the
    table for its prediction scaled by 0.75 / 0.8625, removes more, and keeps that cut once
    it measures on budget; the report lists both timings."""
    monkeypatch.setattr("graphopt.passes.prune.measure_latency", _fake_table)
    calls = []

    def timed(model, coupling, removal, blocks, *a, **k):
        calls.append(sum(len(u) for u in removal.values()))
        return 0.75 * 1.15 if len(calls) == 1 else 0.75

    monkeypatch.setattr("graphopt.passes.prune.time_cut", timed)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.normal(size=(16, 8)).astype(np.float32)} for _ in range(3)]
    _, once = optimize(_mlp(), ["prune:latency=0.75,checks=0"], calibration=feeds,
                       input_shapes={"x": (16, 8)}, final="rest")  # one run of the pass
    _, report = optimize(_mlp(), ["prune:latency=0.75,checks=2"], calibration=feeds,
                         input_shapes={"x": (16, 8)}, final="rest")
    entry = report.passes[0]
    assert len(calls) == 2 and calls[1] > calls[0]
    assert calls[0] == once.passes[0].counters["neurons_removed"]
    assert entry.counters["neurons_removed"] == calls[1]
    checks = entry.details["latency_checks"]
    assert [c["measured"] for c in checks] == [0.8625, 0.75]
    assert [c["chosen"] for c in checks] == [False, True]
