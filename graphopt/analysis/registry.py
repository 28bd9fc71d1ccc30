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

A rewriter gets the node's ``NodeView`` and an ``Editor`` (the typed interface below; the
apply engine, ``graphopt.prune.apply``, implements it).

This module is the mechanism only; the handlers live by family in ``graphopt.analysis.ops``
(importing that package registers them all): ``ops.elementwise`` (activations, broadcasting
ops, normalizations and barriers), ``ops.weights`` (Conv, ConvTranspose, Gemm, MatMul,
Gather), ``ops.layout`` (Concat, Split, Slice, Transpose, pooling, reductions, Resize, Pad),
``ops.reshape`` (Reshape family, Expand, Tile, ConstantOfShape), ``ops.quant`` (Q/DQ) and
``ops.attention`` (fused attention ops and their ``num_heads``).
To support a new op, add one function decorated with ``@handles("OpType")`` (and
``@rewrites`` if an attribute or shape constant must follow the removal; the two may be
declared in either order). An op without a handler is a barrier whose reason names it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

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

    def is_weight_in(self, i: int) -> bool:
        """Input ``i`` is a weight: a constant, or a DequantizeLinear of a constant (a QDQ
        model's quantized weight, with its scales and zero points)."""
        if self.is_const_in(i):
            return True
        if not self.has_in(i):
            return False
        idx = self.view.producer.get(self.node.input[i])
        if idx is None:
            return False
        dq = self.view.nodes[idx]
        return dq.op_type == "DequantizeLinear" and dq.domain in ("", "ai.onnx",
                                                                   "com.microsoft") and \
            all(self.view.is_const(n) for n in dq.input if n)

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

    def free_input(self, i: int) -> None:
        """Every axis of input ``i`` is free (cos/sin caches, shape vectors, masks): only
        its rank is needed, so a symbolic dim the inference left open does not matter."""
        name = self.node.input[i]
        dims = self.view.shapes.get(name) or self.view.shape(name)
        if dims is None and self.view.is_const(name):
            value = self.view.const(name)
            dims = None if value is None else value.shape
        for k in range(len(dims or ())):
            self.free(self.inp(i, k))

    def role(self, m: Member, role: str) -> None:
        if m.slot.is_const:
            self.nc.roles[m] = role
        elif role in ("act_in", "contract"):
            self.nc.roles.setdefault(m, role)

    def seed(self, m: Member) -> None:
        self.nc.seeds.append(m)

    def head(self, m: Member, head_dim: int, atoms_per_head: int) -> None:
        """``m`` is proven to carry query heads of ``head_dim`` (``atoms_per_head`` atoms of
        ``m`` per head: ``head_dim`` on a hidden axis, 1 on a heads axis)."""
        self.nc.heads[m] = (int(head_dim), int(atoms_per_head))


class Editor(Protocol):
    """What a rewriter may do to the model while a removal is applied."""

    def removed(self, m: Member) -> np.ndarray:
        """The atom indices the removal takes from member ``m`` (sorted; maybe empty)."""

    def set_attr(self, node_idx: int, name: str, value: Any) -> None:
        """Set (or replace) attribute ``name`` of node ``node_idx``."""

    def remove_attr(self, node_idx: int, name: str) -> None:
        """Drop attribute ``name`` of node ``node_idx`` if it has one."""

    def set_input(self, node_idx: int, input_idx: int, value: np.ndarray) -> None:
        """Give input ``input_idx`` of node ``node_idx`` a new constant value (copy-on-write)."""

    def current_input(self, node_idx: int, input_idx: int, default: np.ndarray) -> np.ndarray:
        """The value ``set_input`` gave that input in this removal, else ``default``."""


Rewriter = Callable[[NodeView, Editor], None]


@dataclass(frozen=True)
class Handler:
    couple: Callable[[NodeView], None]
    rewrite: Rewriter | None = None
    seeds: bool = False  # the op may start groups (it owns weights with output channels)


_COUPLERS: dict[tuple[str, str], Callable[[NodeView], None]] = {}
_REWRITERS: dict[tuple[str, str], Rewriter] = {}
_SEEDERS: set[tuple[str, str]] = set()


def handles(*ops: str, domain: str = "", seeds: bool = False):
    """Register a coupling function for op types (``domain`` "" is the ONNX domain).

    ``seeds=True``: the op may start groups (its handler calls ``NodeView.seed`` on the
    output-channel axes of its weights); the analysis asks only such ops for seeds."""
    def deco(fn: Callable[[NodeView], None]):
        for op in ops:
            _COUPLERS[(domain, op)] = fn
            if seeds:
                _SEEDERS.add((domain, op))
        return fn
    return deco


def rewrites(*ops: str, domain: str = ""):
    """Register the rewriter that fixes an op's attributes/shape constants after a removal."""
    def deco(fn: Rewriter):
        for op in ops:
            _REWRITERS[(domain, op)] = fn
        return fn
    return deco


def handler_for(node: onnx.NodeProto) -> Handler | None:
    """The node's handler (None: no coupling function is registered for its op)."""
    key = ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)
    couple = _COUPLERS.get(key)
    return None if couple is None else Handler(couple, _REWRITERS.get(key), key in _SEEDERS)


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


def axis_index(axis: int, rank: int) -> int:
    """A possibly negative ONNX axis attribute as an index into a shape of ``rank``."""
    return axis + rank if axis < 0 else axis
