"""graphopt.sweep: parsing, candidate plans, picking from a table, and one sweep on a tiny
CNN that writes its models, sweep.json and report.html (opened in headless Chromium when
one is installed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.errors import ConfigError
from graphopt.htmlreport import pareto, render_html
from graphopt.ir.inputs import generate_inputs
from graphopt.sweep import (
    Budget,
    parse_budgets,
    parse_pick,
    parse_quantize,
    pick_candidate,
    plan_candidates,
    run_sweep,
)
from graphopt.testing import make_model, tiny_cnn

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the HTML report's plots need matplotlib")


def _cnn():
    """x[batch, 3, 12, 12] -> Conv(16) -> Relu -> Conv(16) -> Relu -> GAP -> Flatten -> Gemm"""
    return tiny_cnn((16, 16), size=12, seed=3)


@pytest.fixture(scope="session")
def swept(tmp_path_factory):
    """One sweep (2 budgets x none/dynamic) on the tiny CNN, short timings."""
    folder = tmp_path_factory.mktemp("sweep")
    model = _cnn()
    path = folder / "cnn.onnx"
    graphopt.save(model, path)
    feeds = [generate_inputs(model, {"x": (4, 3, 12, 12)}, seed=i) for i in range(4)]
    result = run_sweep(path, feeds, folder / "out", budgets=parse_budgets("macs=1,0.5"),
                       quantize=["none", "dynamic"], pick=("cosine", 0.5), rounds=3,
                       min_time=0.0, warmup=1)
    return folder, result


# --------------------------------------------------------------------------- parsing


def test_parse_budgets_sorted_unique():
    assert parse_budgets("macs=0.5,1,0.8,0.5") == [Budget("macs", 1.0), Budget("macs", 0.8),
                                                   Budget("macs", 0.5)]


@pytest.mark.parametrize("text, fragment", [
    ("macs", "expected KIND=F1"), ("flops=0.5", "expected KIND=F1"),
    ("macs=1,x", "'x' is not a number"), ("macs=1.5", "not a fraction"),
    ("macs=0", "not a fraction"), ("macs=", "'' is not a number"),
])
def test_bad_budgets_name_the_problem(text, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_budgets(text)


def test_parse_pick_and_quantize():
    assert parse_pick("min_cosine=0.95") == ("cosine", 0.95)
    assert parse_pick("min-top1=0.8") == ("top1", 0.8)
    assert parse_quantize("none,dynamic,none") == ["none", "dynamic"]
    for bad in ("max_cosine=0.9", "min_cosine=2", "min_cosine=abc"):
        with pytest.raises(ConfigError, match="bad --pick"):
            parse_pick(bad)
    with pytest.raises(ConfigError, match="bad --quantize"):
        parse_quantize("none,int4")


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class _PruneConfig:
    macs: float = 1.0
    params: float = 1.0


class _Prune:
    Config = _PruneConfig


def test_plans_use_the_budgeted_prune_pass_when_registered():
    """With a 'prune' pass taking macs=, a budget is that one pass; unpad-tokens comes after
    it for a model with an attention mask; quantize is last; budget 1 is lossless."""
    model = make_model([helper.make_node("Identity", ["input_ids"], ["y"])],
                       [("input_ids", [1, 4], 7), ("attention_mask", [1, 4], 7)], ["y"])
    available = {n: object for n in ("cleanup", "fold-batchnorm", "fold-pad", "unpad-tokens")}
    available["prune"] = _Prune
    plans, notes = plan_candidates(model, parse_budgets("macs=1,0.6"), ["none", "dynamic"],
                                   available=available)
    assert [p.name for p in plans] == ["macs=1", "macs=1+dynamic", "macs=0.6",
                                       "macs=0.6+dynamic"]
    assert plans[3].specs == ["cleanup", "fold-batchnorm", "fold-pad", "prune:macs=0.6",
                              "unpad-tokens", "quantize:mode=dynamic"]
    assert plans[0].specs == ["cleanup", "fold-batchnorm", "fold-pad", "unpad-tokens"]
    assert len(notes) == 1 and "counted before 'unpad-tokens'" in notes[0]


def test_static_quantization_on_cpu_uses_uint8_activations():
    """On the cpu provider a static candidate quantizes activations to uint8 (the ones ORT's
    CPU kernels fuse), and says so; elsewhere it keeps the pass's defaults."""
    available = {n: object for n in ("cleanup", "fold-batchnorm", "fold-pad")}
    available["prune"] = _Prune
    cpu, notes = plan_candidates(_cnn(), [Budget("macs", 1.0)], ["static", "dynamic"],
                                 available=available)
    assert cpu[0].name == "macs=1+static"
    assert cpu[0].specs[-1] == "quantize:mode=static,activations=uint8"
    assert cpu[1].specs[-1] == "quantize:mode=dynamic"
    assert any("uint8 activations" in n for n in notes)
    from graphopt.core.config import parse_pass_spec

    assert parse_pass_spec(cpu[0].specs[-1])[1] == {"mode": "static", "activations": "uint8"}
    gpu, notes = plan_candidates(_cnn(), [Budget("macs", 1.0)], ["static"],
                                 available=available, provider="cuda")
    assert gpu[0].specs[-1] == "quantize:mode=static"
    assert not any("uint8" in n for n in notes)


def test_plans_fall_back_to_ratios_and_say_so():
    """Without the budgeted pass a MACs budget becomes uniform ratios (sqrt for convs), with
    a note; a params= budget is refused."""
    available = {n: object for n in ("cleanup", "fold-batchnorm", "fold-pad")}
    plans, notes = plan_candidates(_cnn(), [Budget("macs", 0.64)], ["none"],
                                   available=available)
    assert plans[0].specs[-1] == "prune-channels:ratio=0.2,importance=activation,scope=global"
    assert "uniform ratios" in notes[0]
    with pytest.raises(ConfigError, match="needs the budgeted 'prune' pass"):
        plan_candidates(_cnn(), [Budget("params", 0.5)], ["none"], available=available)


# --------------------------------------------------------------------------- picking


def _row(name, speedup, cosine, top1=None, error=None, macs=100):
    return {"name": name, "speedup": speedup, "macs": macs, "error": error,
            "fidelity": {"cosine": cosine, "top1": top1}}


TABLE = [_row("a", 1.0, 1.0, 1.0), _row("b", 2.1, 0.97, 0.9), _row("c", 3.0, 0.94, 0.95),
         _row("d", 4.0, 0.99, error="rolled back"), _row("e", 2.1, 0.98, 0.85)]


@pytest.mark.parametrize("metric, floor, expected", [
    ("cosine", 0.95, "e"),   # b and e tie on speed: the higher fidelity wins; d failed
    ("cosine", 0.93, "c"),
    ("cosine", 0.999, "a"),
    ("top1", 0.9, "c"),
    ("top1", 1.01, None),
])
def test_pick_fastest_meeting_the_floor(metric, floor, expected):
    assert pick_candidate(TABLE, metric, floor) == expected


def test_pick_ties_within_the_timing_noise():
    """A candidate within two combined standard errors of the fastest is as fast: the
    higher fidelity wins. Outside that, or without errors, the fastest wins."""
    def rows(err_fast, err_other):
        fast, other = _row("fast", 2.20, 0.955), _row("other", 2.10, 0.965)
        fast["speedup_error"], other["speedup_error"] = err_fast, err_other
        return [fast, other]

    assert pick_candidate(rows(0.03, 0.03), "cosine", 0.95) == "other"  # 4.8 % < 2·4.2 %
    assert pick_candidate(rows(0.01, 0.01), "cosine", 0.95) == "fast"   # 4.8 % > 2·1.4 %
    assert pick_candidate(rows(None, None), "cosine", 0.95) == "fast"
    assert pick_candidate(rows(0.03, 0.03), "cosine", 0.96) == "other"  # only one meets it


def test_pick_without_timings_uses_macs():
    rows = [_row("big", None, 0.99, macs=100), _row("small", None, 0.96, macs=40),
            _row("tiny", None, 0.90, macs=20)]
    assert pick_candidate(rows, "cosine", 0.95) == "small"


def test_pareto_front():
    pts = [(1.0, 1.0), (2.0, 0.97), (1.5, 0.96), (3.0, 0.9), (2.5, 0.95)]
    assert pareto(pts) == [0, 1, 4, 3]


# --------------------------------------------------------------------------- a sweep


def test_sweep_measures_every_candidate(swept):
    folder, result = swept
    names = [c.name for c in result.candidates]
    assert names == ["macs=1", "macs=1+dynamic", "macs=0.5", "macs=0.5+dynamic"]
    for c in result.candidates:
        assert c.error is None and c.speedup > 0 and c.latency_ms > 0
        assert c.speedup_error is not None and c.speedup_error >= 0  # 3 rounds: a spread
        assert Path(c.path).parent == folder / "out" / "candidates" and Path(c.path).exists()
    lossless, q = result.candidates[0], result.candidates[1]
    assert lossless.fidelity["cosine"] > 0.99999 and lossless.macs == result.original["macs"]
    assert "MatMulInteger" in {n.op_type for n in graphopt.load(q.path).graph.node}
    pruned = result.candidates[2]
    assert pruned.macs < 0.8 * result.original["macs"]
    widths = {r["name"]: r["kept"] for r in pruned.kept["layers"]}
    assert widths["conv1"] + widths["conv2"] < 32 and widths["fc"] == 10
    assert result.pick["chosen"] == pick_candidate(result.candidates, "cosine", 0.5)
    assert result.original["latency_ms"] > 0 and "held out" in result.validation


@needs_matplotlib
def test_sweep_json_and_html(swept, tmp_path):
    _, result = swept
    data = json.loads(json.dumps(result.to_dict(), default=str))
    page = render_html(data)
    assert page.count("<svg") >= 2  # the frontier and the kept units
    urls = set(re.findall(r"https?://[^\"' >]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    assert not re.search(r"<(link|script|img|iframe)\b", page)  # nothing to fetch
    for c in result.candidates:
        assert c.name in page
    assert "chosen: <b>" in page and "Skipped sites" in page
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    _open_in_browser(path, tmp_path)


def _browser():
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)


def _open_in_browser(path, tmp_path):
    """Headless Chromium renders the page: its DOM comes back with the plots, no error."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (apt-get install chromium)")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Latency vs fidelity" in done.stdout and "<svg" in done.stdout
    assert "Uncaught" not in done.stderr and "ERR_FILE_NOT_FOUND" not in done.stderr


def test_kept_units_of_a_removed_layer_are_zero():
    from graphopt.htmlreport import kept_units

    model = _cnn()
    smaller = make_model([helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1")],
                         {"x": ["batch", 3, 12, 12]}, ["c1"],
                         {"W1": np.zeros((4, 3, 3, 3), np.float32)})
    rows = {r["name"]: (r["original"], r["kept"]) for r in kept_units(model, smaller)["layers"]}
    assert rows == {"conv1": (16, 4), "conv2": (16, 0), "fc": (10, 0)}


def test_candidate_fields_round_trip(swept):
    _, result = swept
    c = result.candidates[0]
    assert set(c.to_dict()) == {f.name for f in dataclasses.fields(c)}


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="session")
def cli_inputs(tmp_path_factory):
    from graphopt.data.text import write_feeds

    folder = tmp_path_factory.mktemp("sweep-cli")
    model = _cnn()
    graphopt.save(model, folder / "cnn.onnx")
    write_feeds([generate_inputs(model, {"x": (4, 3, 12, 12)}, seed=i) for i in range(4)],
                folder / "calib")
    return folder


def _sweep_cli(folder, out, *extra):
    from graphopt.cli.commands import main

    return main(["sweep", str(folder / "cnn.onnx"), "--calibration", str(folder / "calib"),
                 "--out", str(out), "--rounds", "2", "--min-time", "0", *extra])


@needs_matplotlib
def test_cli_sweep_picks_and_writes(cli_inputs, capsys):
    """The table prints; sweep.json, report.html, the candidates and the picked model (the
    chosen candidate's bytes) are written."""
    out = cli_inputs / "out"
    code = _sweep_cli(cli_inputs, out, "--budget", "macs=1,0.5", "--quantize", "none",
                      "--pick", "min_cosine=0.5")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "macs=0.5" in captured.out and "pick min_cosine=0.5" in captured.out
    data = json.loads((out / "sweep.json").read_text())
    chosen = data["pick"]["chosen"]
    assert chosen == pick_candidate(data["candidates"], "cosine", 0.5)
    assert data["pick"]["output"] == str(out / "picked.onnx")
    path = next(c["path"] for c in data["candidates"] if c["name"] == chosen)
    assert graphopt.load(out / "picked.onnx").graph == graphopt.load(path).graph
    assert (out / "report.html").read_text().count("<svg") >= 2


@needs_matplotlib
def test_cli_sweep_floor_not_met(cli_inputs, capsys):
    """No candidate meets the floor: the table prints, one error line, exit 1, no pick."""
    out = cli_inputs / "unmet"
    code = _sweep_cli(cli_inputs, out, "--budget", "macs=0.5", "--quantize", "dynamic",
                      "--pick", "min_cosine=0.99999")
    captured = capsys.readouterr()
    assert code == 1
    assert "macs=0.5+dynamic" in captured.out
    errors = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: no candidate meets")
    assert (out / "sweep.json").exists() and not (out / "picked.onnx").exists()


@pytest.mark.parametrize("extra, fragment", [
    (("--budget", "macs=1,x"), "bad --budget"),
    (("--quantize", "int4"), "bad --quantize"),
    (("--pick", "min_cosine"), "bad --pick"),
    (("--provider", "cuda"), "provider 'cuda'"),  # as far as the session: no GPU here
    (("--provider", "tensorrt"), "provider 'tensorrt'"),
])
def test_cli_sweep_bad_input_one_line_nothing_written(cli_inputs, capsys, extra, fragment):
    out = cli_inputs / "bad"
    code = _sweep_cli(cli_inputs, out, *extra)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and fragment in err[0] and err[0].startswith("error:")
    assert not out.exists()


@needs_matplotlib
def test_cli_optimize_html_report(cli_inputs, tmp_path, capsys):
    """optimize --report x.html writes the page for one run; .json keeps writing JSON."""
    from graphopt.cli.commands import main

    src = cli_inputs / "cnn.onnx"
    html_path, json_path = tmp_path / "run.html", tmp_path / "run.json"
    for report in (html_path, json_path):
        code = main(["optimize", str(src), "-o", str(tmp_path / "small.onnx"), "--pass",
                     "prune-channels:ratio=0.5", "--validate", "--report", str(report)])
        assert code == 1  # lossy: outside the default tolerance, as documented
    capsys.readouterr()
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2
    assert "prune-channels:ratio=0.5" in page
    assert json.loads(json_path.read_text())["passes"][0]["name"] == "prune-channels"


def test_top1_only_for_classifier_like_outputs():
    """Logits (MatMul + bias) and probabilities get top-1; a LayerNorm hidden state and a
    Tanh pooler (MiniLM's two outputs) do not, and the table then shows no top-1 column but
    the Spearman column when a benchmark added it."""
    from graphopt.htmlreport import fidelity_columns
    from graphopt.sweep import classifier_outputs

    w = np.ones((8, 4), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"]),
             helper.make_node("Softmax", ["mm"], ["probs"]),
             helper.make_node("LayerNormalization", ["x", "g", "b8"], ["hidden"]),
             helper.make_node("Gemm", ["x", "w"], ["pre"]),
             helper.make_node("Tanh", ["pre"], ["pooled"])]
    model = make_model(nodes, {"x": [2, 8]}, ["logits", "probs", "hidden", "pooled"],
                       {"w": w, "b": np.zeros(4, np.float32), "g": np.ones(8, np.float32),
                        "b8": np.zeros(8, np.float32)})
    assert classifier_outputs(model) == {"logits", "probs"}
    rows = {"candidates": [{"fidelity": {"cosine": 0.99, "top1": None, "spearman": 0.98}}]}
    assert fidelity_columns(rows) == [("spearman", "Spearman")]
    rows["candidates"].append({"fidelity": {"cosine": 0.9, "top1": 0.8}})
    assert [k for k, _ in fidelity_columns(rows)] == ["top1", "spearman"]
