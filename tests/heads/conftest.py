"""Fixtures for the head-pruning tests: tiny Hugging Face exports and the masked oracle.

The oracle: run ``prune-heads`` through the pass manager, and separately zero the removed
heads' rows of the output projection in the original (``mask_units``); both run through
onnxruntime on the same token inputs and must agree to ~1e-5, and the masked model must
differ from the original (the removed heads mattered).

Exports are tiny (hidden 32, 4 heads of 8, 2 layers, random weights with initializer range
0.2) and cached per session by family.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.prune.apply import mask_units
from graphopt.ir.inputs import generate_inputs
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.testing import run

LAYERS = 2
VOCAB = 100


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _hf_model(family: str):
    family = family.removesuffix("-dynamo")
    import torch
    import transformers as tf

    torch.manual_seed(0)
    small = {"vocab_size": VOCAB, "max_position_embeddings": 64, "initializer_range": 0.2}
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                            intermediate_size=64, **small)
        return tf.BertModel(cfg, add_pooling_layer=False)
    if family == "distilbert":
        cfg = tf.DistilBertConfig(dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=64, **small)
        return tf.DistilBertModel(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=LAYERS,
                            n_head=4, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
        return tf.GPT2Model(cfg)
    if family.startswith("llama"):
        # GQA: 4 query heads share 2 key/value heads; RoPE; SwiGLU MLP
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, **small)
        return tf.LlamaModel(cfg)
    if family == "vit":
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                           intermediate_size=64, image_size=16, patch_size=8,
                           initializer_range=0.2)
        return tf.ViTModel(cfg, add_pooling_layer=False)
    raise ValueError(family)


def _randomize(model) -> None:
    """Random norm gains and biases so no head is trivially equal to another."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) \
                    is not None:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))


def export_hf(family: str, path: Path) -> Path:
    """Export a tiny ``family`` model returning ``last_hidden_state`` (TorchScript opset 17,
    or torch dynamo opset 18 for ``*-dynamo``)."""
    import torch

    model = _hf_model(family).eval()
    _randomize(model)
    base = family.removesuffix("-dynamo")
    if base == "vit":
        names = ["pixel_values"]
        args = (torch.randn(2, 3, 16, 16),)
    else:
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if base == "bert" else [])
        ids = torch.randint(1, VOCAB, (2, 8))
        args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if base == "bert"
                                              else ())
    extra = {"use_cache": False} if base in ("gpt2", "llama") else {}

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            kwargs = dict(zip(names, inputs), **extra)
            return self.model(**kwargs).last_hidden_state

    options = {"input_names": names, "output_names": ["last_hidden_state"]}
    if family.endswith("dynamo"):
        dim = {0: torch.export.Dim("batch", max=64)}
        if base != "vit":  # images: only the batch is dynamic (dim 1 is channels)
            dim[1] = torch.export.Dim("seq", max=64)
        options.update(dynamo=True, opset_version=18, dynamic_shapes=(tuple(dim for _ in names),))
    else:
        axes = {0: "batch"} if base == "vit" else {0: "batch", 1: "seq"}
        options.update(dynamo=False, opset_version=17,
                       dynamic_axes={n: axes for n in names})
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper().eval(), args, str(path), **options)
    return path


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """``hf_model(family)`` -> a fresh ModelProto of the tiny export (cached file)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_heads")
    cache: dict[str, Path] = {}

    def get(family: str) -> onnx.ModelProto:
        if family not in cache:
            cache[family] = export_hf(family, folder / f"{family}.onnx")
        return graphopt.load(cache[family])

    return get


def feeds_for(model: onnx.ModelProto, seed: int = 5, batch: int = 2, seq: int = 10):
    """Token ids in [1, VOCAB) with a ragged mask, or images, for the tiny exports."""
    names = {i.name for i in model.graph.input}
    if "pixel_values" in names:
        return generate_inputs(model, {"pixel_values": (batch, 3, 16, 16)}, seed=seed)
    feeds = generate_inputs(model, {"input_ids": (batch, seq)}, seed=seed, ragged=True)
    feeds["input_ids"] = np.clip(feeds["input_ids"], 1, VOCAB - 1)
    return feeds


def _compare(expected, got, atol: float) -> float:
    worst = 0.0
    for name, ref in expected.items():
        assert got[name].shape == ref.shape, name
        scale = max(1.0, float(np.abs(ref).max()))
        worst = max(worst, float(np.abs(got[name].astype(np.float64) - ref).max()) / scale)
    assert worst <= atol, f"masked and pruned outputs differ by {worst:.3g} (relative)"
    return worst


def masked_heads(model: onnx.ModelProto, options: dict | None = None, *, ctx=None,
                 feeds=None, atol: float = 1e-5):
    """Run prune-heads, mask the same heads in the original, assert equal outputs.

    Returns (pruned model, report, pass object)."""
    feeds = feeds or feeds_for(model)
    ctx = ctx or Context(calibration=[feeds_for(model, seed=s) for s in (1, 2)])
    # the oracle compares with masked weights: no refit (reconstruct has its own tests)
    options = {"reconstruct": "none", **(options or {"ratio": 0.5})}
    pass_obj = build_pass("prune-heads", options)
    pruned, report = PassManager([pass_obj]).run(copy_model(model), ctx)
    assert report.ok, report.passes[0].error
    plan = report.passes[0].plan
    assert plan.removal, f"nothing pruned; skipped: {plan.skipped}"
    masked = copy_model(model)
    mask_units(masked, plan.coupling, plan.removal)
    original = run(model, feeds)
    expected = run(masked, feeds)
    got = run(pruned, feeds)
    _compare(expected, got, atol)
    assert any(not np.allclose(original[k], expected[k], atol=1e-6) for k in original), \
        "masking changed nothing: the oracle is vacuous"
    return pruned, report, pass_obj


@pytest.fixture
def oracle():
    return masked_heads


@pytest.fixture
def token_feeds():
    return feeds_for


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture
def meta():
    return metadata
