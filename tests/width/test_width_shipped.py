"""Width pruning on ONNX files shipped inside a PyPI package (the ``onnx`` wheel's
``backend/test/data/light`` models), not exported here.

The light models store every weight as ``ConstantOfShape`` (uniform values, to keep the
wheel small); the test replaces them with seeded random initializers first, so channels
differ and the masked-equivalence oracle means something. The graphs themselves (IR 3,
opset 9, ``Sum`` residuals, initializers listed as graph inputs) are used as shipped.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import graphopt
from graphopt.analysis.coupling import analyze
from graphopt.passes.width import PruneChannels
from graphopt.fuzz_models import materialize

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _materialize(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace ConstantOfShape weights by random initializers shaped the same; expose the
    logits (the Softmax input) as an extra output so the check is not blunted by Softmax."""
    graph = materialize(model, seed).graph
    for node in graph.node:
        if node.op_type == "Softmax":
            graph.output.append(onnx.helper.make_tensor_value_info(
                node.input[0], onnx.TensorProto.FLOAT, [1, 1000]))
    return model


@pytest.fixture(scope="module")
def light_resnet50():
    path = LIGHT / "light_resnet50.onnx"
    if not path.is_file():
        pytest.skip("the installed onnx wheel ships no light models")
    return _materialize(graphopt.load(path))


def test_shipped_resnet50_prune_channels(wt, light_resnet50):
    """onnx's shipped ResNet-50 (IR 3, Sum residuals): 25% of channels pruned, outputs equal
    the masked original."""
    model = light_resnet50
    groups = [g for g in analyze(model).groups if g.kind == "channels"]
    assert len(groups) == 1 + 2 * 16 + 4  # stem, two per bottleneck, one per stage
    assert all(g.prunable for g in groups), [g.reason for g in groups if not g.prunable]
    pruned, report, _ = wt.masked_equivalence(model, pass_obj=PruneChannels(ratio=0.25))
    entry = report.passes[0]
    assert entry.counters["groups_pruned"] == len(groups)
    assert entry.params_after < 0.7 * entry.params_before


def test_shipped_models_report_their_barriers():
    """Shipped Inception v1 (LRN) and ShuffleNet (channel shuffle) name what blocks them."""
    if not (LIGHT / "light_inception_v1.onnx").is_file():
        pytest.skip("the installed onnx wheel ships no light models")
    inception = analyze(graphopt.load(LIGHT / "light_inception_v1.onnx")).groups
    assert any(not g.prunable and "LRN" in g.reason for g in inception)
    shuffle = analyze(graphopt.load(LIGHT / "light_shufflenet.onnx")).groups
    assert any(not g.prunable and "Reshape" in g.reason and "splits axis" in g.reason
               for g in shuffle)
