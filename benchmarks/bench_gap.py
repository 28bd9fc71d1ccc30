"""Where MiniLM's held-out fidelity goes: the fit on the calibration itself against new
sentences, and the data the cut's selection sees against the data its refit sees.

    HF_HUB_OFFLINE=1 python benchmarks/bench_gap.py                      # 128 select, 128 refit
    HF_HUB_OFFLINE=1 python benchmarks/bench_gap.py --select 480 --refit 128
    HF_HUB_OFFLINE=1 python benchmarks/bench_gap.py --select 480 --refit 480 --spec "prune:macs=0.6"

1. Model and sentences as ``bench_reconstruct.py minilm --mirror``: all-MiniLM-L6-v2 (real
   weights), calibrated on Python-reference sentences 320.. (``--select`` of them, batches
   of 8), one run on all of them (``holdout=0``). Fidelity (mean cosine of the mean-pooled
   embeddings / Spearman of the pairwise similarities) on: the first ``--refit`` calibration
   sentences themselves ("calibration"), reference sentences 0..319 ("same domain", none
   calibrated) and the 105 odd shipped lines ("other").
2. ``--refit M`` below ``--select``: the cut is chosen (scores, allocation) on all
   ``--select`` sentences, and the refit after it sees only the first M of them with their
   swapped-token copies (the pass's ``refit_step`` is handed that part of its feeds), so
   the two halves of the pass can be given different amounts of data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _refit_on_first(count: int, given: int, batch: int) -> None:
    """Make ``prune``'s refit see only the first ``count`` sentences of the ``given`` feeds
    and their swapped copies (``shared.calibration_copies``: the copies follow in blocks of
    ``given``)."""
    import graphopt.passes.prune as prune

    step = prune.refit_step

    def refit_step(original, model, outputs, ctx, mode, damping, *args, **kwargs):
        feeds = kwargs.get("feeds")
        if feeds is not None:
            assert len(feeds) % given == 0, (len(feeds), given)
            kwargs["feeds"] = [f for b in range(0, len(feeds), given)
                               for f in feeds[b:b + count // batch]]
        return step(original, model, outputs, ctx, mode, damping, *args, **kwargs)

    prune.refit_step = refit_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="prune:macs=0.6")
    parser.add_argument("--select", type=int, default=128)
    parser.add_argument("--refit", type=int, default=None)
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "graphopt-bench")
    args = parser.parse_args()
    refit = args.select if args.refit is None else args.refit
    if not 8 <= refit <= args.select or refit % 8 or args.select % 8:
        parser.error("--refit and --select: multiples of 8, refit <= select")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench_reconstruct import _minilm, _text_fidelity
    from traffic import doc_sentences

    from graphopt.api import optimize
    from graphopt.data.text import load_tokenizer, minilm_folder, text_feeds

    path, _, other = _minilm(args.cache)
    original = onnx.load(path)
    tok = load_tokenizer(minilm_folder())
    pool = doc_sentences()
    if len(pool) < 320 + args.select:
        parser.error(f"--select {args.select}: only {len(pool) - 320} unseen sentences")
    cal = text_feeds(original, pool[320:320 + args.select], tok, batch_size=8)
    same = text_feeds(original, doc_sentences(320), tok, batch_size=16)
    if refit < args.select:
        _refit_on_first(refit, len(cal), 8)
    pruned, _ = optimize(path, args.spec.split("+"), calibration=cal, holdout=0)
    print("| spec | select | refit | calibration cos / Sp | same domain | other |")
    print("|---|---|---|---|---|---|")
    cells = []
    for feeds in (cal[:refit // 8], same, other):
        fid = _text_fidelity(original, pruned, feeds)
        cells.append(f"{fid['cos']:.4f} / {fid['spearman']:.4f}")
    print(f"| {args.spec} | {args.select} | {refit} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
