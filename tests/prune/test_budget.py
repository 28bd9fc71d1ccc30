"""The budgeted ``prune`` pass and fidelity reporting, on a tiny MLP.

    x[n,8] ─ W1[8,6] ─ +b1 ─ Relu ─ W2[6,3] ─ +b2 ─> y

MACs per row: 8·6 + 6·3 = 66; one hidden unit saves 8 + 3 = 11.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.api import optimize
from graphopt.cli.commands import main
from graphopt.core.registry import build_pass
from graphopt.errors import ConfigError, InputSpecError
from graphopt.fidelity import split_holdout
from graphopt.testing import make_model


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = {"W1": rng.normal(size=(8, 6)).astype(np.float32),
             "b1": rng.normal(size=6).astype(np.float32),
             "W2": rng.normal(size=(6, 3)).astype(np.float32),
             "b2": rng.normal(size=3).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "W2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    return make_model(nodes, {"x": ["n", 8]}, ["y"], inits)


def _feeds(count=4, seed=3):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(16, 8)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5])
def test_macs_budget_is_met_within_one_unit(keep):
    """prune:macs=F removes hidden units until at most F of the MACs stay, overshooting by
    less than one unit's 11 MACs per row; the report carries the budget and the refit."""
    model, report = optimize(_mlp(), [f"prune:macs={keep}"], calibration=_feeds(),
                             input_shapes={"x": (16, 8)})
    entry = report.passes[0]
    before, after = report.metadata["cost_before"]["macs"], report.metadata["cost_after"]["macs"]
    need = (1 - keep) * before
    assert before - after >= need - 1e-6
    assert before - after - need < 11 * 16
    assert entry.counters["neurons_removed"] == round((before - after) / (11 * 16))
    assert entry.details["budget"]["metric"] == "macs"
    assert entry.details["reconstruction"]
    assert report.metadata["fidelity"]["measured"]


def test_impossible_budget_is_one_error_line_and_nothing_written(tmp_path, capsys):
    """macs=0.1 is below what max_ratio=0.9 allows (at least 17 % stay): one `error:` line
    before any pass runs, no output file."""
    src = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), src)
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(src), "-o", str(out), "--pass", "prune:macs=0.1",
                 "--input-shape", "x:16x8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error:") and "cannot be met" in err[0], err


@pytest.mark.parametrize("options", [{}, {"macs": 0.5, "params": 0.5}, {"macs": 0.0},
                                     {"macs": 1.5}, {"macs": 0.5, "kinds": ("rows",)}])
def test_bad_budgets_are_refused(options):
    with pytest.raises(ConfigError):
        build_pass("prune", options)


def test_latency_budget_on_a_missing_provider_is_refused():
    from graphopt.runtime.providers import working_providers

    if "cuda" in working_providers():
        pytest.skip("CUDA works here: the refusal cannot be shown")
    with pytest.raises(ConfigError, match="does not start"):
        build_pass("prune", {"latency": 0.5, "provider": "cuda"})


def test_without_calibration_the_report_says_it_guessed():
    """No calibration: weight-only ranking, said in the notes; fidelity not measured."""
    _, report = optimize(_mlp(), ["prune:macs=0.7"], input_shapes={"x": (16, 8)})
    notes = report.passes[0].details["notes"]
    assert any("guess" in n for n in notes)
    assert report.metadata["fidelity"] == {"measured": False, "reason": report.metadata[
        "fidelity"]["reason"]}


def test_calibration_feeds_that_miss_an_input_are_refused():
    with pytest.raises(InputSpecError, match="lacks x"):
        optimize(_mlp(), ["prune:macs=0.7"], calibration=[{"y": np.zeros((2, 8), np.float32)}])


@pytest.mark.parametrize("value, fragment", [
    (np.zeros((2, 8), np.float64), "'x' is float64, the model takes float32"),
    (np.zeros((2, 5), np.float32), "'x' has 5 on axis 1, the model takes 8 there"),
    (np.zeros((2, 8, 1), np.float32), "'x' has rank 3, the model takes rank 2"),
])
def test_calibration_feeds_of_another_type_or_size_are_refused(value, fragment):
    """A feed onnxruntime would refuse mid-run (element type, a fixed dim, the rank) is one
    InputSpecError before any pass runs, for calibration and validation alike."""
    with pytest.raises(InputSpecError, match=re.escape(fragment)):
        optimize(_mlp(), ["prune:macs=0.7"], calibration=[{"x": value}])
    good = [{"x": np.zeros((2, 8), np.float32)}]
    with pytest.raises(InputSpecError, match="validation input set 0: " + re.escape(fragment)):
        optimize(_mlp(), ["prune:macs=0.7"], calibration=good, validation=[{"x": value}])


def test_holdout_split():
    """The last quarter of the feeds is held out; one feed splits along its batch."""
    cal, held = split_holdout(_feeds(4), 0.25)
    assert len(cal) == 3 and len(held) == 1
    cal, held = split_holdout(_feeds(1), 0.25)
    assert cal[0]["x"].shape[0] == 12 and held[0]["x"].shape[0] == 4
    assert split_holdout(_feeds(1), 0.0)[1] == []


def test_a_layer_that_would_pass_the_budget_by_more_than_a_chunk_waits():
    """A whole layer is the cheapest damage per cost, but taking it would remove 30 where
    10 are needed: width chunks (cost 1 each) meet the need instead, to within one chunk.
    With nothing but the layer left, the layer is taken (the only way to meet it)."""
    from graphopt.prune.budget import Candidate, allocate

    layer = Candidate("layers", 0, (), damage=0.3, cost=30.0)
    chunks = [Candidate("neurons", 7, (k,), damage=0.2 + 0.01 * k, cost=1.0, order=k)
              for k in range(20)]
    alloc = allocate([layer] + chunks, need=10.0)
    assert alloc.layers == []
    assert alloc.removal == {7: list(range(10))}
    assert 10.0 <= alloc.removed_cost < 11.0
    alone = allocate([layer] + chunks[:5], need=10.0)
    assert alone.layers == [0] and alone.removed_cost >= 10.0


def _convs() -> onnx.ModelProto:
    """conv1 (4 -> 8, 3x3) -> relu -> conv2 (8 -> 8, 3x3) -> relu -> conv3 (8 -> 2, 1x1),
    dynamic batch and spatial dims: conv2's input and output channels are two groups."""
    rng = np.random.default_rng(5)
    inits = {"W1": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
             "W2": rng.normal(size=(8, 8, 3, 3)).astype(np.float32),
             "W3": rng.normal(size=(2, 8, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "W3"], ["y"])]
    return make_model(nodes, {"x": ["n", 4, "h", "w"]}, ["y"], inits)


@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_overlapping_groups_are_counted_as_cut_and_shapes_come_from_the_calibration(keep):
    """Cutting conv2's inputs and outputs keeps the product of the kept shares of its MACs
    (not 1 minus the sum): the budget is still met, to within one unit (conv1 + conv2 per
    channel of the first group: 6912 MACs per image of 8x8). Dynamic dims are counted at
    the calibration feeds' 2x4x8x8, not at generic defaults."""
    rng = np.random.default_rng(2)
    cal = [{"x": rng.normal(size=(2, 4, 8, 8)).astype(np.float32)} for _ in range(3)]
    model, report = optimize(_convs(), [f"prune:macs={keep},reconstruct=none"],
                             calibration=cal, holdout=0)
    before, after = report.metadata["cost_before"]["macs"], report.metadata["cost_after"]["macs"]
    assert before == 2 * (64 * 8 * 4 * 9 + 64 * 8 * 8 * 9 + 64 * 8 * 2)
    need = (1 - keep) * before
    assert before - after >= need
    assert before - after - need < 2 * 6912
    budget = report.passes[0].details["budget"]
    assert budget["removed"] == pytest.approx(before - after)


def test_a_budget_only_the_overcounted_sum_allows_is_refused():
    """The unit costs of _convs' two groups sum past the whole model (both count conv2), so
    macs=0.02 passes that first check; as really counted, cutting every unit max_ratio=0.9
    allows keeps 1 - 53312/56320 = 0.053 of the MACs: one error, not a silent 0.053."""
    rng = np.random.default_rng(2)
    cal = [{"x": rng.normal(size=(2, 4, 8, 8)).astype(np.float32)} for _ in range(3)]
    with pytest.raises(ConfigError, match=r"macs=0.02 cannot be met.*keep at least 0.053"):
        optimize(_convs(), ["prune:macs=0.02,reconstruct=none"], calibration=cal, holdout=0)
    model, report = optimize(_convs(), ["prune:macs=0.06,reconstruct=none"],
                             calibration=cal, holdout=0)
    assert report.metadata["cost_after"]["macs"] <= 0.06 * report.metadata["cost_before"]["macs"]


def test_search_rescales_by_measured_damage_and_still_meets_the_budget():
    """search=1 probes the hidden group, scales its damages by the measured output damage
    (the note says by how much), and the budget is still met within one unit."""
    model, report = optimize(_mlp(), ["prune:macs=0.7,search=1,target=stream"],
                             calibration=_feeds(), input_shapes={"x": (16, 8)})
    entry = report.passes[0]
    before, after = report.metadata["cost_before"]["macs"], report.metadata["cost_after"]["macs"]
    assert 0 <= before - after - 0.3 * before < 11 * 16
    assert any("measured output damage" in n for n in entry.details["notes"])


def test_cross_fitted_search_still_meets_the_budget():
    """folds=2 changes which units go (probes scored on the fold they were not fit on),
    never the budget: met to within one unit (11 neurons' MACs per row of 16)."""
    model, report = optimize(_mlp(), ["prune:macs=0.7,target=stream,search=1,folds=2"],
                             calibration=_feeds(), input_shapes={"x": (16, 8)})
    before, after = report.metadata["cost_before"]["macs"], report.metadata["cost_after"]["macs"]
    assert 0 <= before - after - 0.3 * before < 11 * 16
    assert any("measured output damage" in n for n in report.passes[0].details["notes"])
