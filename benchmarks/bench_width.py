"""Width pruning pays on ONNX Runtime CPU: params, MACs and latency at 25% and 50% of units.

    python benchmarks/bench_width.py                          # both models, 25% and 50%
    python benchmarks/bench_width.py --models ffn --ratios 0.5 --rounds 30 --json

1. Models (random weights, fixed seed, cached in ``--cache``, default
   ``$TMPDIR/graphopt-bench-width``):
   - ``resnet50``: a ResNet-50 in plain ``torch.nn`` (bottlenecks [3, 4, 6, 3], widths
     64-2048, BatchNorm, projection shortcuts), 224x224, batch ``--batch`` (1), exported
     with the TorchScript exporter (BatchNorm folded into the convs, as users get it);
   - ``ffn``: a transformer feed-forward block (hidden 768, inner 3072, GELU, residual,
     LayerNorm) on [8, 128, 768].
2. ``prune-channels`` (ResNet) / ``prune-neurons`` (FFN) remove ``ratio`` of every prunable
   group's units by l1 importance, widths rounded to ``--round-to`` (8), through the
   ``PassManager`` (checker and ORT load verified).
3. Latency: ``graphopt.benchmark`` times pruned (A) and original (B) interleaved (ABBA) in
   one process on CPU, after warm-up; medians. speedup = 1 / latency ratio; the MACs
   speedup = original MACs / pruned MACs; efficiency η = speedup / MACs speedup.
4. ``--threads`` defaults to 2 (both vCPUs of the machines this project runs on); ``1`` for
   one thread, ``0`` for ORT's default. The two-thread figures of last session (η 0.67-0.77
   at 50 %, "the two vCPUs behave like one contended core") were an artifact of the A/B
   harness: each session's intra-op workers kept spinning after its run and took the
   second core from the session being timed. Since every graphopt session sets
   ``session.force_spinning_stop`` (``graphopt.runtime.session.session_options``) the
   original gains ~1.9x from the second thread and η on two threads is ~0.9
   (``benchmarks/WIDTH.md``). On a shared machine two-thread timings under load are noise:
   note ``uptime`` beside every figure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import graphopt
from graphopt.analysis.cost import count_cost
from graphopt.runtime.benchmark import benchmark
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from models import resnet50, emit, timing_args  # benchmarks/models.py, beside this script

MODELS = ("resnet50", "ffn")
TARGET_ETA = 0.8


def _ffn():
    from torch import nn

    class FFN(nn.Module):
        def __init__(self, hidden=768, inner=3072):
            super().__init__()
            self.up = nn.Linear(hidden, inner)
            self.down = nn.Linear(inner, hidden)
            self.norm = nn.LayerNorm(hidden)

        def forward(self, x):
            return self.norm(x + self.down(nn.functional.gelu(self.up(x))))

    return FFN()


def build(name: str, cache: Path, batch: int):
    """The model file (exported once, then cached) and its input shapes."""
    import torch

    shape = (batch, 3, 224, 224) if name == "resnet50" else (8, 128, 768)
    path = cache / f"{name}_b{shape[0]}.onnx"
    if not path.is_file():
        torch.manual_seed(0)
        module = (resnet50() if name == "resnet50" else _ffn()).eval()
        if name == "resnet50":
            gen = torch.Generator().manual_seed(0)
            for m in module.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        cache.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            torch.onnx.export(module, (torch.randn(*shape),), str(path), dynamo=False,
                              input_names=["x"], output_names=["y"])
    return path, {"x": shape}


def measure(name: str, ratio: float, args) -> dict:
    path, shapes = build(name, Path(args.cache), args.batch)
    original = graphopt.load(path)
    pass_name = "prune-channels" if name == "resnet50" else "prune-neurons"
    p = build_pass(pass_name, {"ratio": ratio, "round_to": args.round_to,
                               "importance": args.importance, "scope": args.scope})
    start = time.perf_counter()
    work = onnx_copy(original)
    pruned, report = PassManager([p]).run(work, Context(input_shapes=shapes))
    seconds = time.perf_counter() - start
    entry = report.passes[0]
    before, after = count_cost(original, shapes), count_cost(pruned, shapes)
    result = benchmark(pruned, vs=original, input_shapes=shapes, warmup=args.warmup,
                       rounds=args.rounds, min_time=args.min_time,
                       threads=args.threads or None)
    speedup = 1.0 / result.ratio
    macs_speedup = before.macs / after.macs
    return {
        "model": name, "pass": pass_name, "ratio": ratio, "round_to": args.round_to,
        "importance": args.importance, "groups_pruned": entry.counters.get("groups_pruned"),
        "units_pruned": entry.counters.get("units_pruned"),
        "groups_skipped": entry.counters.get("groups_skipped"),
        "params_before": before.params, "params_after": after.params,
        "params_ratio": after.params / before.params,
        "macs_before": before.macs, "macs_after": after.macs,
        "macs_ratio": after.macs / before.macs,
        "latency_original_ms": result.b.median_ms, "latency_pruned_ms": result.a.median_ms,
        "latency_ratio": result.ratio, "speedup": speedup, "macs_speedup": macs_speedup,
        "efficiency": speedup / macs_speedup, "prune_seconds": seconds,
        "rounds": result.rounds, "threads": result.threads,
    }


def onnx_copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def render(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Width pruning on ORT CPU (pruned vs original, interleaved A/B)")
    for col in ("model", "removed", "params", "MACs", "latency ms (orig → pruned)",
                "speedup", "MACs speedup", "η"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        eta = r["efficiency"]
        mark = "" if r["ratio"] < 0.5 or eta >= TARGET_ETA else " (below 0.8)"
        table.add_row(
            r["model"], f"{r['ratio']:.0%}", f"{r['params_ratio']:.3f}×",
            f"{r['macs_ratio']:.3f}×",
            f"{r['latency_original_ms']:.1f} → {r['latency_pruned_ms']:.1f}",
            f"{r['speedup']:.2f}×", f"{r['macs_speedup']:.2f}×", f"{eta:.2f}{mark}")
    Console(width=120).print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--batch", type=int, default=1, help="ResNet-50 batch size")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--importance", default="l1")
    parser.add_argument("--scope", choices=("group", "global"), default="group")
    timing_args(parser, "graphopt-bench-width", threads=2)
    args = parser.parse_args(argv)
    emit([measure(name, ratio, args) for name in args.models for ratio in args.ratios],
         args, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
