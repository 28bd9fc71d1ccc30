"""``prune-vocab``: keep the embedding rows a corpus uses; the model's interface is unchanged.

``--pass prune-vocab:text=corpus.txt,tokenizer=FOLDER`` (or ``ids=ids.txt``, or the
calibration feeds' token ids):

1. The word embedding is the ``Gather(table, ids)`` whose table is a rank-2 initializer and
   whose indices are a graph input (``input=NAME`` names it; else the only integer input
   that indexes such a table, the largest table when several do, e.g. word and token-type
   embeddings). A table another node also reads (a tied output projection) is a skip with
   the reason.
2. The kept ids: those of the corpus (``ids``: a file of integers separated by spaces,
   commas or newlines; ``text`` + ``tokenizer``: one sentence per line, tokenized offline;
   without either, the calibration data's ids, never generated ones), plus ``keep`` ids,
   plus the tokenizer's special tokens and the unknown token. Special tokens the corpus
   missed are kept anyway and reported (counter ``special_added``, a note in the skips).
   Without a tokenizer, ``unknown`` must be given (the id the unknown token has).
3. The rewrite: the table keeps the kept rows, in id order; a small int32 table
   ``remap[old id] = new row`` (the unknown token's row for dropped ids) is gathered in
   front, so the graph still takes the original ids. Other readers of the ids input
   (position ids computed from padding, token-type logic) still see the original ids.
4. Ids in the kept set give exactly the original outputs; a dropped id behaves as the
   unknown token. Counters: rows before/after, bytes saved.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.contract import Context, Pass, PassResult, Skip
from graphopt.core.registry import register
from graphopt.errors import ConfigError, InputSpecError
from graphopt.ir.graph import unique_name

logger = logging.getLogger(__name__)

_INT_TYPES = {TensorProto.INT64, TensorProto.INT32}


@dataclass(frozen=True)
class VocabConfig:
    ids: str = ""
    text: str = ""
    tokenizer: str = ""
    input: str = ""
    keep: tuple[int, ...] = ()
    unknown: int | None = None

    def __post_init__(self) -> None:
        if self.ids and self.text:
            raise ConfigError("give ids (a file of token ids) or text (with tokenizer), "
                              "not both")
        if self.text and not self.tokenizer:
            raise ConfigError("text needs tokenizer=FOLDER to turn it into token ids")
        if any(i < 0 for i in self.keep) or (self.unknown is not None and self.unknown < 0):
            raise ConfigError("token ids must be non-negative")


@register
class PruneVocab(Pass[VocabConfig], name="prune-vocab", lossless=False):
    """Keep only the word-embedding rows a corpus uses; see the module docstring."""

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg = self.config
        site = _embedding(model, cfg.input)
        if isinstance(site, str):
            return PassResult(model, False, skipped=[Skip("model", site)])
        node, table, ids_input = site
        rows = int(table.dims[0])
        tokenizer = None
        if cfg.tokenizer:
            from graphopt.data.text import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer)
        corpus = _corpus_ids(cfg, tokenizer, ctx, ids_input)
        if corpus is None:
            return PassResult(model, False, skipped=[Skip("model", (
                "no corpus: give ids=FILE, text=FILE with tokenizer=FOLDER, or calibration "
                "data (generated ids say nothing about a corpus)"))])
        unknown = cfg.unknown if cfg.unknown is not None else (
            getattr(tokenizer, "unk_token_id", None) if tokenizer is not None else None)
        if unknown is None:
            raise ConfigError("prune-vocab: give unknown=ID (the unknown token's id) or "
                              "tokenizer=FOLDER to read it from")
        special = set(getattr(tokenizer, "all_special_ids", []) or []) | {int(unknown)}
        bad = [i for i in set(corpus) | set(cfg.keep) | special if i >= rows]
        if bad:
            raise InputSpecError(f"prune-vocab: token id {max(bad)} is outside the embedding "
                                 f"table '{table.name}' ({rows} rows)")
        used = set(int(i) for i in corpus) | set(cfg.keep)
        missed = sorted(special - used)
        kept = np.array(sorted(used | special), dtype=np.int64)
        skipped = []
        if missed:
            skipped.append(Skip("special tokens", (
                f"{len(missed)} special token(s) the corpus did not use were kept anyway: "
                f"{', '.join(map(str, missed[:10]))}")))
        _rewrite(model, node, table, kept, int(unknown))
        weights = numpy_helper.to_array(table)
        counters = {"rows_before": rows, "rows_after": int(kept.size),
                    "special_added": len(missed),
                    "bytes_saved": int(weights.nbytes * (1 - kept.size / rows)) - 4 * rows}
        logger.info("prune-vocab: %s", counters)
        return PassResult(model, True, counters, skipped)


def _embedding(model: onnx.ModelProto, name: str):
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = {vi.name: vi for vi in graph.input if vi.name not in inits}
    readers: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    sites = []
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.domain not in ("", "ai.onnx"):
            continue
        table = inits.get(node.input[0])
        if table is None or len(table.dims) != 2 or node.input[1] not in inputs:
            continue
        if any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        vi = inputs[node.input[1]]
        if vi.type.tensor_type.elem_type in _INT_TYPES and (not name or node.input[1] == name):
            sites.append((node, table, node.input[1]))
    if not sites:
        where = f"input '{name}'" if name else "an integer graph input"
        return f"no embedding Gather(table, ids) indexed by {where}"
    node, table, ids = max(sites, key=lambda s: s[1].dims[0])
    if readers.get(table.name, 0) > 1 or table.name in {o.name for o in graph.output}:
        return (f"embedding table '{table.name}' is also read by another node (a tied output "
                "projection?): pruning its rows would change that reader")
    return node, table, ids


def _corpus_ids(cfg: VocabConfig, tokenizer, ctx: Context, ids_input: str):
    if cfg.ids:
        try:
            text = Path(cfg.ids).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputSpecError(f"prune-vocab: cannot read ids from {cfg.ids}: "
                                 f"{exc.strerror or exc}") from exc
        tokens = [t for t in re.split(r"[\s,]+", text) if t]
        try:
            values = [int(t) for t in tokens]
        except ValueError:
            raise InputSpecError(f"prune-vocab: {cfg.ids} holds something other than "
                                 "integer token ids; give text=FILE with tokenizer=FOLDER "
                                 "for text") from None
        if not values:
            raise InputSpecError(f"prune-vocab: {cfg.ids} holds no token ids")
        return values
    if cfg.text:
        from graphopt.data.text import read_sentences

        ids: list[int] = []
        for sentence in read_sentences(cfg.text):
            ids.extend(tokenizer(sentence)["input_ids"])
        return ids
    feeds = [f for f in (ctx.calibration or []) if ids_input in f]
    if not feeds:
        return None
    return np.concatenate([np.asarray(f[ids_input]).reshape(-1) for f in feeds]).tolist()


def _rewrite(model: onnx.ModelProto, node: onnx.NodeProto, table: onnx.TensorProto,
             kept: np.ndarray, unknown: int) -> None:
    graph = model.graph
    rows = int(table.dims[0])
    weights = numpy_helper.to_array(table)
    table.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weights[kept]), table.name))
    remap = np.full(rows, int(np.searchsorted(kept, unknown)), dtype=np.int32)
    remap[kept] = np.arange(kept.size, dtype=np.int32)
    taken = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | \
        {i.name for i in graph.input}
    remap_name = unique_name(f"{table.name}/vocab_remap", taken)
    new_ids = unique_name(f"{node.input[1]}/vocab_rows", taken)
    graph.initializer.append(numpy_helper.from_array(remap, remap_name))
    position = list(graph.node).index(node)
    graph.node.insert(position, helper.make_node(
        "Gather", [remap_name, node.input[1]], [new_ids], axis=0,
        name=unique_name("graphopt_prune_vocab/remap", taken)))
    node.input[1] = new_ids
