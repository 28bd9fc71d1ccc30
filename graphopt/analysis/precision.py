"""Whether a graph is already quantized (integer kernels, Q/DQ pairs, low-precision weights).

Read by the manager's ``FLOAT_MODEL`` requirement and by the quantize pass's counters.
"""

from __future__ import annotations

import numpy as np
import onnx

# Op types that only appear in a model something has already quantized.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
    "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulNBits",
    "QAttention", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSoftmax",
    "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "MatMulIntegerToFloat",
    "QOrderedMatMul", "QOrderedAttention", "QuantizeBFP", "DequantizeBFP",
})
LOW_PRECISION = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8,
                 onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op types (and low-precision weights) showing ``model`` is already quantized."""
    found: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    low = sum(1 for t in model.graph.initializer
              if t.data_type in LOW_PRECISION and np.prod(t.dims, dtype=np.int64) > 16)
    if low:
        found["int8/float16 weights"] = low
    return found
