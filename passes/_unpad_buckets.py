"""Length-bucketed attention for ``unpad-tokens`` (its module doc, 5; option ``buckets``).

Batches padded to the longest sentence run attention at ``[B, L, L]``, ``L`` the longest
real row, however short the other rows are: with 40% real tokens, attention (scores,
mask, softmax, head transposes) is a third of what is left after unpadding. Here the rows
are sorted by real length at run time and cut into ``K`` groups of consecutive lengths;
attention and its side computations run once per group, at that group's longest length,
``[n_g, L_g, L_g]``. The rewrite clones the compacted region (attention blocks and their
mask/shape side computations) ``K`` times; every clone reads its own compact mask
``[n_g, L_g]`` and answers its ``Shape`` leaves with ``[n_g, L_g, ...]``. Q/K/V are
re-padded per group from the packed rows; contexts come back by one ``Gather`` over the
groups' outputs laid end to end.

Indices, computed once per run with standard ONNX ops (TopK, ScatterElements, Range):
sorted position ``p`` of each row; group ``g`` covers sorted positions ``[lo_g, hi_g)``,
``lo_g = min(⌊gB/K⌋, B-1)``, ``hi_g = max(lo_g + 1, ⌊(g+1)B/K⌋)``: never empty, so no
zero-sized tensor reaches attention (with ``B < K`` groups overlap; a row's context is
read from the last group starting at or before its position, and a group no row is read
from runs at length 1). Keys stay in
each row's own order (real tokens first), as in the single compact layout.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto


def indices(rw, k: int) -> None:
    """Per-group re-pad indices, masks and shapes, and the pack index of the contexts.

    Reads ``rw.counts`` ([B, 1] real tokens per row), ``rw.offsets`` ([B, 1] packed start
    of each row, exclusive), ``rw.token_row``/``rw.in_row`` (row and rank of each packed
    token); sets ``rw.groups`` = [(rep_g, cmask_g, shape_g)] and ``rw.pidx_b``."""
    i64 = lambda base, v: rw._const(base, np.array(v, np.int64))  # noqa: E731
    minus1 = i64("minus_one", [-1])
    cnt = rw._op("Reshape", [rw.counts, minus1], "row_count_flat")
    offs = rw._op("Reshape", [rw.offsets, minus1], "row_offset_flat")
    # B and 0..B-1 from the data (ReduceSum/CumSum of ones), not from Shape/Range: the
    # symbolic shape inference would evaluate those and mis-size the per-group tensors.
    zero_s = i64("zero_scalar", 0)
    ones = rw._op("Add", [rw._op("Mul", [cnt, zero_s], "row_zeros"), i64("one_scalar", 1)],
                  "row_ones")
    batch = rw._op("ReduceSum", [ones, i64("axes0", [0])], "batch_1d", keepdims=1)
    ranks = rw._op("Sub", [rw._op("CumSum", [ones, i64("axis0", 0)], "row_count_up"),
                           i64("one_scalar", 1)], "row_ranks")
    sorted_cnt, order = (rw._name("sorted_counts"), rw._name("row_order"))
    rw.nodes.append(onnx.helper.make_node("TopK", [cnt, batch], [sorted_cnt, order],
                                          name=rw._name("row_sort_node"), axis=0, largest=0,
                                          sorted=1))
    one = i64("one", [1])
    one_s = i64("one_scalar", 1)
    gs = i64("groups", np.arange(k))
    lo = rw._op("Min", [rw._op("Div", [rw._op("Mul", [gs, batch], "group_scaled"),
                                       i64("k", [k])], "group_floor"),
                        rw._op("Sub", [batch, one], "last_row")], "group_lo")
    hi = rw._op("Max", [rw._op("Add", [lo, one], "group_lo1"), rw._op("Div", [
        rw._op("Mul", [i64("groups1", np.arange(1, k + 1)), batch], "group_scaled1"),
        i64("k", [k])], "group_floor1")], "group_hi")
    sizes = rw._op("Sub", [hi, lo], "group_rows")
    # A group no row is read from (B < K: it repeats the next group's first row) runs at
    # length 1: only the last group starting at a sorted position is read (module doc).
    lo_next = rw._op("Concat", [rw._op("Slice", [lo, one, i64("k", [k])], "group_lo_next"),
                                batch], "group_lo_after", axis=0)
    used = rw._op("Cast", [rw._op("Less", [lo, lo_next], "group_used_bool")], "group_used",
                  to=TensorProto.INT64)
    longest = rw._op("Max", [rw._op("Mul", [rw._op("Gather", [sorted_cnt, rw._op(
        "Sub", [hi, one], "group_last")], "group_longest_raw", axis=0), used],
        "group_longest_used"), one], "group_length")
    start = rw._op("CumSum", [rw._op("Mul", [sizes, longest], "group_slots"),
                              i64("axis0", 0)], "group_start", exclusive=1)
    # Sorted position of each row (the inverse permutation of the order).
    pos = rw._op("ScatterElements", [ranks, order, ranks], "row_position", axis=0)
    # Group of each row: the last group starting at or before its sorted position.
    starts_before = rw._op("Cast", [rw._op("LessOrEqual", [
        rw._op("Unsqueeze", [lo, i64("axes0", [0])], "group_lo_row"),
        rw._op("Unsqueeze", [pos, i64("axes1", [1])], "row_position_col")], "group_le")],
        "group_le_int", to=TensorProto.INT64)
    group = rw._op("Sub", [rw._op("ReduceSum", [starts_before, one], "group_count",
                                  keepdims=0), one_s], "row_group")
    in_group = rw._op("Sub", [pos, rw._op("Gather", [lo, group], "row_group_lo", axis=0)],
                      "row_in_group")
    base = rw._op("Add", [rw._op("Gather", [start, group], "row_group_start", axis=0),
                          rw._op("Mul", [in_group, rw._op("Gather", [longest, group],
                                                          "row_group_length", axis=0)],
                                 "row_group_offset")], "row_slot_base")
    slot = rw._op("Add", [rw._op("Gather", [base, rw.token_row], "token_slot_base", axis=0),
                          rw.in_row], "bucket_slot")
    zero = i64("zero", [0])
    first = rw._op("Slice", [rw._op("Concat", [slot, zero], "bucket_slot_or_zero", axis=0),
                             zero, one], "bucket_first_slot")
    rw.pidx_b = rw._op("Concat", [first, slot], "bucket_pack_index", axis=0)
    rw.groups = []
    for g in range(k):
        at = i64(f"group_{g}", [g])
        rows = rw._op("Slice", [order, rw._op("Gather", [lo, at], f"g{g}_lo", axis=0),
                                rw._op("Gather", [hi, at], f"g{g}_hi", axis=0)], f"g{g}_rows")
        length = rw._op("Gather", [longest, at], f"g{g}_length", axis=0)
        slots = rw._op("Unsqueeze", [rw._op("Range", [zero_s, rw._op(
            "Squeeze", [length, i64("axes0", [0])], f"g{g}_length_scalar"), one_s],
            f"g{g}_slots"), i64("axes0", [0])], f"g{g}_slot_row")
        cnt_g = rw._op("Unsqueeze", [rw._op("Gather", [cnt, rows], f"g{g}_counts", axis=0),
                                     i64("axes1", [1])], f"g{g}_count_col")
        off_g = rw._op("Unsqueeze", [rw._op("Gather", [offs, rows], f"g{g}_offsets", axis=0),
                                     i64("axes1", [1])], f"g{g}_offset_col")
        cmask = rw._op("Less", [slots, cnt_g], f"g{g}_mask_bool")
        rep = rw._op("Mul", [rw._op("Add", [rw._op("Add", [off_g, slots], f"g{g}_slot_token"),
                                            one_s], f"g{g}_slot_packed"),
                             rw._op("Cast", [cmask], f"g{g}_mask_int", to=TensorProto.INT64)],
                     f"g{g}_repad_index")
        if rw.found.mask_type != TensorProto.BOOL:
            cmask = rw._op("Cast", [cmask], f"g{g}_mask", to=rw.found.mask_type)
        shape = rw._op("Concat", [rw._op("Gather", [sizes, at], f"g{g}_batch", axis=0), length],
                       f"g{g}_shape", axis=0)
        rw.groups.append((rep, cmask, shape))


def clone_name(rw, name: str, g: int) -> str:
    key = (name, g)
    if key not in rw.clones:
        rw.clones[key] = rw._name(f"{name}/bucket{g}")
    return rw.clones[key]


def pack(rw, tensor: str) -> str:
    """A region output read by a token-wise node: every group's copy flattened, laid end
    to end, and the real tokens gathered in packed order."""
    if tensor not in rw.packed:
        rest = rw._shape_rest(clone_name(rw, tensor, 0))
        target = rw._op("Concat", [rw._const("minus_one", np.array([-1], np.int64)), rest],
                        "flat_shape", axis=0)
        flats = [rw._op("Reshape", [clone_name(rw, tensor, g), target], f"bucket{g}_flat")
                 for g in range(len(rw.groups))]
        rows = rw._op("Gather", [rw._op("Concat", flats, "buckets_flat", axis=0), rw.pidx_b],
                      "packed_rows", axis=0)
        rw.packed[tensor] = rw._op("Unsqueeze", [rows, rw.axis0], "packed")
        rw.counters["packs"] += 1
    return rw.packed[tensor]


def clone_region(rw, originals, renamed, consumers) -> set[int]:
    """The region once per group (module doc); returns the original region's indices,
    which the caller drops."""
    plan = rw.plan
    mask_reads = {}
    for i, k in plan.mask_reads:
        mask_reads.setdefault(i, set()).add(k)
    inside = {o for i in plan.region for o in originals[i].output if o}
    for g, (rep, cmask, shape) in enumerate(rw.groups):
        answers = {}
        for i in plan.shape_leaves:
            leaf = originals[i]
            x = leaf.input[0]
            rest = rw._shape_rest(renamed.get(x, x))
            full = rw._op("Concat", [shape, rest], f"g{g}_full_shape", axis=0)
            answers[leaf.output[0]] = rw._slice_shape(leaf, full, f"g{g}_shape_of")
        repadded = {}
        for name, packed in renamed.items():
            if any(i in plan.region for i in consumers.get(name, [])):
                out = rw._name(f"{name}/bucket{g}")
                rw._repad(packed, out, None, rw.found.ranks.get(name, 3), index=rep)
                repadded[name] = out
        for i in sorted(plan.region):
            node = copy.deepcopy(originals[i])
            node.name = rw._name(f"{node.name or node.op_type}/bucket{g}")
            for k, x in enumerate(node.input):
                if k in mask_reads.get(i, ()):
                    node.input[k] = cmask
                elif x in answers:
                    node.input[k] = answers[x]
                elif x in repadded:
                    node.input[k] = repadded[x]
                elif x in inside:
                    node.input[k] = clone_name(rw, x, g)
            for k, x in enumerate(node.output):
                if x:
                    node.output[k] = clone_name(rw, x, g)
            rw.nodes.append(node)
    rw.counters["attention_buckets"] = len(rw.groups)
    return set(plan.region)
