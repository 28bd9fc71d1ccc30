"""``unpad-tokens``: run an encoder's token-wise ops on its real tokens only (lossless).

Encoders serve batches padded to the longest sentence (or to a fixed length), and every
token-wise op (projections, FFN, LayerNorm, GELU, residual adds: nearly all of the FLOPs)
runs on the padding too. This pass removes that work with standard ONNX ops only, so every
execution provider runs the result:

1. ``graphopt.analysis.tokens`` finds the attention mask, the stream entry (embeddings,
   ``[B, S, H]``), the token-wise nodes and where tokens mix (see its module doc); a model
   it refuses is a skip with the reason, and nothing changes.
2. Once per run, from the mask: ``pidx = [first real token] ++ NonZero(mask)`` (``T + 1``
   indices into the flattened ``B·S`` tokens; the leading copy of a real token keeps the
   packed tensor non-empty when no token is real) and ``rep = CumSum(mask) · mask``
   (``[B, S]``: the packed row of each real token, 0 for padding).
3. A ``[B, S, ...]`` tensor that a token-wise node reads is *packed*:
   ``Unsqueeze(Gather(Reshape(x, [-1, ...]), pidx), 0)``, ``[1, T + 1, ...]`` (the 3-D form
   keeps onnxruntime's fusions such as SkipLayerNormalization). Token-wise nodes run on
   packed tensors and produce packed tensors.
4. Where a packed tensor is read by a node that is not token-wise, it is *re-padded*:
   ``Gather(Squeeze(p, 0), rep)``. Inside a masked attention block (the Q/K/V head split)
   padded positions get a copy of a real token, which the mask hides; everywhere else
   (graph outputs, a pooler's selection) they are zeros. ``Shape`` of a packed tensor
   (the TorchScript export recomputes batch and sequence from each layer's hidden states)
   is answered with the padded shape, ``Concat(Shape(mask), Shape(p)[2:])``, with no
   re-padding.
5. Attention runs *row-compacted* when ``compact_plan`` allows it (the default,
   ``compact=false`` turns it off): at ``[B, L]``, ``L`` the longest row's real-token count,
   each row's real tokens first. Q/K/V are re-padded into that layout, the mask input and
   the ``Shape`` of ``[B, S, ...]`` tensors read by attention and its side computations
   (the mask bias, head-split shapes) are answered with the compact mask and ``[B, L, ...]``,
   and contexts are packed from it. Keys change order, which attention does not see (float
   summation order aside). Refused, with the reason as a note, when the sequence length is
   fixed, a side computation reads a learned table (a position bias) or a tensor computed
   at the compact length leaves attention other than into a token-wise op; attention then
   runs at ``S``, as in 4. ``buckets=K`` (default 4; 1 = one compact layout) goes further
   for batches padded to the longest: rows sorted by real length are cut into K groups and
   attention runs once per group at that group's longest length
   (``passes/_unpad_buckets.py``). Measured on MiniLM, batches of 32 padded to the longest
   (43% real tokens): 1.54x -> 1.95x (TorchScript), 1.56x -> 2.27x (dynamo); a batch of
   one sentence has no padding to remove and pays ~10% for the index ops (K=4: ~14%).
6. Outputs keep their names, shapes and dtypes; batch and sequence stay dynamic. On real
   tokens (``mask != 0``) they equal the original's to float rounding; **padded rows of
   per-token outputs are zeros** (the original's values there are meaningless). Any mask
   pattern works: left padding, holes, rows with no real token (all zeros, never NaN).
7. The mask must hold 0/1 values (non-zero counts as a real token): calibration data whose
   mask holds other values, or a float mask without calibration data to show its values
   (an additive 0/-inf mask would be read inverted), is a skip with the reason. Opsets
   below 13 are skipped (Squeeze/Unsqueeze take axes as inputs from 13 on).

The manager checks the pass like every lossless pass, on real tokens only
(``compare_outputs``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.tokens import (CompactPlan, TokenAnalysis, analyze_tokens, compact_plan,
                                      selected_outputs)
from graphopt.ir.graph import unique_name
from graphopt.core.contract import Context, Pass, PassResult, Skip
from graphopt.core.registry import register
from graphopt.errors import ConfigError
from graphopt.runtime.validate import real_token_outputs

from . import _unpad_buckets as buckets

logger = logging.getLogger(__name__)

_PREFIX = "graphopt_unpad"
_FLOAT_MASKS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                TensorProto.BFLOAT16}


@dataclass(frozen=True)
class UnpadConfig:
    """``mask``: the attention-mask input (found by the analysis when empty);
    ``compact``: run attention at the batch's longest real length (module doc, 5);
    ``buckets``: with ``compact``, attention once per group of rows of similar length."""

    mask: str = ""
    compact: bool = True
    buckets: int = 4


@register
class UnpadTokens(Pass[UnpadConfig], name="unpad-tokens", lossless=True):
    """Gather real tokens after the embeddings and run token-wise ops on them only;
    see the module docstring for the numbered cases."""

    def __init__(self, config=None, **options):
        super().__init__(config, **options)
        self._mask = ""
        self._zeroed: tuple[str, ...] = ()
        self._selected: dict[str, int] = {}

    def compare_outputs(self, feed, reference, got):
        """Real tokens only: padded rows of the re-padded outputs are zeros by design."""
        if not self._mask or self._mask not in feed:
            return reference, got
        mask = feed[self._mask]
        return (real_token_outputs(reference, mask, self._zeroed, self._selected),
                real_token_outputs(got, mask, self._zeroed, self._selected))

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 13:
            return _skip(model, f"opset {opset} < 13 (Squeeze/Unsqueeze need axes inputs)")
        found = analyze_tokens(model, self.config.mask or None)
        if isinstance(found, str):
            return _skip(model, found)
        reason = _mask_values(found, ctx)
        if reason:
            return _skip(model, reason)
        plan = compact_plan(model, found) if self.config.compact else "compact=false"
        notes = [Skip("attention compaction", plan)] if isinstance(plan, str) else []
        self._selected = selected_outputs(model, found)
        if self.config.buckets < 1:
            raise ConfigError(f"buckets must be >= 1, not {self.config.buckets}")
        rewrite = _Rewrite(model, found, opset, None if isinstance(plan, str) else plan,
                           self.config.buckets)
        counters = rewrite.apply()
        self._mask = found.mask
        self._zeroed = tuple(rewrite.zeroed_outputs)
        logger.info("unpad-tokens: %s", counters)
        notes.append(_no_padding_note(found.mask, ctx))
        return PassResult(model, True, counters, notes)


def _skip(model: onnx.ModelProto, reason: str) -> PassResult:
    return PassResult(model, False, skipped=[Skip("model", reason)])


def _no_padding_note(mask: str, ctx: Context) -> Skip:
    """What the pass costs where there is nothing to remove (module doc, 5), with the
    calibration batches' share of real tokens when they show it."""
    cost = ("a batch without padding (one sentence, or rows of equal length) has nothing "
            "to remove and runs slower than the original: 0.86x measured on "
            "all-MiniLM-L6-v2 at batch 1, the price of the pack/re-pad index ops")
    masks = [np.asarray(f[mask]) for f in ctx.calibration or [] if mask in f]
    if not masks:
        return Skip("no padding", cost)
    real = sum(int(np.count_nonzero(m)) for m in masks) / max(1, sum(m.size for m in masks))
    if real >= 1.0:
        return Skip("no padding", f"the calibration batches hold no padding (100% real "
                    f"tokens): traffic like them runs slower with this pass; {cost}")
    return Skip("no padding", f"calibration batches: {real:.0%} real tokens (at most "
                f"{1 / real:.2f}x from unpadding); {cost}")


def _mask_values(found: TokenAnalysis, ctx: Context) -> str:
    feeds = [f for f in (ctx.calibration or []) if found.mask in f]
    for feed in feeds:
        values = np.unique(np.asarray(feed[found.mask]))
        if not np.isin(values, (0, 1)).all():
            shown = ", ".join(f"{v:g}" for v in values[:6].astype(np.float64))
            return (f"mask '{found.mask}' is not 0/1-valued in the calibration data "
                    f"(values {shown}); an additive or weighted mask cannot be unpadded")
    if found.mask_type in _FLOAT_MASKS and not feeds:
        return (f"mask '{found.mask}' is a float input: it may be additive (0/-inf); give "
                "calibration data showing 0/1 values")
    return ""


class _Rewrite:
    """The rewrite of one analysed model (module doc, 2-4)."""

    def __init__(self, model: onnx.ModelProto, found: TokenAnalysis, opset: int,
                 plan: CompactPlan | None, groups: int = 1):
        self.model = model
        self.bucket_count = groups if plan is not None else 1
        self.groups: list[tuple[str, str, str]] = []
        self.clones: dict[tuple[str, int], str] = {}
        self.plan = plan
        self.region = plan.region if plan is not None else set()
        self.graph = model.graph
        self.found = found
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.taken = {o for n in self.graph.node for o in n.output} | \
            {i.name for i in self.graph.input} | {t.name for t in self.graph.initializer}
        self.packed: dict[str, str] = {}  # padded name -> packed name
        self.rest: dict[str, str] = {}    # packed name -> Shape(p)[2:]
        self.padded_shapes: dict = {}     # static trailing dims (or packed name) -> [B, S, ...]
        self.rests: dict[str, tuple[int, ...]] = {}
        self.zeroed_outputs: list[str] = []
        self.counters = {"tokenwise_nodes": 0, "packs": 0, "repads": 0, "repads_zero": 0,
                         "shapes_redirected": 0, "attention_compacted": int(plan is not None)}

    # ----------------------------------------------------------------- building blocks
    def _name(self, base: str) -> str:
        return unique_name(f"{_PREFIX}/{base}", self.taken)

    def _const(self, base: str, value) -> str:
        name = self._name(base)
        self.nodes.append(helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)))
        return name

    def _op(self, op: str, inputs: list[str], base: str, output: str | None = None,
            **attrs) -> str:
        out = output or self._name(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self._name(f"{base}_node"),
                                           **attrs))
        return out

    def _indices(self) -> None:
        mask = self.found.mask
        if self.found.mask_type == TensorProto.BOOL:
            self.mask_bool = mask
        else:
            self.mask_bool = self._op("Cast", [mask], "mask_bool", to=TensorProto.BOOL)
        m64 = self._op("Cast", [self.mask_bool], "mask_int", to=TensorProto.INT64)
        self.shape_bs = self._op("Shape", [mask], "mask_shape")
        flat = self._op("Reshape", [m64, self._const("minus_one", np.array([-1], np.int64))],
                        "mask_flat")
        nz = self._op("NonZero", [flat], "nonzero")
        nzf = self._op("Reshape", [nz, self._const("minus_one", np.array([-1], np.int64))],
                       "real_tokens")
        zero = self._const("zero", np.array([0], np.int64))
        one = self._const("one", np.array([1], np.int64))
        first = self._op("Slice", [self._op("Concat", [nzf, zero], "real_or_zero", axis=0),
                                   zero, one], "first_real")
        self.pidx = self._op("Concat", [first, nzf], "pack_index", axis=0)
        cums = self._op("CumSum", [flat, self._const("axis0", np.array(0, np.int64))],
                        "mask_cumsum")
        rep = self._op("Mul", [cums, flat], "repad_flat")
        self.rep = self._op("Reshape", [rep, self.shape_bs], "repad_index")
        self.axis0 = self._const("axes0", np.array([0], np.int64))
        if self.plan is not None:
            self._compact_indices(m64, nzf, zero, one)

    def _compact_indices(self, m64: str, nzf: str, zero: str, one: str) -> None:
        """Row-compact layout ``[B, L]``, ``L`` = the longest row's real tokens (at least 1):
        ``rep_c`` (packed row of each compact slot, 0 past a row's end), ``pidx_c`` (compact
        flat slot of each packed row), the compact mask and ``[B, L]``."""
        one_s = self._const("one_scalar", np.array(1, np.int64))
        counts = self._op("ReduceSum", [m64, one], "row_counts", keepdims=1)
        longest = self._op("Max", [self._op("ReduceMax", [counts], "longest_row", keepdims=0),
                                   one_s], "compact_length")
        slots = self._op("Range", [self._const("zero_scalar", np.array(0, np.int64)), longest,
                                   one_s], "slots")
        row = self._op("Unsqueeze", [slots, self.axis0], "slot_row")
        cmask = self._op("Less", [row, counts], "compact_mask_bool")
        offsets = self._op("CumSum", [counts, self._const("axis0", np.array(0, np.int64))],
                           "row_offsets", exclusive=1)
        self.rep_c = self._op("Mul", [
            self._op("Add", [self._op("Add", [offsets, row], "slot_token"), one_s],
                     "slot_row_packed"),
            self._op("Cast", [cmask], "compact_mask_int", to=TensorProto.INT64)],
            "compact_repad_index")
        rank = self._op("Sub", [self._op("CumSum", [m64, self._const(
            "axis1", np.array(1, np.int64))], "row_cumsum"), one_s], "rank_in_row")
        in_row = self._op("Gather", [self._op("Reshape", [rank, self._const(
            "minus_one", np.array([-1], np.int64))], "rank_flat"), nzf], "token_slot", axis=0)
        seq = self._op("Gather", [self.shape_bs, one_s], "seq_len", axis=0)
        self.token_row = self._op("Div", [nzf, seq], "token_row")
        slot = self._op("Add", [self._op("Mul", [self.token_row, longest], "row_start"),
                                in_row], "compact_slot")
        self.counts, self.offsets, self.in_row = counts, offsets, in_row
        if self.bucket_count > 1:
            buckets.indices(self, self.bucket_count)
        first = self._op("Slice", [self._op("Concat", [slot, zero], "slot_or_zero", axis=0),
                                   zero, one], "first_slot")
        self.pidx_c = self._op("Concat", [first, slot], "compact_pack_index", axis=0)
        self.shape_bl = self._op("Concat", [
            self._op("Slice", [self.shape_bs, zero, one], "batch_dim"),
            self._op("Reshape", [longest, one], "compact_dim")], "compact_shape", axis=0)
        if self.found.mask_type == TensorProto.BOOL:
            self.cmask = cmask
        else:
            self.cmask = self._op("Cast", [cmask], "compact_mask", to=self.found.mask_type)

    def _shape_rest(self, tensor: str) -> str:
        """Shape(tensor)[2:] (cached per tensor)."""
        if tensor not in self.rest:
            if self.opset >= 15:
                self.rest[tensor] = self._op("Shape", [tensor], "rest_shape", start=2)
            else:
                full = self._op("Shape", [tensor], "shape")
                self.rest[tensor] = self._op(
                    "Slice", [full, self._const("two", np.array([2], np.int64)),
                              self._const("end", np.array([2**62], np.int64))], "rest_shape")
        return self.rest[tensor]

    def _pack(self, tensor: str, compact: bool = False) -> str:
        if tensor not in self.packed:
            target = self._op("Concat", [self._const("minus_one", np.array([-1], np.int64)),
                                         self._shape_rest(tensor)], "flat_shape", axis=0)
            flat = self._op("Reshape", [tensor, target], "flat")
            rows = self._op("Gather", [flat, self.pidx_c if compact else self.pidx],
                            "packed_rows", axis=0)
            self.packed[tensor] = self._op("Unsqueeze", [rows, self.axis0], "packed")
            self.counters["packs"] += 1
        return self.packed[tensor]

    def _repad(self, packed: str, output: str, zero_dtype: int | None, rank: int,
               compact: bool = False, index: str | None = None) -> None:
        rows = self._op("Squeeze", [packed, self.axis0], "rows")
        if zero_dtype is None:
            index = index or (self.rep_c if compact else self.rep)
            self._op("Gather", [rows, index], "repad",
                     output=output, axis=0)
            self.counters["repads"] += 1
            return
        # Row 0 (the copy of a real token every padded slot reads) set to zeros: padded
        # rows come out as exact zeros with one row written, not a pass over the output.
        rest = self._op("Shape", [rows], "row_shape", start=1) if self.opset >= 15 else \
            self._op("Slice", [self._op("Shape", [rows], "rows_shape"), self._const(
                "one", np.array([1], np.int64)), self._const("end", np.array([2**62], np.int64))],
                "row_shape")
        zeros = self._op("ConstantOfShape", [self._op("Concat", [self._const(
            "one", np.array([1], np.int64)), rest], "zero_row_shape", axis=0)], "zero_row",
            value=helper.make_tensor("zero", zero_dtype, [1], [0]))
        cleared = self._op("ScatterND", [rows, self._const("row0", np.array([[0]], np.int64)),
                                         zeros], "rows_zero_first")
        self._op("Gather", [cleared, self.rep], "repad_zero", output=output, axis=0)
        self.counters["repads_zero"] += 1

    # ----------------------------------------------------------------- the rewrite
    def apply(self) -> dict[str, int]:
        graph, found = self.graph, self.found
        types, self.rests = _inferred(self.model)
        self._indices()
        tokenwise = set(found.tokenwise)
        originals = list(graph.node)
        producer = {o: i for i, n in enumerate(originals) for o in n.output if o}
        renamed: dict[str, str] = {}  # original output name -> packed name
        for idx in found.tokenwise:
            node = originals[idx]
            for k, name in enumerate(node.input):
                if name in renamed:
                    node.input[k] = renamed[name]
                elif found.is_token_layout(name):
                    inside = producer.get(name) in self.region
                    node.input[k] = (buckets.pack(self, name) if inside and self.groups
                                     else self._pack(name, inside))
            for k, name in enumerate(node.output):
                if name:
                    renamed[name] = self._name(f"{name}/packed")
                    node.output[k] = renamed[name]
            self.counters["tokenwise_nodes"] += 1
        outputs = {o.name for o in graph.output}
        consumers: dict[str, list[int]] = {}
        for i, node in enumerate(originals):
            if i in tokenwise:
                continue
            for name in node.input:
                if name in renamed:
                    consumers.setdefault(name, []).append(i)
        drop: set[int] = set()
        if self.groups:
            drop |= buckets.clone_region(self, originals, renamed, consumers)
        elif self.plan is not None:
            self._compact_region(originals, renamed, consumers)
        for name, packed in renamed.items():
            users = [i for i in consumers.get(name, []) if i not in self.region]
            shapes = [i for i in users if originals[i].op_type == "Shape"]
            for i in shapes:
                self._redirect_shape(originals[i], packed, name)
                drop.add(i)
            others = [i for i in users if i not in drop]
            if not others and name not in outputs:
                continue
            masked = name not in outputs and all(i in found.attention_nodes for i in others)
            rank = found.ranks.get(name, 3)
            if masked:
                self._repad(packed, name, None, rank)
            else:
                dtype = types.get(name, TensorProto.FLOAT)
                self._repad(packed, name, dtype, rank)
                if name in outputs:
                    self.zeroed_outputs.append(name)
        kept = [n for i, n in enumerate(originals) if i not in drop]
        del graph.node[:]
        graph.node.extend(_toposort(self.nodes + kept, graph))
        return self.counters

    def _compact_region(self, originals, renamed, consumers) -> None:
        """Attention and its side computations at the compact length (module doc, 5)."""
        plan = self.plan
        for i, k in plan.mask_reads:
            originals[i].input[k] = self.cmask
        answers = {}
        for i in plan.shape_leaves:
            leaf = originals[i]
            x = leaf.input[0]
            rest = self._shape_rest(renamed.get(x, x))
            full = self._op("Concat", [self.shape_bl, rest], "compact_full_shape", axis=0)
            answers[leaf.output[0]] = self._slice_shape(leaf, full, "compact_shape_of")
        for i in plan.region:
            node = originals[i]
            for k, name in enumerate(node.input):
                if name in answers:
                    node.input[k] = answers[name]
        for name, packed in renamed.items():
            users = [i for i in consumers.get(name, []) if i in plan.region]
            if users:
                compact = self._name(f"{name}/compact")
                self._repad(packed, compact, None, self.found.ranks.get(name, 3), True)
                for i in users:
                    node = originals[i]
                    for k, x in enumerate(node.input):
                        if x == name:
                            node.input[k] = compact

    def _slice_shape(self, node: onnx.NodeProto, full: str, base: str,
                     output: str | None = None) -> str:
        """``full`` cut as ``node`` (a Shape) cuts with its start/end attributes."""
        start = next((a.i for a in node.attribute if a.name == "start"), 0)
        end = next((a.i for a in node.attribute if a.name == "end"), None)
        if start == 0 and end is None:
            return self._op("Identity", [full], base, output=output)
        return self._op("Slice", [full, self._const("start", np.array([start], np.int64)),
                                  self._const("end", np.array(
                                      [end if end is not None else 2**62], np.int64))],
                        base, output=output)

    def _redirect_shape(self, node: onnx.NodeProto, packed: str, original: str) -> None:
        """``Shape(x)`` of a packed ``x`` -> the padded shape, with the same start/end;
        computed once for all tensors whose trailing dims are the same known sizes (the
        TorchScript export asks it of every layer's hidden states)."""
        key = self.rests.get(original) or packed
        if key not in self.padded_shapes:
            self.padded_shapes[key] = self._op(
                "Concat", [self.shape_bs, self._shape_rest(packed)], "padded_shape", axis=0)
        full = self.padded_shapes[key]
        self._slice_shape(node, full, "shape", node.output[0])
        self.counters["shapes_redirected"] += 1


def _inferred(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """Element types, and the trailing dims (after batch and sequence) where all are known."""
    from graphopt.ir.strip import stripped_copy

    work = stripped_copy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(work, strict_mode=False)
    except Exception:  # noqa: BLE001 - then the declared types must do
        inferred = work
    types, rests = {}, {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.elem_type:
            types[vi.name] = t.elem_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if len(dims) >= 3 and all(d > 0 for d in dims[2:]):
            rests[vi.name] = tuple(dims[2:])
    return types, rests


def _toposort(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's order over ``nodes`` (new nodes were appended wherever they were made)."""
    from collections import deque

    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    pending = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in n.input if x in producer}
        pending[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = deque(i for i, p in enumerate(pending) if p == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(nodes[i])
        for u in users.get(i, ()):
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise RuntimeError("unpad-tokens made a cycle")
    return order
