"""prune-heads on tiny Hugging Face exports: masked equivalence and recorded head counts."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "vit"])
def test_mha_exports_masked_equivalence(family, hf_model, oracle, meta):
    """MHA exports (BERT, DistilBERT, GPT-2 fused QKV, ViT): half the heads go, outputs match."""
    model = hf_model(family)
    pruned, report, _ = oracle(model, {"ratio": 0.5})
    heads = json.loads(meta(pruned)["graphopt.heads"])
    assert heads == [2, 2]
    assert report.passes[0].counters["heads_removed"] == 4


def test_llama_gqa_rope_prunes_whole_kv_groups(hf_model, oracle, meta):
    """LLaMA-style (GQA 4 q / 2 kv heads, RoPE, SwiGLU): a whole KV group goes per layer."""
    model = hf_model("llama")
    pruned, report, p = oracle(model, {"ratio": 0.5})
    blocks = report.passes[0].plan.blocks
    assert [b.heads_per_unit for b in blocks] == [2, 2]
    assert [b.head_dim for b in blocks] == [8, 8]
    m = meta(pruned)
    assert json.loads(m["graphopt.heads"]) == [2, 2]
    assert json.loads(m["graphopt.kv_heads"]) == [1, 1]


@pytest.mark.parametrize("importance", ["magnitude", "ablation"])
def test_importance_methods(importance, hf_model, oracle):
    """Magnitude (no data) and ablation importance prune BERT with masked equivalence."""
    oracle(hf_model("bert"), {"ratio": 0.5, "importance": importance})


def test_global_scope_and_min_heads(hf_model, oracle, meta):
    """Global ranking over layers removes 5 of 8 heads, keeping at least 2 per layer."""
    pruned, _, _ = oracle(hf_model("distilbert"), {"ratio": 0.6, "scope": "global",
                                                  "min_heads": 2})
    heads = json.loads(meta(pruned)["graphopt.heads"])
    assert sum(heads) == 4 and min(heads) >= 2


def test_exclude_skips_layer(hf_model, oracle, meta):
    """An excluded attention block keeps all heads and is reported as a skip."""
    pruned, report, _ = oracle(hf_model("bert"),
                               {"ratio": 0.5, "exclude": ("*layer.0*",)})
    assert json.loads(meta(pruned)["graphopt.heads"]) == [4, 2]
    assert any("excluded" in s.reason for s in report.passes[0].skipped)


def test_prune_layers_after_heads_keeps_head_counts_aligned(hf_model, meta):
    """prune-layers after prune-heads drops the removed layer's entry from graphopt.heads."""
    import graphopt

    model, _ = graphopt.optimize(hf_model("bert"), ["prune-heads:ratio=0.5,exclude=*layer.0*",
                                                    "prune-layers:indices=1"])
    m = meta(model)
    assert json.loads(m["graphopt.layers"]) == [0]
    assert json.loads(m["graphopt.heads"]) == [4]
