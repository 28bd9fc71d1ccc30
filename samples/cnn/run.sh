#!/usr/bin/env bash
# Build, optimize, validate and benchmark the sample CNN (see README.md in this folder).
#
#   samples/cnn/run.sh [OUT_DIR]        # default OUT_DIR: build/sample-cnn
#
# Needs graphopt installed with the torch extra (`pip install -e ".[torch]"`); uses the
# `python` and `graphopt` found on PATH.
set -euo pipefail

OUT="${1:-build/sample-cnn}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."   # the repository root: the paths below are relative

python samples/cnn/build.py "$OUT"
graphopt inspect "$OUT/cnn.onnx"
graphopt optimize "$OUT/cnn.onnx" -o "$OUT/cnn.opt.onnx" --recipe samples/cnn/recipe.yaml --validate --report "$OUT/report.json"
graphopt validate "$OUT/cnn.onnx" "$OUT/cnn.opt.onnx" --input-shape image:4x3x32x32
graphopt bench "$OUT/cnn.opt.onnx" --vs "$OUT/cnn.onnx" --input-shape image:8x3x32x32
