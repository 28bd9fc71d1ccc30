"""Depth pruning: remove whole layers (or their attention / mlp sub-blocks).

``prune-layers`` (``--pass prune-layers:count=2``, ``ratio=0.25`` or ``indices=3,4``):

1. The residual stream and its blocks come from ``graphopt.analysis.structure``: a layer is
   attention + mlp along the stream (BERT post-norm: from the layer input to its last
   LayerNorm; GPT-2/LLaMA pre-norm: ``x + attn(norm x)`` then ``x + mlp(norm x)``).
   ``kind=attention`` or ``kind=mlp`` removes sub-blocks only. Blocks are numbered by their
   position among blocks of that kind, which is the layer number for ordinary transformers.
2. Removing a block rewires the consumers of its exit to its entry. For a pre-norm
   sub-block ``x + f(norm x)`` that is exactly "f contributes nothing"; for a post-norm
   layer it also drops that layer's LayerNorms.
3. Which blocks: ``indices`` names them; ``count``/``ratio`` take the lowest-scoring
   removable blocks. ``importance=block_influence`` (default) scores a block by
   ``1 - mean cos(entry, exit)`` over calibration tokens (padding excluded by the attention
   mask), captured through onnxruntime one batch at a time; ``importance=last`` removes the
   blocks nearest the output (a baseline, usually the worst choice). With none of
   ``count``, ``ratio``, ``indices`` given, one block is removed.
4. At least one block of the kind always stays: asking for all of them, or an index out of
   range, is a ``ConfigError``. A block that cannot be proven single-entry/single-exit is a
   skip with its reason and is never chosen.
5. ``reconstruct`` (``auto``: ``lstsq`` with calibration data) refits the first weight
   layers that read a removed block's exit (now its entry: the next layer's projections)
   toward their outputs in the original model (``graphopt.prune.reconstruct``).
6. The kept blocks' original numbers go to ``metadata_props`` (``graphopt.layers``, or
   ``graphopt.layers.attention`` / ``graphopt.layers.mlp``) as a JSON list; a second run
   maps through the first run's list, so numbers stay those of the original model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from graphopt.analysis.structure import Block, find_structure
from graphopt.data.calibration import capture
from graphopt.prune.blocks import remove_blocks
from graphopt.errors import ConfigError
from graphopt.core.contract import Context, Pass, PassResult, Skip, SkipCode
from graphopt.core.registry import register
from graphopt.data.gram import token_mask
from graphopt.prune.reconstruct import frontier_sites

from ._refit import check_reconstruct, keep_original, refit_step, resolve_mode

logger = logging.getLogger(__name__)

METADATA_KEY = "graphopt.layers"
# Blocks whose entry/exit are captured by one session; bounds memory on deep models.
_BLOCKS_PER_CAPTURE = 16


@dataclass(frozen=True)
class LayersConfig:
    count: int | None = None
    ratio: float | None = None
    indices: tuple[int, ...] = ()
    importance: Literal["block_influence", "last"] = "block_influence"
    kind: Literal["layer", "attention", "mlp"] = "layer"
    reconstruct: str = "auto"
    damping: float = 0.1

    def __post_init__(self) -> None:
        check_reconstruct(self.reconstruct, self.damping)
        given = [n for n, v in (("count", self.count), ("ratio", self.ratio),
                                ("indices", self.indices or None)) if v is not None]
        if len(given) > 1:
            raise ConfigError(f"give one of count, ratio or indices, not {' and '.join(given)}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"count must be at least 1, got {self.count}")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        if any(i < 0 for i in self.indices):
            raise ConfigError(f"indices must be non-negative, got {list(self.indices)}")
        if len(set(self.indices)) != len(self.indices):
            raise ConfigError(f"indices repeat: {list(self.indices)}")


@register
class PruneLayers(Pass[LayersConfig], name="prune-layers", lossless=False):
    """Remove the least influential layers (or attention/mlp sub-blocks); see the module doc."""

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg = self.config
        structure = find_structure(model)
        blocks = list(structure.blocks(cfg.kind))
        if not blocks:
            why = (f"no {cfg.kind} blocks found: no residual Add(x, f(x)) whose branch "
                   "holds weights lies on a stream")
            parallel = structure.blocks("parallel")
            if parallel:
                why = (f"no {cfg.kind} blocks found: the {len(parallel)} layers run attention "
                       "and MLP in parallel off the same input (x + attn(x) + mlp(x)), so a "
                       f"{cfg.kind} branch is not a block of its own; remove whole layers "
                       "(kind=layer)")
            fused = sorted({n.name or n.output[0] for n in model.graph.node
                            if n.op_type.startswith("Skip") and "Normalization" in n.op_type})
            if fused:
                why += (f"; the residual Adds are fused into {len(fused)} "
                        f"SkipLayerNormalization nodes (e.g. '{fused[0]}'), which are not "
                        "read as residuals: run prune-layers before onnxruntime's "
                        "transformer fusion")
            return PassResult(model, False, skipped=[Skip("model", why, "unsupported")])
        skipped = [Skip(b.site, b.reason, SkipCode.NOT_PRUNABLE) for b in blocks if not b.removable]
        wanted = _how_many(cfg, len(blocks))
        if wanted == 0:
            skipped.append(Skip("model", f"ratio {cfg.ratio} of {len(blocks)} {cfg.kind} blocks "
                                "rounds to 0; nothing removed"))
            return PassResult(model, False, skipped=skipped)
        if cfg.indices:
            chosen = [blocks[i] for i in cfg.indices if blocks[i].removable]
        else:
            chosen = self._choose(model, ctx, blocks, wanted, skipped)
        if not chosen:
            return PassResult(model, False, skipped=skipped)
        positions = {id(b): i for i, b in enumerate(blocks)}
        removed = sorted(positions[id(b)] for b in chosen)
        mode = resolve_mode(cfg.reconstruct, ctx)
        original = keep_original(model, mode)
        nodes = remove_blocks(model, chosen)
        kept = _record_kept(model, cfg.kind, len(blocks), removed)
        logger.info("removed %s %s; kept %s", cfg.kind, removed, kept)
        counters = {"blocks_removed": len(chosen), "blocks_before": len(blocks),
                    "blocks_after": len(blocks) - len(chosen), "nodes_removed": nodes}
        # the first weight layers reading what a removed block's exit fed (now its entry)
        sites = frontier_sites(model, [b.entry for b in chosen])
        more, refit_skips, details = refit_step(original, model, sites, ctx, mode, cfg.damping)
        counters.update(more)
        if not ctx.calibration and cfg.importance != "last" and not cfg.indices:
            details["notes"] = ["no calibration data given: block influence was measured on "
                                "generated inputs, which is a guess (give --calibration)"]
        return PassResult(model, True, counters, skipped + refit_skips, details=details)

    def _choose(self, model: onnx.ModelProto, ctx: Context, blocks: list[Block], wanted: int,
                skipped: list[Skip]) -> list[Block]:
        candidates = [b for b in blocks if b.removable]
        if len(candidates) < wanted:
            skipped.append(Skip("model", f"asked to remove {wanted} {self.config.kind} blocks "
                                f"but only {len(candidates)} can be removed"))
        if self.config.importance == "last":
            ranked = sorted(candidates, key=lambda b: -blocks.index(b))
        else:
            scores = block_influence(model, candidates, ctx.calibration_feeds(model))
            for b in candidates:
                logger.info("block influence of %s: %.4f", b.site, scores[b.exit])
            ranked = sorted(candidates, key=lambda b: (scores[b.exit], blocks.index(b)))
        return ranked[:wanted]


def _how_many(cfg: LayersConfig, total: int) -> int:
    if cfg.indices:
        bad = [i for i in cfg.indices if i >= total]
        if bad:
            raise ConfigError(f"{cfg.kind} index {bad[0]} is out of range: the model has "
                              f"{total} {cfg.kind} blocks (0..{total - 1})")
        wanted = len(cfg.indices)
    elif cfg.ratio is not None:
        wanted = int(np.floor(cfg.ratio * total + 0.5))
    else:
        wanted = cfg.count if cfg.count is not None else 1
    if wanted >= total:
        raise ConfigError(f"cannot remove {wanted} of {total} {cfg.kind} blocks: at least one "
                          f"must stay (ask for at most {total - 1})")
    return wanted


def _record_kept(model: onnx.ModelProto, kind: str, total: int, removed: Sequence[int]
                 ) -> list[int]:
    key = METADATA_KEY if kind == "layer" else f"{METADATA_KEY}.{kind}"
    props = {p.key: p for p in model.metadata_props}
    numbers = list(range(total))
    if key in props:
        try:
            previous = [int(i) for i in json.loads(props[key].value)]
            if len(previous) == total:
                numbers = previous
        except (ValueError, TypeError):
            logger.warning("ignoring unreadable metadata %s=%r", key, props[key].value)
    kept = [n for i, n in enumerate(numbers) if i not in set(removed)]
    if key in props:
        props[key].value = json.dumps(kept)
    else:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(kept)
    if kind in ("layer", "attention"):
        _drop_per_layer_entries(props, total, set(removed))
    return kept


# Per-attention-layer lists other passes record (prune-heads); they lose removed layers' entries.
_PER_LAYER_KEYS = ("graphopt.heads", "graphopt.kv_heads")


def _drop_per_layer_entries(props: Mapping[str, onnx.StringStringEntryProto], total: int,
                            removed: set[int]) -> None:
    for key in _PER_LAYER_KEYS:
        if key not in props:
            continue
        try:
            values = json.loads(props[key].value)
        except ValueError:
            continue
        if isinstance(values, list) and len(values) == total:
            props[key].value = json.dumps([v for i, v in enumerate(values) if i not in removed])
        else:
            logger.warning("%s has %s entries for %d layers; left as it was", key,
                           len(values) if isinstance(values, list) else "no", total)


# --------------------------------------------------------------------------- importance


def block_influence(model: onnx.ModelProto, blocks: Sequence[Block],
                    feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """``1 - mean cos(entry, exit)`` per block (keyed by exit tensor) over calibration tokens.

    Cosine is taken along the hidden axis (the last axis; axis 1 for 4-D conv maps) per
    token or pixel; tokens whose attention mask is 0 are left out. Only running sums are
    kept: one batch of stream tensors is in memory at a time.
    """
    feeds = list(feeds)
    scores: dict[str, float] = {}
    for start in range(0, len(blocks), _BLOCKS_PER_CAPTURE):
        chunk = blocks[start:start + _BLOCKS_PER_CAPTURE]
        reducer = _CosineReducer([(b.entry, b.exit) for b in chunk], feeds)
        capture(model, feeds, reducer.names, reducer, batch_outputs=len(reducer.names))
        for b in chunk:
            scores[b.exit] = reducer.influence(b.entry, b.exit)
    return scores


class _CosineReducer:
    """Accumulates per-token cosine between paired tensors, one feed at a time.

    ``capture`` hands over the tensors of one feed in ``names`` order before the next feed,
    so a pair is complete once a feed's last name arrives.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], feeds: Sequence[Mapping]):
        self.pairs = list(pairs)
        self.names = list(dict.fromkeys(n for pair in pairs for n in pair))
        self.feeds = feeds
        self.feed = 0
        self.current: dict[str, np.ndarray] = {}
        self.sums = {pair: 0.0 for pair in self.pairs}
        self.weights = {pair: 0.0 for pair in self.pairs}

    def __call__(self, name: str, value: np.ndarray) -> None:
        self.current[name] = value
        if len(self.current) < len(self.names):
            return
        mask = token_mask(self.feeds[self.feed]) if self.feed < len(self.feeds) else None
        for pair in self.pairs:
            cos = _cosine(self.current[pair[0]], self.current[pair[1]])
            w = _weights_for(cos.shape, mask)
            self.sums[pair] += float((cos * w).sum())
            self.weights[pair] += float(w.sum())
        self.current = {}
        self.feed += 1

    def influence(self, entry: str, exit_: str) -> float:
        total = self.weights[(entry, exit_)]
        return 1.0 - self.sums[(entry, exit_)] / total if total else 0.0


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    axis = 1 if a.ndim == 4 else -1
    dot = (a * b).sum(axis)
    norm = np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    # Two zero vectors are the same vector: cosine 1, not 0/0.
    return np.where(norm > 0, dot / np.maximum(norm, 1e-30), np.where(dot == 0, 1.0, 0.0))


def _weights_for(shape: tuple[int, ...], mask: np.ndarray | None) -> np.ndarray:
    if mask is not None and len(shape) >= 2 and mask.shape == tuple(shape[:2]):
        w = mask.astype(np.float64).reshape(mask.shape + (1,) * (len(shape) - 2))
        return np.broadcast_to(w, shape)
    return np.ones(shape)
