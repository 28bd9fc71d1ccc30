"""Coupling handlers: elementwise ops, activations, normalizations and other barriers.

Elementwise ops carry every axis one to one (broadcast axes are free: nothing to slice);
normalizations over an axis are barriers on it (its indices interact).
"""

from __future__ import annotations

from graphopt.analysis.registry import NodeView, axis_index, handles

# =========================================================================== elementwise

_UNARY = [
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Erf", "Gelu", "Softplus", "Softsign", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Cast", "Not",
    "IsNaN", "IsInf", "ThresholdedRelu", "Shrink", "Clip", "Dropout", "Swish",
]


@handles(*_UNARY)
@handles("Gelu", "QuickGelu", "FastGelu", "BiasGelu", domain="com.microsoft")
def _unary(nv: NodeView) -> None:
    shape = nv.in_shape(0)
    for k, d in enumerate(shape):
        nv.link(nv.inp(0, k), nv.out(0, k), d)
        if nv.op == "Dropout" and nv.has_out(1):
            nv.link(nv.inp(0, k), nv.out(1, k), d)
    for i in range(1, len(nv.node.input)):
        if nv.has_in(i):
            s = nv.in_shape(i)
            if nv.op in ("FastGelu", "BiasGelu") and len(s) == 1:
                nv.link(nv.inp(i, 0), nv.out(0, len(shape) - 1), s[0])
                nv.role(nv.inp(i, 0), "param")
            else:
                for k in range(len(s)):
                    nv.free(nv.inp(i, k))


_BROADCAST = [
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal",
    "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod",
]


@handles(*_BROADCAST)
@handles("BiasAdd", domain="com.microsoft")
def _broadcast(nv: NodeView) -> None:
    out = nv.out_shape(0)
    rank = len(out)
    for i in range(len(nv.node.input)):
        if not nv.has_in(i):
            continue
        s = nv.in_shape(i)
        for k, d in enumerate(s):
            ok = rank - len(s) + k
            m = nv.inp(i, k)
            if d == out[ok]:
                nv.link(m, nv.out(0, ok), d)
                nv.role(m, "param")
            else:
                nv.free(m)  # broadcast along this axis: nothing to slice


@handles("CastLike")
def _cast_like(nv: NodeView) -> None:
    for k, d in enumerate(nv.in_shape(0)):
        nv.link(nv.inp(0, k), nv.out(0, k), d)
    for k in range(len(nv.in_shape(1))):
        nv.free(nv.inp(1, k))


@handles("Shape", "Size")
def _shape_of(nv: NodeView) -> None:
    # The value changes with the pruned width; shape computations that feed a Reshape
    # then follow the new width by construction.
    for k in range(len(nv.in_shape(0))):
        nv.free(nv.inp(0, k))


# =========================================================================== normalization


@handles("BatchNormalization")
def _batchnorm(nv: NodeView) -> None:
    x = nv.in_shape(0)
    for k, d in enumerate(x):
        nv.link(nv.inp(0, k), nv.out(0, k), d)
    for i in range(1, 5):
        if nv.has_in(i):
            nv.link(nv.inp(i, 0), nv.out(0, 1), x[1])
            nv.role(nv.inp(i, 0), "bn_scale" if i == 1 else "param")
    for o in range(1, len(nv.node.output)):
        if nv.has_out(o):
            nv.link(nv.out(o, 0), nv.out(0, 1), x[1])


@handles("InstanceNormalization")
def _instance_norm(nv: NodeView) -> None:
    x = nv.in_shape(0)
    nv.link(nv.inp(0, 0), nv.out(0, 0), x[0])
    nv.link(nv.inp(0, 1), nv.out(0, 1), x[1])
    nv.link(nv.inp(1, 0), nv.out(0, 1), x[1])
    nv.link(nv.inp(2, 0), nv.out(0, 1), x[1])
    nv.role(nv.inp(1, 0), "bn_scale")
    nv.role(nv.inp(2, 0), "param")
    for k in range(2, len(x)):
        reason = f"{nv.label} normalizes over axis {k}"
        nv.block(nv.inp(0, k), reason)
        nv.block(nv.out(0, k), reason)


@handles("LayerNormalization", "RMSNormalization")
@handles("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
         "SkipSimplifiedLayerNormalization", domain="com.microsoft")
def _layer_norm(nv: NodeView) -> None:
    x = nv.in_shape(0)
    axis = axis_index(nv.attr("axis", -1), len(x))
    skip_inputs = [0, 1] if nv.op.startswith("Skip") else [0]
    for k, d in enumerate(x):
        outs = [nv.out(0, k)]
        if nv.op.startswith("Skip") and len(nv.node.output) > 3 and nv.has_out(3):
            outs.append(nv.out(3, k))
        for i in skip_inputs:
            if not nv.has_in(i):
                continue
            for o in outs:
                if k < axis:
                    nv.link(nv.inp(i, k), o, d)
                else:
                    reason = f"{nv.label} normalizes over axis {k}"
                    nv.block(nv.inp(i, k), reason)
                    nv.block(o, reason)


@handles("GroupNormalization")
def _group_norm(nv: NodeView) -> None:
    x = nv.in_shape(0)
    nv.link(nv.inp(0, 0), nv.out(0, 0), x[0])
    for k in range(1, len(x)):
        reason = f"{nv.label} normalizes over axis {k}"
        nv.block(nv.inp(0, k), reason)
        nv.block(nv.out(0, k), reason)


@handles("LRN")
def _lrn(nv: NodeView) -> None:
    x = nv.in_shape(0)
    for k, d in enumerate(x):
        if k == 1:
            reason = f"{nv.label} normalizes across neighbouring channels (axis 1)"
            nv.block(nv.inp(0, k), reason)
            nv.block(nv.out(0, k), reason)
        else:
            nv.link(nv.inp(0, k), nv.out(0, k), d)


@handles("Softmax", "LogSoftmax", "Hardmax")
def _softmax(nv: NodeView) -> None:
    x = nv.in_shape(0)
    old = nv.opset() < 13
    axis = axis_index(nv.attr("axis", 1 if old else -1), len(x))
    for k, d in enumerate(x):
        if k == axis or (old and k > axis):
            reason = f"{nv.label} normalizes over axis {k}"
            nv.block(nv.inp(0, k), reason)
            nv.block(nv.out(0, k), reason)
        else:
            nv.link(nv.inp(0, k), nv.out(0, k), d)


# Fused attention ops (ONNX Attention, com.microsoft Attention/MultiHeadAttention/
# GroupQueryAttention) have their own handlers in ``ops_attention``.
