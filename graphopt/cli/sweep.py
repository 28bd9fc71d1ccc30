"""``graphopt sweep``: the prune × quantize frontier of one model, and a pick from it.

Everything the user gives is checked before anything is written (budgets, modes, floor,
model, feeds, provider); then candidates are built and measured with progress bars, and
``OUT/sweep.json``, ``OUT/report.html`` and ``OUT/candidates/*.onnx`` are written. With
``--pick`` the fastest candidate meeting the floor is written to ``-o`` (default
``OUT/picked.onnx``); when none meets it, the table still prints and the exit code is 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from graphopt.errors import GraphoptError

from .common import _console, _json_default, _shapes, _write_text_atomic, input_shape_option

EXIT_NO_PICK = 1


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calibration", required=True, type=click.Path(path_type=Path),
              help="Calibration inputs: an .npz file or a folder of them.")
@click.option("--validation", type=click.Path(path_type=Path),
              help="Held-out inputs for fidelity (default: the last quarter of the "
                   "calibration batches, kept out of calibration).")
@click.option("--budget", "budget_text", default="macs=1,0.8,0.6,0.5", show_default=True,
              help="KIND=F1,F2,...: fractions of the original's cost to keep (macs, params, "
                   "latency); 1 is the lossless candidate.")
@click.option("--quantize", "quantize_text", default="none,dynamic", show_default=True,
              help="Quantization modes to cross with the budgets: none, dynamic, static, fp16.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
              show_default=True, help="Where latency and fidelity are measured.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False,
                                                                 path_type=Path),
              help="Folder for sweep.json, report.html and the candidate models.")
@click.option("--pick", "pick_text", default=None, metavar="min_cosine=F|min_top1=F",
              help="Write the fastest candidate meeting this fidelity floor.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where --pick writes its model (default OUT/picked.onnx).")
@input_shape_option
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Intra-op threads for timing (default: onnxruntime's choice).")
@click.option("--bench-batches", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Validation batches each candidate is timed on.")
@click.option("--rounds", type=click.IntRange(1, 100000), default=10, show_default=True)
@click.option("--min-time", type=click.FloatRange(0, 3600), default=1.0, show_default=True,
              help="Minimum seconds of timed runs per model and batch.")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json instead of a table.")
def sweep(model: Path, calibration: Path, validation: Path | None, budget_text: str,
          quantize_text: str, provider: str, out_dir: Path, pick_text: str | None,
          output: Path | None, input_shapes: tuple[str, ...], threads: int | None,
          bench_batches: int, rounds: int, min_time: float, as_json: bool) -> None:
    """Build prune x quantize candidates of MODEL, measure them, and pick one."""
    from graphopt.htmlreport import render_html
    from graphopt.ir.inputs import load_inputs
    from graphopt.ir.model import load, save
    from graphopt.sweep import parse_budgets, parse_pick, parse_quantize, run_sweep

    budgets = parse_budgets(budget_text)
    modes = parse_quantize(quantize_text)
    pick = parse_pick(pick_text) if pick_text else None
    if out_dir.exists() and not out_dir.is_dir():
        raise GraphoptError(f"--out {out_dir} is a file; give a folder")
    original = load(model, load_external=False)
    calib = load_inputs(calibration, original)
    val = load_inputs(validation, original) if validation else None
    picked_path = output or out_dir / "picked.onnx"
    if pick and model.exists() and picked_path.exists() and \
            picked_path.resolve() == model.resolve():
        raise GraphoptError(f"refusing to overwrite the input model {model}; choose another -o")
    console = _console(stderr=True)
    result = _run(console, run_sweep, model, calib, out_dir, validation=val, budgets=budgets,
                  quantize=modes, provider=provider, threads=threads, pick=pick,
                  input_shapes=_shapes(input_shapes) or None, bench_batches=bench_batches,
                  rounds=rounds, min_time=min_time)
    chosen = result.chosen
    if chosen is not None:
        save(load(chosen.path), picked_path, protect=(model,))
        result.pick["output"] = str(picked_path)
    data = result.to_dict()
    _write_text_atomic(out_dir / "sweep.json", json.dumps(data, indent=2, default=_json_default))
    _write_text_atomic(out_dir / "report.html", render_html(data))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=_json_default))
    else:
        render_sweep(_console(), data)
        click.echo(f"wrote {out_dir / 'sweep.json'}, {out_dir / 'report.html'}"
                   + (f", {picked_path}" if chosen is not None else ""))
    if pick and chosen is None:
        best = max((c for c in result.candidates if not c.error
                    and c.fidelity.get(pick[0]) is not None),
                   key=lambda c: c.fidelity[pick[0]], default=None)
        hint = (f" (best: {best.name} at {best.fidelity[pick[0]]:.4f})" if best else "")
        click.echo(f"error: no candidate meets {result.pick['floor']}{hint}; nothing picked",
                   err=True)
        sys.exit(EXIT_NO_PICK)


def _run(console, run_sweep, *args, **kwargs):
    """run_sweep with a rich progress bar over the candidates' build/validate/time steps,
    shown from the first step on: errors in the checks before it stay one line."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TimeElapsedColumn())
    bar = Progress(*columns, console=console, transient=True)
    task = None

    def progress(message: str, done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(message, total=total)
        bar.update(task, description=message, completed=done, total=total)

    try:
        return run_sweep(*args, progress=progress, **kwargs)
    finally:
        if task is not None:
            bar.stop()


def _short(specs: list[str]) -> str:
    """The passes that make a candidate differ: pruning, unpadding, quantization."""
    from graphopt.sweep import LOSSLESS, LOSSLESS_LAST

    kept = [s for s in specs if s.split(":")[0] not in LOSSLESS + LOSSLESS_LAST]
    return " + ".join(kept) or "lossless passes"


def render_sweep(console, data: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from graphopt.core.report import si_number
    from graphopt.htmlreport import fidelity_columns, speedup_cell

    from .render import _bytes

    original = data["original"]
    chosen = (data.get("pick") or {}).get("chosen")
    extra = fidelity_columns(data)
    table = Table("candidate", "passes", "params", "MACs", "size", "latency ms", "speedup",
                  "cosine", *[h for _, h in extra],
                  title=f"sweep of {data['model']} on {data['provider']}", title_justify="left")
    table.add_row("original", "-", si_number(original.get("params")),
                  si_number(original.get("macs")),
                  _bytes(original.get("size_bytes")), _fmt(original.get("latency_ms"), 2),
                  "1.00x", "1.0000", *["1.0000" if k == "spearman" else "-" for k, _ in extra])
    for c in data["candidates"]:
        name = escape(c["name"]) + (" [bold red]*[/]" if c["name"] == chosen else "")
        if c.get("error"):
            table.add_row(name, escape(_short(c["passes"])), "", "", "", "", "",
                          f"[red]{escape(c['error'][:120])}[/]", *[""] * len(extra))
            continue
        fid = c.get("fidelity") or {}
        frac = (f" ({c['macs'] / original['macs']:.2f})" if c.get("macs") and
                original.get("macs") else "")
        table.add_row(name, escape(_short(c["passes"])), si_number(c.get("params")),
                      si_number(c.get("macs")) + frac, _bytes(c.get("size_bytes")),
                      _fmt(c.get("latency_ms"), 2),
                      speedup_cell(c),
                      _fmt(fid.get("cosine"), 4),
                      *[_fmt(fid.get(k), 3 if k == "top1" else 4) for k, _ in extra])
    console.print(table)
    for note in data.get("notes", []):
        console.print(f"note: {escape(note)}")
    console.print(f"fidelity on {escape(data['validation'])}; latency {escape(data['latency'])}"
                  f"; machine: {data.get('machine', {}).get('cpus')} CPUs, load average "
                  f"{data.get('machine', {}).get('load_average')} (shared: compare ratios)")
    pick = data.get("pick") or {}
    if pick.get("floor"):
        console.print(f"pick {pick['floor']}: "
                      + (f"[bold]{escape(chosen)}[/]" if chosen else "[red]none meets it[/]"))


def _fmt(x, digits: int) -> str:
    return "-" if x is None else f"{float(x):.{digits}f}"
