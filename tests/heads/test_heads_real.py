"""prune-heads on a torch dynamo export and on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import json

import numpy as np

import graphopt
from graphopt.core.contract import Context


def test_llama_dynamo_export(hf_model, oracle, meta):
    """Dynamo (opset 18) LLaMA-style export, GQA + RoPE: a KV group per layer goes, outputs
    match the masked original."""
    pruned, _, _ = oracle(hf_model("llama-dynamo"), {"ratio": 0.5})
    assert json.loads(meta(pruned)["graphopt.heads"]) == [2, 2]
    assert json.loads(meta(pruned)["graphopt.kv_heads"]) == [1, 1]


def test_minilm_real_weights(minilm, oracle, meta):
    """all-MiniLM-L6-v2: half the heads of every layer go (12 -> 6), outputs match masking."""
    from graphopt.ir.inputs import generate_inputs

    model = graphopt.load(minilm)

    def feeds(seed):
        f = generate_inputs(model, {"input_ids": (2, 12)}, seed=seed, ragged=True)
        f["input_ids"] = np.clip(f["input_ids"], 1000, 29000)
        return f

    ctx = Context(calibration=[feeds(1)])
    pruned, report, _ = oracle(model, {"ratio": 0.5}, ctx=ctx, feeds=feeds(7), atol=2e-5)
    assert json.loads(meta(pruned)["graphopt.heads"]) == [6] * 6
    assert report.passes[0].counters["heads_removed"] == 36
