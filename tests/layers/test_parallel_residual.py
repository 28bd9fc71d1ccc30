"""Parallel residual layers (GPT-J, Falcon, GPT-NeoX, PaLM): attention and MLP off the same
input, ``x + attn(ln x) + mlp(ln' x)``, in the three ways exporters sum them. Each layer is
one ``parallel`` block that prune-layers removes whole; sub-block kinds say why not.

One layer (``shared``: one norm for both branches; ``two-norm``: one each)::

    x ─┬─ ln ─┬─ Q,K,V ─ softmax(QKᵀ) V ─ Wo ─┐
       │      └─ W1 ─ relu ─ W2 ──────────────│──┐
       └───────────────────────────────── Add(x, attn) ─ Add(·, mlp) ─> next

``sum-first`` adds the branches first: ``Add(Add(attn, mlp), x)``; ``mlp-first`` swaps the
outer Add's inputs: ``Add(mlp, Add(x, attn))``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.analysis.structure import find_structure
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.testing import assert_equivalent

D, F = 8, 16
VARIANTS = ["shared", "two-norm", "sum-first", "mlp-first"]


def parallel_model(variant: str, layers: int = 3, zero: tuple[int, ...] = (),
                   seed: int = 0) -> onnx.ModelProto:
    """``layers`` parallel layers on x[batch, seq, 8]; ``zero``: layers whose Wo and W2 are
    zero (the layer is then exactly the identity)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def w(name, shape, scale=0.4, zeroed=False):
        value = np.zeros(shape) if zeroed else rng.standard_normal(shape) * scale
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def op(op_type, ins, out, **attrs):
        nodes.append(helper.make_node(op_type, ins, [out], **attrs))
        return out

    x = "x"
    for i in range(layers):
        p = f"l{i}."
        h1 = op("LayerNormalization", [x, w(p + "g", (D,), 1.0), w(p + "b", (D,), 0.1)],
                p + "h1", axis=-1)
        h2 = h1 if variant != "two-norm" else op(
            "LayerNormalization", [x, w(p + "g2", (D,), 1.0), w(p + "b2", (D,), 0.1)],
            p + "h2", axis=-1)
        q, k, v = (op("MatMul", [h1, w(p + n, (D, D))], p + n[1]) for n in ("wq", "wk", "wv"))
        s = op("MatMul", [q, op("Transpose", [k], p + "kt", perm=[0, 2, 1])], p + "s")
        c = op("MatMul", [op("Softmax", [s], p + "p", axis=-1), v], p + "c")
        a = op("MatMul", [c, w(p + "wo", (D, D), zeroed=i in zero)], p + "a")
        r = op("Relu", [op("MatMul", [h2, w(p + "w1", (D, F))], p + "u")], p + "r")
        m = op("MatMul", [r, w(p + "w2", (F, D), zeroed=i in zero)], p + "m")
        if variant == "sum-first":
            x = op("Add", [op("Add", [a, m], p + "am"), x], p + "out")
        elif variant == "mlp-first":
            x = op("Add", [m, op("Add", [x, a], p + "xa")], p + "out")
        else:
            x = op("Add", [op("Add", [x, a], p + "xa"), m], p + "out")
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "parallel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _masked(model: onnx.ModelProto, layer: int) -> onnx.ModelProto:
    """The oracle: ``layer``'s output projections (Wo, W2) zeroed in a copy."""
    out = graphopt.load(model)
    for t in out.graph.initializer:
        if t.name in (f"l{layer}.wo", f"l{layer}.w2"):
            t.CopyFrom(numpy_helper.from_array(np.zeros(list(t.dims), np.float32), t.name))
    return out


def _prune(model: onnx.ModelProto, **options):
    out, report = PassManager([build_pass("prune-layers", options)]).run(
        graphopt.load(model), Context())
    return out, report.passes[0]


FEEDS = {"x": np.random.default_rng(5).standard_normal((2, 5, D)).astype(np.float32)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_parallel_layer_is_one_block(variant):
    """Three layers, each one removable ``parallel`` block from its input to the outer Add
    (before, the block ended at the inner Add and held the attention alone, or was refused
    because the shared norm's output left it)."""
    structure = find_structure(parallel_model(variant))
    assert [b.kind for b in structure.sublayers] == ["parallel"] * 3
    layers = structure.layers
    assert [(b.entry, b.exit, b.removable) for b in layers] == [
        ("x", "l0.out", True), ("l0.out", "l1.out", True), ("l1.out", "y", True)]
    held = [parallel_model(variant).graph.node[i].output[0] for i in layers[1].nodes]
    assert "l1.a" in held and "l1.m" in held  # both branches are inside the block


@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_layer_chosen_and_removed_exactly(variant):
    """Layer 1 with Wo = W2 = 0 is x + 0 + 0: block influence picks it, and the pruned model
    equals the original."""
    model = parallel_model(variant, zero=(1,))
    out, entry = _prune(model, count=1)
    assert entry.counters["blocks_removed"] == 1
    assert sum(n.op_type == "Softmax" for n in out.graph.node) == 2
    assert not any(t.name.startswith("l1.") for t in out.graph.initializer)
    assert_equivalent(model, out, FEEDS)


@pytest.mark.parametrize("variant", ["shared", "mlp-first"])
def test_removal_equals_masked_layer(variant):
    """Random weights, layer 1 removed by index: the result equals the original with that
    layer's both output projections zeroed (masked equivalence), and differs from the
    original (the layer mattered)."""
    model = parallel_model(variant)
    out, _ = _prune(model, indices=(1,))
    assert_equivalent(_masked(model, 1), out, FEEDS)
    import onnxruntime as ort

    run = lambda m: ort.InferenceSession(m.SerializeToString(),  # noqa: E731
                                         providers=["CPUExecutionProvider"]).run(None, FEEDS)[0]
    assert np.abs(run(model) - run(out)).max() > 1e-2


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_sub_block_kinds_say_the_layers_are_parallel(kind):
    """kind=attention/mlp on parallel layers removes nothing and says why."""
    out, entry = _prune(parallel_model("shared"), kind=kind, count=1)
    assert entry.status == "unchanged"
    (skip,) = entry.skipped
    assert "in parallel off the same input" in skip.reason and "kind=layer" in skip.reason


@pytest.fixture(scope="module")
def neox_identity(tmp_path_factory):
    """A tiny Hugging Face GPT-NeoX (use_parallel_residual=True, 3 layers, TorchScript export)
    whose layer 1 has its attention and MLP output projections zeroed: x + 0 + 0."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from graphopt.exporters import export_hf

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, use_parallel_residual=True,
        bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModel.from_config(config).eval()
    layer = model.layers[1]
    with torch.no_grad():
        for linear in (layer.attention.dense, layer.mlp.dense_4h_to_h):
            linear.weight.zero_()
            linear.bias.zero_()
    path = export_hf(model, tmp_path_factory.mktemp("neox") / "neox.onnx",
                     exporter="torchscript")
    return graphopt.load(path)


def test_hf_gpt_neox_parallel_layers(neox_identity, token_feeds):
    """GPT-NeoX's parallel layers are three removable parallel blocks; block influence
    picks the zeroed layer 1 and the pruned model equals the original."""
    structure = find_structure(neox_identity)
    assert [b.kind for b in structure.sublayers] == ["parallel"] * 3
    assert all(b.removable for b in structure.layers)
    out, entry = _prune(neox_identity, count=1)
    assert entry.counters["blocks_removed"] == 1
    assert json.loads({p.key: p.value for p in out.metadata_props}["graphopt.layers"]) == [0, 2]
    assert_equivalent(neox_identity, out, token_feeds(neox_identity))
