"""Joined and cropped copies of token feeds (``graphopt.data.spans``), on a tiny embedding
model: ids ─ Gather(table[50, 4]) ─ + Gather(types[2, 4], token_type_ids) ─ × mask ─ ΣL."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.core.registry import build_pass
from graphopt.data.spans import crop_spans, join_pairs, vary_spans
from graphopt.errors import ConfigError
from graphopt.runtime.session import ort_session, run_model
from graphopt.testing import make_model


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"table": rng.normal(size=(50, 4)).astype(np.float32),
             "types": rng.normal(size=(2, 4)).astype(np.float32),
             "axes": np.array([2], np.int64), "one": np.array([1], np.int64)}
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["e0"]),
             helper.make_node("Gather", ["types", "token_type_ids"], ["e1"]),
             helper.make_node("Add", ["e0", "e1"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axes"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["em"]),
             helper.make_node("ReduceSum", ["em", "one"], ["y"], keepdims=0)]
    model = make_model(nodes, {"input_ids": ["b", "n"], "attention_mask": ["b", "n"],
                               "token_type_ids": ["b", "n"]}, ["y"], inits)
    for i in model.graph.input:
        i.type.tensor_type.elem_type = TensorProto.INT64
    return model


def _feed(lengths, seed, width=None):
    """[CLS]=1 … [SEP]=2 rows of real lengths ``lengths``, inner ids 5..49, pad 0."""
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = np.concatenate([[1], rng.integers(5, 50, n - 2), [2]])
    mask = (ids != 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


FEEDS = [_feed([7, 4, 9], 1), _feed([5, 6], 2, width=8)]


def _real(feed, r):
    return feed["input_ids"][r][feed["attention_mask"][r] != 0]


def _runs(model, feeds):
    sess = ort_session(model)
    for f in feeds:
        assert np.all(np.isfinite(run_model(sess, f)["y"]))


def test_joined_rows_are_a_row_without_its_end_then_another_without_its_start():
    """Oracle: every joined row == real(a)[:-1] + real(b)[1:] for some other row b, cut to
    the longest real length (9) keeping b's last token; a row is a second part once; dtypes, batch sizes and the model's inputs are kept; ORT runs them."""
    model = _model()
    out = join_pairs(FEEDS, model, seed=4)
    assert join_pairs(FEEDS, model, seed=4)[0]["input_ids"].tolist() == \
        out[0]["input_ids"].tolist()
    rows = [(i, r) for i, f in enumerate(FEEDS) for r in range(len(f["input_ids"]))]
    seconds = []
    for i, (f, new) in enumerate(zip(FEEDS, out)):
        assert new.keys() == f.keys() and len(new["input_ids"]) == len(f["input_ids"])
        assert all(new[k].dtype == f[k].dtype for k in f)
        for r in range(len(f["input_ids"])):
            got = _real(new, r)
            first = _real(f, r)[:-1]
            assert got[:len(first)].tolist() == first.tolist() and len(got) <= 9
            match = [(j, s) for j, s in rows if (j, s) != (i, r) and
                     (lambda b: got[len(first):].tolist() ==
                      (list(b[1:]) if len(first) + len(b) - 1 <= 9 else
                       list(b[1:9 - len(first)]) + [b[-1]]))(_real(FEEDS[j], s))]
            assert match, (i, r, got)
            if len(first) < 8:  # room for more than the partner's last token
                assert len(got) - len(first) >= 2
                seconds.append(match[0] if len(match) == 1 else None)
        assert np.array_equal(new["attention_mask"], (new["input_ids"] != 0).astype(np.int64))
    known = [m for m in seconds if m is not None]
    assert known and len(set(known)) == len(known)  # a partner is used once
    _runs(model, out)


def test_cropped_rows_keep_their_ends_around_a_contiguous_inner_run():
    model = _model()
    out = crop_spans(FEEDS, model, seed=3)
    for f, new in zip(FEEDS, out):
        for r in range(len(f["input_ids"])):
            got, real = _real(new, r).tolist(), _real(f, r).tolist()
            inner = real[1:-1]
            assert got[0] == real[0] and got[-1] == real[-1]
            run = got[1:-1]
            assert 0.3 * len(inner) - 1 <= len(run) <= 0.7 * len(inner) + 1
            assert any(inner[s:s + len(run)] == run for s in range(len(inner)))
    _runs(model, out)
    assert [f["input_ids"].tolist() for f in crop_spans(FEEDS, model, seed=3)] == \
        [f["input_ids"].tolist() for f in out]
    assert len(vary_spans(FEEDS, model, ["join", "crop"])) == 4


def test_nothing_to_vary_without_token_inputs_and_bad_options_are_refused():
    from graphopt.testing import make_model as mm

    dense = mm([helper.make_node("Relu", ["x"], ["y"])], {"x": ["n", 4]}, ["y"], {})
    assert join_pairs([{"x": np.zeros((2, 4), np.float32)}], dense) == []
    assert crop_spans([{"x": np.zeros((2, 4), np.float32)}], dense) == []
    with pytest.raises(ConfigError, match="spans must be"):
        build_pass("prune", {"macs": 0.5, "spans": "shuffle"})


def _prunable() -> onnx.ModelProto:
    """_model's masked embedding, then x ─ W1[4, 6] ─ Relu ─ W2[6, 3] per token."""
    model = _model()
    rng = np.random.default_rng(1)
    g = model.graph
    g.node[-1].CopyFrom(helper.make_node("MatMul", ["em", "W1"], ["h0"]))
    g.node.extend([helper.make_node("Relu", ["h0"], ["h1"]),
                   helper.make_node("MatMul", ["h1", "W2"], ["z"])])
    g.initializer.extend([onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32),
                                                       n) for n, s in (("W1", (4, 6)),
                                                                       ("W2", (6, 3)))])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    return model


def test_the_pass_calibrates_on_every_copy_with_folds_that_follow_their_feed():
    """prune with swap_copies=2, spans=join|crop, cv=2: the plan's feeds are the 4 given,
    2 swapped copies of them, a joined and a cropped copy, and 2 swapped twins of each of
    those (4 × 9); every copy of feed i sits in feed i's fold; the joined copy of a feed
    starts with its rows' tokens, and its twins swap only inner real tokens."""
    from graphopt.core.contract import Context

    feeds = [_feed([7, 4, 9], s) for s in range(4)]
    model = _prunable()
    p = build_pass("prune", {"macs": 0.7, "swap_copies": 2, "spans": "join|crop", "cv": 2,
                             "reconstruct": "none"})
    plan = p.plan(model, Context(calibration=feeds))
    assert len(plan.feeds) == 36 and plan.folds == [0, 1, 0, 1] * 9
    for k in range(4):
        joined, real = plan.feeds[12 + k], feeds[k]
        assert joined["input_ids"][0][:6].tolist() == real["input_ids"][0][:6].tolist()
    assert sum(not np.array_equal(plan.feeds[4 + k]["input_ids"], plan.feeds[8 + k]["input_ids"])
               for k in range(4)) == 4  # two different swapped copies
    for twin in (plan.feeds[20], plan.feeds[28]):  # the joined copy of feed 0, swapped
        joined = plan.feeds[12]
        assert np.array_equal(twin["attention_mask"], joined["attention_mask"])
        assert twin["input_ids"][0][0] == joined["input_ids"][0][0] == 1
    with pytest.raises(ConfigError, match="swap_copies"):
        build_pass("prune", {"macs": 0.5, "swap_copies": 0})
