"""The rows of a site's Gram sums on one feed, beyond its input: which sites share them,
what they are fit toward, and how they are weighted (``graphopt.data.gram.accumulate``).

1. ``same_rows``: sites reading the same rows (the same input tensor, read the same way,
   weighted alike) form one group, whose X̃ᵀX̃ is one sum: Q, K and V of an attention block
   all read the normed stream, so their refit (or scores) make one product, not three.
2. ``target_rows``: a site's output rows in the reference, on the columns it still has, or
   ``y + (S_ref − S)`` when its output joins a residual stream (``accumulate``'s ``streams``).
3. ``row_weights``: 1 / the variance of each row of a residual sum (``accumulate``'s
   ``weights``: the error a LayerNormalization passes on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# sites are ``graphopt.data.gram.LinearSite``s (not imported: gram imports this module)


def same_rows(sites: Sequence, weighed: Mapping[str, str] | None = None) -> list[list]:
    """``sites`` grouped (in order) by the rows they read: the same input tensor, read the
    same way (a conv's geometry), weighted by the same tensor (``weighed``: site output ->
    ``accumulate``'s ``weights`` name). One group's X̃ᵀX̃ is one sum (Q, K and V of an
    attention block, all reading the normed stream)."""
    groups: dict[tuple, list] = {}
    for s in sites:
        how = (s.kernel, s.strides, s.pads, s.dilations) if s.op == "Conv" else None
        groups.setdefault((s.input, how, (weighed or {}).get(s.output)), []).append(s)
    return list(groups.values())


def target_rows(site, values, values_t, routed, columns) -> np.ndarray:
    """The site's target rows on one feed (``accumulate``'s targets, columns and streams)."""
    t = site.target_rows(values_t[site.output])
    if columns and site.output in columns:
        t = t[:, columns[site.output]]
    if site.output in routed:
        t = stream_target(site, t, values[site.output], values[routed[site.output]],
                          values_t[routed[site.output]], (columns or {}).get(site.output))
    return t


def row_weights(site, stream: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """1 / variance over the last axis of each row of ``stream`` (``accumulate``'s
    ``weights``); None where its rows do not line up with the site's."""
    s = site.target_rows(stream).astype(np.float64)
    if s.shape[0] != rows.shape[0]:
        return None
    var = s.var(axis=1)
    return 1.0 / np.maximum(var, 1e-6 * max(float(var.mean()), 1e-30))


def stream_target(site, plain: np.ndarray, y: np.ndarray, stream: np.ndarray,
                  stream_ref: np.ndarray, columns: np.ndarray | None) -> np.ndarray:
    """``y + (S_ref − S)`` as target rows (``accumulate``'s ``streams``), else ``plain``."""
    if np.shape(y) != np.shape(stream):
        return plain
    ref = site.target_rows(stream_ref)
    if columns is not None:
        ref = ref[:, columns]
    now = site.target_rows(stream)
    if ref.shape != now.shape:
        return plain
    return site.target_rows(y) + (ref - now)
