"""Channel pruning through QuantizeLinear/DequantizeLinear (a QDQ model from onnxruntime's
static quantizer, int8 per-channel weights): the per-channel scales and zero points are
sliced with the quantized weights, and the masked oracle holds.

    x ─ Conv(16) ─ Relu ─ Conv(16) ─ Relu ─ Conv(8) ─ y      (float, hand-built)
    quantize_static(QDQ, per_channel=True, QInt8): every weight becomes
    DequantizeLinear(int8 W, scale[C], zp[C], axis=0), activations Q → DQ per tensor.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.analysis.coupling import analyze
from graphopt.core.contract import Context
from graphopt.passes.width import PruneChannels
from graphopt.testing import make_model

N = helper.make_node


@pytest.fixture(scope="module")
def qdq_cnn(tmp_path_factory):
    quantization = pytest.importorskip("onnxruntime.quantization")
    import graphopt

    rng = np.random.default_rng(0)
    nodes = [N("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, kernel_shape=[3, 3]),
             N("Relu", ["c1"], ["r1"]),
             N("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, kernel_shape=[3, 3]),
             N("Relu", ["c2"], ["r2"]), N("Conv", ["r2", "w3", "b3"], ["y"], kernel_shape=[1, 1])]
    inits = {"w1": rng.standard_normal((16, 3, 3, 3)), "b1": rng.standard_normal(16),
             "w2": rng.standard_normal((16, 16, 3, 3)) * 0.3, "b2": rng.standard_normal(16),
             "w3": rng.standard_normal((8, 16, 1, 1)), "b3": rng.standard_normal(8)}
    model = make_model(nodes, {"x": [1, 3, 12, 12]}, ["y"],
                       {k: v.astype(np.float32) for k, v in inits.items()}, opset=17)
    folder = tmp_path_factory.mktemp("qdq")
    onnx.save(model, folder / "float.onnx")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)}
                               for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantization.quantize_static(
        str(folder / "float.onnx"), str(folder / "qdq.onnx"), Reader(),
        quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        weight_type=quantization.QuantType.QInt8, activation_type=quantization.QuantType.QInt8)
    quantization.quantize_dynamic(str(folder / "float.onnx"), str(folder / "dynamic.onnx"))
    return graphopt.load(folder / "qdq.onnx"), graphopt.load(folder / "dynamic.onnx")


def test_qdq_weights_seed_channel_groups(qdq_cnn):
    qdq_cnn = qdq_cnn[0]
    """The two inner convs (weights behind DequantizeLinear) are prunable channel groups;
    their per-channel scales are members of the group (role param)."""
    ops = {n.op_type for n in qdq_cnn.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    groups = [g for g in analyze(qdq_cnn).groups if g.unit == "channel"]
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) == 2 and all(g.size == 16 for g in prunable)
    for g in prunable:
        params = [m for m in g.members_with_role("param") if "scale" in m.slot.tensor]
        assert params, g.members
        assert g.members_with_role("out") and g.members_with_role("in")


def test_qdq_prune_channels_masked_equivalence(qdq_cnn, wt):
    """A quarter of the channels go from each inner conv: int8 weights, int32 biases and
    their per-channel scales and zero points are sliced; pruned == masked through ORT."""
    qdq_cnn = qdq_cnn[0]
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 3, 12, 12)).astype(np.float32)}
    pruned, report, removal = wt.masked_equivalence(
        qdq_cnn, pass_obj=PruneChannels(ratio=0.25), ctx=Context(), feeds=feeds, atol=1e-5)
    assert report.passes[0].counters["channels_removed"] == 8
    sizes = {i.name: list(i.dims) for i in pruned.graph.initializer}
    scales = [d for n, d in sizes.items() if "scale" in n and d]
    assert [12] in scales  # per-channel scales sliced from 16 to 12
    int8 = [d for n, d in sizes.items() if d[:1] == [12] and len(d) == 4]
    assert int8  # a quantized weight with 12 filters


def test_dynamic_quantized_convs_are_skipped_with_reason(qdq_cnn):
    """ConvInteger (onnxruntime's dynamic quantizer) holds int8 weights no handler slices:
    prune-channels changes nothing and names each ConvInteger, its weight and the fix."""
    from graphopt.core.manager import PassManager

    dynamic = qdq_cnn[1]
    assert "ConvInteger" in {n.op_type for n in dynamic.graph.node}
    _, report = PassManager([PruneChannels(ratio=0.25)]).run(dynamic, Context())
    entry = report.passes[0]
    assert entry.status == "unchanged"
    reasons = [s.reason for s in entry.skipped if "ConvInteger" in s.site]
    assert len(reasons) == 3
    assert all("integer-quantized" in r and "weight '" in r and "to prune:" in r
               for r in reasons)
