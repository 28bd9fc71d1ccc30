"""The budgeted ``prune`` pass and fidelity reporting, on a tiny MLP.

    x[n,8] ─ W1[8,6] ─ +b1 ─ Relu ─ W2[6,3] ─ +b2 ─> y

MACs per row: 8·6 + 6·3 = 66; one hidden unit saves 8 + 3 = 11.
"""

from __future__ import annotations

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


def test_holdout_split():
    """The last quarter of the feeds is held out; one feed splits along its batch."""
    cal, held = split_holdout(_feeds(4), 0.25)
    assert len(cal) == 3 and len(held) == 1
    cal, held = split_holdout(_feeds(1), 0.25)
    assert cal[0]["x"].shape[0] == 12 and held[0]["x"].shape[0] == 4
    assert split_holdout(_feeds(1), 0.0)[1] == []
