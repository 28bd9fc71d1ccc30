"""prune-heads on packed Q/K/V (nn.MultiheadAttention, nn.TransformerEncoderLayer) and on
GQA exported with SDPA: dynamo exports, masked equivalence.

nn.MultiheadAttention projects Q, K and V with one MatMul to 3·E, reshapes to
``[S, B, 3, E]`` and picks Q, K, V with Gather; heads are merged with the batch
(``[S, B*H, D]``). A unit is one head across the three parts of the packed weight.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest

from graphopt.ir.inputs import generate_inputs
from graphopt.core.contract import Context

E, HEADS, SEQ = 32, 4, 7


def _export(module, path, *, seq_first: bool = False):
    import torch

    x = torch.randn(SEQ, 2, E) if seq_first else torch.randn(2, SEQ, E)
    dims = ({0: torch.export.Dim("s", max=64), 1: torch.export.Dim("b", max=64)} if seq_first
            else {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("s", max=64)})
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), input_names=["x"],
                          output_names=["y"], dynamo=True, opset_version=18,
                          dynamic_shapes=(dims,))
    return path


@pytest.fixture(scope="session")
def packed_models(tmp_path_factory):
    """ViT-like encoder (2 nn.TransformerEncoderLayer, pre-norm) and a sequence-first
    nn.MultiheadAttention block, exported once."""
    torch = pytest.importorskip("torch")
    import graphopt

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("packed")

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(E, HEADS, 64, dropout=0.0,
                                                     batch_first=True, norm_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x):
            return self.enc(x)

    class SeqFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(E, HEADS)
            self.out = torch.nn.Linear(E, E)

        def forward(self, x):
            return self.out(x + self.attn(x, x, x, need_weights=False)[0])

    def randomized(module):
        """Random biases and norm gains: torch starts them at 0 and 1, so layers would share
        them (the exporter deduplicates equal constants) and heads would look alike."""
        with torch.no_grad():
            for name, param in module.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    param.add_(0.3 * torch.randn_like(param))
        return module

    paths = {"encoder": _export(randomized(Encoder()), folder / "encoder.onnx"),
             "mha": _export(randomized(SeqFirst()), folder / "mha.onnx", seq_first=True)}
    return lambda name: graphopt.load(paths[name])


def _feeds(model, seed, seq_first=False):
    shape = (SEQ, 3, E) if seq_first else (3, SEQ, E)
    return generate_inputs(model, {"x": shape}, seed=seed)


@pytest.mark.parametrize("name", ["encoder", "mha"])
def test_packed_qkv_masked_equivalence(name, packed_models, oracle, meta):
    """Half the heads of every packed in-projection go, the same heads from Q, K and V;
    pruned and masked outputs match; graphopt.heads records 2 per layer."""
    model = packed_models(name)
    seq_first = name == "mha"
    ctx = Context(calibration=[_feeds(model, s, seq_first) for s in (1, 2)])
    pruned, report, p = oracle(model, {"ratio": 0.5}, feeds=_feeds(model, 3, seq_first),
                               ctx=ctx)
    entry = report.passes[0]
    assert not entry.skipped, entry.skipped
    layers = 2 if name == "encoder" else 1
    assert json.loads(meta(pruned)["graphopt.heads"]) == [2] * layers
    assert entry.counters["heads_removed"] == 2 * layers
    weights = {i.name: i for i in pruned.graph.initializer}
    half = 3 * E // 2
    packed = [w for w in weights.values() if half in w.dims and int(np.prod(w.dims)) in
              (half, half * E)]
    assert len(packed) == 2 * layers  # in_proj weight and bias sliced to 3·E/2
    got = np.asarray(report.passes[0].plan.scores[report.passes[0].plan.blocks[0].group.id])
    assert got.shape == (HEADS,)
