"""Fuzz the lossless passes through the CLI and print the tallies (issue 13's campaign).

    python benchmarks/fuzz_lossless.py --cases 600 [--seed 0] [--no-shipped] [--no-light]

Bases: hand-built tiny CNNs with dynamic H/W, a tiny torch export, the onnx wheel's light
models and, when rapidocr-onnxruntime is installed, its PP-OCR det/rec/cls files. Each case
is described in ``graphopt.fuzzing``; failures are listed with their seed (rerun one with
``--cases 1 --seed N``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from graphopt.fuzz_models import light_models, torch_cnn
from graphopt.fuzzing import FAILURES, campaign


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-shipped", action="store_true")
    parser.add_argument("--no-light", action="store_true")
    args = parser.parse_args()
    extra = {} if args.no_light else light_models()
    with tempfile.TemporaryDirectory() as tmp:
        model = torch_cnn(Path(tmp))
    if model is not None:
        extra["torch_cnn"] = model
    start = time.perf_counter()

    def progress(case):
        if case.outcome in FAILURES:
            print(f"FAIL seed={case.seed} base={case.base} mutations={case.mutations} "
                  f"args={case.args}: {case.outcome}: {case.detail}", flush=True)

    tally = campaign(args.cases, args.seed, shipped=not args.no_shipped, extra=extra,
                     progress=progress)
    seconds = time.perf_counter() - start
    print(f"\n{args.cases} cases, seeds {args.seed}..{args.seed + args.cases - 1}, "
          f"{seconds:.0f} s (shared 2-core machine)\n")
    print("| outcome | cases |\n|---|---|")
    for outcome, n in sorted(tally.counts.items(), key=lambda kv: -kv[1]):
        print(f"| {outcome} | {n} |")
    by_base = Counter((c.base, c.outcome) for c in tally.cases)
    print("\n| base model | outcome | cases |\n|---|---|---|")
    for (base, outcome), n in sorted(by_base.items()):
        print(f"| {base} | {outcome} | {n} |")
    valid = sum(c.valid for c in tally.cases)
    print(f"\ninputs the checker and onnxruntime accept: {valid}; failures: "
          f"{len(tally.failures)}")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
