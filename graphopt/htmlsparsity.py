"""The sparsity section of the HTML report (``graphopt.htmlreport.render_html``).

It reads the per-layer rows ``sparsify`` and ``sparse-ops`` put in their pass reports
(``details["layers"]``, the same rows the CLI prints) of every candidate, so a sweep and a
single ``optimize --report x.html`` run show the same thing:

1. bars, one per weight layer, of the sparsity each layer reached (after the pass, the
   share of zero weights), coloured by what it was asked for: an N:M pattern, an
   unstructured ratio, or kept dense (a light band); a tick marks the target (``1 − N/M`` for N:M) and a
   hatched bar an N:M layer whose written weights break the pattern (``pattern_ok``);
2. the ``sparsify`` table: target, sparsity before → after, whether the N:M pattern holds
   on the written weights, the measured sensitivity, the layer's relative output error,
   and why a layer was kept dense;
3. the ``sparse-ops`` table: per MatMul the implementation kept, the reason and the
   measured median times of every candidate (dense is kept unless a sparse kernel was
   faster by the pass's margin and matched dense).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .htmlparts import escape, pyplot, svg_of, table

_COLOURS = {"nm": "#5a9e5a", "unstructured": "#4878a8", "dense": "#9a9a9a"}


def _kind(target: str) -> str:
    if target == "dense":
        return "dense"
    return "nm" if ":" in str(target) else "unstructured"


def _target_share(target: str) -> float | None:
    """The share of zeros the target asks for (``2:4`` -> 0.5, ``48.3%`` -> 0.483)."""
    target = str(target)
    try:
        if ":" in target:
            n, m = (int(x) for x in target.split(":"))
            return 1 - n / m
        if target.endswith("%"):
            return float(target[:-1]) / 100
    except ValueError:
        return None
    return None


def pass_layers(data: Mapping[str, Any], name: str) -> list[tuple[str, list[Mapping]]]:
    """``(candidate, rows)`` for every candidate whose report has pass ``name`` with rows."""
    out = []
    for c in data.get("candidates", []):
        if c.get("error"):
            continue
        for p in c.get("report", []):
            rows = (p.get("details") or {}).get("layers")
            if p.get("name") == name and rows and p.get("status") != "rolled back":
                out.append((c["name"], rows))
    return out


def sparsity_svg(series: Sequence[tuple[str, Sequence[Mapping]]]) -> str | None:
    """One panel of bars per candidate (module doc, 1), at most four."""
    from matplotlib.patches import Patch


    series = [(label, rows) for label, rows in series if rows][:4]
    if not series:
        return None
    plt = pyplot()
    n = max(len(rows) for _, rows in series)
    fig, axes = plt.subplots(len(series), 1, figsize=(max(8.0, 0.2 * n), 2.8 * len(series)),
                             squeeze=False)
    for ax, (label, rows) in zip(axes[:, 0], series):
        x = range(len(rows))
        for i, r in enumerate(rows):
            kind = _kind(r.get("target", ""))
            broken = kind == "nm" and r.get("pattern_ok") is False
            if kind == "dense":  # a light full-height band: a 0 bar would not show
                ax.axvspan(i - 0.4, i + 0.4, color=_COLOURS["dense"], alpha=0.25, lw=0)
            ax.bar(i, float(r.get("sparsity") or 0), 0.8, color=_COLOURS[kind],
                   hatch="//" if broken else None, edgecolor="#b00020" if broken else None)
            share = _target_share(r.get("target", ""))
            if share is not None:
                ax.plot([i - 0.4, i + 0.4], [share, share], color="black", lw=1)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("zeros / weights")
        ax.set_title(f"{label}: sparsity reached per layer (tick: target)", fontsize=8.5)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{str(r.get('layer'))[-28:]} ({r.get('target')})" for r in rows],
                           rotation=80, ha="right", fontsize=5.5 if len(rows) > 30 else 7)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(handles=[Patch(color=_COLOURS["nm"], label="N:M"),
                           Patch(color=_COLOURS["unstructured"], label="unstructured"),
                           Patch(color=_COLOURS["dense"], label="kept dense")],
                  fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return svg_of(fig)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def _g(x: Any) -> str:
    return "–" if x is None else f"{float(x):.3g}"


def _sparsify_rows(series) -> list[list[str]]:
    rows = []
    for label, layers in series:
        for r in layers:
            ok = r.get("pattern_ok")
            pattern = "–" if ok is None else ("yes" if ok else '<span class="err">no</span>')
            rows.append([escape(label), escape(r.get("layer")), escape(r.get("op")),
                         escape("×".join(str(d) for d in r.get("shape") or [])),
                         escape(r.get("target")),
                         f"{_pct(r.get('sparsity_before'))} → <b>{_pct(r.get('sparsity'))}</b>",
                         pattern, _g(r.get("sensitivity")), _g(r.get("output_error")),
                         escape(r.get("reason") or "")])
    return rows


def _sparse_ops_rows(series) -> list[list[str]]:
    rows = []
    for label, layers in series:
        for r in layers:
            times = ", ".join(
                f"{t['kind']} {float(t['median_ms']):.3f} ms" for t in r.get("timings") or []
                if t.get("median_ms") is not None)
            chosen = escape(r.get("chosen"))
            if r.get("chosen") != "dense":
                chosen = f"<b>{chosen}</b>"
            rows.append([escape(label), escape(r.get("layer")), _pct(r.get("sparsity")), chosen,
                         escape(r.get("reason")), escape(times or "not measured")])
    return rows


def sparsity_section(data: Mapping[str, Any]) -> list[str]:
    """HTML parts of the section (empty when no candidate ran ``sparsify``/``sparse-ops``)."""
    sparsified = pass_layers(data, "sparsify")
    kernels = pass_layers(data, "sparse-ops")
    if not sparsified and not kernels:
        return []
    parts = ["<h2>Sparsity per layer</h2>"]
    if sparsified:
        svg = sparsity_svg(sparsified)
        if svg:
            parts.append(f'<div class="plot">{svg}</div>')
        parts.append(table(["candidate", "layer", "op", "weight shape", "target",
                             "sparsity before → after", "N:M holds", "sensitivity",
                             "output error", "note"], _sparsify_rows(sparsified),
                            cls="sparsify"))
    if kernels:
        parts.append("<h3>sparse-ops: the kernel kept per MatMul</h3>")
        parts.append(table(["candidate", "MatMul", "sparsity", "kept", "why",
                             "measured (median)"], _sparse_ops_rows(kernels),
                            cls="sparse-ops"))
    return parts
