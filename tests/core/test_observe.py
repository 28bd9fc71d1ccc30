"""graphopt.core.observe: the manager's public hook reports every phase, in order."""

from __future__ import annotations

import numpy as np
from onnx import helper

from graphopt.core.contract import Context, Pass, PassResult
from graphopt.core.manager import PassManager
from graphopt.core.observe import PHASES, Event
from graphopt.testing import make_model


def _model():
    """x -> Identity -> Relu -> y (cleanup removes the Identity)."""
    nodes = [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"])]
    return make_model(nodes, {"x": [2, 3]}, ["y"])


class _Break(Pass):
    """A lossless pass that changes the outputs, so the manager rolls it back."""

    name = "break-observe-test"

    def run(self, model, ctx):
        model.graph.node[-1].op_type = "Neg"
        return PassResult(model, modified=True)


def test_phases_of_a_changed_and_a_rolled_back_pass():
    """Each phase starts and ends in order (properly nested), the pass's end carries its
    status, and the failed pass is restored."""
    from graphopt.core.registry import build_pass

    events: list[Event] = []
    passes = [build_pass("cleanup"), _Break()]
    _, report = PassManager(passes, on_error="continue", observers=[events.append]).run(
        _model(), Context())
    assert [p.status for p in report.passes] == ["changed", "rolled back"]
    stack = []
    for e in events:
        assert e.phase in PHASES
        if e.stage == "start":
            stack.append(e.phase)
        else:
            assert stack.pop() == e.phase and e.seconds is not None and e.seconds >= 0
    assert stack == []
    ends = [(e.pass_name, e.status) for e in events if e.phase == "pass" and e.stage == "end"]
    assert ends == [("cleanup", "changed"), ("break-observe-test", "rolled back")]
    cleanup = [e.phase for e in events if e.pass_name == "cleanup" and e.stage == "start"]
    assert cleanup == ["pass", "run", "reference", "session", "finalize", "checker", "session",
                       "compare", "cost"]
    broken = [e.phase for e in events if e.pass_name == "break-observe-test"
              and e.stage == "start"]
    assert broken[-1] == "restore" and "compare" in broken
    assert report.cost_before.params == report.cost_after.params == 0
    assert np.isfinite(report.passes[0].seconds)
