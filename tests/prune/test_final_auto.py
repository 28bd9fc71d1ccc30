"""``optimize(final="auto")`` (the default): the passes run again on all calibration when
that second run's estimated cost is within the bound, else the model from the rest is
written with its exact figure (``graphopt.final_run``).

1. The estimate against a hand count: the MLP's 66 MACs per row, two forwards, over the
   feeds' rows; a token model's swapped-token copies (``Prune.data_feeds``) double it.
2. Within the bound the result is ``final="all"``'s, weight for weight; past it (the bound
   set to zero) it is ``final="rest"``'s, and the figure is that model's exact one; the
   report says which and why, on the CLI's JSON too.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from graphopt.api import optimize
from graphopt.cli.commands import main
from graphopt.final_run import REFIT_FORWARDS, second_run
from graphopt.core.recipe import passes_from_specs
from graphopt.prune import search_work


def get_pass(spec):
    return passes_from_specs([spec])[0]

from .test_budget import _mlp
from .test_final_all import PASS, _feeds, _same


def test_the_estimate_is_two_forwards_over_the_feeds_rows():
    """fc1 8x6 + fc2 6x3 = 66 MACs per row; 8 feeds of 16 rows, analysed at (16, 8): two
    forwards are 2 x 66 x 128 MACs, at the search's 59 GMAC per CPU second."""
    feeds = _feeds()
    prune = get_pass(PASS[0])
    work = second_run(_mlp(), {"x": (16, 8)}, feeds, [prune])
    assert REFIT_FORWARDS == 2
    assert work["macs"] == 2 * 66 * 16 * 8 and work["feeds"] == 8
    assert work["seconds"] == pytest.approx(work["macs"] / search_work.MACS_PER_SECOND)
    # feeds of another size count by their rows: 8 more feeds of 4 rows add a quarter each
    small = [{"x": f["x"][:4]} for f in feeds]
    assert second_run(_mlp(), {"x": (16, 8)}, feeds + small, [prune])["macs"] == \
        2 * 66 * (16 * 8 + 4 * 8)


def test_a_token_model_counts_the_pass_copies(hf_export, token_feeds):
    """BERT's calibration with prune's default swapped-token copy: twice the feeds, twice the
    work of the same feeds with ``swap_tokens=0``."""
    model = hf_export("bert", layers=2)
    feeds = [token_feeds(model, seed=s, batch=3, seq=9) for s in range(4)]
    shapes = {"input_ids": (3, 9), "attention_mask": (3, 9), "token_type_ids": (3, 9)}
    shapes = {k: v for k, v in shapes.items() if k in feeds[0]}
    copies = second_run(model, shapes, feeds, [get_pass("prune:macs=0.7")])
    plain = second_run(model, shapes, feeds, [get_pass("prune:macs=0.7,swap_tokens=0")])
    assert copies["feeds"] == 2 * plain["feeds"] == 8
    assert copies["macs"] == pytest.approx(2 * plain["macs"])


def test_within_the_bound_auto_is_all_and_past_it_rest(monkeypatch):
    feeds = _feeds()
    every, _ = optimize(_mlp(), PASS, calibration=feeds, final="all")
    rest, rest_report = optimize(_mlp(), PASS, calibration=feeds, final="rest")
    model, report = optimize(_mlp(), PASS, calibration=feeds)  # auto
    fid = report.metadata["fidelity"]
    assert _same(model, every) and fid["final_run"]["again"] is True
    assert fid["final_run"]["estimate_seconds"] < 1e-3
    assert "final=auto: optimized again on all 128 calibration samples" in fid["final"]
    monkeypatch.setattr(search_work, "SECONDS_BOUND", 0.0)
    model, report = optimize(_mlp(), PASS, calibration=feeds)
    fid = report.metadata["fidelity"]
    assert _same(model, rest) and fid["final_run"]["again"] is False
    assert fid["outputs"] == rest_report.metadata["fidelity"]["outputs"]
    assert "held_out_run" not in report.metadata
    assert "the written model is the one optimized from the other 96" in fid["final"]
    assert "past the bound of 0 CPU s (--final all runs it)" in fid["final"]


def test_cli_reports_the_decision(tmp_path, capsys, monkeypatch):
    src, out, cal = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "cal"
    onnx.save(_mlp(), src)
    cal.mkdir()
    for i, f in enumerate(_feeds()):
        np.savez(cal / f"{i:02d}.npz", **f)
    monkeypatch.setattr(search_work, "SECONDS_BOUND", 0.0)
    code = main(["optimize", str(src), "-o", str(out), "--pass", PASS[0], "--calibration",
                 str(cal), "--no-latency", "--json"])
    fid = json.loads(capsys.readouterr().out)["fidelity"]
    assert code == 0 and out.exists()
    assert fid["final_run"]["setting"] == "auto" and fid["final_run"]["again"] is False
    assert "final=auto: the written model is the one optimized from the other" in fid["final"]


def test_an_estimate_that_cannot_be_made_is_not_small(monkeypatch):
    """Where the MACs cannot be counted at the analysis shapes, auto writes the model from
    the rest (unknown work is not small, as for ``search=auto``) and says why."""
    monkeypatch.setattr("graphopt.final_run._macs", lambda model, shapes: 0.0)
    rest, _ = optimize(_mlp(), PASS, calibration=_feeds(), final="rest")
    model, report = optimize(_mlp(), PASS, calibration=_feeds())
    fid = report.metadata["fidelity"]
    assert _same(model, rest) and fid["final_run"]["estimate_seconds"] is None
    assert ("not optimized again on all 128: its cost could not be counted (no MACs at the "
            "analysis shapes): unknown work is not small (--final all runs it)") in fid["final"]


def test_a_failing_count_leaves_no_macs(monkeypatch):
    from graphopt import final_run

    def fail(*a, **k):
        raise ValueError("no shapes")

    monkeypatch.setattr("graphopt.analysis.cost.count_cost", fail)
    assert final_run._macs(_mlp(), {"x": (16, 8)}) == 0.0
    assert second_run(_mlp(), {"x": (16, 8)}, _feeds(), [])["seconds"] is None
