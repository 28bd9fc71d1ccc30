"""prune-heads on torch dynamo (opset 18) exports of the tiny MHA families (issue 4)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "vit"])
def test_mha_dynamo_exports_masked_equivalence(family, hf_model, oracle, meta):
    """Dynamo exports of BERT, DistilBERT, GPT-2 and ViT: half the heads go, outputs match."""
    model = hf_model(f"{family}-dynamo")
    pruned, report, p = oracle(model, {"ratio": 0.5})
    skipped = [(s.site, s.reason) for s in report.passes[0].skipped]
    assert not skipped and not report.passes[0].plan.skipped, f"dynamo export refused: {skipped}"
    assert json.loads(meta(pruned)["graphopt.heads"]) == [2, 2]
    assert report.passes[0].counters["heads_removed"] == 4
