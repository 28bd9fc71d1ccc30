"""Swapped-token calibration copies (``graphopt.data.vary``) on a tiny embedding model."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.core.registry import build_pass
from graphopt.data.vary import replace_tokens, token_inputs
from graphopt.errors import ConfigError
from graphopt.testing import make_model


def _embedder():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"]),
             helper.make_node("Gather", ["T", "token_type_ids"], ["t"]),
             helper.make_node("Add", ["e", "t"], ["y"])]
    return make_model(nodes, [("input_ids", ["b", "s"], TensorProto.INT64),
                              ("token_type_ids", ["b", "s"], TensorProto.INT64)], ["y"],
                      {"E": rng.normal(size=(500, 4)).astype(np.float32),
                       "T": rng.normal(size=(2, 4)).astype(np.float32)})


def test_swaps_inner_real_tokens_for_vocabulary_ids():
    model = _embedder()
    assert token_inputs(model) == {"input_ids": 500}  # a 2-row table is no vocabulary
    ids = np.full((4, 40), 0, np.int64)
    mask = np.zeros((4, 40), np.int64)
    for r, n in enumerate((40, 30, 12, 3)):
        ids[r, :n] = [1] + [20 + (i % 7) for i in range(n - 2)] + [2]
        mask[r, :n] = 1
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (new,) = replace_tokens([feed], model, 0.5)
    changed = new["input_ids"] != ids
    inner = mask.astype(bool).copy()
    for r, n in enumerate((40, 30, 12, 3)):
        inner[r, 0] = inner[r, n - 1] = False
    assert not changed[~inner].any()  # pads, first and last tokens stay
    assert 0.3 < changed[inner].mean() < 0.7
    assert new["input_ids"][changed].min() >= 20 and new["input_ids"].max() < 500
    assert (new["token_type_ids"] == 0).all() and (feed["input_ids"] == ids).all()
    assert replace_tokens([feed], model, 0.0) == []


def test_swap_tokens_option_is_checked():
    with pytest.raises(ConfigError, match="swap_tokens"):
        build_pass("prune", {"macs": 0.5, "swap_tokens": 1.0})
