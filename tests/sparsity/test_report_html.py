"""``graphopt optimize --report x.html`` with sparsify and sparse-ops: the page shows each
layer's sparsity as bars, the sparsify table (target, before → after, N:M holding on the
written weights) and what sparse-ops kept per MatMul with the reason and the times.

    x [4, 16, 32] ─ MatMul w1 [32, 48] ─ Relu ─ MatMul w2 [48, 8] ─ y
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from graphopt.cli.commands import main  # noqa: E402
from graphopt.htmlsparsity import pass_layers, sparsity_section  # noqa: E402

from .test_sparsify import _feeds, mlp  # noqa: E402


def test_optimize_html_report_shows_per_layer_sparsity_and_kernel_choices(tmp_path, capsys):
    """2:4 Wanda on fc1 and fc2 (fc2 kept dense by measured sensitivity), then sparse-ops:
    both layers' rows, the bars (one SVG more than a run without sparsity), the sparse-ops
    reasons with measured times."""
    import graphopt

    src = tmp_path / "m.onnx"
    graphopt.save(mlp(), src)
    cal = tmp_path / "cal"
    cal.mkdir()
    for i, feed in enumerate(_feeds(4)):
        np.savez(cal / f"{i}.npz", **feed)
    page_path = tmp_path / "r.html"
    code = main(["optimize", str(src), "-o", str(tmp_path / "s.onnx"), "--calibration", str(cal),
                 "--no-latency", "--pass", "sparsify:pattern=2:4,method=wanda,keep_dense=0.5",
                 "--pass", "sparse-ops:rounds=2,min_time=0.01,min_sparsity=0.4",
                 "--report", str(page_path)])
    capsys.readouterr()
    assert code in (0, 1)
    page = page_path.read_text()
    assert "<h2>Sparsity per layer</h2>" in page
    section = page[page.index("<h2>Sparsity per layer</h2>"):page.index("<h2>Candidates</h2>")]
    assert section.count("<svg") == 1 and "sparsity reached per layer" in section
    table = section[section.index('<table class="sparsify">'):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table)[1:]
    assert len(rows) == 2
    cells = [re.findall(r"<td>(.*?)</td>", r) for r in rows]
    by_target = {c[4]: c for c in cells}
    assert set(by_target) == {"2:4", "dense"}
    assert by_target["2:4"][5].endswith("<b>50.0%</b>") and by_target["2:4"][6] == "yes"
    assert "kept dense" in by_target["dense"][9]
    ops = section[section.index('<table class="sparse-ops">'):]
    ops_rows = re.findall(r"<tr>(.*?)</tr>", ops[:ops.index("</table>")])[1:]
    assert len(ops_rows) == 2
    measured = [r for r in ops_rows if "sparse_to_dense" in r]
    assert len(measured) == 1 and " ms" in measured[0]  # the 2:4 layer was timed
    assert any("min_sparsity" in r and "not measured" in r for r in ops_rows)


def test_section_absent_without_sparsity_and_reads_rolled_back_as_absent():
    """No sparsify/sparse-ops rows: nothing is added; a rolled-back pass's rows are not shown."""
    data = {"candidates": [{"name": "c", "report": [
        {"name": "prune-neurons", "status": "changed", "details": {}},
        {"name": "sparsify", "status": "rolled back",
         "details": {"layers": [{"layer": "fc", "target": "2:4", "sparsity": 0.5}]}}]}]}
    assert pass_layers(data, "sparsify") == [] and sparsity_section(data) == []
