"""The pass manager: verification, rollback, registry and configs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.errors import ConfigError, PassError
from graphopt.core.contract import Context, Pass, PassResult, Skip
from graphopt.core.manager import PassManager
from graphopt.core.config import make_config, parse_pass_spec
from graphopt.core.registry import registered_passes
from graphopt.testing import assert_equivalent, make_model


def _model() -> onnx.ModelProto:
    """x -> MatMul(w) -> Identity -> y, with metadata"""
    w = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                    helper.make_node("Identity", ["h"], ["y"])], {"x": ["batch", 4]}, ["y"],
                   {"w": w})
    m.metadata_props.add(key="origin", value="test")
    return m


class ZeroWeights(Pass):
    """Claims to be lossless but zeroes the weight: verification must catch it."""

    name = "zero-weights-test"

    def run(self, model, ctx):
        w = model.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(np.zeros((4, 3), np.float32), w.name))
        return PassResult(model, True)


class BreakGraph(Pass):
    """Leaves a dangling input: the checker or ORT load must refuse it."""

    name = "break-graph-test"

    def run(self, model, ctx):
        model.graph.node[0].input[1] = "does_not_exist"
        return PassResult(model, True)


class Crash(Pass):
    name = "crash-test"

    def run(self, model, ctx):
        model.graph.node.pop()
        raise RuntimeError("bug in pass")


class SkipsOnly(Pass):
    name = "skips-test"

    def run(self, model, ctx):
        return PassResult(model, False, {"looked": 1}, [Skip("MatMul_0", "no reason at all")])


class NoOp(Pass):
    name = "noop-test"

    def run(self, model, ctx):
        return PassResult(model, True)


@pytest.mark.parametrize("bad", [ZeroWeights, BreakGraph, Crash])
def test_failing_pass_is_rolled_back_and_run_continues(bad):
    """With on_error=continue a failing pass is rolled back and later passes still run."""
    model = _model()
    out, report = PassManager([NoOp(), bad(), SkipsOnly()], on_error="continue").run(model)
    assert [p.status for p in report.passes] == ["changed", "rolled back", "unchanged"]
    assert bad.name in report.passes[1].error and "after noop-test" in report.passes[1].error
    assert not report.ok
    assert_equivalent(_model(), out, atol=0, rtol=0)


def test_failing_pass_stops_run():
    """With on_error=stop the PassError names the pass and those before it."""
    with pytest.raises(PassError, match=r"zero-weights-test' \(after noop-test\)"):
        PassManager([NoOp(), ZeroWeights(), NoOp()]).run(_model())


def test_skips_and_counters_reported():
    """A pass's skips (with reasons) and counters reach the report."""
    _, report = PassManager([SkipsOnly()]).run(_model())
    entry = report.passes[0]
    assert entry.counters == {"looked": 1}
    assert entry.skipped == [Skip("MatMul_0", "no reason at all")]
    assert report.to_dict()["passes"][0]["skipped"][0]["reason"] == "no reason at all"


def test_finalize_keeps_metadata_and_drops_stale_value_info():
    """After a pass, model metadata survives and wrong value_info is replaced by inference."""
    model = _model()
    stale = model.graph.value_info.add()
    stale.CopyFrom(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [7, 7]))
    out, _ = PassManager([NoOp()]).run(model)
    assert {p.key: p.value for p in out.metadata_props} == {"origin": "test"}
    h = [vi for vi in out.graph.value_info if vi.name == "h"]
    assert not h or h[0].type.tensor_type.shape.dim[1].dim_value == 3


def _residual_ln_model() -> onnx.ModelProto:
    """x -> MatMul -> Reshape(to a computed shape) -> Add(x) -> LayerNorm, no value_info:
    ORT alone cannot type the Reshape, so it fuses SkipLayerNormalization only if given
    shapes (as with MiniLM's exporter graph)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Shape", ["x"], ["sh"], end=2),
             helper.make_node("Concat", ["sh", "c8"], ["target"], axis=0),
             helper.make_node("Reshape", ["h", "target"], ["hr"]),
             helper.make_node("Add", ["hr", "x"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1)]
    return make_model(nodes, {"x": ["batch", "seq", 8]}, ["y"],
                      {"w": rng.standard_normal((8, 8)).astype(np.float32),
                       "g": np.ones(8, np.float32), "b": np.zeros(8, np.float32),
                       "c8": np.array([8], np.int64)})


def _ort_fused_ops(model: onnx.ModelProto, path) -> list[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(str(path)).graph.node)


def test_noop_run_saves_no_inferred_value_info(tmp_path):
    """A no-op run leaves no inferred value_info in the saved model, so ORT fuses as before."""
    import graphopt

    model = _residual_ln_model()
    assert not model.graph.value_info
    out, report = PassManager([NoOp()]).run(_residual_ln_model())
    assert report.passes[0].status == "changed"
    saved = graphopt.load(graphopt.save(out, tmp_path / "out.onnx"))
    assert len(saved.graph.value_info) == 0
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in model.graph.node]
    before = _ort_fused_ops(model, tmp_path / "ort_before.onnx")
    assert "SkipLayerNormalization" not in before
    assert _ort_fused_ops(saved, tmp_path / "ort_after.onnx") == before


def test_value_info_kept_when_input_had_it():
    """An input that carries value_info gets re-inferred (correct) value_info back."""
    model = _residual_ln_model()
    model.graph.value_info.append(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT,
                                                                ["batch", "seq", 8]))
    out, _ = PassManager([NoOp()]).run(model)
    assert {"h", "hr", "s"} <= {vi.name for vi in out.graph.value_info}


def test_params_before_after_in_report():
    """Each pass entry carries params and MACs before and after."""
    _, report = PassManager([NoOp()]).run(_model(), Context(input_shapes={"x": (8, 4)}))
    entry = report.passes[0]
    assert entry.params_before == entry.params_after == 12
    assert entry.macs_before == 8 * 4 * 3


def test_subgraph_passes_through_manager():
    """A model with an If subgraph survives cleanup/toposort/re-inference intact."""
    then_out = helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [2])
    else_out = helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [2])
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [then_out])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [else_out])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)
    model = make_model([node], [("c", [], onnx.TensorProto.BOOL), ("x", [2], onnx.TensorProto.FLOAT)],
                       {"y": [2]})
    out, _ = PassManager([NoOp()]).run(model)
    assert out.graph.node[0].op_type == "If"
    feeds = {"c": np.array(False), "x": np.array([1.0, -2.0], np.float32)}
    assert_equivalent(model, out, feeds, atol=0, rtol=0)


def test_custom_domain_passes_through():
    """A com.microsoft op survives the manager and still runs."""
    node = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")
    model = make_model([node], {"x": [2, 8]}, {"y": [2, 8]}, extra_opsets={"com.microsoft": 1})
    out, _ = PassManager([NoOp()]).run(model)
    assert out.graph.node[0].domain == "com.microsoft"
    assert_equivalent(model, out, atol=0, rtol=0)


@dataclass(frozen=True)
class _Cfg:
    ratio: float = 0.5
    round_to: int = 1
    include: tuple[str, ...] = ()
    scope: str = "group"
    exact: bool = False

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}")


def test_make_config_coerces_cli_strings():
    """CLI strings become the dataclass's types; lists split on commas."""
    cfg = make_config(_Cfg, {"ratio": "0.25", "round_to": "8", "include": "a,b", "exact": "true"})
    assert cfg == _Cfg(0.25, 8, ("a", "b"), "group", True)


@pytest.mark.parametrize("options, message", [
    ({"ratioo": 0.5}, "unknown option 'ratioo'"),
    ({"ratio": "half"}, "expected a number"),
    ({"round_to": "2.5"}, "expected an integer"),
    ({"exact": "maybe"}, "expected true or false"),
    ({"ratio": 1.5}, "ratio must be in"),
])
def test_make_config_errors(options, message):
    """Unknown keys, wrong types and out-of-range values are ConfigError with the key."""
    with pytest.raises(ConfigError, match=message):
        make_config(_Cfg, options, "demo")


def test_parse_pass_spec_lists():
    """A token without '=' continues the previous value: indices=3,4."""
    assert parse_pass_spec("prune-layers:indices=3,4,count=1") == (
        "prune-layers", {"indices": "3,4", "count": "1"})
    assert parse_pass_spec("cleanup") == ("cleanup", {})
    with pytest.raises(ConfigError):
        parse_pass_spec(":ratio=1")
    with pytest.raises(ConfigError):
        parse_pass_spec("x:3")


def test_registry_has_lossless_passes():
    """The built-in lossless passes are registered under their CLI names."""
    names = registered_passes()
    for name in ("cleanup", "fold-batchnorm", "fold-pad"):
        assert name in names and names[name].lossless



def _reshape_model() -> onnx.ModelProto:
    """x[batch, 4] -> Reshape(shape=[-1, 4]) -> Relu -> y"""
    shape = np.array([-1, 4], np.int64)
    return make_model([helper.make_node("Reshape", ["x", "shape"], ["r"]),
                       helper.make_node("Relu", ["r"], ["y"])], {"x": ["batch", 4]}, ["y"],
                      {"shape": shape})


class BreakReshapeLossy(Pass):
    """A lossy pass whose result loads in onnxruntime but cannot run: the Reshape target
    no longer divides the input's size, which only shows when the model runs."""

    name = "break-reshape-test"
    lossless = False

    def run(self, model, ctx):
        t = model.graph.initializer[0]
        t.CopyFrom(numpy_helper.from_array(np.array([-1, 3], np.int64), t.name))
        return PassResult(model, True)


def test_lossy_result_that_cannot_run_is_rolled_back():
    """Lossy passes are not compared, but their result is run once: one that loads and
    then fails at run time is rolled back, and the model before it comes back unchanged."""
    model = _reshape_model()
    before = model.SerializeToString()
    out, report = PassManager([BreakReshapeLossy()], on_error="continue").run(
        model, Context(input_shapes={"x": (1, 4)}))
    entry = report.passes[0]
    assert entry.status == "rolled back"
    assert "cannot run the result" in entry.error
    assert out.SerializeToString() == before
