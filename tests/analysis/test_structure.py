"""Residual stream and block detection (graphopt.analysis.structure)."""

from __future__ import annotations

import pytest

from graphopt.analysis.structure import find_structure

FAMILY_NORM = {"bert": "post", "distilbert": "post", "gpt2": "pre", "llama": "pre",
               "llama-dynamo": "pre"}


def _kinds(structure):
    return [(b.index, b.kind) for b in structure.sublayers]


@pytest.mark.parametrize("norm", ["layernorm", "rms_decomposed", "rms_op"])
def test_prenorm_stack_layers_and_sub_blocks(make_stack, norm):
    """Pre-norm stack (LayerNormalization, decomposed RMSNorm, RMSNormalization op): 3 layers
    of attention + mlp, each sub-block from its skip input to its Add."""
    model = make_stack(3, norm=norm)
    s = find_structure(model)
    assert s.norm == "pre"
    assert len(s.layers) == 3
    assert _kinds(s) == [(i, k) for i in range(3) for k in ("attention", "mlp")]
    assert all(b.removable and b.norm == "pre" for b in s.layers + s.sublayers)
    assert s.stream[0] == "x"
    adds = {n.output[0] for n in model.graph.node if n.op_type == "Add"}
    assert all(b.exit in adds for b in s.sublayers)
    for a, b in zip(s.sublayers, s.sublayers[1:]):
        assert a.exit == b.entry


@pytest.mark.parametrize("norm", ["layernorm", "layernorm_decomposed"])
def test_postnorm_stack_exit_is_the_norm_output(make_stack, norm):
    """Post-norm stack (LayerNormalization op or decomposed Reduce/Sub/Div form): each block
    ends at the norm after its Add, the next block's skip input."""
    model = make_stack(3, post=True, norm=norm)
    s = find_structure(model)
    assert s.norm == "post"
    assert len(s.layers) == 3
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    last_op = "LayerNormalization" if norm == "layernorm" else "Add"
    assert all(producers[b.exit] == last_op for b in s.sublayers[:-1])
    assert all(b.norm == "post" and b.removable for b in s.layers)
    # the final norm's output passes through an Identity to the graph output
    assert s.layers[-1].exit == s.stream[-1] == "y"


def test_gelu_polynomial_add_is_not_a_residual(make_stack):
    """tanh-GELU's Add(h, 0.044715·h³) has no weights on its branch: not a block."""
    s = find_structure(make_stack(2, gelu=True))
    assert len(s.layers) == 2
    assert len(s.sublayers) == 4


def test_resnet_residual_blocks(make_resnet):
    """ResNet: Relu(x + conv(relu(conv x))) blocks are 'residual' layers ending at the Relu."""
    model = make_resnet(3)
    s = find_structure(model)
    assert [b.kind for b in s.sublayers] == ["residual"] * 3
    assert len(s.layers) == 3 and s.norm == "post"
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(producers[b.exit] == "Relu" for b in s.layers)


def test_no_residual_gives_empty_structure():
    """A plain MatMul chain has no stream: no layers, no style."""
    import numpy as np
    from onnx import helper

    from graphopt.testing import make_model

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, {"x": (2, 4)}, ["y"], {"w": np.ones((4, 4), np.float32)})
    s = find_structure(model)
    assert s.layers == () and s.norm == "" and s.stream == ()


def test_kv_cache_output_makes_the_block_unremovable(make_stack):
    """A key projection that is also a graph output (KV cache) leaves the block: layer 1 and
    its attention are found but not removable, with the tensor named in the reason."""
    s = find_structure(make_stack(3, leak_key=1))
    assert len(s.layers) == 3
    layer, attn = s.layers[1], s.blocks("attention")[1]
    assert not layer.removable and not attn.removable
    assert "graph output" in layer.reason and "graph output" in attn.reason
    assert s.layers[0].removable and s.layers[2].removable and s.blocks("mlp")[1].removable


def test_tensor_used_by_a_later_layer_makes_the_block_unremovable(make_stack):
    """Layer 0's keys feeding layer 1's attention: layer 0 is not single-exit."""
    s = find_structure(make_stack(3, cross_layer=0))
    assert len(s.layers) == 3
    assert not s.layers[0].removable
    assert "outside it" in s.layers[0].reason
    assert s.layers[1].removable and s.layers[2].removable


@pytest.mark.parametrize("family", list(FAMILY_NORM))
def test_hf_exports_layer_count(hf_layers_model, identity_layer, family):
    """Tiny BERT/DistilBERT (post-LN), GPT-2 and LLaMA (pre-LN; TorchScript, and dynamo opset
    23 with Attention/RMSNormalization/RotaryEmbedding ops): 3 removable layers of attention
    + mlp each (the exports shared with the identity-layer tests)."""
    s = find_structure(hf_layers_model(family, ((identity_layer[family], "layer"),)))
    assert s.norm == FAMILY_NORM[family]
    assert len(s.layers) == 3
    assert all(b.removable for b in s.layers + s.sublayers), [b.reason for b in s.layers]
    assert _kinds(s) == [(i, k) for i in range(3) for k in ("attention", "mlp")]
    if FAMILY_NORM[family] == "post":
        assert s.stream[-1] == "last_hidden_state"


def test_minilm_real_export_has_six_post_norm_layers(minilm):
    """all-MiniLM-L6-v2 (real weights, TorchScript export): 6 post-LN layers; layer 0 also
    holds the mask built from Shape(embeddings), which may leave it (shape-only)."""
    import graphopt

    s = find_structure(graphopt.load(minilm))
    assert s.norm == "post" and len(s.layers) == 6
    assert all(b.removable for b in s.layers)
    assert s.stream[-1] == "last_hidden_state"
