"""``graphopt.optimize``: load → passes (verified) → optional validation, in one call.

The CLI's ``optimize`` command is a thin layer over this function.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import ConfigError
from .fidelity import check_feeds_match, not_measured, split_holdout
from .fidelity import measure as measure_fidelity
from graphopt.ir.inputs import Shape, check_input_shapes, load_inputs
from graphopt.ir.model import is_outline, load, open_for_run
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.observe import Observer
from graphopt.core.report import Report
from graphopt.core.recipe import Recipe, load_recipe, passes_from_specs
from graphopt.core.normalize import normalize

logger = logging.getLogger(__name__)

Calibration = str | os.PathLike | Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]


def _calibration_feeds(calibration: Calibration | None, model: onnx.ModelProto):
    if calibration is None:
        return None
    if isinstance(calibration, (str, os.PathLike)):
        return load_inputs(calibration, model)
    if isinstance(calibration, Mapping):
        return [dict(calibration)]
    return [dict(c) for c in calibration]


def _recipe(passes_or_recipe: Any) -> Recipe:
    if isinstance(passes_or_recipe, Recipe):
        return passes_or_recipe
    if isinstance(passes_or_recipe, (str, os.PathLike)) and \
            Path(passes_or_recipe).suffix.lower() in (".yaml", ".yml", ".json"):
        return load_recipe(passes_or_recipe)
    if isinstance(passes_or_recipe, str):
        passes_or_recipe = [passes_or_recipe]
    if not passes_or_recipe:
        raise ConfigError("no passes given: name at least one pass or a recipe")
    return Recipe(passes_from_specs(list(passes_or_recipe)))


def _on_provider(recipe: Recipe, provider: str, latency: bool) -> Recipe:
    """``recipe`` with ``provider`` for the passes that time on their default provider;
    a ``ConfigError`` when it does not start here and would be used (``optimize`` doc 8)."""
    import dataclasses

    passes = []
    for p in recipe.passes:
        cfg = getattr(p, "config", None)
        fields = {f.name: f for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(
            cfg) else {}
        if "provider" in fields and cfg.provider == fields["provider"].default \
                and provider != cfg.provider:
            p = type(p)(dataclasses.replace(cfg, provider=provider))  # checked again there
        passes.append(p)
    lossy = any(not getattr(p, "lossless", True) for p in passes)
    if latency and lossy and provider != "cpu":
        from graphopt.runtime.providers import working_providers

        if provider not in working_providers():
            raise ConfigError(f"provider '{provider}' does not start on this machine "
                              f"(working: {', '.join(working_providers())}): the latency "
                              "ratio is measured on it (--provider cpu, or --no-latency)")
    return dataclasses.replace(recipe, passes=passes)


def _shapes_from_feeds(model: onnx.ModelProto, shapes: dict, feeds) -> dict:
    """Inputs with dynamic dims that ``shapes`` leaves open take the first calibration
    feed's shape: costs (MACs of a budget, the report) are counted at the sizes the model
    is calibrated on, not at generic defaults (16×16 images would skew a CNN's MAC shares)."""
    from graphopt.ir.inputs import input_specs

    if not feeds:
        return shapes
    out = dict(shapes)
    for spec in input_specs(model):
        value = feeds[0].get(spec.name)
        if spec.name in out or not spec.is_dynamic or value is None or \
                np.ndim(value) != len(spec.dims):
            continue
        out[spec.name] = tuple(int(d) for d in np.shape(value))
    return out


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    passes_or_recipe: Any,
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    calibration: Calibration | None = None,
    validate: bool | Mapping[str, Any] = False,
    on_error: str | None = None,
    verify: bool = True,
    seed: int = 0,
    allow_unverified: bool = False,
    progress: Callable[[str], None] | None = None,
    observers: Sequence[Observer] = (),
    validation: Calibration | None = None,
    holdout: float = 0.25,
    final: str = "auto",
    latency: bool = False,
    provider: str = "cpu",
) -> tuple[onnx.ModelProto, Report]:
    """Optimize ``model`` with passes (names, ``"name:key=value"`` strings, Pass objects) or a
    recipe (a ``Recipe`` or a ``.yaml``/``.json`` path); return the new model and a report.

    1. The input (file or proto) is never modified; the returned model is a new proto.
       What onnxruntime runs but the checker refuses is normalized first (``normalize``:
       the ``ai.onnx`` domain alias, node order, outputs declared without a shape), and
       listed in ``report.metadata["normalized"]``; what cannot be is refused.
    2. ``input_shapes`` fixes dynamic dims for analysis and generated inputs only; the saved
       model keeps its dynamic dims. A recipe's shapes apply unless given here.
    3. ``calibration``: an ``.npz`` file, a folder of them, a feed dict or a list of them.
    4. A lossless pass is checked at several input sizes (``graphopt.runtime.check_feeds``);
       when none runs the model, the pass is ``unverified`` and ``report.ok`` is False unless
       ``allow_unverified``.
    5. ``validate=True`` (or a dict of ``graphopt.validate`` keyword options) compares the
       result with the input on the calibration data (else generated inputs) and stores the
       ``ValidationResult`` in ``report.validation``.
    5. ``observers`` watch the manager's phases (``graphopt.core.observe``).
    6. Fidelity of a lossy run (``report.metadata["fidelity"]``, ``graphopt.fidelity``):
       measured on ``validation`` (same forms as ``calibration``), else on the last
       ``holdout`` share of the calibration feeds, which the passes then do not see; per
       output cosine and top-1 agreement, and with ``latency=True`` the latency ratio on
       ``provider``. Without data it says that fidelity was not measured.
       ``final="all"`` with a held-out share: the figure is measured on a model
       optimized from the rest of the calibration, then the passes run again on all of it
       and that model is returned (fidelity["final"] says so: its own figure is not
       measured on unseen data; the held-out one is of a model with less data).
       ``final="rest"``: the model optimized from the rest is returned, its figure exact.
       ``final="auto"`` (default): "all" unless a lower bound of the second run's cost (its
       refit's forwards) is large, else "rest" (``graphopt.final_run``;
       fidelity["final_run"] has the decision).
    7. Feeds that do not match the model's inputs are refused before any pass runs.
    8. ``provider`` is where latency is measured: the report's latency ratio, and the
       passes' own latency measurements (``prune:latency=F``'s table) where a pass leaves
       its ``provider`` option at the default. A provider that does not start on this
       machine is refused before any pass runs when something would be timed on it.
    """
    recipe = _on_provider(_recipe(passes_or_recipe), provider, latency)
    # ``original`` gives the input specs; ``reference`` is what the result is measured
    # against: the model given in memory, or the file (onnxruntime reads it); over 2 GB
    # ``original`` is the file's outline, and the passes' ``work`` is the one copy in memory.
    reference = open_for_run(
        load(model) if isinstance(model, onnx.ModelProto) else model)  # a proto: a copy
    original = reference.model
    if is_outline(original):
        work = load(model)
        normalized = normalize(work)
    else:
        normalized = normalize(original)
        work = onnx.ModelProto()
        work.CopyFrom(original)
    shapes = dict(recipe.input_shapes)
    shapes.update(input_shapes or {})
    check_input_shapes(original, shapes)
    feeds = _calibration_feeds(calibration, original)
    val_feeds = _calibration_feeds(validation, original)
    for what, given in (("calibration", feeds), ("validation", val_feeds)):
        if given is not None:
            check_feeds_match(original, given, what)
    lossy = any(not getattr(p, "lossless", True) for p in recipe.passes)
    source = "validation data" if val_feeds else None
    if final not in ("auto", "all", "rest"):
        raise ConfigError(f"final must be auto, all or rest, got {final!r}")
    everything, held = feeds, []
    if lossy and feeds and not val_feeds:
        feeds, held = split_holdout(feeds, holdout)
        if held:
            val_feeds = held
            source = f"held-out calibration ({len(held)} of {len(feeds) + len(held)} feeds)"
    shapes = _shapes_from_feeds(original, shapes, feeds)
    again, decision = bool(held) and final != "rest", None
    if again:  # final=auto: on a count of the second run's work, before any pass (doc 6)
        from .final_run import decide

        again, decision = decide(final, work, shapes, everything, recipe.passes)
    # the run on all calibration reuses what the held-out run's first lossy pass captured
    # of the model where the two runs' feeds agree (graphopt.prune.shared)
    first = next((p for p in recipe.passes if not getattr(p, "lossless", True)), None)
    ctx = Context(input_shapes=shapes or None, calibration=feeds, seed=seed,
                  shared={"everything": everything, "pass": first} if again else None)
    if again:
        work_again = onnx.ModelProto()
        work_again.CopyFrom(work)
    manager = PassManager(recipe.passes, on_error=on_error or recipe.on_error, verify=verify,
                          progress=progress, observers=observers)
    # The input file is the first rollback copy when it holds ``work`` exactly (nothing
    # normalized) and onnxruntime reads it: large models are then not written once more.
    input_file = reference.runnable if isinstance(reference.runnable, Path) and not normalized \
        else None
    optimized, report = manager.run(work, ctx, source=input_file)
    report.metadata["cost_before"] = report.cost_before.to_dict()
    report.metadata["cost_after"] = report.cost_after.to_dict()
    changed_lossy = any(not p.lossless and p.status == "changed" for p in report.passes)
    if changed_lossy and again:
        optimized, report = _optimize_on_all(
            manager, reference, optimized, report, work_again, everything, val_feeds,
            source, ctx, latency, provider, input_file, decision)
    elif changed_lossy:
        if val_feeds:
            report.metadata["fidelity"] = measure_fidelity(
                reference, optimized, val_feeds, source, latency=latency, provider=provider,
                input_shapes=ctx.input_shapes)
            _decided(report.metadata["fidelity"], decision, everything, held)
        else:
            report.metadata["fidelity"] = not_measured(
                "no calibration data to hold out and no validation data given")
    report.allow_unverified = allow_unverified
    if normalized:
        report.metadata["normalized"] = normalized
    if validate:
        from graphopt.runtime.validate import validate as run_validation

        options = dict(validate) if isinstance(validate, Mapping) else {}
        options.setdefault("input_shapes", ctx.input_shapes)
        if feeds:
            options.setdefault("feeds", feeds)
        report.validation = run_validation(reference, optimized, **options)
    return optimized, report


def _decided(fidelity: dict, decision, everything, held) -> None:
    """``final=auto``'s decision and its line in the fidelity report (``final_run``)."""
    from .final_run import note

    if decision is None:
        return
    fidelity["final_run"] = decision
    line = note(decision, _samples(everything), _samples(held))
    if line:
        fidelity["final"] = f"{fidelity['final']}; {line}" if fidelity.get("final") else line


def _optimize_on_all(manager, reference, rest_model, rest_report, work, everything, held,
                     source, ctx, latency, provider, input_file, decision=None):
    """``final="all"``: the held-out figure of the model optimized from the rest, then the
    passes again on ``everything``; that model and its report, fidelity labelled (doc 6)."""
    fidelity = measure_fidelity(reference, rest_model, held, source,
                                input_shapes=ctx.input_shapes)
    every, apart = _samples(everything), _samples(held)
    fidelity["final"] = (f"the written model was optimized again from all {every} "
                         f"calibration samples; the figure is of the model optimized from the "
                         f"other {every - apart}, on the {apart} it did not see (the written "
                         "model was not measured on unseen data)")
    if manager.progress:
        manager.progress(f"all {every} calibration samples")
    again = Context(input_shapes=ctx.input_shapes, calibration=ctx.shared["everything"],
                    seed=ctx.seed, shared=ctx.shared)
    optimized, report = manager.run(work, again, source=input_file)
    report.metadata["cost_before"] = report.cost_before.to_dict()
    report.metadata["cost_after"] = report.cost_after.to_dict()
    if latency:
        from .fidelity import latency_ratio

        fidelity["latency_ratio"] = latency_ratio(reference, optimized, held[0], provider)
    _decided(fidelity, decision, everything, held)
    report.metadata["fidelity"] = fidelity
    report.metadata["held_out_run"] = {"cost_after": rest_report.cost_after.to_dict(),
                                       "samples": every - apart}
    return optimized, report


def _samples(feeds) -> int:
    """Rows of the batch axis over ``feeds`` (a held-out share of one feed is its rows)."""
    return sum(int(np.shape(next(iter(f.values())))[0]) if np.ndim(next(iter(f.values())))
               else 1 for f in feeds)
