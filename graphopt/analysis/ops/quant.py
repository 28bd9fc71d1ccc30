"""Coupling handlers for QuantizeLinear / DequantizeLinear (QDQ models, as TensorRT int8
pipelines and onnxruntime's static quantizer write them).

1. Every axis is carried; a per-channel scale and zero point (``[C]`` on ``axis``) are
   per-channel constants of that axis (role ``param``): they are sliced with the weights.
2. A DequantizeLinear of a constant that feeds a weight op (Conv, ConvTranspose, Gemm,
   MatMul) is that op's weight: its quantized tensor gets the weight roles (``out`` on the
   output-channel axis, ``in`` on the contraction axis), so the weight op seeds groups
   (``NodeView.is_weight_in``), importance reads the quantized values, and the masked
   oracle zeroes them (exact for symmetric weights: zero point 0, onnxruntime's default).
"""

from __future__ import annotations

from graphopt.analysis.registry import NodeView, axis_index, handles


def _weight_roles(nv: NodeView, rank: int) -> dict[int, str]:
    """Roles of the quantized tensor's axes when the output is a weight op's weight."""
    roles: dict[int, str] = {}
    for idx, i in nv.view.consumers.get(nv.node.output[0], []):
        node = nv.view.nodes[idx]
        attrs = {a.name: a for a in node.attribute}
        op = node.op_type
        if op in ("Conv", "FusedConv") and i == 1:
            group = attrs["group"].i if "group" in attrs else 1
            new = {0: "out", 1: "in"} if group == 1 else {0: "out"}
        elif op == "ConvTranspose" and i == 1:
            new = {0: "in", 1: "out"}
        elif op == "Gemm" and i == 1:
            trans = attrs["transB"].i if "transB" in attrs else 0
            new = {0: "out", 1: "in"} if trans else {0: "in", 1: "out"}
        elif op == "MatMul" and i == 1 and rank >= 2:
            new = {rank - 1: "out", rank - 2: "in"}
        else:
            return {}
        if roles and roles != new:
            return {}
        roles = new
    return roles


@handles("QuantizeLinear", "DequantizeLinear")
def _quant(nv: NodeView) -> None:
    shape = nv.in_shape(0)
    axis = axis_index(nv.attr("axis", 1), len(shape))
    for k, d in enumerate(shape):
        nv.link(nv.inp(0, k), nv.out(0, k), d)
    for i in (1, 2):
        if nv.has_in(i):
            s = nv.in_shape(i)
            if len(s) == 1 and s[0] == shape[axis] and s[0] > 1:
                nv.link(nv.inp(i, 0), nv.inp(0, axis), s[0])
                nv.role(nv.inp(i, 0), "param")
            else:
                nv.free_input(i)
    if nv.op == "DequantizeLinear" and nv.is_const_in(0):
        for k, role in _weight_roles(nv, len(shape)).items():
            nv.role(nv.inp(0, k), role)
