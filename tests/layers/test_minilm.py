"""prune-layers on all-MiniLM-L6-v2 with its real weights and real sentences."""

from __future__ import annotations

import json

import numpy as np

import graphopt
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.testing import run
from graphopt.data.text import encode, read_sentences


def _embeddings(model, feeds):
    out = []
    for feed in feeds:
        hidden = run(model, feed)["last_hidden_state"]
        mask = feed["attention_mask"][..., None].astype(np.float64)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return np.concatenate(out)


def test_block_influence_drops_a_middle_layer_and_keeps_fidelity(minilm, minilm_tokenizer):
    """Calibrated on 32 real sentences, block influence removes layer 2 (not the last, the
    worst choice); mean-pooled embeddings of 48 other sentences keep cosine > 0.9."""
    sentences = read_sentences()
    calibration = encode(sentences[:32], minilm_tokenizer, batch_size=16)
    original = graphopt.load(minilm)
    pruned, report = PassManager([build_pass("prune-layers", {"count": 1})]).run(
        graphopt.load(minilm), Context(calibration=calibration))
    assert report.passes[0].status == "changed"
    kept = json.loads({p.key: p.value for p in pruned.metadata_props}["graphopt.layers"])
    assert kept == [0, 1, 3, 4, 5]
    feeds = encode(sentences[32:80], minilm_tokenizer, batch_size=16)
    a, b = _embeddings(original, feeds), _embeddings(pruned, feeds)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() > 0.9
    assert sum(n.op_type == "Softmax" for n in pruned.graph.node) == 5
