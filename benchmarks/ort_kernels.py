"""Which ops onnxruntime really runs for a model: the op types of the graph its CPU
session optimizes (``optimized_model_filepath``, all optimizations on), so one can see
whether a QDQ model's ``DequantizeLinear -> Conv -> QuantizeLinear`` groups became
``QLinearConv`` (int8 kernels) or stayed float Conv between (de)quantize ops.

    python benchmarks/ort_kernels.py MODEL.onnx [MODEL2.onnx ...]

Prints one line per model: op type counts after optimization, and how many Conv-like
nodes run in int8 (QLinearConv, ConvInteger) vs float (Conv, FusedConv, NhwcConv).
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

INT8 = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat"}
FLOAT = {"Conv", "FusedConv", "NhwcConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm"}


def optimized_ops(path: str) -> Counter:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "opt.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = out
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        model = onnx.load(out, load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


def main(argv: list[str]) -> int:
    for path in argv:
        ops = optimized_ops(path)
        int8 = sum(c for op, c in ops.items() if op in INT8)
        flt = sum(c for op, c in ops.items() if op in FLOAT)
        shown = ", ".join(f"{op} {c}" for op, c in ops.most_common() if op != "Constant")
        print(f"{Path(path).name}: int8 compute {int8}, float compute {flt}; {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
