"""prune-heads configuration, skips and reporting on small hand-built graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.errors import ConfigError
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.core.config import parse_pass_spec

HID, HEADS = 16, 4
RNG = np.random.default_rng(1)


def _w(*shape):
    return (RNG.standard_normal(shape) * 0.5).astype(np.float32)


def _mha(cache: bool = False):
    """Q/K/V MatMuls -> com.microsoft MultiHeadAttention (optionally reading a KV cache)
    -> output projection + residual."""
    import onnx

    N = helper.make_node
    ins = ["q", "k", "v"] + (["", "", "", "pk", "pv"] if cache else [])
    nodes = [N("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             N("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             N("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             N("MultiHeadAttention", ins, ["ctx"], domain="com.microsoft", num_heads=HEADS,
               name="mha"),
             N("MatMul", ["ctx", "wo"], ["o"], name="o_proj"), N("Add", ["o", "x"], ["y"])]
    inputs = {"x": [2, 5, HID]}
    if cache:
        inputs.update(pk=[2, HEADS, 3, HID // HEADS], pv=[2, HEADS, 3, HID // HEADS])
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v)
                     for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(_w(HID, HID), n) for n in ("wq", "wk", "wv", "wo")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("options", [{"ratio": 1.0}, {"ratio": -0.1}, {"min_heads": 0},
                                     {"importance": "l1"}, {"scope": "group"},
                                     {"include": ("re:[",)}])
def test_bad_config_is_rejected(options):
    """Out-of-range ratio/min_heads, unknown importance/scope, bad regex: ConfigError."""
    with pytest.raises(ConfigError):
        build_pass("prune-heads", options)


def test_cli_spec_parses():
    """`prune-heads:ratio=0.5,scope=global,importance=magnitude` builds the pass."""
    name, opts = parse_pass_spec("prune-heads:ratio=0.5,scope=global,importance=magnitude")
    p = build_pass(name, opts)
    assert p.config.ratio == 0.5 and p.config.scope == "global"


def test_kv_cache_block_is_a_skip():
    """An attention block reading a KV cache is reported as a Skip with the reason."""
    p = build_pass("prune-heads", {"ratio": 0.5, "importance": "magnitude"})
    _, report = PassManager([p]).run(_mha(cache=True), Context())
    entry = report.passes[0]
    assert report.ok and entry.status == "unchanged"
    assert any("KV cache" in s.reason for s in entry.skipped)


def test_min_heads_keeps_layer(oracle):
    """min_heads=4 on a 4-head block: nothing to remove, reported as a skip."""
    p = build_pass("prune-heads", {"ratio": 0.5, "min_heads": 4, "importance": "magnitude"})
    _, report = PassManager([p]).run(_mha(), Context())
    assert any("only 4 head" in s.reason for s in report.passes[0].skipped)


def test_second_run_updates_metadata(oracle, meta):
    """Pruning twice leaves the current head counts in graphopt.heads."""
    feeds = {"x": _w(2, 5, HID)}
    ctx = Context(calibration=[feeds])
    once, _, _ = oracle(_mha(), {"ratio": 0.5}, feeds=feeds, ctx=ctx)
    twice, _, _ = oracle(once, {"ratio": 0.5}, feeds=feeds, ctx=ctx)
    assert json.loads(meta(twice)["graphopt.heads"]) == [1]
    assert sum(p.key == "graphopt.heads" for p in twice.metadata_props) == 1
