"""prune-layers: config, choice by block influence, exact removal of identity blocks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.errors import ConfigError, PassError
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.core.config import parse_pass_spec
from graphopt.testing import assert_equivalent


def _prune(model: onnx.ModelProto, ctx: Context | None = None, **options):
    """Run prune-layers through the manager on a copy; return (pruned, pass report)."""
    work = graphopt.load(model)
    out, report = PassManager([build_pass("prune-layers", options)]).run(work, ctx or Context())
    return out, report.passes[0]


def _kept(model: onnx.ModelProto, key: str = "graphopt.layers") -> list[int]:
    return json.loads({p.key: p.value for p in model.metadata_props}[key])


# --------------------------------------------------------------------------- config


def test_cli_spelling_of_indices():
    """`prune-layers:indices=3,4,kind=mlp` parses into a tuple of ints and a kind."""
    name, options = parse_pass_spec("prune-layers:indices=3,4,kind=mlp")
    p = build_pass(name, options)
    assert p.config.indices == (3, 4) and p.config.kind == "mlp" and p.config.count is None


@pytest.mark.parametrize("options, message", [
    ({"count": 1, "ratio": 0.5}, "not count and ratio"),
    ({"count": 0}, "count must be at least 1"),
    ({"ratio": "1.5"}, "ratio must be between 0 and 1"),
    ({"indices": "1,1"}, "indices repeat"),
    ({"indices": "-1"}, "non-negative"),
    ({"kind": "conv"}, "is not one of"),
    ({"importance": "magnitude"}, "is not one of"),
])
def test_config_rejects_bad_options(options, message):
    """Out-of-range or conflicting options are ConfigErrors naming the problem."""
    with pytest.raises(ConfigError, match=message):
        build_pass("prune-layers", options)


def test_removing_every_layer_is_refused(make_stack):
    """count equal to the number of layers: ConfigError, and the manager rolls back."""
    model = make_stack(3)
    p = build_pass("prune-layers", {"count": 3})
    with pytest.raises(ConfigError, match="at least one must stay"):
        p.run(graphopt.load(model), Context())
    with pytest.raises(PassError, match="cannot remove 3 of 3 layer blocks"):
        _prune(model, count=3)


def test_index_out_of_range_is_refused(make_stack):
    """indices=5 on a 3-layer model names the valid range."""
    with pytest.raises(ConfigError, match=r"index 5 is out of range.*0\.\.2"):
        build_pass("prune-layers", {"indices": "5"}).run(make_stack(3), Context())


def test_ratio_rounding(make_stack):
    """ratio=0.34 of 3 layers removes 1; ratio=0.1 rounds to 0 and is a skip, unchanged."""
    model = make_stack(3)
    out, entry = _prune(model, ratio=0.34)
    assert entry.counters["blocks_removed"] == 1 and len(_kept(out)) == 2
    out, entry = _prune(model, ratio=0.1)
    assert entry.status == "unchanged"
    assert "rounds to 0" in entry.skipped[0].reason


def test_no_stream_is_a_skip():
    """A model without residuals is left unchanged with the reason."""
    from onnx import helper

    from graphopt.testing import make_model

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, {"x": (2, 4)}, ["y"], {"w": np.ones((4, 4), np.float32)})
    _, entry = _prune(model)
    assert entry.status == "unchanged"
    assert "no layer blocks found" in entry.skipped[0].reason


# --------------------------------------------------------------------------- hand-built graphs


@pytest.mark.parametrize("norm", ["layernorm", "rms_decomposed", "rms_op"])
def test_prenorm_identity_layer_is_chosen_and_removed_exactly(make_stack, stack_feeds, norm):
    """Pre-norm: layer 1 with zeroed output projections is x + 0 + 0; block influence picks it
    and the pruned model equals the original."""
    model = make_stack(3, norm=norm, zero=((1, "attention"), (1, "mlp")))
    out, entry = _prune(model, count=1)
    assert _kept(out) == [0, 2]
    assert entry.counters == {"blocks_removed": 1, "blocks_before": 3, "blocks_after": 2,
                              "nodes_removed": entry.counters["nodes_removed"]}
    assert sum(n.op_type == "Softmax" for n in out.graph.node) == 2
    assert_equivalent(model, out, stack_feeds)


@pytest.mark.parametrize("norm", ["layernorm", "layernorm_decomposed"])
def test_postnorm_identity_layer_is_chosen_and_removed_exactly(make_stack, stack_feeds, norm):
    """Post-norm: with γ=1, β=0 norms, LN(x + 0) = x for an already normalized x, so a zeroed
    layer is identity to float rounding; it is chosen, and removal matches the original."""
    model = make_stack(3, post=True, norm=norm, zero=((1, "attention"), (1, "mlp")))
    out, _ = _prune(model, count=1)
    assert _kept(out) == [0, 2]
    assert_equivalent(model, out, stack_feeds)


def test_last_layer_whose_exit_is_the_graph_output(make_stack, stack_feeds):
    """Post-norm, last layer identity: its exit is the graph output 'y', which becomes an
    Identity of the layer's entry."""
    model = make_stack(3, post=True, zero=((2, "attention"), (2, "mlp")))
    out, _ = _prune(model, indices=(2,))
    assert _kept(out) == [0, 1]
    assert [o.name for o in out.graph.output] == ["y"]
    assert_equivalent(model, out, stack_feeds)


def test_adjacent_layers_removed_together(make_stack, stack_feeds):
    """Layers 1 and 2 both identity, removed in one pass: the rewiring follows the chain."""
    model = make_stack(4, zero=((1, "attention"), (1, "mlp"), (2, "attention"), (2, "mlp")))
    out, _ = _prune(model, count=2)
    assert _kept(out) == [0, 3]
    assert_equivalent(model, out, stack_feeds)


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_sub_block_kind(make_stack, stack_feeds, kind):
    """kind=attention / kind=mlp removes only that sub-block of the identity layer."""
    model = make_stack(3, zero=((2, kind),))
    out, _ = _prune(model, kind=kind, count=1)
    assert _kept(out, f"graphopt.layers.{kind}") == [0, 1]
    softmaxes = sum(n.op_type == "Softmax" for n in out.graph.node)
    assert softmaxes == (2 if kind == "attention" else 3)
    assert_equivalent(model, out, stack_feeds)


def test_resnet_identity_block(make_resnet):
    """ResNet: a zeroed second conv gives Relu(x + 0) = x (x is a Relu output); it is chosen
    and removed exactly."""
    model = make_resnet(3, zero=(1,))
    out, _ = _prune(model, count=1)
    assert _kept(out) == [0, 2]
    assert sum(n.op_type == "Conv" for n in out.graph.node) == 5
    assert_equivalent(model, out, input_shapes={"image": (2, 3, 8, 8)})


def test_importance_last_removes_the_final_layers(make_stack):
    """importance=last ignores data and drops the blocks nearest the output."""
    out, _ = _prune(make_stack(4), importance="last", count=2)
    assert _kept(out) == [0, 1]


def test_second_run_keeps_original_numbers(make_stack):
    """Metadata maps through an earlier run: removing index 0 twice leaves original layer 2."""
    out, _ = _prune(make_stack(3), indices=(0,))
    out, _ = _prune(out, indices=(0,))
    assert _kept(out) == [2]


def test_unremovable_block_is_skipped_never_chosen(make_stack):
    """Layer 1 is identity but its keys are a graph output: it is a skip with that reason,
    and count=1 removes another layer; indices=1 changes nothing."""
    model = make_stack(3, zero=((1, "attention"), (1, "mlp")), leak_key=1)
    out, entry = _prune(model, count=1)
    assert 1 in _kept(out) and len(_kept(out)) == 2
    assert any(s.site.startswith("layer 1") and "graph output" in s.reason for s in entry.skipped)
    _, entry = _prune(model, indices=(1,))
    assert entry.status == "unchanged"


def test_block_influence_scores(make_stack, stack_feeds):
    """Identity blocks score 0; others score above 0; padding tokens are left out."""
    from graphopt.analysis.structure import find_structure
    from graphopt.passes.layers import block_influence

    model = make_stack(3, zero=((0, "attention"), (0, "mlp")))
    blocks = find_structure(model).layers
    scores = block_influence(model, blocks, [stack_feeds, stack_feeds])
    assert scores[blocks[0].exit] == pytest.approx(0.0, abs=1e-6)
    assert scores[blocks[1].exit] > 1e-3 and scores[blocks[2].exit] > 1e-3


# --------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "llama-dynamo"])
def test_hf_identity_layer_chosen_and_removed_exactly(hf_layers_model, token_feeds, identity_layer,
                                                      family):
    """Tiny HF exports with one layer made identity in torch (output projections zeroed; for
    post-LN also unit/zero LayerNorms around it; DistilBERT's is the last layer, whose exit
    is the graph output): block influence on generated calibration data picks that layer,
    and the pruned model equals the original to ~1e-5."""
    layer = identity_layer[family]
    model = hf_layers_model(family, ((layer, "layer"),))
    out, entry = _prune(model, count=1)
    assert entry.status == "changed", entry.error
    assert _kept(out) == [i for i in range(3) if i != layer]
    # ORT 1.31 runs the opset-23 RotaryEmbedding of torch's dynamo export at batch 1 only
    # (its cos/sin caches keep batch 1), in the original model as in the pruned one.
    batch = 1 if family.endswith("dynamo") else 2
    assert_equivalent(model, out, token_feeds(model, batch=batch), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family, layer, kind", [("gpt2", 2, "attention"), ("llama", 1, "mlp")])
def test_hf_identity_sub_block(hf_layers_model, token_feeds, family, layer, kind):
    """Pre-LN sub-blocks: a zeroed attention (GPT-2) or mlp (LLaMA) projection is exactly
    x + 0; kind=attention/mlp picks and removes it."""
    model = hf_layers_model(family, ((layer, kind),))
    out, _ = _prune(model, kind=kind, count=1)
    assert _kept(out, f"graphopt.layers.{kind}") == [i for i in range(3) if i != layer]
    assert_equivalent(model, out, token_feeds(model), atol=1e-5, rtol=1e-4)


def test_hf_first_layer_keeps_shape_only_side_products(hf_layers_model, token_feeds):
    """BERT's TorchScript export builds the attention mask from Shape(embeddings) inside
    layer 0's region; removing an identity layer 0 keeps those nodes and stays exact."""
    from graphopt.analysis.structure import find_structure

    model = hf_layers_model("bert", ((0, "layer"),))
    block = find_structure(model).layers[0]
    out, entry = _prune(model, indices=(0,))
    assert 0 < entry.counters["nodes_removed"] < len(block.nodes)
    assert _kept(out) == [1, 2]
    assert_equivalent(model, out, token_feeds(model), atol=1e-5, rtol=1e-4)
