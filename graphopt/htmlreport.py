"""One self-contained HTML page for a sweep or a single optimize run.

``render_html(data)`` turns the sweep's dict (``graphopt.sweep.SweepResult.to_dict()``,
or ``page_for_run`` of one ``optimize`` run) into a page that needs nothing else: plots are
matplotlib SVG written inline, styles are inline, nothing is fetched. It shows:

1. the latency (or, without timings, MACs) vs fidelity frontier with every candidate, the
   original at (1×, 1.0) and the chosen candidate marked; the Pareto-optimal points joined;
2. per-layer kept units of every distinct float model (one bar series per budget; the
   quantized twins share their budget's widths): the output width of every Conv (channels)
   and MatMul/Gemm with a weight (neurons) against the original's; attention heads per
   layer from the models' ``graphopt.heads`` metadata, kept layers from ``graphopt.layers``;
3. a table of candidates (passes and their options, params, MACs, latency, fidelity), one
   table of every candidate's passes (status, params/MACs before and after, counters);
4. every skipped site with its pass and reason;
5. per-layer sparsity and sparse-ops' kernel choices, where a candidate ran those passes
   (``graphopt.htmlsparsity``).

``kept_units(original, candidate)`` computes (2) from two models.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from graphopt.core.report import macs_after, si_number

from .htmlparts import escape as _e
from .htmlparts import pyplot as _pyplot
from .htmlparts import svg_of as _svg
from .htmlparts import table as _table
from .htmlsparsity import sparsity_section

logger = logging.getLogger(__name__)

_KIND_COLOURS = {"channels": "#4878a8", "neurons": "#e07b39", "heads": "#5a9e5a"}


# --------------------------------------------------------------------------- kept units


def layer_widths(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Output width of every Conv/ConvTranspose (channels) and MatMul/Gemm with a constant
    weight (neurons), keyed by node name (else the weight's name)."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out: dict[str, tuple[str, int]] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = inits[node.input[1]]
        key = node.name or node.input[1]
        if node.op_type == "Conv" and len(dims) >= 3:
            out[key] = ("channels", int(dims[0]))
        elif node.op_type == "ConvTranspose" and len(dims) >= 3:
            group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
            out[key] = ("channels", int(dims[1]) * group)
        elif node.op_type == "MatMul" and len(dims) == 2:
            out[key] = ("neurons", int(dims[1]))
        elif node.op_type == "Gemm" and len(dims) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out[key] = ("neurons", int(dims[0] if trans_b else dims[1]))
    return out


def _metadata(model: onnx.ModelProto, key: str) -> list[int] | None:
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                value = json.loads(prop.value)
            except ValueError:
                return None
            return [int(v) for v in value] if isinstance(value, list) else None
    return None


def kept_units(original: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, Any]:
    """Per-layer widths of ``candidate`` against ``original`` (module doc, 2): ``layers``
    rows ``{name, kind, original, kept}`` in the original's order (kept 0 where the
    candidate lost the node), ``heads``/``kv_heads``/``kept_layers`` from metadata."""
    before = layer_widths(original)
    after = layer_widths(candidate)
    rows = [{"name": name, "kind": kind, "original": width,
             "kept": after.get(name, (kind, 0))[1]} for name, (kind, width) in before.items()]
    return {"layers": rows, "heads": _metadata(candidate, "graphopt.heads"),
            "original_heads": _metadata(original, "graphopt.heads"),
            "kv_heads": _metadata(candidate, "graphopt.kv_heads"),
            "kept_layers": _metadata(candidate, "graphopt.layers")}


# --------------------------------------------------------------------------- plots


def _x_of(c: Mapping[str, Any], original: Mapping[str, Any], timed: bool) -> float | None:
    if timed:
        return c.get("speedup")
    if c.get("macs") and original.get("macs"):
        return original["macs"] / c["macs"]
    return None


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both x and y (higher is better),
    ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def frontier_svg(data: Mapping[str, Any]) -> str | None:
    candidates = [c for c in data.get("candidates", []) if not c.get("error")]
    original = data.get("original", {})
    metric = data.get("metric", "cosine")
    timed = any(c.get("speedup") for c in candidates)
    pts, labels, chosen = [], [], None
    for c in candidates:
        x, y = _x_of(c, original, timed), (c.get("fidelity") or {}).get(metric)
        if x is None or y is None:
            continue
        if c["name"] == (data.get("pick") or {}).get("chosen"):
            chosen = len(pts)
        pts.append((float(x), float(y)))
        labels.append(c["name"])
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    xs, ys = zip(*pts)
    ax.scatter(xs, ys, s=36, color="#4878a8", zorder=3, label="candidates")
    front = pareto(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="#4878a8",
            alpha=0.5, lw=1.2, zorder=2, label="frontier")
    ax.scatter([1.0], [1.0], marker="D", s=50, color="#333333", zorder=4, label="original")
    for (x, y), text in zip(pts, labels):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7.5)
    if chosen is not None:
        ax.scatter([pts[chosen][0]], [pts[chosen][1]], marker="*", s=260, color="#d62728",
                   zorder=5, label=f"chosen: {labels[chosen]}")
    floor = (data.get("pick") or {}).get("value")
    if floor is not None:
        ax.axhline(float(floor), color="#d62728", ls="--", lw=0.8, alpha=0.7,
                   label=f"floor {(data.get('pick') or {}).get('floor')}")
    ax.set_xlabel("speedup vs the original (median latency, A/B interleaved)" if timed
                  else "MACs reduction vs the original (no timings)")
    ax.set_ylabel({"cosine": "output cosine vs the original",
                   "top1": "top-1 agreement with the original"}.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig)


def kept_svg(series: Sequence[tuple[str, Mapping[str, Any]]]) -> str | None:
    """Grouped bars: for every layer, the fraction of its output width each candidate's
    float model keeps (``series`` of ``(label, kept_units(...))``), and heads per layer."""
    series = [(label, kept) for label, kept in series if kept.get("layers")]
    if not series:
        return None
    rows = [r for r in series[0][1]["layers"] if r["original"] > 0]
    with_heads = [(k, label, kept["heads"]) for k, (label, kept) in enumerate(series)
                  if kept.get("heads")]
    plt = _pyplot()
    panels = 1 + (1 if with_heads else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(max(8.0, 0.22 * len(rows) * len(series)
                                                     ** 0.5), 3.0 * panels), squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / len(series)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, kept) in enumerate(series):
        by_name = {r["name"]: r for r in kept["layers"]}
        frac = [by_name.get(r["name"], {"kept": 0})["kept"] / r["original"] for r in rows]
        ax.bar(np.arange(len(rows)) + (k - (len(series) - 1) / 2) * width, frac, width,
               label=label, color=colours[k % len(colours)])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("kept / original width")
    ax.set_title("output width kept per layer: conv channels (Conv), neurons (MatMul/Gemm "
                 "with a weight); 0 = layer removed", fontsize=8.5)
    ax.set_xticks(range(len(rows)))
    kinds = {"channels": "ch", "neurons": "n"}
    ax.set_xticklabels([f"{r['name'][-30:]} ({kinds.get(r['kind'], r['kind'])} "
                        f"{r['original']})" for r in rows], rotation=80, ha="right",
                       fontsize=5.5 if len(rows) > 30 else 7)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if with_heads:
        ax = axes[1, 0]
        n = max(len(h) for _, _, h in with_heads)
        width = 0.8 / len(with_heads)
        for j, (k, label, heads) in enumerate(with_heads):
            ax.bar(np.arange(len(heads)) + (j - (len(with_heads) - 1) / 2) * width, heads,
                   width, label=label, color=colours[k % len(colours)])
        ax.set_xticks(range(n))
        ax.set_xlabel("attention layer")
        ax.set_ylabel("heads kept")
        ax.set_title("attention heads per layer (graphopt.heads metadata)", fontsize=8.5)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _svg(fig)


# --------------------------------------------------------------------------- page


def _num(n: Any, digits: int = 2) -> str:
    return si_number(n, digits, missing="–", fractions=True)


def _f(x: Any, digits: int = 4) -> str:
    return "–" if x is None else f"{float(x):.{digits}f}"


def speedup_cell(c: Mapping[str, Any], times: str = "x", none: str = "-") -> str:
    """``2.31x ±3%``: a candidate's speedup and its relative standard error (sweep doc 4)."""
    if not c.get("speedup"):
        return none
    error = c.get("speedup_error")
    return f"{c['speedup']:.2f}{times}" + (f" ±{error:.1%}" if error is not None else "")


def fidelity_columns(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The fidelity columns beyond cosine that some candidate has: top-1 (classifier-like
    outputs only, ``graphopt.sweep.classifier_outputs``) and the similarity-rank Spearman
    of sentence embeddings (benchmarks add it), as (key, header)."""
    fids = [c.get("fidelity") or {} for c in data.get("candidates", [])]
    return [(k, h) for k, h in (("top1", "top-1"), ("spearman", "Spearman"))
            if any(f.get(k) is not None for f in fids)]


def _candidate_rows(data: Mapping[str, Any]) -> list[list[str]]:
    original = data.get("original", {})
    chosen = (data.get("pick") or {}).get("chosen")
    extra = fidelity_columns(data)
    rows = [["<b>original</b>", "–", _num(original.get("params")), _num(original.get("macs")),
             _f(original.get("latency_ms"), 2), "1.00×", "1.0000"]
            + ["1.0000" if k == "spearman" else "–" for k, _ in extra] + ["–"]]
    for c in data.get("candidates", []):
        fid = c.get("fidelity") or {}
        name = _e(c["name"]) + (" ★" if c["name"] == chosen else "")
        passes = "<br>".join(_e(p) for p in c.get("passes", []))
        if c.get("error"):
            rows.append([name, passes] + ["–"] * (5 + len(extra))
                        + [f'<span class="err">{_e(c["error"])}</span>'])
            continue
        macs = c.get("macs")
        frac = f" ({macs / original['macs']:.2f})" if macs and original.get("macs") else ""
        rows.append([name, passes, _num(c.get("params")), _num(macs) + frac,
                     _f(c.get("latency_ms"), 2),
                     speedup_cell(c, "×", "–"),
                     _f(fid.get("cosine"))]
                    + [_f(fid.get(k), 3 if k == "top1" else 4) for k, _ in extra]
                    + [_e(", ".join(fid.get("notes", [])))])
    return rows


def _pass_rows(data: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for c in data.get("candidates", []):
        for p in c.get("report", []):
            options = ", ".join(f"{k}={v}" for k, v in (p.get("config") or {}).items()
                                if v not in (None, (), [], ""))
            counters = ", ".join(f"{k}={v}" for k, v in (p.get("counters") or {}).items())
            status = _e(p.get("status", ""))
            if p.get("error"):
                status += f'<br><span class="err">{_e(p["error"])}</span>'
            rows.append([_e(c["name"]), _e(p["name"]), _e(options), status,
                         f"{_num(p.get('params_before'))} → {_num(p.get('params_after'))}",
                         f"{_num(p.get('macs_before'))} → "
                         f"{_e(macs_after(p.get('macs_after'), p.get('macs_uncounted'), '–'))}",
                         f"{float(p.get('seconds') or 0):.2f}", _e(counters)])
    return rows


def _skip_rows(data: Mapping[str, Any]) -> list[list[str]]:
    seen, rows = set(), []
    for c in data.get("candidates", []):
        for p in c.get("report", []):
            for s in p.get("skipped", []):
                key = (p["name"], s.get("site"), s.get("reason"))
                if key in seen:
                    continue
                seen.add(key)
                rows.append([_e(p["name"]), _e(s.get("site")), _e(s.get("reason")),
                             _e(c["name"])])
    return rows


def _kept_series(data: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """One entry per distinct float model (budget): quantized twins share its widths."""
    seen, out = set(), []
    for c in data.get("candidates", []):
        kept = c.get("kept")
        if not kept or c.get("error"):
            continue
        key = json.dumps(kept, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        out.append((c.get("budget") or c["name"], kept))
    return out[:6]


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
.meta{color:#555;font-size:12px}.err{color:#b00020}.plot svg{max-width:100%;height:auto}
"""


def render_html(data: Mapping[str, Any]) -> str:
    """The page (module doc) for a sweep dict or ``page_for_run``'s dict."""
    title = data.get("title") or "graphopt report"
    meta = [f"model: {_e(data.get('model', '?'))}"]
    for key, label in (("provider", "provider"), ("threads", "threads"),
                       ("validation", "fidelity measured on"), ("latency", "latency")):
        if data.get(key) is not None:
            meta.append(f"{label}: {_e(data[key])}")
    parts = [f"<h1>{_e(title)}</h1>", f'<p class="meta">{" · ".join(meta)}</p>']
    pick = data.get("pick") or {}
    if pick.get("floor"):
        verdict = (f"chosen: <b>{_e(pick['chosen'])}</b>, written to {_e(pick.get('output'))}"
                   if pick.get("chosen") else '<span class="err">no candidate meets it</span>')
        parts.append(f"<p>floor <b>{_e(pick['floor'])}</b>: {verdict}</p>")
    for note in data.get("notes", []):
        parts.append(f'<p class="meta">{_e(note)}</p>')
    svg = frontier_svg(data)
    parts.append("<h2>Latency vs fidelity</h2>")
    parts.append(f'<div class="plot">{svg}</div>' if svg else
                 "<p>No candidate has both a fidelity and a latency or MACs figure.</p>")
    series = _kept_series(data)
    if series:
        svg = kept_svg(series)
        parts.append("<h2>Kept units per layer</h2>")
        if svg:
            parts.append(f'<div class="plot">{svg}</div>')
        for label, kept in series:
            if kept.get("kept_layers") is not None:
                parts.append(f"<p>{_e(label)}: kept layers (graphopt.layers) "
                             f"{_e(kept['kept_layers'])}</p>")
    parts += sparsity_section(data)
    parts.append("<h2>Candidates</h2>")
    parts.append(_table(["candidate", "passes", "params", "MACs (fraction)", "latency ms",
                         "speedup", "cosine"] + [h for _, h in fidelity_columns(data)]
                        + ["notes"], _candidate_rows(data)))
    parts.append("<h2>Passes</h2>")
    parts.append(_table(["candidate", "pass", "options", "status", "params", "MACs",
                         "seconds", "counters"], _pass_rows(data)))
    skips = _skip_rows(data)
    parts.append(f"<h2>Skipped sites ({len(skips)})</h2>")
    parts.append(_table(["pass", "site", "reason", "first seen in"], skips) if skips
                 else "<p>None.</p>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")


def page_for_run(report: Any, original: onnx.ModelProto, optimized: onnx.ModelProto,
                 *, model: str = "", name: str = "optimized") -> dict[str, Any]:
    """The page's dict for one ``optimize`` run (``graphopt.pass_manager.Report``): one
    candidate, its fidelity from ``report.validation`` when it was validated."""
    data = report.to_dict()
    before, after = data.get("cost_before", {}), data.get("cost_after", {})
    fidelity: dict[str, Any] = {}
    validation = data.get("validation")
    if validation:
        fidelity = fidelity_summary(validation["outputs"])
    candidate = {"name": name, "passes": [_spec(p) for p in data["passes"]],
                 "params": after.get("params"),
                 # None where the result has ops whose shapes depend on the data
                 "macs": after.get("macs") if len(after.get("unknown_shapes", []))
                 <= len(before.get("unknown_shapes", [])) else None,
                 "fidelity": fidelity, "report": data["passes"],
                 "kept": kept_units(original, optimized)}
    return {"title": f"graphopt optimize: {model or 'model'}", "model": model,
            "metric": "cosine" if fidelity.get("cosine") is not None else "top1",
            "original": {"params": before.get("params"), "macs": before.get("macs")},
            "candidates": [candidate],
            "notes": [] if validation else ["not validated (run with --validate for fidelity)"]}


def _spec(p: Mapping[str, Any]) -> str:
    """``name:key=value,...`` with the options that differ from the pass's defaults."""
    import dataclasses

    from .core.registry import registered_passes

    cls = registered_passes().get(p["name"])
    defaults = ({f.name: f.default for f in dataclasses.fields(cls.Config)} if cls else {})
    options = ",".join(f"{k}={v}" for k, v in (p.get("config") or {}).items()
                       if k not in defaults or defaults[k] != v)
    return f"{p['name']}:{options}" if options else p["name"]


def fidelity_summary(outputs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The worst cosine and top-1 agreement over a validation's float outputs."""
    cos = [o["cosine"] for o in outputs if isinstance(o.get("cosine"), (int, float))]
    top1 = [o["top1_agreement"] for o in outputs
            if isinstance(o.get("top1_agreement"), (int, float))]
    return {"cosine": min(cos) if cos else None, "top1": min(top1) if top1 else None,
            "outputs": {o["name"]: {"cosine": o.get("cosine"), "top1": o.get("top1_agreement"),
                                    "max_abs": o.get("max_abs")} for o in outputs}}
