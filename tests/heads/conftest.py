"""Fixtures for the head-pruning tests: tiny Hugging Face exports and the masked oracle.

The oracle: run ``prune-heads`` through the pass manager, and separately zero the removed
heads' rows of the output projection in the original (``mask_units``); both run through
onnxruntime on the same token inputs and must agree to ~1e-5, and the masked model must
differ from the original (the removed heads mattered).

Exports are the root conftest's tiny ones (``hf_export``: hidden 32, 4 heads of 8, random
weights with initializer range 0.2) at 2 layers, made once per session.
"""

from __future__ import annotations

import onnx
import pytest

from graphopt.core.contract import Context
from graphopt.core.registry import build_pass
from graphopt.testing import masked_equivalence, token_feeds

LAYERS = 2


@pytest.fixture(scope="session")
def hf_model(hf_export):
    """``hf_model(family)`` -> a fresh ModelProto of the tiny export (root ``hf_export``):
    2 layers; ``FAMILY-dynamo`` exports at opset 18."""
    return lambda family: hf_export(family, layers=LAYERS, dynamo_opset=18)


def masked_heads(model: onnx.ModelProto, options: dict | None = None, *, ctx=None,
                 feeds=None, atol: float = 1e-5):
    """Run prune-heads, mask the same heads in the original, assert equal outputs.

    Returns (pruned model, report, pass object)."""
    feeds = feeds or token_feeds(model)
    ctx = ctx or Context(calibration=[token_feeds(model, seed=s) for s in (1, 2)])
    # the oracle compares with masked weights: no refit (reconstruct has its own tests)
    options = {"reconstruct": "none", **(options or {"ratio": 0.5})}
    pass_obj = build_pass("prune-heads", options)
    pruned, report, _ = masked_equivalence(model, pass_obj=pass_obj, ctx=ctx, feeds=feeds,
                                           atol=atol, must_prune=True)
    return pruned, report, pass_obj


@pytest.fixture
def oracle():
    return masked_heads


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture
def meta():
    return metadata
