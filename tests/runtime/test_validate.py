"""graphopt.validate: per-output numerics of a candidate against a reference, through ORT."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import ConfigError, InputSpecError
from graphopt.testing import make_model, run
from graphopt.runtime.validate import REL_FLOOR, validate

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 5)).astype(np.float32)


#   x[batch, 8] -> MatMul(W) -> logits[batch, 5] -> ArgMax -> pred[batch] (int64)
def _classifier(weight: np.ndarray = W) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["pred"], axis=-1, keepdims=0),
    ]
    return make_model(nodes, {"x": ["batch", 8]}, ["logits", "pred"], {"W": weight})


def test_identical_models_pass_with_cosine_one():
    """The same model twice: ok, zero error, cosine 1, full top-1 agreement, exit code 0."""
    model = _classifier()
    result = validate(model, model, input_shapes={"x": (4, 8)})
    assert result.ok and result.exit_code == 0
    logits = result.output("logits")
    assert logits.max_abs == 0.0 and logits.mean_abs == 0.0 and logits.max_rel == 0.0
    assert logits.cosine == pytest.approx(1.0)
    assert logits.top1_agreement == 1.0
    assert logits.shape == (4, 5) and logits.dtype == "float32"
    assert result.feeds == 2 and result.input_shapes == {"x": (4, 8)}
    assert logits.elements == 2 * 4 * 5


def test_perturbed_weight_fails_naming_the_output():
    """A changed weight fails the float output with a message, and JSON stays valid."""
    changed = W.copy()
    changed[0, 0] += 0.5
    result = validate(_classifier(), _classifier(changed), input_shapes={"x": (16, 8)})
    assert not result.ok and result.exit_code == 1
    logits = result.output("logits")
    assert not logits.ok
    assert "elements outside atol=0.0001" in logits.message
    assert logits.max_abs > 0.01 and 0.9 < logits.cosine < 1.0
    assert "logits" in [o.name for o in result.failed]
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert "logits" in data["failed"] and data["ok"] is False


def test_per_output_tolerance_override():
    """A loose (atol, rtol) for one output lets it pass while the default applies elsewhere."""
    nudged = W + np.float32(1e-3)
    ref, cand = _classifier(), _classifier(nudged)
    feeds = [{"x": np.eye(8, dtype=np.float32)[:3]}]  # one-hot rows: argmax cannot flip
    strict = validate(ref, cand, feeds)
    assert not strict.output("logits").ok and strict.output("pred").ok
    loose = validate(ref, cand, feeds, tolerances={"logits": (1e-2, 0.0)})
    assert loose.ok
    assert loose.output("logits").atol == 1e-2 and loose.output("pred").atol == 1e-4


def test_tolerance_for_unknown_output_is_config_error():
    """A tolerance naming an output the reference lacks is refused, listing the outputs."""
    with pytest.raises(ConfigError, match="nope.*outputs: logits, pred"):
        validate(_classifier(), _classifier(), tolerances={"nope": (1.0, 1.0)})


def test_input_name_mismatch_is_input_spec_error():
    """Models with different input names: InputSpecError naming both sides."""
    other = make_model([helper.make_node("MatMul", ["inp", "W"], ["logits"])],
                       {"inp": ["batch", 8]}, ["logits"], {"W": W})
    with pytest.raises(InputSpecError,
                       match="only the reference has x; only the candidate has inp"):
        validate(_classifier(), other)


def test_feeds_with_wrong_names_refused():
    """Given feeds must hold exactly the model's inputs."""
    with pytest.raises(InputSpecError, match="lacks x"):
        validate(_classifier(), _classifier(), [{"y": np.zeros((1, 8), np.float32)}])


def test_top1_agreement_on_logits():
    """Top-1 agreement is the fraction of rows whose argmax matches, here with columns 0/1
    swapped in the candidate."""
    swapped = W[:, [1, 0, 2, 3, 4]]
    ref, cand = _classifier(), _classifier(swapped)
    x = RNG.standard_normal((32, 8)).astype(np.float32)
    result = validate(ref, cand, [{"x": x}])
    expected = run(ref, {"x": x})["logits"].argmax(-1)
    got = run(cand, {"x": x})["logits"].argmax(-1)
    assert result.output("logits").top1_agreement == pytest.approx(np.mean(expected == got))
    assert result.output("logits").top1_agreement < 1.0


def test_top1_on_3d_logits_only_when_named_so():
    """[batch, seq, vocab] gets top-1 when named like logits; a 3-D hidden state does not."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"]),
             helper.make_node("MatMul", ["x", "W"], ["hidden"])]
    model = make_model(nodes, {"x": [2, 3, 8]}, ["logits", "hidden"], {"W": W})
    result = validate(model, model)
    assert result.output("logits").top1_agreement == 1.0
    assert result.output("hidden").top1_agreement is None


#   x -> Mul(100) -> Floor -> Cast(int64) -> q        (candidate adds 0.5 before Floor)
def _quantizer(offset: float) -> onnx.ModelProto:
    nodes = [helper.make_node("Mul", ["x", "scale"], ["s"]),
             helper.make_node("Add", ["s", "offset"], ["t"]),
             helper.make_node("Floor", ["t"], ["f"]),
             helper.make_node("Cast", ["f"], ["q"], to=TensorProto.INT64)]
    inits = {"scale": np.float32(100.0), "offset": np.float32(offset)}
    return make_model(nodes, {"x": [4, 8]}, ["q"], inits)


def test_integer_outputs_compared_exactly():
    """Integer outputs off by one fail even under a huge atol; identical ones pass."""
    ref, cand = _quantizer(0.0), _quantizer(0.5)
    result = validate(ref, cand, atol=10.0, rtol=1.0)
    q = result.output("q")
    assert q.exact and not q.ok and "compared exactly" in q.message
    assert q.max_abs == 1.0 and q.cosine is None and q.max_rel is None
    assert validate(ref, _quantizer(0.0)).ok


def test_missing_output_fails():
    """An output the candidate lacks fails with 'missing'; an extra one is only listed."""
    cand = make_model([helper.make_node("MatMul", ["x", "W"], ["logits"]),
                       helper.make_node("Relu", ["logits"], ["extra"])],
                      {"x": ["batch", 8]}, ["logits", "extra"], {"W": W})
    result = validate(_classifier(), cand)
    assert result.output("pred").message == "missing in the candidate"
    assert result.output("logits").ok and result.extra_outputs == ["extra"]
    assert result.to_dict()["failed"] == ["pred"]


def test_shape_change_fails():
    """A candidate output with another shape fails, naming both shapes."""
    wide = RNG.standard_normal((8, 6)).astype(np.float32)
    result = validate(_classifier(), _classifier(wide))
    assert "shape [1, 6] in the candidate, [1, 5] in the reference" in \
        result.output("logits").message


def test_nan_in_candidate_fails_and_json_is_valid():
    """NaN where the reference is finite fails; non-finite stats are strings in to_dict."""
    ref = make_model([helper.make_node("Abs", ["x"], ["a"]),
                      helper.make_node("Sqrt", ["a"], ["y"])], {"x": [2, 8]}, ["y"])
    cand = make_model([helper.make_node("Sqrt", ["x"], ["y"])], {"x": [2, 8]}, ["y"])
    result = validate(ref, cand)
    row = result.output("y")
    assert not row.ok and row.max_abs == float("inf")
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["outputs"][0]["max_abs"] == "inf"


def test_relative_error_is_clamped_near_zero():
    """Max rel error divides by max(|ref|, 1e-3 * max|ref|): a zero reference does not make
    it infinite."""
    ref = make_model([helper.make_node("Mul", ["x", "k"], ["y"])], {"x": [1, 2]}, ["y"],
                     {"k": np.array([1.0, 0.0], np.float32)})
    cand = make_model([helper.make_node("Add", ["x", "k"], ["y"])], {"x": [1, 2]}, ["y"],
                      {"k": np.array([0.0, 0.001], np.float32)})
    feeds = [{"x": np.array([[2.0, 5.0]], np.float32)}]
    # ref = [2, 0], cand = [2, 5.001]: the second element's error is 5.001 over a floor of
    # 1e-3 * 2.
    row = validate(ref, cand, feeds).output("y")
    assert row.max_rel == pytest.approx(5.001 / (REL_FLOOR * 2.0), rel=1e-5)
    assert row.max_abs == pytest.approx(5.001, rel=1e-6)


def test_paths_and_lazy_export(tmp_path):
    """Models given as paths work, and graphopt.validate is the same function."""
    path = graphopt.save(_classifier(), tmp_path / "m.onnx")
    assert graphopt.validate is validate
    result = validate(path, str(path), count=1, seed=3)
    assert result.ok and result.feeds == 1


def test_bad_arguments_are_config_errors():
    """count < 1 and negative tolerances are refused."""
    with pytest.raises(ConfigError, match="count"):
        validate(_classifier(), _classifier(), count=0)
    with pytest.raises(ConfigError, match="atol"):
        validate(_classifier(), _classifier(), atol=-1.0)


def test_float_width_change_fails_but_is_measured():
    """A float16 output where the reference has float32 fails as an interface change, and
    its error is still measured."""
    ref = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [2, 8]}, ["y"])
    cand = make_model([helper.make_node("Relu", ["x"], ["r"]),
                       helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT16)],
                      {"x": [2, 8]}, ["y"])
    row = validate(ref, cand).output("y")
    assert not row.ok and row.message == "dtype float16 in the candidate, float32 in the reference"
    assert 0 < row.max_abs < 1e-2 and row.cosine == pytest.approx(1.0, abs=1e-6)
