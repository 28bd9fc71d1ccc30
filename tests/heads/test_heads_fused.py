"""prune-heads on hand-built graphs with fused attention ops (com.microsoft and ONNX)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.analysis.coupling import analyze

HID = 16
HEADS = 4
RNG = np.random.default_rng(0)


def _w(*shape):
    return (RNG.standard_normal(shape) * 0.5).astype(np.float32)


def _model(nodes, inits, opsets, inputs=None):
    inputs = inputs or {"x": [2, 5, HID]}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v)
                     for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in opsets.items()])
    model.ir_version = 10
    return model


def _qkv(kv_hidden=HID, bias=False, hid=HID):
    """Q/K/V projections of x (optionally biased), an output projection and a residual."""
    N = helper.make_node
    nodes = [N("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             N("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             N("MatMul", ["x", "wv"], ["v"], name="v_proj")]
    inits = {"wq": _w(hid, hid), "wk": _w(hid, kv_hidden), "wv": _w(hid, kv_hidden),
             "wo": _w(hid, hid)}
    tail = [N("MatMul", ["ctx", "wo"], ["o"], name="o_proj"), N("Add", ["o", "x"], ["y"])]
    if bias:
        inits["qkv_bias"] = _w(hid + 2 * kv_hidden)
    return nodes, tail, inits


def test_ms_multihead_attention(oracle, meta):
    """com.microsoft MultiHeadAttention with a packed bias: num_heads 4 -> 2, outputs match."""
    nodes, tail, inits = _qkv(bias=True)
    mha = helper.make_node("MultiHeadAttention", ["q", "k", "v", "qkv_bias"], ["ctx"],
                           domain="com.microsoft", num_heads=HEADS, name="mha")
    model = _model(nodes + [mha] + tail, inits, {"": 17, "com.microsoft": 1})
    pruned, _, _ = oracle(model, {"ratio": 0.5, "importance": "magnitude"},
                          feeds={"x": _w(2, 5, HID)}, ctx=_ctx({"x": _w(2, 5, HID)}))
    node = next(n for n in pruned.graph.node if n.op_type == "MultiHeadAttention")
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["num_heads"] == 2
    assert json.loads(meta(pruned)["graphopt.heads"]) == [2]


def test_ms_attention_packed_weight(oracle, meta):
    """com.microsoft Attention with its packed QKV weight and qkv_hidden_sizes: 4 -> 2 heads."""
    N = helper.make_node
    nodes = [N("Attention", ["x", "wqkv", "bqkv"], ["ctx"], domain="com.microsoft",
               num_heads=HEADS, qkv_hidden_sizes=[HID, HID, HID], name="attn"),
             N("MatMul", ["ctx", "wo"], ["o"], name="o_proj"), N("Add", ["o", "x"], ["y"])]
    inits = {"wqkv": _w(HID, 3 * HID), "bqkv": _w(3 * HID), "wo": _w(HID, HID)}
    model = _model(nodes, inits, {"": 17, "com.microsoft": 1})
    pruned, _, _ = oracle(model, {"ratio": 0.5}, feeds={"x": _w(2, 5, HID)},
                          ctx=_ctx({"x": _w(2, 5, HID)}))
    attrs = {a.name: helper.get_attribute_value(a) for a in
             next(n for n in pruned.graph.node if n.op_type == "Attention").attribute}
    assert attrs["num_heads"] == 2 and list(attrs["qkv_hidden_sizes"]) == [8, 8, 8]
    assert json.loads(meta(pruned)["graphopt.heads"]) == [2]


def _ctx(feeds):
    from graphopt.core.contract import Context

    return Context(calibration=[feeds])


def test_onnx_attention_3d_gqa(oracle, meta):
    """ONNX Attention (opset 23), 3-D inputs, 4 query / 2 KV heads: one KV group goes."""
    nodes, tail, inits = _qkv(kv_hidden=HID // 2)
    att = helper.make_node("Attention", ["q", "k", "v"], ["ctx"], q_num_heads=HEADS,
                           kv_num_heads=2, name="attn")
    model = _model(nodes + [att] + tail, inits, {"": 23})
    pruned, _, _ = oracle(model, {"ratio": 0.5, "importance": "ablation"},
                          feeds={"x": _w(2, 5, HID)}, ctx=_ctx({"x": _w(2, 5, HID)}))
    attrs = {a.name: helper.get_attribute_value(a) for a in
             next(n for n in pruned.graph.node if n.op_type == "Attention").attribute}
    assert attrs["q_num_heads"] == 2 and attrs["kv_num_heads"] == 1
    assert json.loads(meta(pruned)["graphopt.kv_heads"]) == [1]


def test_onnx_attention_4d(oracle, meta):
    """ONNX Attention (opset 23) on [B, H, S, d] inputs after Reshape/Transpose: 4 -> 2."""
    N = helper.make_node
    nodes, tail, inits = _qkv()
    inits.update(split=np.array([0, 0, HEADS, HID // HEADS], np.int64),
                 merge=np.array([0, 0, HID], np.int64))
    for t in "qkv":
        nodes += [N("Reshape", [t, "split"], [f"{t}4"]),
                  N("Transpose", [f"{t}4"], [f"{t}t"], perm=[0, 2, 1, 3])]
    nodes += [N("Attention", ["qt", "kt", "vt"], ["c4"], name="attn"),
              N("Transpose", ["c4"], ["c3"], perm=[0, 2, 1, 3]),
              N("Reshape", ["c3", "merge"], ["ctx"])]
    model = _model(nodes + tail, inits, {"": 23})
    pruned, _, _ = oracle(model, {"ratio": 0.5}, feeds={"x": _w(2, 5, HID)},
                          ctx=_ctx({"x": _w(2, 5, HID)}))
    assert json.loads(meta(pruned)["graphopt.heads"]) == [2]


def test_fused_op_with_kv_cache_is_skipped():
    """A MultiHeadAttention reading a KV cache is a barrier whose reason says so."""
    nodes, tail, inits = _qkv()
    mha = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "", "pk", "pv"],
                           ["ctx"], domain="com.microsoft", num_heads=HEADS, name="mha")
    model = _model(nodes + [mha] + tail, inits, {"": 17, "com.microsoft": 1},
                   inputs={"x": [2, 5, HID], "pk": [2, HEADS, 3, 4], "pv": [2, HEADS, 3, 4]})
    groups = [g for g in analyze(model).groups if g.source == "q_proj"]
    assert groups and not groups[0].prunable and "KV cache" in groups[0].reason


def test_ms_group_query_attention(oracle, meta):
    """com.microsoft GroupQueryAttention, 4 query / 2 KV heads (no KV cache): one
    KV group goes, num_heads 4 -> 2 and kv_num_heads 2 -> 1."""
    N = helper.make_node
    hid = 32  # the CPU kernel wants head_size % 8 == 0
    nodes, tail, inits = _qkv(kv_hidden=hid // 2, hid=hid)
    gqa = N("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"],
            ["ctx"], domain="com.microsoft", num_heads=HEADS,
            kv_num_heads=2, name="gqa")
    inits["seqlens"] = np.full(2, 4, np.int32)
    inits["total"] = np.array(5, np.int32)
    model = _model(nodes + [gqa] + tail, inits, {"": 17, "com.microsoft": 1},
                   inputs={"x": [2, 5, hid]})
    feeds = {"x": _w(2, 5, hid)}
    pruned, _, _ = oracle(model, {"ratio": 0.5}, feeds=feeds, ctx=_ctx(feeds))
    attrs = {a.name: helper.get_attribute_value(a) for a in
             next(n for n in pruned.graph.node if n.op_type == "GroupQueryAttention").attribute}
    assert attrs["num_heads"] == 2 and attrs["kv_num_heads"] == 1
    assert json.loads(meta(pruned)["graphopt.heads"]) == [2]


@pytest.mark.parametrize("domain", ["", "com.microsoft"])
def test_rotary_embedding_op_keeps_heads(domain, oracle, meta):
    """RotaryEmbedding (ONNX opset 23 / com.microsoft) on 3-D Q and K with num_heads, then
    ONNX Attention / com.microsoft MultiHeadAttention: half the heads go, RoPE's num_heads follows, outputs match."""
    N = helper.make_node
    nodes, tail, inits = _qkv()
    half = HID // HEADS // 2
    angles = np.arange(16)[:, None] * (0.3 ** np.arange(half))[None, :]
    inits.update(cos=np.cos(angles).astype(np.float32), sin=np.sin(angles).astype(np.float32),
                 pos=np.tile(np.arange(5, dtype=np.int64), (2, 1)))
    for t in "qk":
        ins = [t, "cos", "sin", "pos"] if not domain else [t, "pos", "cos", "sin"]
        nodes.append(N("RotaryEmbedding", ins, [f"{t}r"], domain=domain, num_heads=HEADS,
                       name=f"rope_{t}"))
    if domain:  # the contrib RotaryEmbedding feeds a contrib MultiHeadAttention
        nodes.append(N("MultiHeadAttention", ["qr", "kr", "v"], ["ctx"], domain=domain,
                       num_heads=HEADS, name="attn"))
    else:
        nodes.append(N("Attention", ["qr", "kr", "v"], ["ctx"], q_num_heads=HEADS,
                       kv_num_heads=HEADS, name="attn"))
    opsets = {"": 17, "com.microsoft": 1} if domain else {"": 23}
    model = _model(nodes + tail, inits, opsets)
    feeds = {"x": _w(2, 5, HID)}
    pruned, _, _ = oracle(model, {"ratio": 0.5}, feeds=feeds, ctx=_ctx(feeds))
    ropes = [n for n in pruned.graph.node if n.op_type == "RotaryEmbedding"]
    assert all({a.name: helper.get_attribute_value(a) for a in n.attribute}["num_heads"] == 2
               for n in ropes)
    assert json.loads(meta(pruned)["graphopt.heads"]) == [2]
