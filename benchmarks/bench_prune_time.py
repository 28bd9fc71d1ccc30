"""How long ``prune`` with reconstruction takes on a BERT-base-sized model.

    python benchmarks/bench_prune_time.py                       # prune:macs=0.5 on 256 sentences
    python benchmarks/bench_prune_time.py --spec prune:macs=0.6 --sentences 128
    python benchmarks/bench_prune_time.py --cli                 # as `graphopt optimize` runs it

1. Model: ``transformers.BertConfig`` with BERT-base's sizes (12 layers, hidden 768, 12
   heads, FFN 3072, vocab 30522), random weights (seed 0: the timing does not depend on
   the values), exported by ``graphopt.exporters.export_hf`` (TorchScript) into
   ``--cache`` once.
2. Calibration: ``--sentences`` sentences (default 256, the issue's figure): the 210
   shipped sentences (``graphopt/data/sentences.txt``), then pairs of them joined, until
   there are enough; the MiniLM tokenizer (BERT's uncased vocabulary), batches of 16
   padded to their longest.
3. Timed: ``graphopt.api.optimize`` with the pass (planning: Gram capture and OBS scores,
   allocation; the cut; the sequential refit; the manager's checks), without a hold-out
   (``holdout=0``): wall time, this process's CPU time, peak RSS, and the load average
   of the machine before and after (the machine is shared: wall time is inflated by the
   other processes, CPU time much less).
4. ``--cli``: what ``graphopt optimize MODEL --calibration DIR --pass SPEC`` runs with its
   defaults instead (the last 25 % of the feeds held out: the pass on the rest, fidelity
   and the latency ratio on the held-out feeds; ``--final auto``: the pass again on all of
   them unless its refit's forwards alone are counted at over 30 CPU s,
   ``graphopt.final_run``; BERT-base on 256 sentences is past it), the fidelity line
   added: the held-out cosines, the latency ratio and the final run's decision.
   ``--final all|rest`` forces it. The CLI's own load, rendering and save are not in it
   (about 2 s on BERT-base).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _bert(cache: Path) -> Path:
    path = cache / "bert-base-random.onnx"
    if path.exists():
        return path
    import torch
    import transformers

    from graphopt.exporters import export_hf

    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072)
    export_hf(config, path, exporter="torchscript", batch=2, seq_len=16)
    return path


def _sentences(count: int) -> list[str]:
    from graphopt.data.text import read_sentences

    base = read_sentences()
    out = list(base[:count])
    k = 0
    while len(out) < count:
        out.append(base[k % len(base)] + " " + base[(k * 7 + 3) % len(base)])
        k += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="prune:macs=0.5")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cli", action="store_true",
                        help="the CLI's defaults: holdout 0.25, final=auto, latency (doc 4)")
    parser.add_argument("--final", choices=["auto", "all", "rest"], default="auto",
                        help="with --cli: the CLI's --final (default auto, as the CLI's)")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "graphopt-bench")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnx

    from graphopt.api import optimize
    from graphopt.data.text import load_tokenizer, minilm_folder, text_feeds

    path = _bert(args.cache)
    model = onnx.load(path)
    feeds = text_feeds(model, _sentences(args.sentences), load_tokenizer(minilm_folder()),
                       batch_size=args.batch)
    tokens = sum(int(f["attention_mask"].sum()) for f in feeds if "attention_mask" in f)
    load0 = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    if args.cli:  # graphopt.cli.commands.optimize's defaults
        pruned, report = optimize(path, args.spec.split("+"), calibration=feeds,
                                  holdout=0.25, final=args.final, latency=True,
                                  provider="cpu")
    else:
        pruned, report = optimize(path, args.spec.split("+"), calibration=feeds, holdout=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load1 = os.getloadavg()[0]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before, after = report.metadata["cost_before"], report.metadata["cost_after"]
    entry = report.passes[0]
    print("| model | spec | sentences (tokens) | MACs kept | params kept | sites refit | "
          "wall | CPU | peak RSS | load avg before/after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    spec = (f"{args.spec}, CLI defaults" + (f", --final {args.final}"
                                            if args.final != "auto" else "")) \
        if args.cli else args.spec
    print(f"| BERT-base (random weights) | {spec} | {args.sentences} ({tokens}) | "
          f"{after['macs'] / before['macs']:.3f} | {after['params'] / before['params']:.3f} | "
          f"{entry.counters.get('sites_refit', 0)} | {wall:.0f} s | {cpu:.0f} s | "
          f"{rss:.0f} MB | {load0:.1f} / {load1:.1f} |")
    fidelity = report.metadata.get("fidelity") or {}
    if args.cli and fidelity.get("measured"):
        outputs = "; ".join(f"{o['name']} cosine {o['cosine']:.4f}" for o in fidelity["outputs"])
        print(f"\nfidelity ({fidelity['data']}): {outputs}; latency ratio "
              f"{fidelity.get('latency_ratio', float('nan')):.3f}")
        if fidelity.get("final"):
            print(f"\n{fidelity['final']}")


if __name__ == "__main__":
    main()
