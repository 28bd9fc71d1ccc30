"""Model factories for the depth-pruning tests: hand-built graphs and tiny Hugging Face exports.

Hand-built transformer (``stack``), one layer of it, pre-norm::

    x ─┬─ norm ─ Q,K,V ─ softmax(QKᵀ + mask) V ─ Wo ─┐
       └──────────────────────────────────────────── Add ─┬─ norm ─ W1 ─ act ─ W2 ─┐
                                                          └────────────────────── Add ─> next

post-norm puts the norm after each Add instead. Zeroing ``Wo`` (``W2``) makes the attention
(mlp) sub-block exactly the identity in pre-norm; in post-norm ``norm(x + 0) = x`` only when
``x`` is already normalized with unit gain and zero shift, which holds here because every
norm has γ=1, β=0 (see ``_post_norms`` for the Hugging Face case).

Hugging Face exports come from the root conftest (``hf_export``: tiny configs with random
weights, initializer range 0.2, so each layer really changes the stream), at 3 layers.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.testing import make_model

HIDDEN = 8


# --------------------------------------------------------------------------- hand-built


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


# --------------------------------------------------------------------------- Hugging Face

LAYERS = 3
# The layer each family's identity-layer tests zero; structure tests use the same exports
# so each (slow, for dynamo) export happens once per session.
IDENTITY_LAYER = {"bert": 1, "distilbert": 2, "gpt2": 1, "llama": 0, "llama-dynamo": 1}


@pytest.fixture(scope="session")
def identity_layer():
    return dict(IDENTITY_LAYER)


@pytest.fixture(scope="session")
def hf_model(hf_export):
    """``hf_model(family, identity=((layer, kind), ...))`` -> a fresh ModelProto of the root
    conftest's tiny export (``hf_export``) at 3 layers; ``FAMILY-dynamo`` at opset 23."""
    return lambda family, identity=(): hf_export(family, identity, layers=LAYERS,
                                                 dynamo_opset=23)
