"""Skip reasons name the op, the tensor and the fix, the same in prune passes and in
``inspect --groups``; costs on dynamic inputs say which dims they assumed."""

from __future__ import annotations

import json

import numpy as np
from onnx import helper

import graphopt
from graphopt.analysis.cost import count_cost
from graphopt.cli.commands import main
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.testing import make_model

N = helper.make_node


def _ffn_into_layernorm():
    """x ─ MatMul(w1) ─ Relu ─ MatMul(w2) ─ LayerNorm ─ y: the inner width is prunable, the
    hidden width stops at the LayerNorm (and at the graph input)."""
    rng = np.random.default_rng(0)
    nodes = [N("MatMul", ["x", "w1"], ["h"], name="up"), N("Relu", ["h"], ["r"]),
             N("MatMul", ["r", "w2"], ["o"], name="down"),
             N("LayerNormalization", ["o", "g", "b"], ["y"], name="ln", axis=-1)]
    inits = {"w1": rng.standard_normal((8, 16)).astype(np.float32),
             "w2": rng.standard_normal((16, 8)).astype(np.float32),
             "g": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}
    return make_model(nodes, {"x": ["batch", "seq", 8]}, ["y"], inits)


def test_skip_reason_names_op_tensor_and_fix(tmp_path, capsys):
    """prune-neurons skips the LayerNorm-bound group with a reason naming the LayerNorm, the
    tensor it stops on and what would make it prunable; inspect --groups --json shows the
    very same reason."""
    model = _ffn_into_layernorm()
    p = build_pass("prune-neurons", {"ratio": 0.5})
    _, report = PassManager([p]).run(model, Context())
    (skip,) = [s for s in report.passes[0].skipped if "down" in s.site]
    assert "LayerNormalization 'ln'" in skip.reason
    assert "'o'" in skip.reason and "to prune:" in skip.reason
    path = tmp_path / "m.onnx"
    graphopt.save(model, path)
    assert main(["inspect", str(path), "--groups", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert skip.reason in [g["reason"] for g in groups]
    assert {g["unit"] for g in groups} == {"neuron"}


def test_costs_say_which_dynamic_dims_they_assumed(tmp_path, capsys):
    """MACs on [batch, seq, 8] are counted at batch 1, seq 16 and say so; given shapes
    leave nothing assumed; the table prints the assumption."""
    model = _ffn_into_layernorm()
    cost = count_cost(model)
    assert cost.assumed == {"x": {0: 1, 1: 16}}
    assert cost.macs == 16 * (8 * 16 + 16 * 8)
    assert count_cost(model, {"x": (2, 4, 8)}).assumed == {}
    path = tmp_path / "m.onnx"
    graphopt.save(model, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "x[0]=1" in out and "x[1]=16" in out and "--input-shape" in out


def test_prune_layers_names_fused_skip_layernorm():
    """Residual Adds fused into com.microsoft SkipLayerNormalization (ORT's transformer
    optimizer): prune-layers finds no residual and says which fused nodes hid them."""
    rng = np.random.default_rng(1)
    nodes, prev, inits = [], "x", {"g": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}
    for k in range(2):
        inits[f"w{k}"] = rng.standard_normal((8, 8)).astype(np.float32)
        nodes += [N("MatMul", [prev, f"w{k}"], [f"h{k}"]),
                  N("SkipLayerNormalization", [f"h{k}", prev, "g", "b"], [f"n{k}"],
                    domain="com.microsoft", name=f"sln{k}", epsilon=1e-5)]
        prev = f"n{k}"
    nodes.append(N("Identity", [prev], ["y"]))
    model = make_model(nodes, {"x": [2, 4, 8]}, {"y": [2, 4, 8]}, inits,
                       extra_opsets={"com.microsoft": 1})
    p = build_pass("prune-layers", {"count": 1})
    _, report = PassManager([p]).run(model, Context())
    (skip,) = report.passes[0].skipped
    assert "2 SkipLayerNormalization nodes" in skip.reason and "'sln0'" in skip.reason
