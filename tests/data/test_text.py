"""Calibration text: shipped sentences, tokenized batches with ragged masks, .npz folders."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.errors import ConfigError, InputSpecError
from graphopt.ir.inputs import load_inputs
from graphopt.data.text import encode, read_sentences, text_feeds, write_feeds


def test_shipped_sentences():
    """About 200 distinct sentences of 5 to 40 words."""
    sentences = read_sentences()
    assert 190 <= len(sentences) <= 230
    assert len(set(sentences)) == len(sentences)
    lengths = [len(s.split()) for s in sentences]
    assert min(lengths) >= 5 and max(lengths) <= 40 and max(lengths) >= 30


def test_read_sentences_errors(tmp_path):
    """A missing file or one without sentences is an InputSpecError; comments are skipped."""
    with pytest.raises(InputSpecError, match="cannot read sentences"):
        read_sentences(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(InputSpecError, match="holds no sentences"):
        read_sentences(empty)


def test_encode_with_tokenizer_pads_to_longest(minilm_tokenizer):
    """Real tokenizer: int64 ids/mask/types, each batch as wide as its longest sentence, the
    mask ragged and matching the non-pad ids."""
    sentences = read_sentences()[:20]
    feeds = encode(sentences, minilm_tokenizer, batch_size=8)
    assert [f["input_ids"].shape[0] for f in feeds] == [8, 8, 4]
    for feed in feeds:
        assert set(feed) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(v.dtype == np.int64 for v in feed.values())
        lengths = feed["attention_mask"].sum(1)
        assert lengths.max() == feed["input_ids"].shape[1] and lengths.min() < lengths.max()
        assert (feed["input_ids"][:, 0] == minilm_tokenizer.cls_token_id).all()
        assert ((feed["input_ids"] != minilm_tokenizer.pad_token_id) == (
            feed["attention_mask"] == 1)).all()


def test_encode_max_length_padding(minilm_tokenizer):
    """padding=max_length gives fixed [batch, max_length] shapes (benchmarks), truncating."""
    feeds = encode(read_sentences()[:8], minilm_tokenizer, batch_size=8, max_length=16,
                   padding="max_length")
    assert feeds[0]["input_ids"].shape == (8, 16)
    assert feeds[0]["attention_mask"].sum(1).max() == 16


def test_hashing_fallback_stays_in_vocab():
    """Without a tokenizer, hashed word ids stay in [first_id, vocab) with CLS/SEP ends."""
    feeds = encode(["The cat sat on the mat.", "A dog."], vocab_size=30522)
    ids, mask = feeds[0]["input_ids"], feeds[0]["attention_mask"]
    assert ids.shape == (2, 9) and mask.sum(1).tolist() == [9, 5]
    assert ids[0, 0] == 101 and ids[0, 8] == 102
    assert ids[0, 1] == ids[0, 5]  # "the" twice, the same id
    assert (ids[0, 1:8] >= 1000).all() and (ids < 30522).all()
    small = encode(["one two three four five"], vocab_size=50)[0]["input_ids"]
    assert small.max() < 50 and small[0, 0] == 1


@pytest.mark.parametrize("options, message", [
    ({}, "give vocab_size"), ({"vocab_size": 100, "padding": "left"}, "padding must be"),
    ({"vocab_size": 100, "batch_size": 0}, "batch_size must be"),
])
def test_encode_rejects_bad_options(options, message):
    """Bad encode options are ConfigErrors."""
    with pytest.raises(ConfigError, match=message):
        encode(["a b c d e"], **options)


def test_text_feeds_fit_the_model_inputs(make_stack):
    """text_feeds keeps only the model's inputs: a float 'mask' gets the attention mask in the
    model's dtype; an input it cannot fill is an InputSpecError."""
    from onnx import TensorProto, helper

    from graphopt.testing import make_model

    emb = np.zeros((500, 4), np.float32)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("Cast", ["position_ids"], ["p"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["p", "ax"], ["pu"]),
             helper.make_node("Add", ["h", "pu"], ["y"])]
    model = make_model(nodes, [("input_ids", ("b", "s"), TensorProto.INT32),
                               ("position_ids", ("b", "s"), TensorProto.INT64)],
                       ["y"], {"emb": emb, "ax": np.array([-1], np.int64)})
    feeds = text_feeds(model, read_sentences()[:10], batch_size=4)
    assert len(feeds) == 3
    first = feeds[0]
    assert set(first) == {"input_ids", "position_ids"}
    assert first["input_ids"].dtype == np.int32 and first["input_ids"].max() < 500
    assert first["position_ids"][1].tolist() == list(range(first["input_ids"].shape[1]))
    with pytest.raises(InputSpecError, match="not a text input"):
        text_feeds(make_stack(1), ["a b c d e"])


def test_write_feeds_round_trip(tmp_path, minilm_tokenizer):
    """write_feeds' folder of .npz reads back with load_inputs, in order and unchanged."""
    feeds = encode(read_sentences()[:20], minilm_tokenizer, batch_size=8)
    paths = write_feeds(feeds, tmp_path / "calib")
    assert [p.name for p in paths] == ["batch_000.npz", "batch_001.npz", "batch_002.npz"]
    back = load_inputs(tmp_path / "calib")
    assert len(back) == 3
    for a, b in zip(feeds, back):
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
