"""Human-readable tables (rich) for the CLI. Library code returns data; only this renders."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphopt.core.report import macs_after, si_number


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _shape(dims: list[Any]) -> str:
    return escape("[" + ", ".join(str(d) for d in dims) + "]")


def render_inspect(console: Console, info: dict[str, Any]) -> None:
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    cost = info["cost"]
    console.print(f"[bold]{info.get('path') or 'model'}[/]  IR {info['ir_version']}  opsets: "
                  f"{opsets}  producer: {info['producer'] or '-'}")
    assumed = ", ".join(f"{name}[{axis}]={value}"
                        for name, dims in cost.get("assumed_dims", {}).items()
                        for axis, value in dims.items())
    macs = si_number(cost["macs"]) + (f" (at {assumed})" if assumed else "")
    console.print(f"params {si_number(cost['params'])}  MACs {macs}  weights "
                  f"{_bytes(info['weight_bytes'])}  file {_bytes(info.get('file_bytes'))}  "
                  f"nodes {info['nodes']}  subgraphs {info['subgraphs']}")
    formula = cost.get("macs_formula") or {}
    if formula.get("text"):
        names = "; ".join(f"{v} = {', '.join(axes)}" for v, axes in formula["variables"].items())
        console.print(f"[yellow]MACs = {escape(formula['text'])}  ({escape(names)}; fitted and "
                      "checked at batch 1-4, other dims 32-128); give "
                      "--input-shape for the sizes you run[/]")
    elif assumed:
        why = f" ({escape(formula['reason'])})" if formula.get("reason") else ""
        console.print(f"[yellow]MACs assume dynamic input dims {assumed}; they scale with "
                      f"those dims{why}: give --input-shape for the sizes you run[/]")
    io = Table("", "name", "dtype", "shape", title="inputs and outputs", title_justify="left")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io.add_row(kind[:-1], v["name"], v["dtype"], _shape(v["shape"]))
    console.print(io)
    ops = Table("op", "count", "params", "MACs", title="op histogram", title_justify="left")
    for op, count in info["op_histogram"].items():
        bare = op.split("::")[-1]
        ops.add_row(op, str(count), si_number(cost["params_by_op"].get(bare)),
                    si_number(cost["macs_by_op"].get(bare)))
    console.print(ops)
    if cost.get("unknown_shapes"):
        console.print(f"[yellow]MACs not counted (shapes unknown) for: "
                      f"{', '.join(cost['unknown_shapes'][:10])}[/] (try --input-shape)")
    if "groups" in info:
        render_groups(console, info["groups"])


def render_groups(console: Console, groups: list[dict[str, Any]]) -> None:
    table = Table("group", "source", "unit", "units", "members", "prunable",
                  title="coupled groups", title_justify="left")
    for g in groups:
        members = g.get("members", [])
        shown = ", ".join(str(m) for m in members[:4]) + (
            f" (+{len(members) - 4})" if len(members) > 4 else "")
        verdict = "yes" if g.get("prunable") else f"no: {g.get('reason')}"
        unit = str(g.get("unit", "-"))
        if g.get("unit") == "head":
            unit += f" (dim {g.get('head_dim')}" + (
                f", {g.get('heads_per_unit')} q heads per kv)" if g.get("heads_per_unit", 1) > 1
                else ")")
        table.add_row(str(g.get("id")), str(g.get("source")), unit, str(g.get("size")), shown,
                      escape(verdict))
    console.print(table)
    ok = sum(1 for g in groups if g.get("prunable"))
    console.print(f"{ok} of {len(groups)} groups prunable")


def render_report(console: Console, report: Any) -> None:
    table = Table("pass", "result", "counters", "params", "MACs", "skipped", "time",
                  title="passes", title_justify="left")
    for p in report.passes:
        status = {"changed": "[green]changed[/]", "unchanged": "unchanged",
                  "rolled back": "[red]rolled back[/]",
                  "unverified": "[bold red]unverified[/]"}.get(p.status, p.status)
        counters = ", ".join(f"{k}={v}" for k, v in p.counters.items() if v) or "-"
        table.add_row(p.name, status, counters,
                      f"{si_number(p.params_before)} → {si_number(p.params_after)}",
                      f"{si_number(p.macs_before)} → "
                      f"{macs_after(p.macs_after, p.macs_uncounted)}",
                      str(len(p.skipped)) if p.skipped else "-", f"{p.seconds:.2f}s")
    console.print(table)
    for p in report.passes:
        if p.error:
            console.print(f"[red]{escape(p.error)}[/]")
        if p.unverified:
            console.print(f"[bold red]{p.name} not verified:[/] {escape(p.unverified)}")
        for s in p.skipped[:20]:
            console.print(f"  [dim]{p.name} skipped[/] {escape(s.site)}: {escape(s.reason)}")
        if len(p.skipped) > 20:
            console.print(f"  [dim]... {len(p.skipped) - 20} more skips in the JSON report[/]")
        _render_details(console, p.name, p.details)
        if p.details.get("layers"):
            render_layers(console, p.name, p.details["layers"])
    before = report.metadata.get("cost_before")
    after = report.metadata.get("cost_after")
    if before and after:
        uncounted = len(after.get("unknown_shapes", [])) - len(before.get("unknown_shapes", []))
        macs = (f"{si_number(after['macs'])} ({_ratio(after['macs'], before['macs'])})"
                if uncounted <= 0 else
                f"not counted ({uncounted} MatMul/Conv/attention ops have shapes that depend "
                f"on the data, e.g. the packed token count after unpad-tokens: time it with "
                f"graphopt bench)")
        console.print(
            f"params {si_number(before['params'])} → {si_number(after['params'])} "
            f"({_ratio(after['params'], before['params'])}), MACs {si_number(before['macs'])} → "
            f"{macs}, weights "
            f"{_bytes(before['weight_bytes'])} → {_bytes(after['weight_bytes'])}")
    _render_fidelity(console, report.metadata.get("fidelity"))
    if report.validation is not None:
        render_validation(console, report.validation)


def _render_fidelity(console: Console, fidelity: dict[str, Any] | None) -> None:
    if not fidelity:
        return
    if not fidelity.get("measured"):
        console.print(f"[yellow]fidelity not measured:[/] {escape(fidelity.get('reason', ''))}")
        return
    parts = []
    for o in fidelity["outputs"]:
        text = f"{o['name']}: cosine {_g(o.get('cosine'), 4)}"
        if o.get("top1_agreement") is not None:
            text += f", top-1 agreement {o['top1_agreement']:.1%}"
        parts.append(text)
    latency = fidelity.get("latency_ratio")
    tail = f"; latency ratio {latency:.3f}×" if latency is not None else ""
    console.print(f"fidelity on {escape(fidelity['data'])}: {escape('; '.join(parts))}{tail}")
    if latency is not None and latency > 1:
        console.print(f"  [yellow]the result ran slower than the original here ({latency:.3f}× "
                      "its latency, one held-out input, A/B interleaved): see the passes' "
                      "notes[/]")
    if fidelity.get("final"):
        console.print(f"  [yellow]{escape(fidelity['final'])}[/]")


def _render_details(console: Console, name: str, details: dict[str, Any]) -> None:
    for note in details.get("notes", []):
        console.print(f"  [yellow]{escape(name)}:[/] {escape(note)}")
    fits = details.get("reconstruction") or []
    if fits:
        table = Table("site", "op", "rows", "error before", "error after",
                      title=f"{name}: per-layer relative output error, refit "
                            f"({details.get('reconstruct', '')})", title_justify="left")
        for f in fits[:40]:
            table.add_row(escape(str(f["site"])), f["op"], str(f["rows"]),
                          f"{f['error_before']:.4g}", f"{f['error_after']:.4g}")
        console.print(table)
        if len(fits) > 40:
            console.print(f"  [dim]... {len(fits) - 40} more sites in the JSON report[/]")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return escape("[" + ", ".join(str(x) for x in v) + "]")
    return escape(str(v))


def render_layers(console: Console, pass_name: str, rows: list[dict[str, Any]]) -> None:
    """A pass's per-layer report (``details["layers"]``): one row per layer, the scalar
    fields as columns."""
    columns = [k for k, v in rows[0].items() if not isinstance(v, (dict,)) and
               not (isinstance(v, list) and v and isinstance(v[0], dict))]
    table = Table(*columns, title=f"{pass_name}: per layer", title_justify="left")
    for row in rows:
        table.add_row(*(_cell(row.get(k)) for k in columns))
    console.print(table)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}×" if b else "-"


def render_validation(console: Console, result: Any) -> None:
    data = result.to_dict()
    table = Table("output", "shape", "max abs", "max rel", "mean abs", "cosine", "top-1",
                  "tolerance", "ok", title="validation", title_justify="left")
    for row in data["outputs"]:
        top1 = row.get("top1_agreement")
        table.add_row(
            row["name"], _shape(row.get("shape") or []), _g(row.get("max_abs")),
            _g(row.get("max_rel")), _g(row.get("mean_abs")), _g(row.get("cosine"), 6),
            "-" if top1 is None else f"{top1:.1%}",
            f"atol {row.get('atol'):g}, rtol {row.get('rtol'):g}",
            "[green]yes[/]" if row["ok"] else f"[red]no[/] {row.get('message') or ''}")
    console.print(table)
    if data.get("mask"):
        console.print(f"per-token outputs compared on the real tokens of '{data['mask']}'")
    console.print("[green]within tolerance[/]" if data["ok"] else "[red]outside tolerance[/]")


def _g(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def render_benchmark(console: Console, result: Any, native: Any, a_name: str,
                     b_name: str | None) -> None:
    data = result.to_dict()
    table = Table("model", "provider", "median ms", "p90 ms", "mean ms", "min ms", "runs",
                  title="latency", title_justify="left")
    for key, name in (("a", a_name), ("b", b_name)):
        stats = data.get(key)
        if not stats:
            continue
        table.add_row(name, data.get("provider", "-"), f"{stats['median_ms']:.3f}",
                      f"{stats['p90_ms']:.3f}", f"{stats['mean_ms']:.3f}",
                      f"{stats['min_ms']:.3f}", str(stats["runs"]))
    console.print(table)
    if data.get("ratio") is not None:
        console.print(f"latency ratio {a_name} / {b_name}: [bold]{data['ratio']:.3f}×[/] "
                      f"(below 1 means {a_name} is faster)")
    if native is not None:
        info = native.to_dict() if hasattr(native, "to_dict") else native
        if info.get("skipped"):
            console.print(f"[yellow]native TensorRT skipped:[/] {escape(info['skipped'])}")
        else:
            console.print(f"native TensorRT median {info['a']['median_ms']:.3f} ms"
                          + (f", ratio {info['ratio']:.3f}×" if info.get("ratio") else ""))
