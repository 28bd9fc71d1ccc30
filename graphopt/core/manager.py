"""The manager that runs passes in order, verifies each one and rolls back failures.

The manager alone runs cleanup, toposort and shape re-inference after a pass
(``graphopt.core.finalize``), then verifies: ``onnx.checker``, an onnxruntime session load,
and for lossless passes outputs equal to the model before the pass. A pass that fails is
rolled back and reported with its name and the passes before it; the run stops
(``on_error="stop"``) or goes on. The re-inferred shapes (``value_info``) are for the passes
and the checks: the returned model keeps them only when the input had value_info (see
``PassManager.run``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from graphopt.core.config import config_dict
from graphopt.core.contract import Context, Pass
from graphopt.core.finalize import finalize
from graphopt.core.report import PassReport, Report
from graphopt.errors import ConfigError, GraphoptError, PassError
from graphopt.runtime.session import (
    file_session,
    _Snapshot,
    _weight_bytes,
    check_model,
    max_difference,
    ort_session,
    release_memory,
    run_model,
)

logger = logging.getLogger(__name__)



_RELEASE_BYTES = 64 * 2**20


def _same_feeds(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


# Models with at least this many bytes of weights keep the copy a failing pass is rolled back
# to on disk (``_Snapshot``) instead of in memory: one model size less at the peak
# (BERT-base: 2.95x -> ~2x the file size). Smaller models keep the in-memory copy (faster).
_DISK_ROLLBACK_BYTES = 64 * 2**20


class PassManager:
    """Run passes in order, verify each, roll back failures.

    ``on_error``: "stop" raises ``PassError`` after rolling back the failing pass; "continue"
    records it and goes on with the model from before that pass.
    """

    def __init__(self, passes: Sequence[Pass], *, on_error: str = "stop", verify: bool = True,
                 progress: Callable[[str], None] | None = None):
        if on_error not in ("stop", "continue"):
            raise ConfigError(f"on_error must be 'stop' or 'continue', not {on_error!r}")
        self.passes = list(passes)
        self.on_error = on_error
        self.verify = verify
        self.progress = progress
        # (model, feeds, outputs): ORT outputs already computed for a model object, so the
        # next lossless pass's reference needs no second session on the same model.
        self._known: tuple[onnx.ModelProto, list, list] | None = None
        # The run's temporary folder for on-disk rollback copies, the check files of the
        # running pass, and a counter naming their folders (see run).
        self._spill: Path | None = None
        self._candidate: _Snapshot | None = None
        self._serial = 0

    def run(self, model: onnx.ModelProto, ctx: Context | None = None
            ) -> tuple[onnx.ModelProto, Report]:
        """Run the passes on ``model`` (changed in place or replaced) and report.

        Before each pass the manager keeps the model as it is, to roll back to: a copy in
        memory, or for models with ``_DISK_ROLLBACK_BYTES`` of weights or more a
        ``_Snapshot`` in a temporary folder, removed when the run ends however it ends.
        """
        from graphopt.analysis.cost import count_cost

        ctx = ctx or Context()
        for p in self.passes:
            p.check(model, ctx)
        report = Report()
        done: list[str] = []
        self._known = None
        cost = count_cost(model, ctx.input_shapes)
        weights = _weight_bytes(model)
        large = weights >= _RELEASE_BYTES
        # value_info inferred by finalize() serves the passes and their verification only:
        # kept in a model whose exporter wrote none, it lets onnxruntime apply fusions the
        # original does not get (MiniLM: SkipLayerNormalization, slower on some CPUs), so
        # a no-op run would change the speed. The result has value_info iff the input had.
        keep_value_info = len(model.graph.value_info) > 0
        self._spill = (Path(tempfile.mkdtemp(prefix="graphopt-rollback-"))
                       if weights >= _DISK_ROLLBACK_BYTES else None)
        snapshot: _Snapshot | None = None  # of `model` as it is now, when on disk
        try:
            for p in self.passes:
                if self.progress:
                    self.progress(p.name)
                entry = PassReport(p.name, config_dict(p.config), p.lossless, "not run",
                                   params_before=cost.params, macs_before=cost.macs)
                start = time.perf_counter()
                backup: onnx.ModelProto | _Snapshot
                if self._spill is None:
                    backup = onnx.ModelProto()
                    backup.CopyFrom(model)
                else:
                    if snapshot is None:
                        snapshot = self._new_snapshot(model)
                    backup = snapshot
                self._candidate = None
                # Outputs known for the model before this pass hold for the backup too.
                known = (self._known if self._known is not None and self._known[0] is model
                         else None)
                rolled_back = False
                try:
                    model, changed, diff = self._run_one(p, model, backup, ctx, entry,
                                                         tuple(done))
                    entry.status = "changed" if changed else "unchanged"
                    entry.max_abs_diff = diff
                    if changed:
                        cost = count_cost(model, ctx.input_shapes)
                        if snapshot is not None:  # the check's files, if any, are the model's
                            snapshot.close()
                            snapshot, self._candidate = self._candidate, None
                    elif known is not None:
                        self._known = (model, *known[1:])
                except PassError as exc:
                    rolled_back = True
                    if isinstance(backup, onnx.ModelProto):
                        model = backup
                    entry.status = "rolled back"
                    entry.error = str(exc)
                    logger.warning("%s; rolled back", exc)
                    if self.on_error == "stop":
                        entry.seconds = time.perf_counter() - start
                        entry.params_after, entry.macs_after = cost.params, cost.macs
                        report.passes.append(entry)
                        exc.report = report  # type: ignore[attr-defined]
                        raise
                finally:
                    if self._candidate is not None:  # the failed pass's check files
                        self._candidate.close()
                        self._candidate = None
                if rolled_back:
                    if isinstance(backup, _Snapshot):
                        # The failed model is let go of (with the exception's frames) first.
                        model = None
                        if large:
                            release_memory()
                        model = backup.restore()
                    if known is not None:
                        self._known = (model, *known[1:])
                entry.seconds = time.perf_counter() - start
                entry.params_after, entry.macs_after = cost.params, cost.macs
                report.passes.append(entry)
                done.append(p.name)
                # Let go of this pass's rollback copy before the next pass makes its own:
                # held over, it is a third copy of the weights while the next one is made.
                backup = known = None
                if large:
                    release_memory()
            if not keep_value_info:
                del model.graph.value_info[:]
            return model, report
        finally:
            if self._spill is not None:
                shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = self._candidate = None

    def _new_snapshot(self, model: onnx.ModelProto) -> _Snapshot:
        """Write ``model`` to a new folder in this run's temporary folder."""
        assert self._spill is not None
        self._serial += 1
        return _Snapshot(model, self._spill / str(self._serial))

    def _as_before(self, model: onnx.ModelProto, backup: onnx.ModelProto | _Snapshot
                   ) -> onnx.ModelProto:
        """The model before a pass that reported no change (which may have edited it all
        the same): the in-memory copy, or ``model`` itself once compared with the snapshot."""
        if isinstance(backup, onnx.ModelProto):
            return backup
        if backup.matches(model):
            return model
        logger.warning("a pass that reported no change changed the model; restored")
        return backup.restore()

    def _run_one(self, p: Pass, model: onnx.ModelProto, backup: onnx.ModelProto | _Snapshot,
                 ctx: Context, entry: PassReport, before: tuple[str, ...]
                 ) -> tuple[onnx.ModelProto, bool, float | None]:
        known = self._known if self._known is not None and self._known[0] is model else None
        try:
            result = p.run(model, ctx)
        except GraphoptError as exc:
            raise PassError(p.name, str(exc), before) from exc
        except Exception as exc:  # noqa: BLE001 - a pass bug must not lose the user's model
            logger.debug("pass %s crashed", p.name, exc_info=True)
            raise PassError(p.name, f"crashed: {exc.__class__.__name__}: {exc}", before) from exc
        entry.counters = dict(result.counters)
        entry.skipped = list(result.skipped)
        if not result.modified:
            return self._as_before(model, backup), False, None
        self._known = None  # the model (perhaps the same object) has changed
        on_disk = isinstance(backup, _Snapshot)
        # The reference is computed only now, for a pass that changed something, and from
        # the outputs the previous pass's check already computed when it can.
        feeds = (ctx.sample_feeds(backup.outline if on_disk else backup, 1)
                 if self.verify else [])
        reference = None
        if self.verify and p.lossless:
            if known is not None and _same_feeds(known[1], feeds):
                reference = known[2]
            else:
                try:
                    session = (file_session(backup.path) if on_disk
                               else ort_session(backup, lean=True))
                    reference = [run_model(session, f) for f in feeds]
                    del session
                except Exception as exc:  # noqa: BLE001 - the input model itself may not run
                    logger.warning("cannot run the model before '%s' (%s); numeric check "
                                   "skipped", p.name, exc)
        try:
            out = finalize(result.model, in_place=True)
        except Exception as exc:  # noqa: BLE001
            raise PassError(p.name, f"cleanup after the pass failed: {exc}", before) from exc
        if not self.verify:
            return out, True, None
        try:
            check_model(out)
        except onnx.checker.ValidationError as exc:
            raise PassError(p.name, f"onnx.checker refused the result: {exc}", before) from exc
        try:
            if on_disk:
                # Written for the check session, kept as the next pass's rollback copy.
                self._candidate = self._new_snapshot(out)
                session = file_session(self._candidate.path)
            else:
                session = ort_session(out, lean=True)
        except Exception as exc:  # noqa: BLE001
            raise PassError(p.name, f"onnxruntime cannot load the result: {exc}", before) from exc
        diff = None
        if reference is not None:
            diff = 0.0
            outputs = []
            for feed, ref in zip(feeds, reference):
                try:
                    got = run_model(session, feed)
                except Exception as exc:  # noqa: BLE001
                    raise PassError(p.name, f"onnxruntime cannot run the result: {exc}",
                                    before) from exc
                worst, problem = max_difference(*p.compare_outputs(feed, ref, got), p.atol,
                                                p.rtol)
                diff = max(diff, worst)
                if problem:
                    raise PassError(p.name, f"changed the outputs of a lossless pass: {problem}",
                                    before)
                outputs.append(got)
            self._known = (out, feeds, outputs)
        return out, True, diff
