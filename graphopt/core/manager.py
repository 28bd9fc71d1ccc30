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
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from graphopt.core.config import config_dict
from graphopt.core.contract import Context, Pass
from graphopt.core.finalize import finalize
from graphopt.core.needs import check_needs
from graphopt.ir.model import initializer_bytes
from graphopt.core.report import PassReport, Report
from graphopt.errors import ConfigError, GraphoptError, InputSpecError, PassError
from graphopt.core.observe import Event, Observer, Observers
from graphopt.core.rollback import Kept, Where, rollback_store
from graphopt.runtime.session import (
    check_model,
    max_difference,
    release_memory,
    run_model,
)

logger = logging.getLogger(__name__)


# Below this many bytes of weights the manager does not call release_memory (a full gc pass
# costs ~0.1 s in a process with torch loaded; small models' copies do not matter).
_RELEASE_BYTES = 64 * 2**20


def _same_feeds(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


class PassManager:
    """Run passes in order, verify each, roll back failures.

    ``on_error``: "stop" raises ``PassError`` after rolling back the failing pass; "continue"
    records it and goes on with the model from before that pass. ``rollback``: where the
    copy to roll back to is kept (``graphopt.core.rollback``: "auto" puts large models on
    disk). ``observers``: callables told about every phase (``graphopt.core.observe``).
    """

    def __init__(self, passes: Sequence[Pass], *, on_error: str = "stop", verify: bool = True,
                 progress: Callable[[str], None] | None = None, rollback: Where = "auto",
                 observers: Sequence[Observer] = ()):
        if on_error not in ("stop", "continue"):
            raise ConfigError(f"on_error must be 'stop' or 'continue', not {on_error!r}")
        if rollback not in ("auto", "memory", "disk"):
            raise ConfigError(f"rollback must be 'auto', 'memory' or 'disk', not {rollback!r}")
        self.passes = list(passes)
        self.on_error = on_error
        self.verify = verify
        self.progress = progress
        self.rollback = rollback
        self.observers = Observers(observers)
        # (model, feeds, outputs): ORT outputs already computed for a model object, so the
        # next lossless pass's reference needs no second session on the same model.
        self._known: tuple[onnx.ModelProto, list, list] | None = None
        # The check feeds found for this run (several sizes; see _reference) and the
        # candidates that did not run, for the report of an unverified pass.
        self._feeds: list | None = None
        self._not_run: list[str] = []
        self._store = None

    def add_observer(self, observer: Observer) -> None:
        self.observers.observers.append(observer)

    def _cost(self, model: onnx.ModelProto, ctx: Context, pass_name: str | None = None):
        from graphopt.analysis.cost import count_cost

        with self.observers.phase("cost", pass_name):
            return count_cost(model, ctx.input_shapes)

    def run(self, model: onnx.ModelProto, ctx: Context | None = None, *,
            source: str | os.PathLike | None = None) -> tuple[onnx.ModelProto, Report]:
        """Run the passes on ``model`` (changed in place or replaced) and report.

        Before each pass the manager keeps the model as it is, to roll back to (see
        ``graphopt.core.rollback``); what it writes is removed when the run ends however it
        ends. ``source``: a file holding exactly ``model``, which on disk serves as the
        first rollback copy. ``report.cost_before``/``cost_after`` are the model's params
        and MACs.
        """
        ctx = ctx or Context()
        for p in self.passes:
            check_needs(p, model, ctx)
            p.check(model, ctx)
        report = Report()
        done: list[str] = []
        self._known = None
        self._feeds, self._not_run = None, []
        cost = self._cost(model, ctx)
        report.cost_before = cost
        large = initializer_bytes(model) >= _RELEASE_BYTES
        # value_info inferred by finalize() serves the passes and their verification only:
        # kept in a model whose exporter wrote none, it lets onnxruntime apply fusions the
        # original does not get (MiniLM: SkipLayerNormalization, slower on some CPUs), so
        # a no-op run would change the speed. The result has value_info iff the input had.
        keep_value_info = len(model.graph.value_info) > 0
        self._store = store = rollback_store(
            model, self.rollback, lambda: self.observers.emit(Event("snapshot", "start")),
            source)
        try:
            for p in self.passes:
                if self.progress:
                    self.progress(p.name)
                self.observers.emit(Event("pass", "start", p.name))
                entry = PassReport(p.name, config_dict(p.config), p.lossless, "not run",
                                   params_before=cost.params, macs_before=cost.macs)
                start = time.perf_counter()
                backup = store.keep(model)
                # Outputs known for the model before this pass hold for the backup too.
                known = (self._known if self._known is not None and self._known[0] is model
                         else None)
                rolled_back = False
                try:
                    model, changed, diff = self._run_one(p, model, backup, ctx, entry,
                                                         tuple(done))
                    entry.status = "changed" if changed else "unchanged"
                    if changed and entry.unverified:
                        entry.status = "unverified"
                    entry.max_abs_diff = diff
                    if changed:
                        cost = self._cost(model, ctx, p.name)
                        store.accept()  # the check's files, if any, are the model's copy
                    elif known is not None:
                        self._known = (model, *known[1:])
                except PassError as exc:
                    rolled_back = True
                    entry.status = "rolled back"
                    entry.error = str(exc)
                    if self.on_error == "stop":
                        # Raised: the caller reports it (the CLI as its one error line).
                        logger.info("%s; rolled back", exc)
                        entry.seconds = time.perf_counter() - start
                        entry.params_after, entry.macs_after = cost.params, cost.macs
                        entry.macs_uncounted = max(0, len(cost.unknown) - len(report.cost_before.unknown))
                        report.passes.append(entry)
                        report.cost_after = cost
                        self.observers.emit(Event("pass", "end", p.name, entry.seconds,
                                                  entry.status))
                        exc.report = report  # type: ignore[attr-defined]
                        raise
                    logger.warning("%s; rolled back", exc)
                finally:
                    store.discard()  # the failed pass's check files, if any
                if rolled_back:
                    with self.observers.phase("restore", p.name):
                        # The failed model is let go of (with the exception's frames) first.
                        model = None
                        if large and backup.on_disk:
                            release_memory()
                        model = backup.restore()
                    if known is not None:
                        self._known = (model, *known[1:])
                entry.seconds = time.perf_counter() - start
                entry.params_after, entry.macs_after = cost.params, cost.macs
                entry.macs_uncounted = max(0, len(cost.unknown) - len(report.cost_before.unknown))
                report.passes.append(entry)
                done.append(p.name)
                self.observers.emit(Event("pass", "end", p.name, entry.seconds, entry.status))
                # Let go of this pass's rollback copy before the next pass makes its own:
                # held over, it is a third copy of the weights while the next one is made.
                backup = known = None
                if large:
                    release_memory()
            if not keep_value_info:
                del model.graph.value_info[:]
            report.cost_after = cost
            return model, report
        finally:
            store.close()
            self._store = None

    def _reference(self, backup: Kept, ctx: Context, known, entry: PassReport
                   ) -> tuple[list, list | None]:
        """The check feeds and the model-before-the-pass's outputs on them (see
        ``graphopt.runtime.check_feeds``: several sizes, found once per run); no reference
        (and ``entry.unverified`` saying why) when nothing runs the model before the pass."""
        from graphopt.runtime.check_feeds import describe, find_check_feeds

        if known is not None and self._feeds and _same_feeds(known[1], self._feeds):
            entry.checked_at = [describe(f) for f in self._feeds]
            return self._feeds, known[2]
        phase = self.observers.phase
        with phase("reference", entry.name):
            try:
                with phase("session", entry.name):
                    session = backup.reference_session()
            except Exception as exc:  # noqa: BLE001 - the input model itself may not load
                entry.unverified = f"onnxruntime cannot load the model before the pass: {exc}"
                logger.warning("pass '%s' not verified: %s", entry.name, entry.unverified)
                return [], None
            if self._feeds is None:
                self._feeds, reference, self._not_run = find_check_feeds(
                    backup.outline, lambda feed: run_model(session, feed, quiet=True),
                    input_shapes=ctx.input_shapes, calibration=ctx.calibration, seed=ctx.seed)
            else:
                reference = []
                for feed in self._feeds:
                    try:
                        reference.append(run_model(session, feed))
                    except Exception as exc:  # noqa: BLE001
                        self._not_run.append(f"{describe(feed)}: {exc}")
                        reference = None
                        break
        del session
        if not self._feeds or reference is None:
            tried = "; ".join(self._not_run[:3]) or "no inputs could be generated"
            entry.unverified = (f"no input tried runs the model before the pass ({tried}); "
                                "give --input-shape or --calibration with inputs it runs")
            logger.warning("pass '%s' not verified: %s", entry.name, entry.unverified)
            return [], None
        entry.checked_at = [describe(f) for f in self._feeds]
        return self._feeds, reference

    def _run_one(self, p: Pass, model: onnx.ModelProto, backup: Kept, ctx: Context,
                 entry: PassReport, before: tuple[str, ...]
                 ) -> tuple[onnx.ModelProto, bool, float | None]:
        known = self._known if self._known is not None and self._known[0] is model else None
        phase = self.observers.phase
        try:
            with phase("run", p.name):
                result = p.run(model, ctx)
        except GraphoptError as exc:
            # A user's config or input problem found mid-run (an index out of range, a file
            # that does not read) keeps the user-error exit code 2; a pass that fails
            # verification exits 1.
            raise PassError(p.name, str(exc), before,
                            user_error=isinstance(exc, (ConfigError, InputSpecError))) from exc
        except Exception as exc:  # noqa: BLE001 - a pass bug must not lose the user's model
            logger.debug("pass %s crashed", p.name, exc_info=True)
            raise PassError(p.name, f"crashed: {exc.__class__.__name__}: {exc}", before) from exc
        entry.counters = dict(result.counters)
        entry.skipped = list(result.skipped)
        entry.plan = result.plan
        entry.details = dict(result.details)
        if not result.modified:
            return backup.unchanged(model), False, None
        self._known = None  # the model (perhaps the same object) has changed
        # The reference is computed only now, for a pass that changed something, and from
        # the outputs the previous pass's check already computed when it can.
        feeds, reference = [], None
        if self.verify and p.lossless:
            feeds, reference = self._reference(backup, ctx, known, entry)
        try:
            with phase("finalize", p.name):
                out = finalize(result.model, in_place=True)
        except Exception as exc:  # noqa: BLE001
            raise PassError(p.name, f"cleanup after the pass failed: {exc}", before) from exc
        if not self.verify:
            return out, True, None
        try:
            with phase("checker", p.name):
                check_model(out)
        except onnx.checker.ValidationError as exc:
            raise PassError(p.name, f"onnx.checker refused the result: {exc}", before) from exc
        try:
            with phase("session", p.name):
                # On disk, written for the check session and kept as the next rollback copy.
                session = self._store.check_session(out)
        except Exception as exc:  # noqa: BLE001
            raise PassError(p.name, f"onnxruntime cannot load the result: {exc}", before) from exc
        diff = None
        if reference is None:
            with phase("run-result", p.name):
                self._check_runs(p, session, backup, ctx, before)
        if reference is not None:
            diff = 0.0
            outputs = []
            with phase("compare", p.name):
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
                        raise PassError(p.name, "changed the outputs of a lossless pass: "
                                        f"{problem}", before)
                    outputs.append(got)
            self._known = (out, feeds, outputs)
        return out, True, diff

    @staticmethod
    def _check_runs(p: Pass, session, backup: Kept, ctx: Context, before: tuple[str, ...]
                    ) -> None:
        """A result whose outputs are not compared (a lossy pass, an unverified one) must
        still run: loading is not enough (a pruned Expand or Reshape target fails only at
        run time). The pass is blamed only when the model before it runs the same feed."""
        try:
            feed = ctx.sample_feeds(backup.outline, 1)[0]
        except Exception:  # noqa: BLE001 - no feed can be made: nothing to run
            return
        try:
            run_model(session, feed)
            return
        except Exception as exc:  # noqa: BLE001
            failure = exc
        try:
            run_model(backup.reference_session(), feed)
        except Exception:  # noqa: BLE001 - the model before the pass fails the same way
            return
        raise PassError(p.name, f"onnxruntime cannot run the result: {failure}", before)

