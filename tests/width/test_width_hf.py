"""Width pruning on Hugging Face transformers vision models built from configs (random
weights, offline), exported with torch.onnx, checked by masked equivalence."""

from __future__ import annotations

import pytest

from graphopt.analysis.coupling import analyze
from graphopt.passes.width import PruneChannels, PruneNeurons

transformers = pytest.importorskip("transformers")


def _config(name: str):
    t = transformers
    if name == "resnet":
        return t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                              layer_type="bottleneck", num_labels=5)
    if name == "convnext":
        return t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5,
                                layer_scale_init_value=1.0)
    if name == "mobilenetv2":
        return t.MobileNetV2Config(depth_multiplier=0.35, num_labels=5, image_size=32)
    if name == "regnet":
        return t.RegNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                              groups_width=8, num_labels=5)
    raise KeyError(name)


@pytest.fixture(scope="module")
def hf_models(wt):
    import torch

    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForImageClassification.from_config(_config(name))
            wt.randomize_norms(model)
            cache[name] = wt.export(model, (torch.randn(2, 3, 32, 32),),
                                    input_names=("pixel_values",), output_names=("logits",))
        return cache[name]

    return get


def test_hf_resnet(wt, hf_models):
    """HF ResNet: bottleneck and shortcut groups pruned; output equals the masked original."""
    model = hf_models("resnet")
    pruned, report, removal = wt.masked_equivalence(model, pass_obj=PruneChannels(ratio=0.5))
    assert report.passes[0].counters["groups_pruned"] >= 5


def test_hf_mobilenetv2_with_tf_padding(wt, hf_models):
    """HF MobileNetV2: TF-style padding built from constant subgraphs folds to zero channel
    pads; depthwise and inverted-residual groups are pruned."""
    model = hf_models("mobilenetv2")
    groups = [g for g in analyze(model).groups if g.kind == "channels"]
    assert sum(g.prunable for g in groups) >= 10, [g.reason for g in groups if not g.prunable]
    wt.masked_equivalence(model, pass_obj=PruneChannels(ratio=0.5, round_to=2))


def test_hf_regnet_grouped_convs_and_squeeze_excite(wt, hf_models):
    """HF RegNet: grouped convs lose whole groups (the group attribute shrinks), SE couples."""
    model = hf_models("regnet")
    groups = analyze(model).groups
    grouped = [g for g in groups if g.unit_width > 1 and g.kind == "channels"]
    assert grouped and all(g.prunable for g in grouped), [g.reason for g in grouped]
    pruned, report, removal = wt.masked_equivalence(model, pass_obj=PruneChannels(ratio=0.5))
    attrs = [a.i for n in pruned.graph.node if n.op_type == "Conv" for a in n.attribute
             if a.name == "group" and a.i > 1]
    original = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute
                if a.name == "group" and a.i > 1]
    assert sum(attrs) < sum(original)


def test_hf_convnext_layernorm_is_a_barrier(wt, hf_models):
    """HF ConvNeXt: LayerNorm over channels blocks the conv groups (reported with the reason);
    the MLP inside each block is still pruned by prune-neurons."""
    model = hf_models("convnext")
    conv_groups = [g for g in analyze(model).groups if g.kind == "channels"]
    assert conv_groups and not any(g.prunable for g in conv_groups)
    assert all("LayerNormalization" in g.reason for g in conv_groups)
    pruned, report, removal = wt.masked_equivalence(model, pass_obj=PruneNeurons(ratio=0.5))
    assert report.passes[0].counters["groups_pruned"] == 2


def test_hf_bert_ffn_neurons_and_head_blocks(wt):
    """HF BERT (TorchScript export): the FFN inner width is pruned by prune-neurons; Q/K/V
    groups are units of head_dim channels (left to prune-heads); the hidden size is blocked
    by LayerNorm."""
    import torch

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 100, (2, 8))
    model = wt.export(Wrapper(), (ids, torch.ones(2, 8, dtype=torch.long)),
                      input_names=("input_ids", "attention_mask"),
                      output_names=("last_hidden_state",))
    groups = analyze(model).groups
    heads = [g for g in groups if g.kind == "blocks"]
    assert len(heads) == 2 and all(g.size == 4 and g.unit_width == 8 and g.prunable
                                   for g in heads)
    hidden = [g for g in groups if g.kind == "neurons" and g.size == 32]
    assert hidden and all("LayerNormalization" in g.reason for g in hidden)
    pruned, report, removal = wt.masked_equivalence(model, pass_obj=PruneNeurons(ratio=0.5))
    entry = report.passes[0]
    assert entry.counters["neurons_removed"] == 64
    assert sum("prune-heads" in s.reason for s in entry.skipped) == 2
