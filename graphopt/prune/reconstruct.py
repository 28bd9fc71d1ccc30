"""Reconstruction after a structural cut: a damped least-squares refit of the consuming layers.

After units are removed (neurons, channels, heads) or blocks are bypassed (layers), the
layers that read the changed activations (*sites*, ``graphopt.data.gram``) are refit so
their outputs stay close to the original model's:

    min_{W, b} ‖X W + b − T‖² + λ · mean diag(XᵀX) · ‖W − W₀‖²

1. X: the site's input in the pruned model, with the layers before it already refit
   (sequential: sites are refit in dependency levels, each level's Gram matrices captured
   on the model as the previous levels left it); T: the site's output in the original
   model (only the columns the site still has, when its own outputs were pruned too).
2. W₀ is the site's weight as the cut left it, so the damping pulls toward the original
   weights, not toward zero (a plain refit overfits a few thousand calibration tokens);
   λ → ∞ gives W₀ back. The bias is not damped: it absorbs the removed units' mean.
3. ``mode="bias"`` keeps W₀ and sets only the bias (the mean correction); ``"lstsq"`` fits
   both. A MatMul without a bias gets an ``Add`` when its bias moves; a Conv or Gemm gets
   its bias input.
4. Only Gram sums are kept (``graphopt.data.gram.accumulate``), never activations; their
   products are float32 (summed in float64) at ``damping`` ≥ ``SINGLE_DAMPING``.
5. Each site's relative error ‖XW + b − T‖² / ‖T‖² before (W₀, bias as cut) and after is
   returned (``SiteFit``) for the pass report.

Which sites: ``consumer_sites(coupling, removal)`` (the ``in`` weights of the cut groups)
and ``frontier_sites(model, tensors)`` (the first weight layers reading a bypassed block's
exit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..data.gram import GramStats, LinearSite, accumulate, constants, site_for
from ..data.segments import Segments
from ..runtime.blas import on_one_blas_thread

logger = logging.getLogger(__name__)

MODES = ("none", "bias", "lstsq")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
#: From this damping on, the refit's Gram products are float32 (summed in float64:
#: ``GramStats``' ``single``), as the scores' are: ~1e-7 relative rounding against a damping
#: of 1e-3 of the mean diagonal or more. The oracles' near-zero damping keeps float64.
SINGLE_DAMPING = 1e-3


@dataclass
class SiteFit:
    """One refit site: relative output error before and after, the rows it saw and the
    inputs (weight rows) each of its outputs was fit with."""

    site: str
    op: str
    rows: int
    before: float
    after: float
    damping: float | None = None  # chosen by cross-validation (``folds``)
    inputs: int = 0

    def to_dict(self) -> dict:
        out = {"site": self.site, "op": self.op, "rows": self.rows, "inputs": self.inputs,
               "error_before": round(self.before, 6), "error_after": round(self.after, 6)}
        if self.damping is not None:
            out["damping"] = self.damping if math.isfinite(self.damping) else "inf"
        return out


@on_one_blas_thread  # graphopt.runtime.blas: 2x faster than threaded on a busy machine
def solve(stats: GramStats, w0: np.ndarray, b0: np.ndarray, mode: str, damping: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """The refit (W, b) from the Gram sums (module doc); ``w0`` [K, N], ``b0`` [N]."""
    h, c = stats.xtx, stats.xty
    if mode == "bias" or stats.k == 0:
        b = (c[-1] - h[-1, :-1] @ w0) / max(h[-1, -1], 1e-30)  # Σ row weights (n)
        return w0, b
    k = stats.k
    scale = float(np.mean(np.diag(h)[:k])) if k else 0.0
    scale = scale if scale > 0 else 1.0
    d = np.full(k + 1, damping * scale)
    d[-1] = 0.0
    v0 = np.concatenate([w0, b0[None, :]], axis=0)
    lhs = h + np.diag(d + 1e-10 * scale)
    rhs = c + d[:, None] * v0
    try:
        v = np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        v = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    if not np.all(np.isfinite(v)):
        logger.warning("refit produced non-finite weights; kept the cut weights")
        return w0, b0
    return v[:-1], v[-1]


# ------------------------------------------------------------- damping by cross-validation
#
# The refit's damping chosen per site by cross-validation on the Gram sums.
#
# ``reconstruct.solve`` damps a refit toward the cut weights W₀ with λ · mean diag(XᵀX).
# Which λ generalizes depends on the site: an FFN down projection with ~1500 kept inputs fit
# on a few thousand tokens needs more than an attention output projection with 192. With the
# sums kept per fold (``graphopt.data.gram.accumulate``'s ``folds``: a fold's rows are whole
# calibration feeds), every candidate λ is fit on the other folds' sums and scored on the
# held-out fold's (‖X̃V − T‖² from its sums, ``GramStats.error``), without another capture:
#
#     cv(λ) = Σ_f error_f(solve(total − part_f, λ))
#
# ``choose_damping(stats, w0, b0)`` returns the λ of ``GRID`` (multiples of the pass's
# ``damping``) with the least held-out error (ties: the larger λ) and the errors; λ = ∞ (keep
# W₀, refit the bias only) is a candidate too, so a site whose refit does not generalize keeps
# its weights.

GRID = (0.1, 0.3, 1.0, 3.0, 10.0, math.inf)  # × the pass's damping


def choose_damping(stats: GramStats, w0: np.ndarray, b0: np.ndarray, damping: float,
                   grid: tuple[float, ...] = GRID) -> tuple[float, dict[float, float]] | None:
    """(λ, {λ: held-out error}) for one site, or None without two folds holding rows."""
    parts = [p for p in stats.parts if p.n > 0]
    if len(parts) < 2:
        return None
    errors: dict[float, float] = {}
    for factor in grid:
        lam = math.inf if math.isinf(factor) else damping * factor
        total = 0.0
        for part in parts:
            w, b = _solve_at(stats.minus(part), w0, b0, "lstsq", lam)
            total += part.error(w, b)
        errors[lam] = total
    best = min(errors, key=lambda lam: (errors[lam], -lam))
    return best, errors


def _solve_at(stats: GramStats, w0: np.ndarray, b0: np.ndarray, mode: str, lam: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """``solve`` at damping ``lam``, where λ = ∞ (a ``GRID`` choice) keeps W₀ and refits
    the bias only."""
    if math.isinf(lam):
        return solve(stats, w0, b0, "bias", 0.0)
    return solve(stats, w0, b0, mode, lam)


# ------------------------------------------------------------------------ model editing


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    """The initializer or ``Constant`` value named ``name``."""
    for init in model.graph.initializer:
        if init.name == name:
            return init
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    return a.t
    return None


def _uses(model: onnx.ModelProto, name: str) -> int:
    return sum(1 for n in model.graph.node for i in n.input if i == name)


def _set_input_const(model: onnx.ModelProto, node: onnx.NodeProto, index: int,
                     value: np.ndarray, base: str) -> None:
    """Give ``node`` input ``index`` the constant ``value``: in place when no other node
    reads the current initializer, else as a new initializer."""
    name = node.input[index] if index < len(node.input) else ""
    init = _initializer(model, name) if name else None
    if init is not None and _uses(model, name) == 1:
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), init.name))
        return
    taken = {i.name for i in model.graph.initializer} | \
        {o for n in model.graph.node for o in n.output}
    k = 0
    while f"{base}_refit{k}" in taken:
        k += 1
    new = f"{base}_refit{k}"
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), new))
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = new


def _bias_add(model: onnx.ModelProto, site: LinearSite, n: int):
    """A MatMul's bias: the only consumer of its output is ``Add`` with an [N] initializer.
    Returns (add node, input index of the bias) or None."""
    readers = [nd for nd in model.graph.node if site.output in nd.input]
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    add = readers[0]
    for i, name in enumerate(add.input):
        init = _initializer(model, name)
        if name != site.output and init is not None and \
                [d for d in init.dims if d != 1] == [n] and init.dims[-1] == n:
            return add, i
    return None


class _SiteEdit:
    """Reads and writes one site's weight and bias in a model."""

    def __init__(self, model: onnx.ModelProto, site: LinearSite):
        self.model = model
        self.site = site
        self.node = model.graph.node[site.node]
        w = numpy_helper.to_array(_initializer(model, site.weight))
        self.weight_like = w
        self.w0 = site.matrix(w).astype(np.float64)
        n = self.w0.shape[1]
        self.n = n
        self.bias_in_node = site.op in ("Conv", "Gemm")
        self.add = None
        b = np.zeros(n)
        if self.bias_in_node:
            if len(self.node.input) > 2 and self.node.input[2]:
                init = _initializer(model, self.node.input[2])
                if init is None:
                    raise ValueError("its bias is not a constant tensor")
                b = numpy_helper.to_array(init).astype(np.float64)
                self.bias_like = numpy_helper.to_array(init)
                if b.size != n:
                    raise ValueError("its bias broadcasts")
                b = b.reshape(n)
        else:
            self.add = _bias_add(model, site, n)
        self.b0 = b  # the bias inside the fitted map (0 for a MatMul: its Add stays)

    def write(self, w: np.ndarray, b: np.ndarray, moved_bias: bool) -> None:
        _set_input_const(self.model, self.node, 1, self.site.unmatrix(w, self.weight_like),
                         self.site.weight)
        if not moved_bias:
            return
        dtype = self.weight_like.dtype
        if self.bias_in_node:
            like = getattr(self, "bias_like", None)
            value = b.reshape(like.shape).astype(like.dtype) if like is not None else \
                b.astype(dtype)
            _set_input_const(self.model, self.node, 2, value, f"{self.site.output}_bias")
            return
        if self.add is not None:
            add, i = self.add
            init = _initializer(self.model, add.input[i])
            old = numpy_helper.to_array(init)
            value = (old.astype(np.float64) + b.reshape(old.shape)).astype(old.dtype)
            _set_input_const(self.model, add, i, value, add.input[i])
            return
        # a MatMul without a bias: Add one after it, under the MatMul's output name
        out = self.site.output
        inner = f"{out}_nobias"
        self.node.output[0] = inner
        name = f"{out}_refit_bias"
        self.model.graph.initializer.append(numpy_helper.from_array(b.astype(dtype), name))
        index = list(self.model.graph.node).index(self.node)
        self.model.graph.node.insert(index + 1, onnx.helper.make_node(
            "Add", [inner, name], [out], name=f"{self.node.name or out}_refit_bias"))


# --------------------------------------------------------------------------- the refit


def _levels(model: onnx.ModelProto, outputs: set[str]) -> dict[str, int]:
    """Dependency level of each site output: how many chosen sites lie upstream of it."""
    depth: dict[str, int] = {}
    level: dict[str, int] = {}
    for node in model.graph.node:
        d = max((depth.get(i, 0) for i in node.input if i), default=0)
        if node.output and node.output[0] in outputs:
            level[node.output[0]] = d
            d += 1
        for o in node.output:
            depth[o] = d
    return level


def reconstruct(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    outputs: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    mode: str = "lstsq",
    damping: float = 0.1,
    target_columns: Mapping[str, np.ndarray] | None = None,
    max_levels: int | None = None,
    streams: bool = False,
    postnorm: bool = False,
    folds: Sequence[int] | None = None,
) -> tuple[list[SiteFit], list[tuple[str, str]]]:
    """Refit the sites named by ``outputs`` (node output tensors) in ``pruned``, in place.

    Returns the fits and the sites skipped, with the reason ((site, reason) pairs).
    ``max_levels`` caps the sequential rounds (adjacent levels are merged; fewer rounds,
    fewer passes over the calibration data). ``streams=True``: a site whose output is
    added into a residual sum (``y + bias + r``) is fit so that the *sum* matches the
    original's (``stream_sums``; ``accumulate``'s ``streams``): it also absorbs the error
    the layers before it left in the stream, not only its own. ``postnorm=True``: a site
    whose residual sum goes straight into a LayerNormalization is fit on the error the
    norm sees (rows weighted by 1 / the original sum's variance, ``graphopt.prune.postnorm``).
    """
    if mode not in MODES:
        raise ValueError(f"reconstruct must be one of {', '.join(MODES)}, not {mode!r}")
    fits: list[SiteFit] = []
    skipped: list[tuple[str, str]] = []
    if mode == "none" or not outputs:
        return fits, skipped
    wanted = set(outputs)
    levels = _levels(pruned, wanted)
    for name in sorted(wanted - set(levels)):
        skipped.append((name, "no node produces it in the pruned model"))
    distinct = sorted(set(levels.values()))
    # one runner per model: each level's capture runs only the nodes after the last one's
    # (the refit rewrites a level's weights: what is downstream of them is run again)
    runner, ref_runner = Segments(feeds), Segments(feeds)
    if max_levels and len(distinct) > max_levels:
        per = -(-len(distinct) // max_levels)
        remap = {lv: i // per for i, lv in enumerate(distinct)}
        levels = {k: remap[v] for k, v in levels.items()}
        distinct = sorted(set(levels.values()))
    for lv in distinct:
        producer = {n.output[0]: i for i, n in enumerate(pruned.graph.node) if n.output}
        inits = constants(pruned)
        sites: list[LinearSite] = []
        edits: dict[str, _SiteEdit] = {}
        for name in [o for o in outputs if levels.get(o) == lv]:
            site, why = site_for(pruned, producer[name], inits)
            if site is None:
                skipped.append((name, why or "not a weight layer"))
                continue
            try:
                edits[name] = _SiteEdit(pruned, site)
            except ValueError as exc:
                skipped.append((name, str(exc)))
                continue
            sites.append(site)
        if not sites:
            continue
        sites = _matching_targets(original, pruned, sites, target_columns, skipped)
        if not sites:
            continue
        routes = weights = None
        made = {o for n in original.graph.node for o in n.output}
        if streams:
            routes = {k: v for k, v in stream_sums(pruned, [x.output for x in sites]).items()
                      if v in made}
        if postnorm:
            from .postnorm import norm_streams

            sums = stream_sums(pruned, [x.output for x in sites])
            weights = {k: v for k, v in norm_streams(pruned, sums).items() if v in made}
        stats = accumulate(pruned, sites, feeds, targets=True, reference=original,
                           target_columns=target_columns, streams=routes, weights=weights,
                           segments=runner, ref_segments=ref_runner,
                           folds=folds if mode == "lstsq" else None,
                           single=damping >= SINGLE_DAMPING, rerun=True)
        for site in sites:
            st, ed = stats[site.output], edits[site.output]
            if st.n == 0 or st.tt <= 0:
                skipped.append((site.output, "no calibration rows reach it"))
                continue
            before = st.error(ed.w0, ed.b0) / st.tt
            lam = None
            if st.parts:
                chosen = choose_damping(st, ed.w0, ed.b0, damping)
                lam = chosen[0] if chosen is not None else None
            w, b = _solve_at(st, ed.w0, ed.b0, mode, damping if lam is None else lam)
            after = st.error(w, b) / st.tt
            if after > before:  # a refit is never worse on its own data; guard rounding
                w, b, after = ed.w0, ed.b0, before
            ed.write(w if mode == "lstsq" else ed.w0, b,
                     moved_bias=bool(np.any(np.abs(b - ed.b0) > 0)))
            runner.invalidate(pruned, [site.output])
            fits.append(SiteFit(site.output, site.op, st.n, before, after, lam, st.k))
            logger.info("refit %s: relative error %.4g -> %.4g (%d rows, damping %s)",
                        site.output, before, after, st.n, damping if lam is None else lam)
    return fits, skipped


def stream_sums(model: onnx.ModelProto, outputs: Sequence[str]) -> dict[str, str]:
    """For each site output that reaches a residual sum through constant-bias ``Add``s
    only (single readers), the sum's tensor: ``Add(y + b, r)`` with ``r`` an activation."""
    consts = set(constants(model))
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    out = {}
    for name in outputs:
        current = name
        for _ in range(4):
            nodes = readers.get(current, [])
            if len(nodes) != 1 or nodes[0].op_type != "Add" or len(nodes[0].input) != 2:
                break
            other = [x for x in nodes[0].input if x != current]
            if len(other) != 1:
                break
            if other[0] not in consts:
                out[name] = nodes[0].output[0]
                break
            current = nodes[0].output[0]
    return out


def _matching_targets(original, pruned, sites, target_columns, skipped):
    """Sites whose output width in the original (after ``target_columns``) is their width
    now; the others are skipped with the reason (a cut the caller did not map)."""
    from ..data.gram import constants, site_dims

    consts = constants(pruned)
    ref = {n.output[0]: i for i, n in enumerate(original.graph.node) if n.output}
    ref_consts = constants(original)
    out = []
    for s in sites:
        n_now = site_dims(pruned, s, consts)[1]
        if target_columns and s.output in target_columns:
            n_ref = len(target_columns[s.output])
        else:
            node = original.graph.node[ref[s.output]] if s.output in ref else None
            site, _ = site_for(original, ref[s.output], ref_consts) if node is not None else \
                (None, None)
            n_ref = site_dims(original, site, ref_consts)[1] if site is not None else n_now
        if n_ref != n_now:
            skipped.append((s.output, f"its output has {n_now} channels, the original's "
                                      f"{n_ref}: the cut is not mapped"))
            continue
        out.append(s)
    return out


# --------------------------------------------------------------------------- which sites


def consumer_sites(coupling, removal: Mapping[int, np.ndarray],
                   after: Sequence[str] = (), downstream: bool = False
                   ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Sites reading the removed units (the groups' ``in`` weights), in graph order, and
    the original output columns each still has where its own outputs were cut too.

    ``downstream=True`` adds every weight layer whose input depends on a changed tensor:
    the consumers' outputs and the tensors in ``after`` (e.g. the exits of bypassed blocks).
    Refitting all of them in order (inputs from the pruned prefix, targets from the
    original) is the layer-wise mask tuning of Kwon et al. (2022) carried through the
    whole model: each layer also absorbs the error the layers before it left."""
    from .apply import removed_atoms

    view = coupling.view
    atoms = removed_atoms(coupling, removal)
    nodes: set[int] = set()
    for gid, units in removal.items():
        if not len(units):
            continue
        group = coupling.group(gid)
        for m in group.members_with_role("in"):
            idx = m.slot.use[0]
            if view.nodes[idx].op_type in WEIGHT_OPS:
                nodes.add(idx)
    if downstream:
        nodes |= _downstream_weights(view.nodes, {view.nodes[i].output[0] for i in nodes}
                                     | set(after))
    outputs = [view.nodes[i].output[0] for i in sorted(nodes)]
    columns: dict[str, np.ndarray] = {}
    out_of = {view.nodes[i].output[0]: i for i in nodes}
    for m, cut in atoms.items():
        if m.slot.use is None and m.slot.tensor in out_of:
            # the site's own output channels were cut (read off its output activation)
            node = view.nodes[out_of[m.slot.tensor]]
            shape = view.shapes.get(m.slot.tensor)
            rank = len(shape) if shape is not None else None
            channel = 1 if node.op_type == "Conv" else (rank - 1 if rank else None)
            if channel is not None and m.axis == channel and coupling.dims.get(m):
                columns[m.slot.tensor] = np.delete(np.arange(coupling.dims[m]), cut)
            continue
        if m.slot.use is None or m.slot.use[1] != 1 or m.slot.use[0] not in nodes:
            continue
        node = view.nodes[m.slot.use[0]]
        w = view.const(m.slot.tensor)
        if w is None or node.output[0] in columns:
            continue
        out_axis = _out_axis(node, w.ndim)
        if m.axis == out_axis:
            columns[node.output[0]] = np.delete(np.arange(w.shape[out_axis]), cut)
    return outputs, columns


def _downstream_weights(nodes, changed: set[str]) -> set[int]:
    """Indices of the weight nodes (constant weight, any input reached) whose activation
    input depends on a tensor in ``changed`` (``nodes`` in topological order)."""
    reach = set(changed)
    out: set[int] = set()
    for i, node in enumerate(nodes):
        if any(x in reach for x in node.input if x):
            if node.op_type in WEIGHT_OPS and node.input and node.input[0] in reach:
                out.add(i)
            reach.update(o for o in node.output if o)
    return out


def _out_axis(node: onnx.NodeProto, ndim: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans else 1
    return ndim - 1


def frontier_sites(model: onnx.ModelProto, tensors: Sequence[str]) -> list[str]:
    """The first weight layers (sites) reading ``tensors``, through ops that are not weight
    layers (in graph order). A node mixing a reached activation with one that is not reached
    (a residual ``Add(x, f(x))``, whose ``f`` starts with a weight layer) ends the walk: what
    it makes is the stream itself, not one layer's input."""
    consts = set(constants(model))
    reach = set(tensors)
    found = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS + ("ConvTranspose",):
            if node.input and node.input[0] in reach and len(node.input) > 1 and \
                    node.input[1] in consts:
                found.append(node.output[0])
            continue
        acts = [x for x in node.input if x and x not in consts]
        if acts and all(a in reach for a in acts):
            reach.update(o for o in node.output if o)
    return found
