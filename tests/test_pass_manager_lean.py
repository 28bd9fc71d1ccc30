"""The manager's cheaper verification: lean (file-backed) sessions, checker on a stripped copy,
references computed lazily and reused between passes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.errors import PassError
from graphopt.core.contract import Context, Pass, PassResult
from graphopt.core.finalize import finalize
from graphopt.core.manager import PassManager
from graphopt.core.observe import Event
from graphopt.runtime.session import check_model, ort_session
from graphopt.testing import make_model, run


def _model() -> onnx.ModelProto:
    """x -> MatMul(w: 64x32 float) -> Gather(idx: 1024 int64, large) -> Add(Constant) -> y"""
    rng = np.random.default_rng(0)
    c = numpy_helper.from_array(rng.standard_normal((2048,)).astype(np.float32), "c")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Flatten", ["h"], ["f"], axis=0),
             helper.make_node("Gather", ["f", "idx"], ["g"], axis=1),
             helper.make_node("Reshape", ["g", "shape"], ["r"]),
             helper.make_node("Constant", [], ["c"], value=c),
             helper.make_node("Add", ["r", "c"], ["y"])]
    return make_model(nodes, {"x": [2, 64]}, ["y"], {
        "w": rng.standard_normal((64, 32)).astype(np.float32),
        "idx": rng.integers(0, 64, 2048).astype(np.int64),
        "shape": np.array([2048], np.int64)})


def test_lean_session_matches_plain():
    """lean=True runs the same outputs as a session on the serialized model."""
    model = _model()
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    plain = ort_session(model).run(None, {"x": x})[0]
    before = model.SerializeToString()
    lean = ort_session(model, lean=True).run(None, {"x": x})[0]
    np.testing.assert_array_equal(lean, plain)
    assert model.SerializeToString() == before, "the model is left as it was"


def test_check_model_on_stripped_copy():
    """check_model passes a valid model with large weights and refuses a dangling input."""
    model = _model()
    before = model.SerializeToString()
    check_model(model)
    assert model.SerializeToString() == before
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        check_model(model)


class _Scale(Pass):
    """Multiplies w by ``factor`` and claims to be lossless (factor 1: a real no-op edit)."""

    lossless = True

    def __init__(self, name: str, factor: float):
        super().__init__()
        self.name, self.factor = name, factor

    def run(self, model, ctx):
        w = model.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * self.factor, w.name))
        return PassResult(model, modified=True)


class _Nothing(Pass):
    name = "nothing-test"
    lossless = True

    def run(self, model, ctx):
        return PassResult(model, modified=False)


def _count_sessions(calls: list[int]):
    """An observer counting the onnxruntime sessions the manager opens."""
    def observe(event: Event) -> None:
        if event.phase == "session" and event.stage == "start":
            calls.append(1)
    return observe


def test_reference_reused_between_passes():
    """change, no change, change: one reference session plus one check per change."""
    calls = []
    passes = [_Scale("a-test", 1.0), _Nothing(), _Scale("b-test", 1.0)]
    _, report = PassManager(passes, observers=[_count_sessions(calls)]).run(_model(), Context())
    assert [p.status for p in report.passes] == ["changed", "unchanged", "changed"]
    assert len(calls) == 3


def test_reused_reference_still_catches_a_change():
    """A lossless pass that changes outputs after a reused reference is rolled back."""
    calls = []
    model = _model()
    x = {"x": np.ones((2, 64), np.float32)}
    passes = [_Scale("a-test", 1.0), _Scale("bad-test", 1.5)]
    out, report = PassManager(passes, on_error="continue",
                              observers=[_count_sessions(calls)]).run(model, Context())
    assert [p.status for p in report.passes] == ["changed", "rolled back"]
    assert "changed the outputs" in report.passes[1].error
    np.testing.assert_allclose(run(out, x)["y"], run(_model(), x)["y"])
    assert len(calls) == 3  # reference, check a, check bad (its reference was reused)
    with pytest.raises(PassError):
        PassManager([_Scale("bad-test", 1.5)]).run(_model(), Context())


class _LossyScale(_Scale):
    lossless = False


def test_lossy_pass_in_place_invalidates_reference():
    """After a lossy in-place change, the next lossless pass is checked against the new model."""
    passes = [_Scale("a-test", 1.0), _LossyScale("lossy-test", 2.0), _Scale("b-test", 1.0)]
    _, report = PassManager(passes).run(_model(), Context())
    assert [p.status for p in report.passes] == ["changed", "changed", "changed"]


def test_finalize_copy_leaves_input_alone():
    """finalize() without in_place returns a new model and keeps the input's weights."""
    model = _model()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(4096, np.float32), "dead"))
    before = model.SerializeToString()
    out = finalize(model)
    assert model.SerializeToString() == before
    assert "dead" not in {t.name for t in out.graph.initializer}
    x = {"x": np.ones((2, 64), np.float32)}
    np.testing.assert_array_equal(run(out, x)["y"], run(model, x)["y"])
