"""prune-heads on GQA exported with SDPA (8 query heads sharing 2 KV heads), masked
equivalence: a unit is one KV head with its 4 query heads.

1. a hand-written block whose ``repeat_kv`` is ``k[:, :, None].expand(...).reshape(...)``,
   TorchScript export: the Expand target is ``Where(Equal(s, -1), ones, s)`` over a Concat
   of runtime and constant pieces, and must shrink with the KV heads;
2. the same block calling ``scaled_dot_product_attention(..., enable_gqa=True)``, dynamo
   export (torch's decomposition repeats K/V itself);
3. ``transformers.LlamaModel`` (RoPE, SwiGLU, ``attn_implementation="sdpa"``), dynamo
   export at opset 23: ONNX ``Attention``, ``RotaryEmbedding`` and ``RMSNormalization``,
   with cos/sin caches whose sequence dim shape inference leaves symbolic.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest

from graphopt.core.contract import Context
from graphopt.ir.inputs import generate_inputs
from graphopt.testing import llama_gqa

H, KV, D, E = 8, 2, 8, 64


def _block(mode: str):
    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(E, H * D, bias=False)
            self.k = torch.nn.Linear(E, KV * D, bias=False)
            self.v = torch.nn.Linear(E, KV * D, bias=False)
            self.o = torch.nn.Linear(H * D, E, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q = self.q(x).view(b, t, H, D).transpose(1, 2)
            k = self.k(x).view(b, t, KV, D).transpose(1, 2)
            v = self.v(x).view(b, t, KV, D).transpose(1, 2)
            if mode == "enable_gqa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                k = k[:, :, None].expand(b, KV, H // KV, t, D).reshape(b, H, t, D)
                v = v[:, :, None].expand(b, KV, H // KV, t, D).reshape(b, H, t, D)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return x + self.o(y.transpose(1, 2).reshape(b, t, H * D))

    return Block()


@pytest.fixture(scope="session")
def gqa_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    import graphopt

    folder = tmp_path_factory.mktemp("gqa")
    cache = {}

    def get(kind: str):
        if kind in cache:
            return graphopt.load(cache[kind])
        torch.manual_seed(0)
        path = folder / f"{kind}.onnx"
        llama = kind == "llama-opset23"
        if llama:
            pytest.importorskip("transformers")
        module = (llama_gqa(hidden=H * D, layers=2, heads=H, kv_heads=KV, intermediate=96)
                  if llama else _block(kind)).eval()
        name = "input_ids" if llama else "x"
        arg = torch.randint(1, 100, (1, 8)) if llama else torch.randn(2, 7, E)
        options = {"input_names": [name], "output_names": ["y"]}
        if kind == "expand":
            options.update(dynamo=False, opset_version=17,
                           dynamic_axes={name: {0: "b", 1: "t"}})
        else:
            options.update(dynamo=True, opset_version=23 if llama else 18, dynamic_shapes=(
                {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("t", max=64)},))
        with torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (arg,), str(path), **options)
        cache[kind] = path
        return graphopt.load(path)

    return get


def _feeds(model, seed: int):
    if model.graph.input[0].name == "input_ids":
        # batch 1: the opset-23 export's RotaryEmbedding refuses batch > 1 in ORT 1.32
        rng = np.random.default_rng(seed)
        return {"input_ids": rng.integers(1, 100, (1, 8)).astype(np.int64)}
    return generate_inputs(model, {"x": (2, 7, E)}, seed=seed)


@pytest.mark.parametrize("kind", ["expand", "enable_gqa", "llama-opset23"])
def test_gqa_sdpa_masked_equivalence(kind, gqa_model, oracle, meta):
    """Half the KV heads go with their query heads; pruned and masked outputs match."""
    model = gqa_model(kind)
    ctx = Context(calibration=[_feeds(model, s) for s in (1, 2)])
    pruned, report, p = oracle(model, {"ratio": 0.5}, feeds=_feeds(model, 3), ctx=ctx)
    entry = report.passes[0]
    assert not entry.skipped, entry.skipped
    blocks = report.passes[0].plan.blocks
    assert [(b.heads_per_unit, b.head_dim, b.kv_heads) for b in blocks] == \
        [(H // KV, D, KV)] * len(blocks)
    assert json.loads(meta(pruned)["graphopt.heads"]) == [H // 2] * len(blocks)
    assert json.loads(meta(pruned)["graphopt.kv_heads"]) == [KV // 2] * len(blocks)
