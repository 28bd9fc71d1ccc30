"""Gram matrices of the inputs of weight-bearing layers, accumulated over calibration batches.

A *site* (``LinearSite``) is one node that multiplies an activation by a constant weight:
``MatMul(x, W)``, ``Gemm(x, W[, C])`` (``transA=0``) or a 2-D ``Conv(x, W[, B])`` with
``group=1``. Its input is read as the rows of a matrix ``X`` (``rows``): the tokens of a
``[..., K]`` MatMul input, or the im2col patches of a conv (one row per output position,
``C·kh·kw`` columns in the weight's own order; a 1×1 stride-1 conv is the plain per-pixel
channel matrix). Its output, read the same way (``target_rows``), is ``X W``.

``accumulate(model, sites, feeds)`` runs the calibration feeds through onnxruntime (the
site tensors exposed as outputs of a temporary session, one feed at a time) and keeps, per
site, only running sums (``GramStats``):

1. ``xtx`` = X̃ᵀX̃ with X̃ = [X, 1] (the ones column gives the bias row; ``xtx[-1, -1]``
   is the row count);
2. with ``targets=True``: ``xty`` = X̃ᵀT and ``tt`` = ‖T‖², where T is the site's output
   in ``reference`` (another model, e.g. the original before pruning, run on the same
   feeds; default the same model). This is what a least-squares refit of the site's
   weight toward T needs, and what the error of any weight on these inputs needs:
   ‖X̃V − T‖² = tr(VᵀX̃ᵀX̃V) − 2 tr(VᵀX̃ᵀT) + ‖T‖² (``GramStats.error``).

Tokens that the feed's attention mask marks as padding (a 2-D integer input named like
``*mask*`` whose shape is the activation's leading two dims) are left out. Memory: the sums
per site (O(K²) and O(K·N)) and one feed's activations; sites are captured a chunk at a time
(``max_bytes`` of sums per chunk) when there are many. Sums are float64, so batches in any
split give the same result as one big batch (to float64 rounding). Sites of one chunk that
read the same rows (``graphopt.data.site_rows.same_rows``: Q, K and V on one input) share
one X̃ᵀX̃, summed once: their ``GramStats`` hold the same array (read it, never write it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InputSpecError
from .gramstats import GramStats, mirror_lower  # noqa: F401  (re-exported)
from .segments import Segments
from .site_rows import row_weights, same_rows, target_rows

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class LinearSite:
    """One weight-bearing node, read as ``Y = X W`` (see the module doc).

    ``output`` is the node's output tensor (names survive pruning rewrites, so a site is
    found again in a pruned copy by it); ``input`` the activation it reads; ``weight`` the
    weight (an initializer or a ``Constant``); ``kernel``/``strides``/``pads``/``dilations``
    describe a conv.
    """

    output: str
    input: str
    weight: str
    op: str  # "MatMul", "Gemm" or "Conv"
    node: int
    trans_b: bool = False
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The site's input as a matrix [rows, K] (im2col for a conv)."""
        x = np.asarray(x)
        if self.op != "Conv":
            return x.reshape(-1, x.shape[-1])
        return im2col(x, self.kernel, self.strides, self.pads, self.dilations)

    def target_rows(self, y: np.ndarray) -> np.ndarray:
        """The site's output as a matrix [rows, N] (rows in the order of ``rows``)."""
        y = np.asarray(y)
        if self.op != "Conv":
            return y.reshape(-1, y.shape[-1])
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        """The weight as the [K, N] matrix that multiplies ``rows``."""
        if self.op == "Conv":
            return weight.reshape(weight.shape[0], -1).T
        if self.op == "Gemm" and self.trans_b:
            return weight.T
        return weight

    def unmatrix(self, matrix: np.ndarray, like: np.ndarray) -> np.ndarray:
        """A [K, N] matrix back in the layout of the weight initializer ``like``."""
        if self.op == "Conv":
            return matrix.T.reshape(like.shape).astype(like.dtype)
        if self.op == "Gemm" and self.trans_b:
            return np.ascontiguousarray(matrix.T).astype(like.dtype)
        return matrix.astype(like.dtype)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            if isinstance(value, bytes):
                return value.decode()
            return tuple(value) if isinstance(value, list) else value
    return default


def constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values (exporters such as paddle2onnx put weights
    in ``Constant`` nodes), by tensor name."""
    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = a.t
    out.update({i.name: i for i in model.graph.initializer})
    return out


def site_for(model: onnx.ModelProto, node_index: int,
             initializers: Mapping[str, onnx.TensorProto] | None = None
             ) -> tuple[LinearSite | None, str | None]:
    """The site of node ``node_index``, or None and the reason it is not one."""
    node = model.graph.node[node_index]
    inits = initializers if initializers is not None else constants(model)
    label = f"{node.op_type} '{node.name or node.output[0]}'"
    if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
        return None, f"{label} is not a MatMul, Gemm or Conv"
    weight = inits.get(node.input[1])
    if weight is None or node.input[0] in inits:
        return None, f"{label}: its weight is not a constant tensor"
    dims = tuple(weight.dims)
    if node.op_type == "MatMul":
        if len(dims) != 2:
            return None, f"{label}: a {len(dims)}-D weight"
        return LinearSite(node.output[0], node.input[0], node.input[1], "MatMul",
                          node_index), None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or float(_attr(node, "alpha", 1.0)) != 1.0 or \
                float(_attr(node, "beta", 1.0)) != 1.0:
            return None, f"{label}: transA, alpha or beta not the default"
        return LinearSite(node.output[0], node.input[0], node.input[1], "Gemm", node_index,
                          trans_b=bool(_attr(node, "transB", 0))), None
    if len(dims) != 4:
        return None, f"{label}: a {len(dims) - 2}-D convolution (only 2-D is read as rows)"
    if _attr(node, "group", 1) != 1:
        return None, f"{label}: a grouped convolution"
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", ""):
        return None, f"{label}: auto_pad={auto_pad}"
    kernel = tuple(int(d) for d in dims[2:])
    strides = tuple(_attr(node, "strides", (1, 1)))
    dilations = tuple(_attr(node, "dilations", (1, 1)))
    pads = tuple(_attr(node, "pads", (0, 0, 0, 0))) if auto_pad != "VALID" else (0, 0, 0, 0)
    return LinearSite(node.output[0], node.input[0], node.input[1], "Conv", node_index,
                      kernel=kernel, strides=strides, pads=pads, dilations=dilations), None


def linear_sites(model: onnx.ModelProto) -> dict[str, LinearSite]:
    """Every site of ``model``, keyed by the node's output tensor."""
    inits = constants(model)
    out = {}
    for idx in range(len(model.graph.node)):
        site, _ = site_for(model, idx, inits)
        if site is not None:
            out[site.output] = site
    return out


def im2col(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int],
           pads: Sequence[int], dilations: Sequence[int]) -> np.ndarray:
    """[N, C, H, W] -> [N·Ho·Wo, C·kh·kw] patches, columns in ``W[o, c, i, j]`` order."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    n, c = x.shape[:2]
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(pads):
        return np.moveaxis(x, 1, -1).reshape(-1, c)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(-1, c * kh * kw)


def token_mask(feed: Feed) -> np.ndarray | None:
    """The feed's attention mask (True = real token), if it has one."""
    for name, value in feed.items():
        if "mask" in name.lower() and np.ndim(value) == 2:
            return np.asarray(value) != 0
    return None


def _row_keep(site: LinearSite, value: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    if mask is None or site.op == "Conv" or value.ndim < 3 or \
            tuple(value.shape[:2]) != mask.shape:
        return None
    keep = np.broadcast_to(mask.reshape(mask.shape + (1,) * (value.ndim - 3)), value.shape[:-1])
    return keep.reshape(-1)


def site_dims(model: onnx.ModelProto, site: LinearSite,
              consts: Mapping[str, onnx.TensorProto] | None = None) -> tuple[int, int]:
    """(K, N) of the site's weight matrix, from the weight tensor's dims."""
    init = (consts if consts is not None else constants(model)).get(site.weight)
    if init is None:
        raise KeyError(site.weight)
    shape = tuple(int(d) for d in init.dims)
    if site.op == "Conv":
        return int(np.prod(shape[1:])), shape[0]
    if site.op == "Gemm" and site.trans_b:
        return shape[1], shape[0]
    return shape[0], shape[1]


def chunked(sites: Sequence[LinearSite], dims: Mapping[str, tuple[int, int]],
            max_bytes: int = 512 * 2**20) -> list[list[LinearSite]]:
    """``sites`` in consecutive chunks whose Gram sums fit ``max_bytes`` (at least one
    site per chunk): a caller that reduces each chunk before the next bounds memory."""
    chunks: list[list[LinearSite]] = [[]]
    used = 0
    for s in sites:
        k, n = dims[s.output]
        size = 8 * (k + 1) * (k + 1 + n)
        if chunks[-1] and used + size > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(s)
        used += size
    return [c for c in chunks if c]


def _session(model: onnx.ModelProto, names: Sequence[str], providers):
    """A session computing ``names`` from the graph inputs (the large weights shared with
    ``model``'s bytes, not serialized: ``graphopt.data.segments``)."""
    from .segments import segment_session

    return segment_session(model, names, providers)


def _run(session, feed: Feed, names: Sequence[str]) -> list[np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    missing = wanted - set(feed)
    if missing:
        raise InputSpecError(f"calibration inputs lack {sorted(missing)}")
    return session.run(list(names), {k: v for k, v in feed.items() if k in wanted})


def accumulate(
    model: onnx.ModelProto,
    sites: Sequence[LinearSite],
    feeds: Iterable[Feed],
    *,
    targets: bool = False,
    reference: onnx.ModelProto | None = None,
    target_columns: Mapping[str, np.ndarray] | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    max_bytes: int = 512 * 2**20,
    max_rows: int | None = 4096,
    streams: Mapping[str, str] | None = None,
    weights: Mapping[str, str] | None = None,
    segments: Segments | None = None,
    ref_segments: Segments | None = None,
    observe: Mapping[str, Callable[[int, np.ndarray], None]] | None = None,
    folds: Sequence[int] | None = None,
    single: bool = False,
    upto: int | None = None,
    early: dict | None = None,
    rerun: bool = False,
) -> dict[str, GramStats]:
    """Gram sums of every site's input in ``model`` (and targets from ``reference``).

    ``sites`` are sites of ``model``; with ``targets=True`` each site's output tensor (same
    name) is read from ``reference`` (default ``model``) on the same feed;
    ``target_columns[site.output]`` picks the reference's output columns that the site
    still has (after its own outputs were pruned). ``max_rows``: at most this many rows
    per site and feed (an even random subset, seeded by the feed's position, the same for
    X and T), which bounds the cost of conv maps with many positions; ``None`` keeps all.
    ``streams[site.output]`` names the residual sum the site's output is added into
    (``y + bias + r``, unit coefficients): the target is then ``y + (S_ref − S)``, what
    the site must output for the stream S to match the reference's S_ref, so the site
    also absorbs the stream's error from the layers before it (where the shapes do not
    line up, the plain target). ``weights[site.output]`` names a tensor holding the
    site's output rows (a residual sum a LayerNormalization reads): each row is weighted
    by 1 / its variance over the last axis, as the norm will scale its error (read from
    ``reference`` when the targets come from it). ``segments``/``ref_segments``: the
    runners (``graphopt.data.segments``) of ``model``/``reference`` on these feeds, shared
    with the caller's other captures (sequential refits, chunked scores) so that each runs
    only the nodes the ones before it did not; default: new ones, shared by this call's
    chunks. ``observe[name](feed_index, array)``: more tensors of ``model`` fetched in the
    same runs (with the first chunk) and handed over feed by feed, so a caller's other
    statistics need no run of their own. ``single``: ``GramStats``' float32 products.
    ``early[site.output]``: the sums of the first ``upto`` feeds (``GramStats.snapshot``).
    ``rerun``: the caller will rewrite the sites' weights and capture after them again
    (a sequential refit, ``segments.invalidate``): ``segments`` holds the sites' inputs
    so that the sites run again from them (``Segments.run``'s ``hold``).
    Returns ``{site.output: GramStats}``.
    """
    feeds = list(feeds)
    if not feeds:
        raise InputSpecError("no calibration inputs were given")
    segments = segments if segments is not None else Segments(feeds, providers=providers)
    if ref_segments is None:
        ref_segments = Segments(feeds, providers=providers)
    sites = list(sites)
    consts = constants(model)
    dims = {s.output: site_dims(model, s, consts) for s in sites}
    out: dict[str, GramStats] = {}
    other = reference if reference is not None else model
    watched = dict(observe or {})
    # the Gram products of a full buffer run on this thread while the next feeds are
    # captured (GramStats' ``flusher``): the same products, in the same order
    flusher = ThreadPoolExecutor(1, thread_name_prefix="graphopt-gram")
    try:
        for chunk in chunked(sites, dims, max_bytes):
            seen, watched = watched, {}  # the observed tensors come with the first chunk

            weighed = {s.output: weights[s.output] for s in chunk
                       if weights and s.output in weights}
            readers = same_rows(chunk, weighed)

            def fresh(group):
                widths = [dims[s.output][1] for s in group]
                k = dims[group[0].output][0]
                return GramStats(np.zeros((k + 1,) * 2),
                                 np.zeros((k + 1, sum(widths))) if targets else None,
                                 single=single, widths=widths, flusher=flusher)

            ids = sorted(set(folds)) if folds is not None else [None]
            parts = {g[0].output: {i: fresh(g) for i in ids} for g in readers}
            x_names = list(dict.fromkeys(s.input for s in chunk))
            t_names = list(dict.fromkeys(s.output for s in chunk)) if targets else []
            same = targets and other is model
            routed = {s.output: streams[s.output] for s in chunk
                      if targets and not same and streams and s.output in streams}
            extra = list(dict.fromkeys([o for o in routed] + list(routed.values())))
            t_names = list(dict.fromkeys(t_names + list(routed.values())))
            if targets and not same:
                t_names = list(dict.fromkeys(t_names + list(weighed.values())))
            else:
                extra = list(dict.fromkeys(extra + list(weighed.values())))
            names = x_names + [n for n in dict.fromkeys(t_names + extra) if n not in x_names] \
                if same else x_names + [n for n in extra if n not in x_names]
            names += [n for n in seen if n not in names]
            ref_names = t_names if targets and not same else []
            values_of = segments.run(model, names, hold=x_names if rerun else ())
            refs = ref_segments.run(other, ref_names) if ref_names else None
            for f_idx, feed in enumerate(feeds):
                if f_idx == upto and early is not None and folds is None:
                    early.update({s.output: piece for g in readers for s, piece in
                                  zip(g, parts[g[0].output][None].snapshot().split())})
                values = next(values_of)
                values_t = next(refs) if refs is not None else values
                for name, take in seen.items():
                    take(f_idx, values[name])
                mask = token_mask(feed)
                for group in readers:
                    lead = group[0]
                    x = values[lead.input]
                    keep = _row_keep(lead, x, mask)
                    rows = lead.rows(x)
                    ts = [target_rows(s, values, values_t, routed, target_columns)
                          for s in group] if targets else None
                    w = row_weights(lead, (values_t if targets and not same else values)
                                    [weighed[lead.output]], rows) \
                        if lead.output in weighed else None
                    if keep is not None:
                        rows = rows[keep]
                        ts = [t[keep] for t in ts] if ts is not None else None
                        w = w[keep] if w is not None else None
                    if max_rows and rows.shape[0] > max_rows:
                        pick = np.sort(np.random.default_rng(f_idx).choice(
                            rows.shape[0], max_rows, replace=False))
                        rows = rows[pick]
                        ts = [t[pick] for t in ts] if ts is not None else None
                        w = w[pick] if w is not None else None
                    for s, t in zip(group, ts or ()):
                        if t.shape[0] != rows.shape[0]:
                            raise InputSpecError(f"site '{s.output}': {rows.shape[0]} input rows "
                                                 f"but {t.shape[0]} target rows")
                    parts[lead.output][folds[f_idx] if folds is not None else None].add(rows, ts, w)
            for it in (values_of, refs):
                if it is not None:
                    next(it, None)  # let the runner keep what the next capture needs
            got = {}
            for group in readers:
                pieces = {i: p.split() for i, p in parts.pop(group[0].output).items()}
                for j, s in enumerate(group):
                    got[s.output] = GramStats.total([pieces[i][j] for i in ids]) \
                        if folds is not None else pieces[None][j]
            out.update({s.output: got[s.output] for s in chunk})
    finally:
        flusher.shutdown(wait=True)
    return out


def weight_matrix(model: onnx.ModelProto, site: LinearSite) -> np.ndarray:
    """The site's weight as its [K, N] matrix (float64)."""
    init = constants(model).get(site.weight)
    if init is None:
        raise KeyError(site.weight)
    return site.matrix(numpy_helper.to_array(init)).astype(np.float64)
