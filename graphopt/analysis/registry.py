"""Per-op coupling handlers: how each op maps axis indices between its inputs and outputs.

A handler gets a ``NodeView`` and *links* atoms of its members (see
``graphopt.analysis.coupling`` for the vocabulary), *blocks* members it cannot carry (a
barrier, with the reason), marks members it does not care about as *free*, gives weight
members a *role* (``out``: filters/output columns; ``in``: the contraction side a removed
unit feeds; ``bias``; ``bn_scale``; ``param``: other per-channel constants; ``act_in``: the
activation a contraction consumes; ``contract``: a contraction axis between two activations)
and names *seeds* (output-channel axes of weight ops).

A *rewriter* (optional, same table) fixes what is not a sliced member after a removal:
attributes (``group``, ``num_heads``), and shape-like constants (Reshape targets, Split sizes, Slice
bounds, Resize sizes, Gather indices). Weights, biases and per-channel constants are sliced
by the apply engine itself, never here.

The handlers live by family in ``ops_elementwise`` (activations, broadcasting ops,
normalizations and barriers), ``ops_weights`` (Conv, ConvTranspose, Gemm, MatMul, Gather)
and ``ops_layout`` (Concat, Split, Slice, Transpose, Reshape family, pooling, reductions,
Resize, Pad). To support a new op, add one function decorated with ``@handles("OpType")``
(and ``@rewrites`` if an attribute or shape constant must follow the removal); fused
attention ops (``ops_attention``) update their ``num_heads`` there. An op without a handler is a barrier
whose reason names it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graphopt.analysis.view import GraphView, HandlerError, Member, NodeCoupling, Slot

logger = logging.getLogger(__name__)


class NodeView:
    """One node as a handler sees it, and the builder of its ``NodeCoupling``."""

    def __init__(self, view: GraphView, idx: int):
        self.view = view
        self.idx = idx
        self.node = view.nodes[idx]
        self.nc = NodeCoupling()

    # --------------------------------------------------------------- reading
    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def label(self) -> str:
        return self.view.node_label(self.idx)

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def has_in(self, i: int) -> bool:
        return len(self.node.input) > i and bool(self.node.input[i])

    def has_out(self, i: int) -> bool:
        return len(self.node.output) > i and bool(self.node.output[i])

    def is_const_in(self, i: int) -> bool:
        return self.has_in(i) and self.view.is_const(self.node.input[i])

    def const_in(self, i: int) -> np.ndarray | None:
        return self.view.const(self.node.input[i]) if self.has_in(i) else None

    def in_shape(self, i: int) -> tuple[int, ...]:
        name = self.node.input[i]
        shape = self.view.shape(name)
        if shape is None and self.view.is_const(name):
            v = self.view.const(name)
            shape = None if v is None else tuple(v.shape)
        if shape is None:
            raise HandlerError(f"shape of '{name}' (input of {self.label}) is unknown; "
                               "give --input-shape")
        return shape

    def out_shape(self, i: int = 0) -> tuple[int, ...]:
        name = self.node.output[i]
        shape = self.view.shape(name)
        if shape is None:
            raise HandlerError(f"shape of '{name}' (output of {self.label}) is unknown; "
                               "give --input-shape")
        return shape

    def opset(self) -> int:
        return self.view.opset(self.node.domain if self.node.domain != "ai.onnx" else "")

    # --------------------------------------------------------------- members
    def inp(self, i: int, axis: int) -> Member:
        if self.view.is_const(self.node.input[i]):
            return Member(Slot(self.node.input[i], (self.idx, i)), axis)
        return Member(Slot(self.node.input[i]), axis)

    def out(self, i: int, axis: int) -> Member:
        return Member(Slot(self.node.output[i]), axis)

    def virtual(self, dim: int) -> Member:
        slot = Slot(f"{self.node.name or self.node.output[0]}#groups", (self.idx, -1))
        self.nc.virtual_dims[slot] = dim
        return Member(slot, 0)

    # --------------------------------------------------------------- building
    def link(self, a: Member, b: Member, n_or_ia, ib: np.ndarray | None = None) -> None:
        """Link atoms: ``link(a, b, n)`` is the identity on ``n`` atoms; ``link(a, b, ia, ib)``
        pairs atom ``ia[k]`` of ``a`` with atom ``ib[k]`` of ``b``."""
        if ib is None:
            ia = ib = np.arange(int(n_or_ia), dtype=np.int64)
        else:
            ia = np.asarray(n_or_ia, dtype=np.int64)
            ib = np.asarray(ib, dtype=np.int64)
        self.nc.links.append((a, b, ia, ib))

    def block(self, m: Member, reason: str) -> None:
        self.nc.blocks.setdefault(m, reason)

    def free(self, m: Member) -> None:
        self.nc.free.add(m)

    def role(self, m: Member, role: str) -> None:
        if m.slot.is_const:
            self.nc.roles[m] = role
        elif role in ("act_in", "contract"):
            self.nc.roles.setdefault(m, role)

    def seed(self, m: Member) -> None:
        self.nc.seeds.append(m)


@dataclass
class Handler:
    couple: Callable[[NodeView], None]
    rewrite: Callable[[NodeView, Any], None] | None = None


HANDLERS: dict[tuple[str, str], Handler] = {}


def handles(*ops: str, domain: str = ""):
    """Register a coupling function for op types (``domain`` "" is the ONNX domain)."""
    def deco(fn: Callable[[NodeView], None]):
        for op in ops:
            HANDLERS[(domain, op)] = Handler(fn)
        return fn
    return deco


def rewrites(*ops: str, domain: str = ""):
    """Register the rewriter that fixes an op's attributes/shape constants after a removal."""
    def deco(fn):
        for op in ops:
            HANDLERS[(domain, op)].rewrite = fn
        return fn
    return deco


def handler_for(node: onnx.NodeProto) -> Handler | None:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return HANDLERS.get((domain, node.op_type))


def couple_node(view: GraphView, idx: int) -> NodeCoupling:
    """The coupling of node ``idx``; a missing handler or a failure becomes a barrier."""
    nv = NodeView(view, idx)
    handler = handler_for(nv.node)
    if handler is None:
        domain = f"{nv.node.domain}::" if nv.node.domain not in ("", "ai.onnx") else ""
        nv.nc.failure = f"{domain}{nv.label} has no coupling handler (op {nv.op})"
        return nv.nc
    try:
        handler.couple(nv)
    except HandlerError as exc:
        nv.nc = NodeCoupling(failure=str(exc))
    except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the whole analysis
        logger.debug("handler for %s failed", nv.label, exc_info=True)
        nv.nc = NodeCoupling(failure=f"{nv.label}: handler failed ({exc.__class__.__name__}: "
                                     f"{exc})")
    return nv.nc


def _ax(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# The op modules register their handlers in HANDLERS when imported.
from graphopt.analysis.ops import (  # noqa: E402,F401
    attention as ops_attention,
    elementwise as ops_elementwise,
    layout as ops_layout,
    weights as ops_weights,
)

