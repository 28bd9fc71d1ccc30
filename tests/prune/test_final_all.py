"""The held-out figure and the model written: ``optimize(final="all"|"rest")``, ``--final``.

With calibration and no validation, a lossy run holds out the last ``holdout`` share.
``final="all"`` (what the default ``auto`` does on models this small,
tests/prune/test_final_auto.py) measures the figure on a model optimized from the rest,
then optimizes again from all the feeds and returns that, labelled; ``"rest"`` returns the
model optimized from the rest with its exact held-out figure.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphopt.api import optimize
from graphopt.cli.commands import main
from graphopt.errors import ConfigError
from graphopt.fidelity import measure, split_holdout
from graphopt.prune.shared import SHARED_NOTE

from .test_budget import _mlp

# search=0: the search keeps the scores' inverses, so with it each run captures its own
# (``graphopt.prune.shared``, 3); on these tiny models search=auto would run it
PASS = ["prune:macs=0.6,search=0"]


def _feeds(count=8, seed=3):
    rng = np.random.default_rng(seed)
    # the last feeds differ in scale: a model refit with them differs from one without
    return [{"x": (rng.normal(size=(16, 8)) * (1 + 2 * (i >= count - 2))).astype(np.float32)}
            for i in range(count)]


def _weights(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _same(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_final_all_writes_the_model_from_all_feeds_and_the_figure_of_the_rest():
    """Oracles: the model returned == optimize on all feeds with nothing held out; its
    figure == the exact held-out figure of the model optimized from the rest (final=rest),
    == fidelity.measure of that model on the held-out feeds; the report says which is which."""
    feeds = _feeds()
    rest, held = split_holdout(feeds, 0.25)
    everything, _ = optimize(_mlp(), PASS, calibration=feeds, holdout=0)
    from_rest, rest_report = optimize(_mlp(), PASS, calibration=feeds, final="rest")
    model, report = optimize(_mlp(), PASS, calibration=feeds)
    assert _same(model, everything) and not _same(model, from_rest)
    fid, exact = report.metadata["fidelity"], rest_report.metadata["fidelity"]
    assert fid["outputs"] == exact["outputs"]
    assert fid["outputs"] == measure(_mlp(), from_rest, held, "x")["outputs"]
    assert fid["data"] == exact["data"] == "held-out calibration (2 of 8 feeds)"
    assert "optimized again from all 128 calibration samples" in fid["final"]
    assert "other 96, on the 32" in fid["final"] and "final" not in exact
    assert report.metadata["held_out_run"]["samples"] == 16 * len(rest) == 96
    assert report.passes[0].status == "changed"
    assert SHARED_NOTE in report.passes[0].details["notes"]


def test_with_validation_or_no_holdout_there_is_one_run():
    """Validation data given, or holdout=0: nothing is held out, final changes nothing."""
    feeds, val = _feeds(), _feeds(2, seed=9)
    a, ra = optimize(_mlp(), PASS, calibration=feeds, validation=val)
    b, _ = optimize(_mlp(), PASS, calibration=feeds, validation=val, final="rest")
    assert _same(a, b) and "final" not in ra.metadata["fidelity"]
    assert ra.metadata["fidelity"]["data"] == "validation data"
    _, r0 = optimize(_mlp(), PASS, calibration=feeds, holdout=0)
    assert r0.metadata["fidelity"]["measured"] is False


def test_one_feed_is_split_along_its_batch_and_labelled_in_samples():
    """One feed of 64 rows: 48 calibrate the measured model, 16 are held out; the written
    model == the one optimized from all 64 rows."""
    feed = {"x": np.concatenate([f["x"] for f in _feeds(4)])}
    model, report = optimize(_mlp(), PASS, calibration=feed)
    assert _same(model, optimize(_mlp(), PASS, calibration=feed, holdout=0)[0])
    assert "all 64 calibration samples" in report.metadata["fidelity"]["final"]
    assert "other 48, on the 16" in report.metadata["fidelity"]["final"]


def test_bad_final_is_refused():
    with pytest.raises(ConfigError, match="final must be auto, all or rest"):
        optimize(_mlp(), PASS, calibration=_feeds(), final="best")


def test_cli_final_labels_the_figure_and_refuses_bad_values(tmp_path, capsys):
    src, out, cal = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "cal"
    onnx.save(_mlp(), src)
    cal.mkdir()
    for i, f in enumerate(_feeds()):
        np.savez(cal / f"{i:02d}.npz", **f)
    code = main(["optimize", str(src), "-o", str(out), "--pass", PASS[0], "--calibration",
                 str(cal), "--no-latency", "--json"])
    text = capsys.readouterr().out
    assert code == 0 and out.exists()
    fid = json.loads(text)["fidelity"]
    assert "optimized again from all 128" in fid["final"]
    bad = tmp_path / "bad.onnx"
    code = main(["optimize", str(src), "-o", str(bad), "--pass", PASS[0], "--calibration",
                 str(cal), "--final", "best"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not bad.exists()
    assert len(err) == 1 and err[0].startswith("error:"), err


def test_one_capture_serves_both_runs_of_a_token_model(hf_export, token_feeds):
    """A tiny BERT (swapped-token copies in the scoring feeds): the held-out run's capture of
    the original model gives the full run its scores (the note says so), and still the
    model written == optimize on all feeds alone, weight for weight, and the figure == the
    exact held-out figure of the model optimized from the rest alone (final=rest)."""
    model = hf_export("bert", layers=2)
    feeds = [token_feeds(model, seed=s, batch=3, seq=9) for s in range(8)]
    spec = ["prune:macs=0.7,search=0"]
    written, report = optimize(model, spec, calibration=feeds, latency=False)
    alone, _ = optimize(model, spec, calibration=feeds, holdout=0)
    from_rest, rest_report = optimize(model, spec, calibration=feeds, final="rest")
    assert SHARED_NOTE in report.passes[0].details["notes"]
    assert SHARED_NOTE not in rest_report.passes[0].details["notes"]
    assert _same(written, alone) and not _same(written, from_rest)
    assert report.metadata["fidelity"]["outputs"] == rest_report.metadata["fidelity"]["outputs"]


def test_early_scores_are_those_of_the_first_feeds_alone(hf_export, token_feeds):
    """Oracle for the share: ``data_scores`` with ``upto=n`` gives, from one capture, the
    scores a call on the first n feeds alone gives, number for number, and its own scores
    equal a call without ``upto``."""
    from graphopt.analysis.coupling import analyze
    from graphopt.prune.scores import data_scores
    from graphopt.prune.streams import StreamStats

    from graphopt.passes._prune_units import prunable_groups
    from graphopt.passes.prune import PrunePlan

    model = hf_export("bert", layers=2)
    coupling = analyze(model, None)
    groups = prunable_groups(coupling, PrunePlan(coupling), ("heads", "neurons"))
    feeds = [token_feeds(model, seed=s, batch=3, seq=9) for s in range(6)]

    def alone(fs):
        norms = StreamStats(model, groups, fs)
        got, _ = data_scores(model, coupling, groups, "obs", fs, norms=norms,
                             observe=norms.observers())
        return got

    both, first = StreamStats(model, groups, feeds), StreamStats(model, groups, feeds[:4])
    observe = {n: (lambda f, v, n=n: (both.observe(f, n, v), f < 4 and first.observe(f, n, v)))
               for n in both.names}
    early = {"norms": first}
    got, _ = data_scores(model, coupling, groups, "obs", feeds, norms=both, observe=observe,
                         upto=4, early=early)
    ref_all, ref_first = alone(feeds), alone(feeds[:4])
    assert got.keys() == ref_all.keys() == early["scores"].keys() and len(got) >= 2
    assert all(np.array_equal(got[g], ref_all[g]) for g in got)
    assert all(np.array_equal(early["scores"][g], ref_first[g]) for g in got)
    assert not all(np.array_equal(got[g], early["scores"][g]) for g in got)


def test_only_the_first_lossy_pass_shares_its_capture():
    """Two prunes: the second sees a model the first cut differently in each run, so it
    captures on its own; the model written == optimize on all feeds alone."""
    passes = ["prune:macs=0.8,search=0", "prune:macs=0.6,search=0"]
    model, report = optimize(_mlp(), passes, calibration=_feeds())
    assert _same(model, optimize(_mlp(), passes, calibration=_feeds(), holdout=0)[0])
    first, second = (p.details["notes"] for p in report.passes)
    assert SHARED_NOTE in first and SHARED_NOTE not in second
