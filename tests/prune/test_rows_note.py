"""The refit's note on few calibration rows per input (passes/_refit.py, module doc 4).

On the MLP of test_reconstruct (fc2 reads 6 hidden units; prune-neurons at ratio 0.34 cuts 2,
so fc2 is refit from 4 inputs): one feed of 16 rows is 4.0 rows per input (the note names
the site and its figures), three feeds are 12 (no note), and ``reconstruct=bias`` fits no
weights (no note)."""

from __future__ import annotations

import onnx

from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.passes._refit import FEW_ROWS, rows_note
from graphopt.prune.reconstruct import SiteFit

from .test_reconstruct import _feeds, _mlp


def _notes(options: dict, feeds: list) -> tuple[list[str], dict]:
    model = onnx.ModelProto()
    model.CopyFrom(_mlp())
    _, report = PassManager([build_pass("prune-neurons", options)]).run(
        model, Context(calibration=feeds))
    assert report.ok, report.passes[0].error
    entry = report.passes[0]
    return entry.details.get("notes", []), entry.details["reconstruction"][0]


def test_few_rows_per_input_is_reported_with_the_site():
    notes, fit = _notes({"ratio": 0.34}, _feeds((16, 8), count=1))
    assert (fit["site"], fit["rows"], fit["inputs"]) == ("y0", 16, 4)
    (note,) = [n for n in notes if "rows per input" in n]
    assert "4.0 calibration rows per input" in note and "y0: 16 rows, 4 inputs" in note


def test_enough_rows_or_no_weight_fit_says_nothing():
    notes, fit = _notes({"ratio": 0.34}, _feeds((16, 8), count=3))
    assert fit["rows"] / fit["inputs"] == 12 > FEW_ROWS
    assert not [n for n in notes if "rows per input" in n]
    notes, _ = _notes({"ratio": 0.34, "reconstruct": "bias"}, _feeds((16, 8), count=1))
    assert not [n for n in notes if "rows per input" in n]


def test_the_thinnest_site_is_named():
    fits = [SiteFit("a", "MatMul", 1000, 0.1, 0.01, inputs=50),
            SiteFit("b", "MatMul", 300, 0.1, 0.01, inputs=100),
            SiteFit("c", "Conv", 10, 0.1, 0.01)]  # no inputs recorded: left out
    assert "3.0 calibration rows per input" in rows_note(fits) and "(b: 300" in rows_note(fits)
    assert rows_note(fits[:1]) is None and rows_note(fits[2:]) is None
