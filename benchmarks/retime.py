"""Re-time saved candidate models against their original in one process, all interleaved.

    python benchmarks/retime.py --data det ORIGINAL.onnx CAND1.onnx [CAND2.onnx ...]

A sweep times each candidate A/B against the original at its own moment; on a shared
machine the load moves between those moments. Here every model gets its session up front
and rounds run all of them in ABBA order (``graphopt.runtime.benchmark.interleaved_times``),
so each ratio (the original's median over the candidate's) is taken under the same load.
``--data``: ``det`` one held-apart scene of ``benchmarks/scenes.py`` at ``--size``; ``cls``
a batch of 8 held-apart text lines of ``benchmarks/textlines.py``. Also prints, per model,
how many compute nodes onnxruntime's CPU EP runs in int8 and in float
(``benchmarks/ort_kernels.py``) and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="the original first")
    parser.add_argument("--data", choices=["det", "cls"], default="det")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from graphopt.runtime.benchmark import interleaved_times
    from ort_kernels import FLOAT, INT8, optimized_ops

    if args.data == "det":
        from scenes import scenes

        feed = {"x": scenes("validation", 1, args.size, seed=5)}
    else:
        from textlines import textlines

        feed = {"x": textlines("validation", 8, seed=5)[0]}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = [ort.InferenceSession(str(m), options, providers=["CPUExecutionProvider"])
                for m in args.models]
    load = os.getloadavg()
    times = interleaved_times([lambda s=s: s.run(None, feed) for s in sessions], warmup=3,
                              rounds=args.rounds)
    after = os.getloadavg()
    base = float(np.median(times[0]))
    print(f"load average {load[0]:.1f} -> {after[0]:.1f}; {args.rounds} rounds, "
          f"{args.threads} threads, feed {feed['x'].shape}")
    print("| model | int8 / float compute nodes (ORT CPU) | median ms | speedup |")
    print("|---|---|---|---|")
    for path, t in zip(args.models, times):
        ops = optimized_ops(str(path))
        int8 = sum(c for op, c in ops.items() if op in INT8)
        flt = sum(c for op, c in ops.items() if op in FLOAT)
        ms = float(np.median(t))
        print(f"| {path.parent.parent.name}/{path.stem} | {int8} / {flt} | {ms * 1e3:.1f} | "
              f"{base / ms:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
