"""More contexts from the user's own sentences: joined pairs and cropped spans of token feeds.

``graphopt.data.vary.replace_tokens`` spreads the calibration's token *identities* over the
vocabulary; this module varies their *contexts*, with only the user's real tokens:

1. ``join_pairs``: each row of each feed followed by another row (a fixed random pairing
   over all rows of all feeds): the first row's real tokens without its last one
   (``[SEP]``-like) and the second's without its first (``[CLS]``-like), so every token is
   seen after, or before, a sentence it never stood with, and at other positions. A row is
   cut to the longest real length in the calibration (positions the model was given).
2. ``crop_spans``: each row's first and last real token around a random contiguous run of
   its inner tokens (a share in [0.3, 0.7] of them): the same words with less context.

Feeds keep their inputs, dtypes and batch size: the token input (an integer input indexing
an embedding table, ``vary.token_inputs``) is rebuilt from source positions, and every other
input of the same [batch, length] shape follows the same positions (token types), except an
attention mask (ones on real tokens, zeros on padding) and ``position_ids`` (0..n-1 on each
row). Padding takes the feed's own pad value. Deterministic for a ``seed``; [] for a model
without token-id inputs or feeds without a [batch, length] token input.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from .vary import _mask, token_inputs

Feed = dict[str, np.ndarray]
KINDS = ("join", "crop")


def _rows(feeds: Sequence[Mapping[str, np.ndarray]], name: str):
    """Per feed: (ids [B, L], real-position lists per row), or None when not [B, L]."""
    out = []
    for f in feeds:
        ids = np.asarray(f.get(name)) if name in f else None
        if ids is None or ids.ndim != 2:
            return None
        m = _mask(f, ids)
        out.append([np.flatnonzero(m[r]) for r in range(ids.shape[0])])
    return out


def _assemble(like: Mapping[str, np.ndarray], name: str, feeds: Sequence[Mapping],
              rows: Sequence[list[tuple[int, int, np.ndarray]]]) -> Feed:
    """A new feed shaped like ``like``'s inputs: row r concatenates the positions of its
    (feed index, row, positions) parts; [batch, length] inputs follow them (module doc)."""
    ids = np.asarray(like[name])
    lengths = [sum(len(p) for _, _, p in parts) for parts in rows]
    width = max(lengths)
    m = _mask(like, ids)
    pad_of = {}
    for key, value in like.items():
        v = np.asarray(value)
        if v.shape == ids.shape:
            pad_of[key] = v[~m][0] if (~m).any() else np.zeros((), v.dtype)
    out: Feed = {}
    for key, value in like.items():
        v = np.asarray(value)
        if v.shape != ids.shape:
            out[key] = np.array(v, copy=True)
            continue
        new = np.full((len(rows), width), pad_of[key], dtype=v.dtype)
        for r, parts in enumerate(rows):
            if "mask" in key.lower():
                new[r, :lengths[r]] = 1
            elif key.lower() == "position_ids":
                new[r, :lengths[r]] = np.arange(lengths[r])
            else:
                new[r, :lengths[r]] = np.concatenate(
                    [np.asarray(feeds[i][key])[row, pos] for i, row, pos in parts])
        out[key] = new
    return out


def _token_rows(feeds, model):
    """(token input name, ``_rows``) of the first [batch, length] token input, or None."""
    for name in token_inputs(model):
        if feeds and all(name in f and np.ndim(f[name]) == 2 for f in feeds):
            return name, _rows(feeds, name)
    return None


def _on_token_rows(build):
    """``build(feeds, token input, _rows, seed)`` as ``f(feeds, model, seed=0)``: [] for a
    model without a [batch, length] token input."""
    @functools.wraps(build)
    def run(feeds: Sequence[Mapping[str, np.ndarray]], model: onnx.ModelProto,
            seed: int = 0) -> list[Feed]:
        found = _token_rows(feeds, model)
        return [] if found is None else build(feeds, *found, seed=seed)
    return run


def _each_row(feeds, name, real, make) -> list[Feed]:
    """A copy of every feed whose row r is ``make(i, r, positions)``'s parts (``_assemble``)."""
    return [_assemble(feeds[i], name, feeds, [make(i, r, pos) for r, pos in enumerate(rows)])
            for i, rows in enumerate(real)]


@_on_token_rows
def join_pairs(feeds, name: str, real, seed: int = 0) -> list[Feed]:
    """One joined copy per feed (module doc 1); [] when there is nothing to join."""
    everyone = [(i, r) for i, rows in enumerate(real) for r in range(len(rows))
                if len(rows[r]) >= 2]
    if len(everyone) < 2:
        return []
    longest = max(len(p) for rows in real for p in rows)
    order = np.random.default_rng(seed).permutation(len(everyone))
    partner = {everyone[k]: everyone[order[(j + 1) % len(order)]]
               for j, k in enumerate(order)}  # a cycle: nobody is paired with itself

    def make(i, r, pos):
        if len(pos) < 2:
            return [(i, r, pos)]
        j, s = partner[(i, r)]
        second = real[j][s][1:]
        room = max(longest - (len(pos) - 1), 1)
        if len(second) > room:  # cut to the longest length, keeping the last token
            second = np.concatenate([second[:room - 1], second[-1:]])
        return [(i, r, pos[:-1]), (j, s, second)]

    return _each_row(feeds, name, real, make)


@_on_token_rows
def crop_spans(feeds, name: str, real, seed: int = 0) -> list[Feed]:
    """One cropped copy per feed (module doc 2); [] when there is nothing to crop."""
    rng = np.random.default_rng(seed)

    def make(i, r, pos):
        inner = pos[1:-1]
        if len(inner) < 2:
            return [(i, r, pos)]
        size = max(1, int(round(rng.uniform(0.3, 0.7) * len(inner))))
        start = int(rng.integers(0, len(inner) - size + 1))
        return [(i, r, pos[:1]), (i, r, inner[start:start + size]), (i, r, pos[-1:])]

    return _each_row(feeds, name, real, make)


def vary_spans(feeds: Sequence[Mapping[str, np.ndarray]], model: onnx.ModelProto,
               kinds: Sequence[str], seed: int = 0) -> list[Feed]:
    """The copies of every kind in ``kinds`` (``KINDS``), in that order."""
    makers = {"join": join_pairs, "crop": crop_spans}
    out: list[Feed] = []
    for k, kind in enumerate(kinds):
        out += makers[kind](feeds, model, seed=seed + k)
    return out
