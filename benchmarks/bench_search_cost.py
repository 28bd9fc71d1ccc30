"""What a ``search`` round costs, in parts: the constants of ``graphopt.prune.search_work``.

    python benchmarks/bench_search_cost.py cnn
    HF_HUB_OFFLINE=1 python benchmarks/bench_search_cost.py minilm   # --mirror 128's calibration
    HF_HUB_OFFLINE=1 python benchmarks/bench_search_cost.py minilm --shipped
    HF_HUB_OFFLINE=1 python benchmarks/bench_search_cost.py bert

Runs ``prune:macs=M,search=1`` once (``holdout=0``: one run; the CNN and MiniLM as
``bench_reconstruct.py`` calibrates them, BERT-base as ``bench_prune_time.py``) and times,
in this process's CPU seconds (``time.process_time``: every thread) and wall seconds, the
round's ``graphopt.prune.sensitivity.measure`` and inside it:

1. ``edit``: building each probe's copy (``sensitivity._edited``: the model copied, the
   OBS update of its consumers);
2. ``sessions``: making onnxruntime sessions (the probes' suffixes and the original's
   segments: ``graphopt.data.segments._session``);
3. ``runs``: the rest of ``measure`` (the sessions' runs, the error sums).

Beside them the counted quantities the estimate uses (``search_work.probe_work``): MACs,
probes, node runs. Per-probe cost = (edit + sessions) / probes measured; GEMM rate = MACs
of the runs / runs' CPU seconds (the node runs' overhead is in it, see RECONSTRUCT.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CLOCKS = {"edit": [0.0, 0.0], "sessions": [0.0, 0.0], "measure": [0.0, 0.0]}
COUNTS = {"probes": 0, "sessions": 0}


def _timed(name, fn):
    def wrapper(*a, **k):
        c, w = time.process_time(), time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            CLOCKS[name][0] += time.process_time() - c
            CLOCKS[name][1] += time.perf_counter() - w
    return wrapper


def _instrument():
    import graphopt.data.segments as segments
    import graphopt.prune.search as search
    import graphopt.prune.sensitivity as sensitivity
    import graphopt.prune.suffix as suffix

    edited = sensitivity._edited

    def count_edit(model, p, *a, **k):
        COUNTS["probes"] += 1
        return edited(model, p, *a, **k)

    sensitivity._edited = _timed("edit", count_edit)
    session = segments._session

    def count_session(*a, **k):
        COUNTS["sessions"] += 1
        return session(*a, **k)

    segments._session = suffix._session = _timed("sessions", count_session)
    search.measure = _timed("measure", sensitivity.measure)


def _data(kind: str, shipped: bool):
    if kind == "cnn":
        from bench_reconstruct import _cnn

        path, cal, _ = _cnn("ch_ppocr_mobile_v2.0_cls_infer.onnx", "textlines")
        return path, cal, "prune:macs=0.6,search=1"
    if kind == "minilm":
        from bench_reconstruct import _minilm

        path, cal, _ = _minilm(Path("/tmp/graphopt-bench"))
        if not shipped:
            import onnx
            from traffic import doc_sentences

            from graphopt.data.text import load_tokenizer, minilm_folder, text_feeds

            cal = text_feeds(onnx.load(path), doc_sentences()[320:448],
                             load_tokenizer(minilm_folder()), batch_size=8)
        return path, cal, "prune:macs=0.6,search=1"
    from bench_prune_time import _bert, _sentences

    import onnx

    from graphopt.data.text import load_tokenizer, minilm_folder, text_feeds

    path = _bert(Path("/tmp/graphopt-bench"))
    cal = text_feeds(onnx.load(path), _sentences(256), load_tokenizer(minilm_folder()),
                     batch_size=16)
    return path, cal, "prune:macs=0.5,search=1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["cnn", "minilm", "bert"])
    parser.add_argument("--shipped", action="store_true",
                        help="MiniLM on the shipped even lines (--traffic 320's calibration)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path, cal, spec = _data(args.kind, args.shipped)
    _instrument()
    from graphopt.api import optimize

    load = os.getloadavg()[0]
    c, w = time.process_time(), time.perf_counter()
    _, report = optimize(path, [spec], calibration=cal, holdout=0)
    total = (time.process_time() - c, time.perf_counter() - w)
    search = report.passes[0].details["search"]
    m, e, s = CLOCKS["measure"], CLOCKS["edit"], CLOCKS["sessions"]
    runs = (m[0] - e[0] - s[0], m[1] - e[1] - s[1])
    probes = max(COUNTS["probes"], 1)
    print(f"{args.kind}{' shipped' if args.shipped else ''}: {spec}, load "
          f"{load:.1f} -> {os.getloadavg()[0]:.1f}; pass {total[0]:.1f} s CPU / "
          f"{total[1]:.1f} s wall")
    print(f"  counted: {search['work_macs'] / 1e9:.1f} GMAC, "
          f"{search['work_elements'] / 1e9:.2f} G elements, {search['probes']} probes, "
          f"{search['setups']} set-ups of {search['weight_bytes'] / 1e6:.1f} MB; estimate "
          f"{search['seconds']:.1f} CPU s")
    print(f"  measure(): {m[0]:.2f} s CPU / {m[1]:.2f} s wall; {COUNTS['probes']} probes "
          f"built, {COUNTS['sessions']} sessions")
    print(f"  edit {e[0]:.2f} / {e[1]:.2f}; sessions {s[0]:.2f} / {s[1]:.2f}; "
          f"runs {runs[0]:.2f} / {runs[1]:.2f} (CPU / wall s)")
    print(f"  per probe: edit+sessions {(e[0] + s[0]) / probes:.3f} s CPU; runs at "
          f"{search['work_macs'] / 1e9 / max(runs[0], 1e-9):.1f} GMAC per CPU-s "
          f"(the estimate's MACs over the runs' CPU)")


if __name__ == "__main__":
    main()
