"""prune-heads on packed-QKV and GQA-with-SDPA exports: heads removed, MACs, latency on ORT CPU.

    python benchmarks/bench_heads_packed.py                  # both models, 50% of heads
    python benchmarks/bench_heads_packed.py --models vit --ratios 0.25 0.5 --json

1. Models (random weights, fixed seed, torch dynamo export, opset 18, dynamic batch and
   sequence; cached in ``--cache``, default ``$TMPDIR/graphopt-bench-heads``):
   - ``vit``: a ViT-S/16-like encoder built from ``nn.TransformerEncoderLayer`` (dim 384,
     6 heads, MLP 1536, 6 layers, pre-norm, GELU) on [8, 197, 384]: every block projects
     Q, K, V with one packed MatMul to 3·384 and picks them with Gather;
   - ``llama``: a LLaMA-style decoder (``transformers.LlamaModel``, hidden 512, 8 query
     heads sharing 2 KV heads, RoPE, SwiGLU 1408, 4 layers, ``attn_implementation="sdpa"``)
     on [4, 128] token ids: K/V reach the attention through ``repeat_kv``
     (Unsqueeze → Expand → Reshape), so a unit is one KV head with its 4 query heads.
2. ``prune-heads`` (``importance=magnitude``: no calibration data needed) removes ``ratio``
   of the units of every attention block, through the ``PassManager`` (checker and ORT
   load verified).
3. Masked equivalence on the benchmark's own feeds: the removed heads' output-projection
   rows zeroed in the original (``mask_units``) against the pruned model, max |Δ| relative
   to the output scale (must be ~1e-5).
4. Latency: ``graphopt.runtime.benchmark`` times pruned (A) and original (B) interleaved
   (ABBA) in one process, after warm-up; medians; speedup = 1 / latency ratio. ``--threads``
   defaults to 1 (2-vCPU machine, shared with other jobs: see bench_width's note).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

import graphopt
from graphopt.analysis.cost import count_cost
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.ir.inputs import generate_inputs
from graphopt.prune.apply import mask_units
from graphopt.runtime.benchmark import benchmark
from graphopt.runtime.session import ort_session, run_model
from graphopt.testing import llama_gqa
from models import emit, timing_args  # benchmarks/models.py, beside this script

MODELS = ("vit", "llama")


def _vit():
    import torch

    class ViTEncoder(torch.nn.Module):
        def __init__(self, dim=384, heads=6, mlp=1536, layers=6):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0,
                                                     activation="gelu", batch_first=True,
                                                     norm_first=True)
            self.blocks = torch.nn.TransformerEncoder(layer, layers,
                                                      enable_nested_tensor=False)
            self.norm = torch.nn.LayerNorm(dim)

        def forward(self, x):
            return self.norm(self.blocks(x))

    return ViTEncoder()


def build(name: str, cache: Path):
    """The model file (exported once, then cached) and its input shapes."""
    import torch

    shapes = {"x": (8, 197, 384)} if name == "vit" else {"input_ids": (4, 128)}
    path = cache / f"{name}.onnx"
    if not path.is_file():
        torch.manual_seed(0)
        module = (_vit() if name == "vit" else llama_gqa(
            hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1408, vocab=1000,
            positions=256)).eval()
        with torch.no_grad():
            for pname, param in module.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    param.add_(0.1 * torch.randn_like(param))
        (key, shape), = shapes.items()
        arg = torch.randn(*shape) if name == "vit" else torch.randint(1, 1000, shape)
        dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=256)}
        cache.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (arg,), str(path), input_names=[key],
                              output_names=["y"], dynamo=True, opset_version=18,
                              dynamic_shapes=(dims,))
    return path, shapes


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _rel(want, got) -> float:
    worst = 0.0
    for k, ref in want.items():
        scale = max(1.0, float(np.abs(ref).max()))
        worst = max(worst, float(np.abs(got[k].astype(np.float64) - ref).max()) / scale)
    return worst


def _masked_error(original, pruned, plan, feeds) -> tuple[float, float]:
    """(pruned vs masked, original vs masked): the first must be ~0, the second not."""
    masked = _copy(original)
    mask_units(masked, plan.coupling, plan.removal)
    want = run_model(ort_session(masked), feeds)
    return (_rel(want, run_model(ort_session(pruned), feeds)),
            _rel(want, run_model(ort_session(original), feeds)))


def measure(name: str, ratio: float, args) -> dict:
    path, shapes = build(name, Path(args.cache))
    original = graphopt.load(path)
    p = build_pass("prune-heads", {"ratio": ratio, "importance": "magnitude"})
    start = time.perf_counter()
    pruned, report = PassManager([p]).run(_copy(original), Context(input_shapes=shapes))
    seconds = time.perf_counter() - start
    entry = report.passes[0]
    if not report.ok or entry.skipped:
        raise SystemExit(f"{name}: refused: {entry.error or entry.skipped}")
    if not report.passes[0].plan.removal:  # e.g. 25% of 2 KV groups is no whole group
        print(f"{name}: ratio {ratio} removes no whole unit; skipped", file=sys.stderr)
        return None
    feeds = generate_inputs(original, shapes, seed=3)
    if name == "llama":
        feeds["input_ids"] = np.clip(feeds["input_ids"], 1, 999)
    error, change = _masked_error(original, pruned, report.passes[0].plan, feeds)
    before, after = count_cost(original, shapes), count_cost(pruned, shapes)
    result = benchmark(pruned, vs=original, feeds=feeds, warmup=args.warmup,
                       rounds=args.rounds, min_time=args.min_time,
                       threads=args.threads or None)
    blocks = report.passes[0].plan.blocks
    heads_before = sum(b.heads for b in blocks)
    return {
        "model": name, "ratio": ratio, "attention_blocks": len(blocks),
        "heads_before": heads_before, "heads_removed": entry.counters["heads_removed"],
        "heads_per_unit": blocks[0].heads_per_unit, "skipped": len(entry.skipped),
        "masked_max_rel_error": error, "heads_change_output_by": change,
        "params_ratio": after.params / before.params, "macs_ratio": after.macs / before.macs,
        "latency_original_ms": result.b.median_ms, "latency_pruned_ms": result.a.median_ms,
        "speedup": 1.0 / result.ratio, "macs_speedup": before.macs / after.macs,
        "prune_seconds": seconds, "rounds": result.rounds, "threads": result.threads,
    }


def render(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="prune-heads on packed-QKV / GQA-SDPA exports, ORT CPU "
                        "(pruned vs original, interleaved A/B)")
    for col in ("model", "heads", "pruned vs masked Δ", "masking changed", "params", "MACs", "latency ms (orig → pruned)",
                "speedup", "MACs speedup"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(
            r["model"], f"{r['heads_before']} → {r['heads_before'] - r['heads_removed']}",
            f"{r['masked_max_rel_error']:.1e}", f"{r['heads_change_output_by']:.2f}",
            f"{r['params_ratio']:.3f}×",
            f"{r['macs_ratio']:.3f}×",
            f"{r['latency_original_ms']:.1f} → {r['latency_pruned_ms']:.1f}",
            f"{r['speedup']:.2f}×", f"{r['macs_speedup']:.2f}×")
    Console(width=130).print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    timing_args(parser, "graphopt-bench-heads")
    args = parser.parse_args(argv)
    rows = [measure(name, ratio, args) for name in args.models for ratio in args.ratios]
    emit([r for r in rows if r is not None], args, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
