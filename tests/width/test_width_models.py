"""Masked equivalence of prune-channels / prune-neurons on torch.nn models exported to ONNX."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.analysis.coupling import analyze
from graphopt.analysis.cost import count_cost
from graphopt.core.contract import Context
from graphopt.passes.width import PruneChannels, PruneNeurons

pytest.importorskip("torch", reason="these models are built and exported with torch")


def _prune(wt, model, cls, ctx=None, **options):
    pruned, report, removal = wt.masked_equivalence(model, pass_obj=cls(**options), ctx=ctx)
    entry = report.passes[0]
    assert entry.status == "changed"
    assert entry.counters["units_pruned"] == sum(len(u) for u in removal.values()) > 0
    assert entry.params_after < entry.params_before
    return pruned, entry


def test_resnet_bottlenecks_with_projection_shortcuts(wt):
    """ResNet-style: bottlenecks, projection shortcuts, residual stages pruned as one group."""
    m = wt.models
    net = m.ResNet()
    wt.randomize_norms(net)
    model = wt.export(net, (m.torch.randn(1, 3, 32, 32),))
    pruned, entry = _prune(wt, model, PruneChannels, ratio=0.5)
    groups = [g for g in analyze(model).groups if g.kind == "channels"]
    # stem + 2 per bottleneck (c1, c2) + one per residual stage
    assert sum(g.prunable for g in groups) == 1 + 2 * 3 + 2
    assert count_cost(pruned).macs < 0.5 * count_cost(model).macs


def test_resnet_dynamo_export(wt):
    """The same ResNet through the dynamo exporter (Reshape with a constant target)."""
    m = wt.models
    net = m.ResNet(widths=(4, 8), blocks=(1, 1))
    wt.randomize_norms(net)
    model = wt.export(net, (m.torch.randn(1, 3, 16, 16),), dynamo=True)
    _prune(wt, model, PruneChannels, ratio=0.5, round_to=2)


def test_mobilenetv2_depthwise_inverted_residuals(wt):
    """MobileNetV2-style: depthwise conv couples its input and output channels."""
    m = wt.models
    net = m.MobileNetV2()
    wt.randomize_norms(net)
    model = wt.export(net, (m.torch.randn(1, 3, 32, 32),))
    pruned, entry = _prune(wt, model, PruneChannels, ratio=0.5)
    depthwise = [n for n in pruned.graph.node if n.op_type == "Conv" and
                 any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert depthwise
    shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    for n in depthwise:
        group = next(a.i for a in n.attribute if a.name == "group")
        assert shapes[n.input[1]][0] == group  # still depthwise after pruning


def test_densenet_concat_block(wt):
    """DenseNet-style: concatenated features; the transition conv loses matching inputs."""
    m = wt.models
    net = m.DenseBlock()
    wt.randomize_norms(net)
    model = wt.export(net, (m.torch.randn(1, 3, 8, 8),))
    _prune(wt, model, PruneChannels, ratio=0.5)


def test_squeeze_excite_block(wt):
    """SE block: ReduceMean over H, W, two Linear layers and a broadcast Mul couple."""
    m = wt.models
    model = wt.export(m.SqueezeExcite(), (m.torch.randn(4, 3, 8, 8),))
    groups = analyze(model).groups
    conv_group = next(g for g in groups if g.source_op == "Conv" and g.size == 16)
    assert conv_group.prunable, conv_group.reason
    assert any("fc2" in label or "Gemm" in label for label in conv_group.members)
    _prune(wt, model, PruneChannels, ratio=0.5)
    _prune(wt, model, PruneNeurons, ratio=0.5)


def test_mlp_classifier_neurons(wt):
    """MLP: Gemm hidden units pruned; the logits group is a graph output."""
    m = wt.models
    model = wt.export(m.MLP(), (m.torch.randn(2, 12),))
    pruned, entry = _prune(wt, model, PruneNeurons, ratio=0.5, round_to=4)
    assert entry.counters["groups_pruned"] == 2
    assert any("graph output" in s.reason for s in entry.skipped)
    dims = sorted(tuple(i.dims) for i in pruned.graph.initializer if len(i.dims) == 2)
    assert (16, 12) in dims and (12, 16) in dims


def test_mlp_global_scope(wt):
    """Global ranking over two MLP layers removes the requested share in total."""
    m = wt.models
    model = wt.export(m.MLP(), (m.torch.randn(2, 12),))
    _, entry = _prune(wt, model, PruneNeurons, ratio=0.5, scope="global")
    assert entry.counters["units_pruned"] == (32 + 24) // 2


def test_flatten_gemm_head(wt):
    """Flatten C×H×W into a Gemm: each channel removes a block of H×W features."""
    m = wt.models
    model = wt.export(m.FlattenHead(), (m.torch.randn(1, 3, 8, 8),))
    group = next(g for g in analyze(model).groups if g.source_op == "Conv")
    assert group.prunable and max(v.shape[1] for v in group.index.values()) == 16
    pruned, _ = _prune(wt, model, PruneChannels, ratio=0.5)
    fc = next(i for i in pruned.graph.initializer if tuple(i.dims)[0] == 5 and len(i.dims) == 2)
    assert tuple(fc.dims) == (5, 3 * 16)


@pytest.mark.parametrize("act,opset", [("gelu", 17), ("tanh_gelu", 17), ("silu", 17),
                                       ("gelu", 20)])
def test_transformer_ffn_decomposed_activations(wt, act, opset):
    """FFN on [batch, seq, hidden]: MatMul + bias + GELU (erf/tanh forms or op) / x·sigmoid(x)."""
    m = wt.models
    model = wt.export(m.FFN(act=act), (m.torch.randn(2, 5, 16),), opset=opset)
    _, entry = _prune(wt, model, PruneNeurons, ratio=0.5)
    assert entry.counters["neurons_removed"] == 16


def test_activation_importance_on_resnet(wt):
    """Activation (mean |a|) and APoZ importance read calibration data through ORT."""
    m = wt.models
    net = m.ResNet(widths=(4, 8), blocks=(1, 1))
    wt.randomize_norms(net)
    model = wt.export(net, (m.torch.randn(1, 3, 16, 16),))
    for importance in ("activation", "apoz"):
        _prune(wt, model, PruneChannels, ctx=Context(calibration_batches=2), ratio=0.25,
               importance=importance)


def test_dynamic_batch_export(wt):
    """A model exported with a symbolic batch dim is analyzed with the default batch."""
    m = wt.models
    model = wt.export(m.MLP(), (m.torch.randn(2, 12),), dynamic_batch=True)
    _prune(wt, model, PruneNeurons, ratio=0.25, ctx=Context(input_shapes={"x": (3, 12)}))


def test_pruned_model_keeps_finite_outputs_and_fewer_macs(wt):
    """Pruning 50% of ResNet channels cuts MACs by more than half (quadratic in width)."""
    m = wt.models
    net = m.ResNet()
    model = wt.export(net, (m.torch.randn(1, 3, 32, 32),))
    pruned, _ = _prune(wt, model, PruneChannels, ratio=0.5, importance="random")
    from graphopt.testing import run
    from graphopt.ir.inputs import generate_inputs

    out = run(pruned, generate_inputs(pruned))["y"]
    assert np.isfinite(out).all()
