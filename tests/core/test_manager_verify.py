"""The manager's verification and rollback copies: lean (file-backed) sessions, the checker
on a stripped copy, references computed lazily and reused between passes, and the on-disk
rollback copy for large models (``Snapshot``), exercised on a small model with
``rollback="disk"`` (what ``auto`` picks for large models)."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.errors import PassError
from graphopt.core.contract import Context, Pass, PassResult
from graphopt.core.finalize import finalize
from graphopt.core.manager import PassManager
from graphopt.core.observe import Event
from graphopt.runtime.session import Snapshot, check_model, ort_session
from graphopt.testing import make_model, run


def _model() -> onnx.ModelProto:
    """x -> MatMul(w: 64x32) -> Gather(idx: 2048 int64) -> Reshape -> Add(Constant c) -> y,
    w over the strip size (spilled to weights.bin); idx (an int table), the Constant inline."""
    rng = np.random.default_rng(0)
    c = numpy_helper.from_array(rng.standard_normal((2048,)).astype(np.float32), "c")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Flatten", ["h"], ["f"], axis=0),
             helper.make_node("Gather", ["f", "idx"], ["g"], axis=1),
             helper.make_node("Reshape", ["g", "shape"], ["r"]),
             helper.make_node("Constant", [], ["c"], value=c),
             helper.make_node("Add", ["r", "c"], ["y"])]
    model = make_model(nodes, {"x": [2, 64]}, ["y"], {
        "w": rng.standard_normal((64, 32)).astype(np.float32),
        "idx": rng.integers(0, 64, 2048).astype(np.int64),
        "shape": np.array([2048], np.int64)})
    model.metadata_props.add(key="origin", value="test")
    return model


class _Scale(Pass):
    """Multiplies w by ``factor``, claiming to be lossless (factor 1: a real no-op edit)."""

    lossless = True

    def __init__(self, name: str, factor: float, modified: bool = True):
        super().__init__()
        self.name, self.factor, self.modified = name, factor, modified

    def run(self, model, ctx):
        w = model.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * self.factor, w.name))
        return PassResult(model, modified=self.modified)


class _Nothing(Pass):
    name = "nothing-disk-test"

    def run(self, model, ctx):
        return PassResult(model, modified=False)


class _Interrupt(Pass):
    name = "interrupt-disk-test"

    def run(self, model, ctx):
        model.graph.node.pop()
        raise KeyboardInterrupt


@pytest.fixture
def on_disk(monkeypatch, tmp_path):
    """``disk(passes, ...)`` makes a manager that keeps its rollback copies on disk and
    records each snapshot written (an observer); temporary folders go to the test's."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    writes = []

    def record(event: Event) -> None:
        if event.phase == "snapshot":
            writes.append(event)

    def disk(passes, **kwargs):
        return PassManager(passes, rollback="disk", observers=[record], **kwargs)

    return temp, writes, disk


def _in_memory(passes, model, **kwargs):
    """The same run on the in-memory path (the default for a small model)."""
    return PassManager(passes, rollback="memory", **kwargs).run(model, Context())


def test_snapshot_restores_the_model_exactly(tmp_path):
    """restore() gives back the model byte for byte (IR version, explicit data_location)."""
    model = _model()
    model.ir_version = 11
    model.graph.initializer[0].data_location = onnx.TensorProto.DEFAULT
    before = model.SerializeToString()
    snap = Snapshot(model, tmp_path / "snap")
    assert model.SerializeToString() == before
    assert [i for i, *_ in snap._spilled] == [0]
    assert snap.restore().SerializeToString() == before
    assert snap.matches(model)
    snap.close()
    assert not (tmp_path / "snap").exists()


def test_snapshot_matches_sees_weight_and_graph_edits(tmp_path):
    """matches() is False after an in-place weight edit or a node edit."""
    model = _model()
    snap = Snapshot(model, tmp_path / "snap")
    _Scale("s", 2.0).run(model, Context())
    assert not snap.matches(model)
    other = _model()
    other.graph.node[1].attribute[0].i = 1
    assert not snap.matches(other)
    assert snap.matches(_model())


def test_disk_run_equals_memory_run(on_disk):
    """change, no change, failure, change: same statuses and same result as in memory;
    one snapshot write to start plus one per checked change, and nothing left on disk."""
    temp, writes, disk = on_disk
    passes = [_Scale("a-disk-test", 1.0), _Nothing(), _Scale("bad-disk-test", 1.5),
              _Scale("b-disk-test", 1.0)]
    out, report = disk(passes, on_error="continue").run(_model(), Context())
    assert [p.status for p in report.passes] == ["changed", "unchanged", "rolled back",
                                                 "changed"]
    assert len(writes) == 4  # start, check a, check bad (discarded), check b
    assert list(temp.iterdir()) == []
    expected, _ = _in_memory(passes, _model(), on_error="continue")
    assert out.SerializeToString() == expected.SerializeToString()


def test_failing_first_pass_restores_the_input(on_disk):
    """A rolled-back first pass gives back exactly the input model, read from disk."""
    temp, _, disk = on_disk
    out, report = disk([_Scale("bad-disk-test", 1.5)], on_error="continue").run(
        _model(), Context())
    assert report.passes[0].status == "rolled back"
    assert out.SerializeToString() == _model().SerializeToString()
    assert list(temp.iterdir()) == []


def test_unchanged_pass_that_edits_is_undone(on_disk):
    """A pass reporting no change that edited the weights gets the model before it back."""
    _, _, disk = on_disk
    out, report = disk([_Scale("liar-disk-test", 3.0, modified=False)]).run(
        _model(), Context())
    assert report.passes[0].status == "unchanged"
    x = {"x": np.ones((2, 64), np.float32)}
    np.testing.assert_array_equal(run(out, x)["y"], run(_model(), x)["y"])
    assert out.SerializeToString() == _model().SerializeToString()


def test_stop_and_interrupt_clean_up(on_disk):
    """on_error='stop' and a KeyboardInterrupt inside a pass leave no temporary files."""
    temp, _, disk = on_disk
    with pytest.raises(PassError):
        disk([_Scale("a-disk-test", 1.0), _Scale("bad-disk-test", 1.5)]).run(
            _model(), Context())
    assert list(temp.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        disk([_Scale("a-disk-test", 1.0), _Interrupt()]).run(_model(), Context())
    assert list(temp.iterdir()) == []


def test_disk_run_without_verification(on_disk):
    """verify=False: each pass gets a fresh snapshot (no check files to reuse)."""
    temp, writes, disk = on_disk
    passes = [_Scale("a-disk-test", 2.0), _Scale("b-disk-test", 0.5)]
    out, report = disk(passes, verify=False).run(_model(), Context())
    assert [p.status for p in report.passes] == ["changed", "changed"]
    assert len(writes) == 2
    assert list(temp.iterdir()) == []
    x = {"x": np.ones((2, 64), np.float32)}
    np.testing.assert_allclose(run(out, x)["y"], run(_model(), x)["y"], rtol=1e-6)


def test_small_model_stays_in_memory():
    """Under the threshold no snapshot is written."""
    def refuse(event: Event) -> None:
        if event.phase == "snapshot":
            raise AssertionError("snapshot written for a small model")

    _, report = PassManager([_Scale("a-disk-test", 1.0), _Nothing()],
                            observers=[refuse]).run(_model(), Context())
    assert [p.status for p in report.passes] == ["changed", "unchanged"]


# --------------------------------------------------------------------------- lean checks


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


# --------------------------------------------------------------------------- input file


@pytest.fixture
def from_file(tmp_path):
    """The model saved to a file and loaded back: what ``graphopt.optimize`` runs on."""
    from graphopt.ir.model import load, save

    path = save(_model(), tmp_path / "in.onnx")
    return path, (lambda: load(path)), path.read_bytes()


def test_input_file_is_the_first_copy(on_disk, from_file):
    """source=the input file: no snapshot before the first pass (3 writes where a run
    without it makes 4); same statuses and result; the file is left as it was."""
    temp, writes, disk = on_disk
    path, model, data = from_file
    passes = [_Scale("a-disk-test", 1.0), _Nothing(), _Scale("bad-disk-test", 1.5),
              _Scale("b-disk-test", 1.0)]
    out, report = disk(passes, on_error="continue").run(model(), Context(), source=path)
    assert [p.status for p in report.passes] == ["changed", "unchanged", "rolled back",
                                                 "changed"]
    assert len(writes) == 3  # check a, check bad (discarded), check b
    expected, _ = _in_memory(passes, _model(), on_error="continue")
    assert out.SerializeToString() == expected.SerializeToString()
    assert list(temp.iterdir()) == [] and path.read_bytes() == data


@pytest.mark.parametrize("bad", [_Scale("bad-disk-test", 1.5),
                                 _Scale("liar-disk-test", 3.0, modified=False)])
def test_input_file_restores_and_undoes(on_disk, from_file, bad):
    """A failing first pass, or a pass that edits while reporting no change, gets the
    input model back, read from the input file; nothing is written."""
    _, writes, disk = on_disk
    path, model, _ = from_file
    out, report = disk([bad], on_error="continue").run(model(), Context(), source=path)
    assert report.passes[0].status in ("rolled back", "unchanged")
    assert out.SerializeToString() == model().SerializeToString()
    assert len(writes) == (1 if bad.modified else 0)  # the failing pass's check files


def test_input_file_changed_during_the_run(on_disk, from_file):
    """Rolling back to an input file that changed on disk meanwhile is one clear error."""
    from graphopt.errors import GraphoptError

    class _Overwrite(Pass):
        name = "overwrite-disk-test"

        def run(self, model, ctx):
            path.write_bytes(path.read_bytes() + b" ")
            raise RuntimeError("fails after the input file changed")

    _, _, disk = on_disk
    path, model, _ = from_file
    with pytest.raises(GraphoptError, match="changed on disk"):
        disk([_Overwrite()], on_error="continue").run(model(), Context(), source=path)


def test_optimize_hands_its_input_file_over(monkeypatch, tmp_path, on_disk):
    """graphopt.optimize on a file (rollback copies on disk): a pass reporting no change
    writes nothing; a model that optimize normalized (duplicate node names) is not the
    file, so its first copy is written as before."""
    import graphopt
    from graphopt.core import rollback
    from graphopt.ir.model import save

    _, writes, _ = on_disk
    monkeypatch.setattr(rollback, "DISK_ROLLBACK_BYTES", 0)
    clean = save(_model(), tmp_path / "clean.onnx")
    graphopt.optimize(clean, [_Nothing()], observers=[_recorder(writes)])
    assert len(writes) == 0
    dup = _model()
    for node in dup.graph.node[:2]:
        node.name = "same"
    graphopt.optimize(save(dup, tmp_path / "dup.onnx"), [_Nothing()],
                      observers=[_recorder(writes)])
    assert len(writes) == 1


def _recorder(writes):
    def record(event: Event) -> None:
        if event.phase == "snapshot":
            writes.append(event)
    return record
