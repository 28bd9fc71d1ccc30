"""η with a measured latency budget: ResNet-50 pruned by ``prune:latency=F`` against the
uniform ``prune-channels``, on 2 and 1 intra-op threads.

    python benchmarks/bench_eta.py                       # the WIDTH.md table (~2 min quiet)
    python benchmarks/bench_eta.py --threads 2 --latency 0.3 --repeats 5 --json

1. Model: ``bench_width``'s ResNet-50 (random weights, batch 1, 224², cached in ``--cache``).
2. Rows per thread count T (``--threads``, default 2 then 1):
   - ``uniform``: ``prune-channels:ratio=0.5,round_to=R,importance=l1`` (every group loses
     half its channels);
   - ``latency=F`` for each ``--latency`` F and each ``--latency-round-to`` Q:
     ``prune:latency=F,threads=T,round_to=Q`` without calibration (weight importance, as
     on random weights); its latency table is measured with T threads on the CPU provider
     (``graphopt.prune.latency``). Q = 0 (default) is the pass's automatic rounding: conv
     channels to the CPU's NCHWc block.
   ``R`` is ``--round-to`` (8).
3. Timing: ``graphopt.benchmark(pruned, vs=original, threads=T)`` (A/B interleaved ABBA in one
   process, every session with ``session_options``), taken ``--repeats`` times; the table
   gives the median latency ratio and its range. speedup = 1 / ratio, MACs speedup =
   original / pruned MACs, η = speedup / MACs speedup. For a latency budget, ``asked`` is F,
   ``predicted`` the table's kept share and ``measured / asked`` how well it was met;
   ``checks`` lists the pass's own timings of its cuts (table → timed, * the cut kept).
4. ``--alignment``: the uniform 50 % cut (every width a multiple of 16) against the same
   cut with every group keeping 8 channels fewer / more (off the AVX-512 NCHWc block).
5. The 1-minute load average is printed before and after every row: 2-thread timings on a
   shared 2-vCPU machine are noise when the load is above ~1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import graphopt
from graphopt.analysis.cost import count_cost
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.runtime.benchmark import benchmark
from bench_width import build, onnx_copy  # benchmarks/, beside this script
from models import emit


def row(original, shapes, label: str, spec: tuple[str, dict], threads: int, args) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    pruned, report = PassManager([build_pass(*spec)]).run(onnx_copy(original),
                                                          Context(input_shapes=shapes))
    seconds = time.perf_counter() - start
    entry = report.passes[0]
    before, after = count_cost(original, shapes), count_cost(pruned, shapes)
    ratios = []
    for _ in range(args.repeats):
        r = benchmark(pruned, vs=original, input_shapes=shapes, warmup=args.warmup,
                      rounds=args.rounds, min_time=args.min_time, threads=threads)
        ratios.append(r.ratio)
    ratio = statistics.median(ratios)
    macs_speedup = before.macs / after.macs
    table = entry.details.get("latency_table")
    budget = entry.details.get("budget", {})
    return {
        "row": label, "threads": threads, "spec": f"{spec[0]}:" + ",".join(
            f"{k}={v}" for k, v in spec[1].items()),
        "params_ratio": after.params / before.params, "macs_ratio": after.macs / before.macs,
        "latency_ratio": ratio, "ratios": ratios, "speedup": 1 / ratio,
        "macs_speedup": macs_speedup, "efficiency": (1 / ratio) / macs_speedup,
        "asked": budget.get("keep") if budget.get("metric") == "latency" else None,
        "predicted": float(budget["kept_fraction"]) if budget.get("metric") == "latency"
        else None,
        "table_seconds": table["seconds"] if table else None, "prune_seconds": seconds,
        "checks": entry.details.get("latency_checks"),
        "channels_removed": entry.counters.get("channels_removed",
                                               entry.counters.get("units_pruned")),
        "load": (round(load_before, 2), round(os.getloadavg()[0], 2)),
    }


def alignment(original, shapes, threads: int, args) -> list[dict]:
    """Every group cut to half its width (multiples of 16 here), then 8 channels fewer or
    more (multiples of 8 off the AVX-512 NCHWc block), timed against the aligned cut."""
    import numpy as np

    from graphopt.analysis.coupling import analyze
    from graphopt.prune.apply import apply_removal

    coupling = analyze(original, shapes)
    groups = [g for g in coupling.groups if g.prunable and g.kind == "channels"]

    def cut(extra):
        work = onnx_copy(original)
        apply_removal(work, coupling, {g.id: np.arange(g.size // 2 - extra, g.size)
                                       for g in groups})
        return work

    aligned = cut(0)
    macs = count_cost(aligned, shapes).macs
    out = []
    for extra in (-8, 8):
        load = os.getloadavg()[0]
        other = cut(extra)
        ratios = [benchmark(other, vs=aligned, input_shapes=shapes, warmup=args.warmup,
                            rounds=args.rounds, min_time=args.min_time,
                            threads=threads).ratio for _ in range(args.repeats)]
        out.append({"row": f"widths {-extra:+d} (off the block)", "threads": threads,
                    "macs_vs_aligned": count_cost(other, shapes).macs / macs,
                    "latency_vs_aligned": statistics.median(ratios), "ratios": ratios,
                    "load": (round(load, 2), round(os.getloadavg()[0], 2))})
    return out


def render(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ResNet-50: latency budget vs uniform width (interleaved A/B)")
    for col in ("row", "T", "params", "MACs", "latency ratio (range)", "speedup", "η",
                "asked → predicted", "measured/asked", "checks: table → timed", "table s",
                "load"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        budget = (f"{r['asked']:.3f} → {r['predicted']:.3f}" if r["asked"] else "")
        met = f"{r['latency_ratio'] / r['asked']:.3f}" if r["asked"] else ""
        table.add_row(
            r["row"], str(r["threads"]), f"{r['params_ratio']:.3f}", f"{r['macs_ratio']:.3f}",
            f"{r['latency_ratio']:.3f} ({min(r['ratios']):.3f}–{max(r['ratios']):.3f})",
            f"{r['speedup']:.2f}×", f"{r['efficiency']:.2f}", budget, met,
            " ".join(f"{c['predicted']:.3f}→{c['measured']:.3f}" + ("*" if c["chosen"] else "")
                     for c in r["checks"] or []),
            f"{r['table_seconds']:.1f}" if r["table_seconds"] else "",
            f"{r['load'][0]:.1f}/{r['load'][1]:.1f}")
    Console(width=170).print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--latency", type=float, nargs="+", default=[0.3])
    parser.add_argument("--round-to", type=int, default=8, help="uniform rows (8)")
    parser.add_argument("--latency-round-to", type=int, nargs="+", default=[0],
                        help="latency rows, one row each (0: the pass's automatic rounding)")
    parser.add_argument("--no-uniform", action="store_true")
    parser.add_argument("--alignment", action="store_true",
                        help="instead: the uniform 50%% cut with widths 8 channels off the "
                             "NCHWc block, against the aligned one (JSON rows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.0)
    parser.add_argument("--cache", default=str(Path(os.environ.get("TMPDIR", "/tmp"))
                                               / "graphopt-bench-width"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    path, shapes = build("resnet50", Path(args.cache), 1)
    original = graphopt.load(path)
    if args.alignment:
        import json

        print(json.dumps([r for t in args.threads
                          for r in alignment(original, shapes, t, args)], indent=2))
        return 0
    rows = []
    for t in args.threads:
        if not args.no_uniform:
            rows.append(row(original, shapes, "uniform 50%", (
                "prune-channels", {"ratio": 0.5, "round_to": args.round_to,
                                   "importance": "l1"}), t, args))
        for f in args.latency:
            for r in args.latency_round_to:
                rows.append(row(original, shapes, f"latency={f:g}" + (
                    f", round_to={r}" if r else ""), (
                    "prune", {"latency": f, "threads": t, "round_to": r}), t, args))
    emit(rows, args, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
