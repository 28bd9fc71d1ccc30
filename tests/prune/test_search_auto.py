"""``search=auto`` (the default): measured sensitivity when its probes' estimated CPU time is
under a bound.

Models: ``_mlp`` of ``test_budget`` (x[n,8] ─ W1[8,6] + b1 ─ Relu ─ W2[6,3] + b2 ─> y:
66 MACs and 24 output elements a row; the hidden group's probe runs W2 and its bias Add
alone, 18 MACs and 6 elements; 75 float weights, 300 bytes) and ``_two_blocks`` of
``test_reconstruct`` (three neuron groups and a removable layer, 8×8 MatMuls: 64 MACs a
row each, every tensor 8 wide). Oracles:

1. ``probe_work`` equals the MACs and output elements of what the probes run, counted
   independently: by hand for the MLP; for ``_two_blocks`` over the nodes ``suffix_of``
   finds in each probe's edited copy, plus one run of the original; the estimate in
   seconds is the module's formula on those counts.
2. The decision falls on either side of the bound at the estimate exactly.
3. ``auto`` under a huge bound cuts what ``search=1`` cuts and under a zero bound what
   ``search=0`` cuts, weight for weight (and those two differ on ``_two_blocks``).
4. The report: ``details["search"]`` and a note saying what ran, the estimate against the
   bound and how to force it; the CLI prints the note and its JSON carries the fields.
5. ``final=all``: the held-out run's round is the only one (``measure`` runs once), the run
   on all the data says it reused that round's factors.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt.prune.search_work as search_work
from graphopt.analysis.coupling import analyze
from graphopt.analysis.structure import find_structure
from graphopt.api import optimize
from graphopt.cli.commands import main
from graphopt.data.gram import accumulate, constants
from graphopt.errors import ConfigError
from graphopt.core.registry import build_pass
from graphopt.prune.scores import _consumers, damped_inverse
from graphopt.prune.search_work import (ELEMENTS_PER_SECOND, MACS_PER_SECOND,
                                         SECONDS_BOUND, SECONDS_PER_BYTE,
                                         SETUP_SECONDS, probe_work)
from graphopt.prune.sensitivity import Probe, _edited
from graphopt.prune.suffix import suffix_of

from .test_budget import _feeds, _mlp
from .test_reconstruct import _two_blocks

MLP_WORK = 4 * 16 * (66 + 18)  # 4 feeds of 16 rows: the original once, the probe's W2
MLP_ELEMENTS = 4 * 16 * (24 + 6)
MLP_SECONDS = (MLP_WORK / MACS_PER_SECOND + MLP_ELEMENTS / ELEMENTS_PER_SECOND
               + 1 * (SETUP_SECONDS + 300 * SECONDS_PER_BYTE))  # one probe's set-up


def _run(model, spec, feeds=None, **kw):
    return optimize(model, [spec], calibration=_feeds() if feeds is None else feeds,
                    input_shapes={"x": (16, 8)}, holdout=0, **kw)


def _weights(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _same(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(
        wa[k].shape == wb[k].shape and np.array_equal(wa[k], wb[k]) for k in wa)


def test_mlp_estimate_is_the_macs_the_probe_runs():
    """The MLP's one probe (its hidden group) on the 4 feeds holding 64 rows: the original
    once (66 MACs, 24 elements a row) and W2 + b2 for the probe (18, 6), one set-up copying
    300 bytes; a tiny model is far under the bound, so the default runs the search and
    says so."""
    _, report = _run(_mlp(), "prune:macs=0.7")
    entry = report.passes[0]
    search = entry.details["search"]
    assert search["work_macs"] == MLP_WORK and search["probes"] == 1
    assert search["work_elements"] == MLP_ELEMENTS and search["setups"] == 1
    assert search["weight_bytes"] == 300 and search["seconds"] == MLP_SECONDS
    assert search["samples"] == 64 and search["bound_seconds"] == SECONDS_BOUND
    assert search["setting"] == "auto" and search["ran"] and search["rounds"] == 1
    assert any("measured output damage" in n for n in entry.details["notes"])


def test_two_blocks_estimate_equals_the_suffixes_the_probes_run():
    """Every group's probe and the removable layer's bypass: ``probe_work`` counts the
    MatMuls of the nodes ``suffix_of`` finds in each edited copy (64 MACs a row each), on
    the feeds it is given, plus the original's six MatMuls once."""
    model = _two_blocks()
    coupling = analyze(model, {"x": (16, 8)})
    groups = [g for g in coupling.groups if g.prunable]
    consumers = {g.id: _consumers(model, coupling, g, constants(model)) for g in groups}
    blocks = list(find_structure(model).blocks("layer"))[:1]
    feeds = [{"x": np.ones((rows, 8), np.float32)} for rows in (16, 5, 7)]
    sites = [s for cs in consumers.values() for s, _ in cs]
    inverses = {n: damped_inverse(st.xtx, 0.1)
                for n, st in accumulate(model, sites, feeds).items()}
    probes = [Probe(("group", g.id), np.array([0])) for g in groups] + \
             [Probe(("layer", 0), block=blocks[0])]
    per_row = elements = 0
    for p in probes:
        work, touched = _edited(model, p, consumers, inverses)
        nodes, _ = suffix_of(model, work, touched)
        per_row += 64 * sum(work.graph.node[i].op_type == "MatMul" for i in nodes)
        made = {o for n in model.graph.node for o in n.output}  # not the bias Adds an edit
        elements += 8 * sum(work.graph.node[i].output[0] in made for i in nodes)  # inserts
    per_row += 64 * 6  # the original, once
    elements += 8 * 9
    for subset, rows in ((None, 16 + 5 + 7), ([0, 2], 16 + 7)):
        got = probe_work(model, coupling, groups, blocks, feeds, subset)
        assert got.probes == len(probes) and got.groups == len(groups)
        assert got.samples == rows and got.macs == per_row * rows
        assert got.elements == elements * rows and got.setups == len(probes)
        assert got.weight_bytes == 6 * 64 * 4
    folded = probe_work(model, coupling, groups, blocks, feeds, [0], folds=2)
    assert folded.macs == 64 * 6 * (len(probes) + 2) * 28  # whole runs, every feed
    assert folded.setups == len(probes) + len(groups)  # a group: a copy per fold


@pytest.mark.parametrize("bound, ran", [(MLP_SECONDS, True),
                                        (math.nextafter(MLP_SECONDS, 0), False)])
def test_auto_decides_at_the_estimate_exactly(monkeypatch, bound, ran):
    monkeypatch.setattr(search_work, "SECONDS_BOUND", bound)
    _, report = _run(_mlp(), "prune:macs=0.7")
    entry = report.passes[0]
    assert entry.details["search"]["ran"] is ran
    assert entry.details["search"]["bound_seconds"] == bound
    assert any("measured output damage" in n for n in entry.details["notes"]) is ran
    (note,) = [n for n in entry.details["notes"] if n.startswith("search=auto")]
    assert ("search=0 turns it off" in note) is ran and ("search=1 forces it" in note) is not ran
    assert ("within" if ran else "past") in note and "5.38 kMAC" in note
    assert f"≈{MLP_SECONDS:.3g} CPU s" in note and "1.92 k elements" in note


@pytest.mark.parametrize("bound, forced", [(1e30, 1), (0.0, 0)])
def test_auto_cuts_as_the_forced_setting_on_its_side_of_the_bound(monkeypatch, bound, forced):
    """``_two_blocks`` at macs=0.7: search=1 cuts other units than search=0 (the oracle is
    not vacuous); auto on either side of the bound gives that side's model exactly."""
    feeds = [{"x": np.random.default_rng(3 + i).normal(size=(16, 8)).astype(np.float32)}
             for i in range(4)]
    models = {s: _run(_two_blocks(), f"prune:macs=0.7,search={s}", feeds)[0] for s in (0, 1)}
    assert not _same(models[0], models[1])
    monkeypatch.setattr(search_work, "SECONDS_BOUND", bound)
    auto, report = _run(_two_blocks(), "prune:macs=0.7", feeds)
    assert _same(auto, models[forced])
    assert report.passes[0].details["search"]["rounds"] == forced


def test_forced_settings_and_no_calibration_are_reported():
    """search=0 and search=1 say they were forced, with the estimate; without calibration
    nothing is measured, whatever the setting, and the report says why."""
    for setting in (0, 1):
        _, report = _run(_mlp(), f"prune:macs=0.7,search={setting}")
        search = report.passes[0].details["search"]
        assert search["setting"] == setting and search["rounds"] == setting
        assert search["work_macs"] == MLP_WORK and search["reason"] == f"forced (search={setting})"
        assert any(n.startswith(f"search={setting}: measured sensitivity forced")
                   for n in report.passes[0].details["notes"])
    for setting in ("auto", 1):
        _, report = optimize(_mlp(), [f"prune:macs=0.7,search={setting}"],
                             input_shapes={"x": (16, 8)})
        search = report.passes[0].details["search"]
        assert not search["ran"] and search["work_macs"] is None
        assert "no calibration" in search["reason"]


@pytest.mark.parametrize("value", ["-1", "sometimes", "1.5"])
def test_bad_search_values_are_refused(value):
    with pytest.raises(ConfigError, match="search"):
        build_pass("prune", {"macs": "0.7", "search": value})


def test_cli_prints_the_decision_and_its_json_carries_it(tmp_path, capsys):
    src, cal = tmp_path / "m.onnx", tmp_path / "cal"
    onnx.save(_mlp(), src)
    cal.mkdir()
    for i, f in enumerate(_feeds()):
        np.savez(cal / f"{i:02d}.npz", **f)
    args = ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--pass", "prune:macs=0.7",
            "--calibration", str(cal), "--no-latency", "--final", "rest"]
    assert main(args) == 0
    assert "search=auto: measured sensitivity ran 1 round" in capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["passes"]
    assert entry["config"]["search"] == "auto"
    assert entry["details"]["search"]["ran"] is True
    assert entry["details"]["search"]["work_macs"] == 3 * 16 * (66 + 18)  # 3 feeds kept


def test_work_that_cannot_be_counted_is_not_small(monkeypatch):
    """Shapes not inferred at the probe feeds' sizes: no estimate, auto leaves the search
    off and says why; search=1 still runs it."""
    def fail(*_):
        raise ValueError("no shapes")

    monkeypatch.setattr(search_work, "node_macs", fail)
    _, report = _run(_mlp(), "prune:macs=0.7")
    entry = report.passes[0]
    assert not entry.details["search"]["ran"] and entry.details["search"]["work_macs"] is None
    assert any("could not be estimated" in n and "search=1 forces it" in n
               for n in entry.details["notes"])
    _, report = _run(_mlp(), "prune:macs=0.7,search=1")
    assert report.passes[0].details["search"]["ran"]


def test_final_all_pays_one_round(monkeypatch):
    """``final=all`` on ``_two_blocks`` (8 feeds, 2 held out): the held-out run probes once;
    the run on all 8 runs no probe, scales its scores by those factors and lists them; with
    ``final=rest`` there is one run and one round too."""
    import graphopt.prune.search as search

    calls = []
    real = search.measure

    def counted(*a, **k):
        out = real(*a, **k)
        calls.append(out)
        return out

    monkeypatch.setattr(search, "measure", counted)
    feeds = [{"x": np.random.default_rng(3 + i).normal(size=(16, 8)).astype(np.float32)}
             for i in range(8)]
    _, report = optimize(_two_blocks(), ["prune:macs=0.7"], calibration=feeds,
                         input_shapes={"x": (16, 8)})
    assert len(calls) == 1
    entry = report.passes[0]
    assert entry.details["search"]["reused"] == len(calls[0]) > 0
    assert entry.details["search"]["rounds"] == 0 and not entry.details["search"]["ran"]
    (note,) = [n for n in entry.details["notes"] if "measured output damage" in n]
    assert note.startswith("search: the damage factors the held-out run measured "
                           f"({len(calls[0])} probes)")  # and they are listed
    calls.clear()
    _, report = optimize(_two_blocks(), ["prune:macs=0.7"], calibration=feeds,
                         input_shapes={"x": (16, 8)}, final="rest")
    assert len(calls) == 1 and "reused" not in report.passes[0].details["search"]
