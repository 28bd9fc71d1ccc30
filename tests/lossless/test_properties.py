"""Property-based tests (hypothesis) for the lossless passes.

1. ``pad_legality`` against onnxruntime itself: for random pooling/Conv windows (kernel,
   stride, dilation, own pads, explicit pads, ceil_mode, pad value, count_include_pad),
   whenever ``axis_blocker`` allows a fold, ``Pad -> Op`` and the folded ``Op`` give the
   same outputs and shapes through onnxruntime at every input length from 1 to 12 (and at
   the one length a static axis has).
2. Random small graphs and random mutations of a small real export (a torch CNN with
   dynamic H and W), through ``graphopt.optimize`` with the lossless passes in random order:
   nothing rolled back or left unverified for an input the checker and onnxruntime accept,
   and outputs equal to the input's at every size it runs at (1, 2, 3, 5, 8, 16, ...).

Bounded for CI (``GRAPHOPT_PROPERTY_EXAMPLES``, default 25 and 15 examples, no deadline);
each failure found becomes a named test in ``test_regressions.py``.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import graphopt
from graphopt.fuzz_models import tiny_cnn, torch_cnn
from graphopt.fuzz_mutations import VALID
from graphopt.fuzzing import LOSSLESS, _compare, _is_valid, probe
from graphopt.passes.pad_legality import Axis, axis_blocker

EXAMPLES = int(os.environ.get("GRAPHOPT_PROPERTY_EXAMPLES", "0")) or None
_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4


def _session(nodes, inits):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 1, None])],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), options)


def _op(op, data, k, s, d, own, ceil, include):
    attrs = {"kernel_shape": [k], "strides": [s], "pads": list(own)}
    if d > 1:
        attrs["dilations"] = [d]
    if op != "Conv":
        attrs["ceil_mode"] = int(ceil)
    if op == "AveragePool":
        attrs["count_include_pad"] = 1
    if op == "Conv":
        attrs.pop("kernel_shape")
        return helper.make_node("Conv", [data, "w"], ["y"], **attrs)
    return helper.make_node(op, [data], ["y"], **attrs)


def _run(session, x):
    try:
        return session.run(None, {"x": x}, _QUIET)[0]
    except Exception:  # noqa: BLE001 - not at this length
        return None


@settings(max_examples=EXAMPLES or 25, deadline=None)
@given(op=st.sampled_from(["MaxPool", "AveragePool", "LpPool", "Conv"]),
       k=st.integers(1, 3), s=st.integers(1, 3), d=st.integers(1, 3),
       own=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       explicit=st.tuples(st.integers(0, 2), st.integers(0, 2)).filter(any),
       ceil=st.booleans(), value=st.sampled_from([0.0, -1.0, -np.inf]),
       static=st.one_of(st.none(), st.integers(1, 9)))
def test_pad_fold_allowed_only_when_onnxruntime_agrees(op, k, s, d, own, explicit, ceil,
                                                       value, static):
    """Where the window check allows a fold, onnxruntime gives the same outputs before and
    after it, at every length (dynamic) or at the static one."""
    value = value if op == "MaxPool" else 0.0
    assume(op == "Conv" or (own[0] + explicit[0] < k and own[1] + explicit[1] < k))
    assume(op == "Conv" or (own[0] < k and own[1] < k))
    assume(axis_blocker(Axis(k, s, d, own, explicit), op, ceil, static) is None)
    b, e = explicit
    inits = [numpy_helper.from_array(np.array([0, 0, b, 0, 0, e], np.int64), "pads"),
             numpy_helper.from_array(np.array(value, np.float32), "v"),
             numpy_helper.from_array(np.random.default_rng(0).random((1, 1, k)).astype(
                 np.float32), "w")]
    relu = helper.make_node("Relu", ["x"], ["r"])
    before = _session([relu, helper.make_node("Pad", ["r", "pads", "v"], ["p"]),
                       _op(op, "p", k, s, d, own, ceil, True)], inits)
    after = _session([relu, _op(op, "r", k, s, d, (own[0] + b, own[1] + e), ceil, True)],
                     inits)
    rng = np.random.default_rng(1)
    for n in ([static] if static else range(1, 13)):
        x = rng.standard_normal((1, 1, n)).astype(np.float32)
        want = _run(before, x)
        if want is None:
            continue
        got = _run(after, x)
        assert got is not None and got.shape == want.shape, (n, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=f"length {n}")


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    model = torch_cnn(tmp_path_factory.mktemp("torch_cnn"))
    if model is None:
        pytest.skip("torch is not installed: the real-export half of the property suite "
                    "needs it")
    return model


@settings(max_examples=EXAMPLES or 15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), real=st.booleans(),
       mutations=st.lists(st.sampled_from(sorted(VALID)), min_size=1, max_size=3),
       order=st.permutations(LOSSLESS), count=st.integers(1, 3))
def test_lossless_passes_keep_outputs_at_every_size(real_export, seed, real, mutations,
                                                    order, count):
    """Random graph (tiny CNN or the torch export) + random valid mutations -> lossless
    passes in random order: nothing rolled back or unverified for a valid input, outputs
    equal at every size the input runs at."""
    rng = np.random.default_rng(seed)
    model = onnx.ModelProto()
    model.CopyFrom(real_export if real else tiny_cnn(rng))
    for key in mutations:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        try:
            mutated = VALID[key](work, rng)
        except Exception:  # noqa: BLE001 - a mutation that does not fit
            mutated = None
        model = mutated if mutated is not None else model
    probes = probe(model, rng)
    assume(probes)
    out, report = graphopt.optimize(model, list(order[:count]), on_error="continue")
    if _is_valid(model):
        assert report.ok, [(p.name, p.status, p.error, p.unverified) for p in report.passes]
    problem = _compare(model, out, probes, rng)
    assert problem is None, problem
