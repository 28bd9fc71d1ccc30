"""``graphopt.sweep``: build prune × quantize candidates, measure them, pick one.

1. Candidates (``plan_candidates``): for every budget, the lossless passes (``LOSSLESS``,
   with ``drop-nan-guard``), the pruning that meets the budget (``budget_specs``, the one
   place a budget becomes passes), token unpadding where the model has an attention mask
   and the pass exists, and ``LOSSLESS_LAST`` (``softmax-floor``); then, for
   every quantization mode, the ``quantize`` pass on that float model (``none`` keeps it
   float). A budget of 1 is the lossless candidate.
2. Each float model is built once per budget (``graphopt.optimize``, every pass verified by
   the manager; params and MACs counted before unpadding, on the padded batch) and
   quantized per mode from it. Every candidate is saved to
   ``OUT/candidates/NAME.onnx``.
3. Fidelity: ``graphopt.validate`` of the candidate against the original on the
   validation feeds (``validation``, else the last quarter of the calibration batches, kept
   out of calibration): the worst cosine over the outputs, and the worst top-1 agreement
   over the classifier-like ones (``classifier_outputs``: logits or probabilities; an
   embedding's argmax means nothing, so it gets none).
4. Latency: ``graphopt.benchmark`` of the candidate against the original, A/B interleaved
   in one process on ``provider``, on ``bench_batches`` validation batches (ratios of summed
   medians); ``speedup = original / candidate``, ``speedup_error`` its relative standard
   error (``graphopt.runtime.benchmark``'s ``ratio_error`` of each batch, weighted by the
   candidate's time on it).
5. ``pick_candidate``: the fastest candidate (by speedup, else by MACs) whose ``min_cosine``
   or ``min_top1`` meets the floor; ties go to the higher fidelity. A candidate whose
   speedup is within two combined standard errors of the fastest's (``TIE_ERRORS``) is
   not measurably slower and ties with it: otherwise the pick between two equally fast
   candidates would follow the timing noise of the run. None when none meets the floor.
6. Bad input (a budget list or floor that does not parse, an unknown quantize mode, a
   provider that does not run here, feeds that do not fit) raises before anything is
   written. A candidate whose passes fail verification is recorded with its error and the
   sweep goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import ConfigError, GraphoptError, InputSpecError

logger = logging.getLogger(__name__)

BUDGET_KINDS = ("macs", "params", "latency")
TIE_ERRORS = 2.0  # speedups this many combined standard errors apart tie (module doc, 5)
QUANTIZE_MODES = ("none", "dynamic", "static", "fp16")
PICK_METRICS = {"min_cosine": "cosine", "min_top1": "top1"}
LOSSLESS = ("cleanup", "fold-batchnorm", "fold-pad", "drop-nan-guard")
UNPAD = "unpad-tokens"
# Lossless passes that go last among the float passes (after pruning and unpadding).
LOSSLESS_LAST = ("softmax-floor",)
Feed = dict[str, np.ndarray]
Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Budget:
    """``kind=value``: the fraction of the original's MACs (params, latency) to keep."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        return f"{self.kind}={self.value:g}"


def parse_budgets(text: str) -> list[Budget]:
    """``"macs=1,0.8,0.6"`` -> budgets; one kind, fractions in (0, 1]."""
    kind, sep, rest = text.partition("=")
    kind = kind.strip()
    if not sep or kind not in BUDGET_KINDS:
        raise ConfigError(f"bad --budget '{text}': expected KIND=F1,F2,... with KIND one of "
                          f"{', '.join(BUDGET_KINDS)}, e.g. macs=1,0.8,0.6")
    values = []
    for token in rest.split(","):
        try:
            value = float(token)
        except ValueError:
            raise ConfigError(f"bad --budget '{text}': '{token.strip()}' is not a number; "
                              "give fractions of the original such as 0.8") from None
        if not 0 < value <= 1 or not np.isfinite(value):
            raise ConfigError(f"bad --budget '{text}': {token.strip()} is not a fraction in "
                              "(0, 1] of the original's cost")
        if value not in values:
            values.append(value)
    return [Budget(kind, v) for v in sorted(values, reverse=True)]


def parse_quantize(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in QUANTIZE_MODES]
    if not modes or bad:
        raise ConfigError(f"bad --quantize '{text}': expected a list of "
                          f"{', '.join(QUANTIZE_MODES)}")
    return list(dict.fromkeys(modes))


def parse_pick(text: str) -> tuple[str, float]:
    """``"min_cosine=0.95"`` -> ``("cosine", 0.95)``."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    try:
        floor = float(value)
    except ValueError:
        floor = None
    if not sep or key not in PICK_METRICS or floor is None or not 0 <= floor <= 1:
        raise ConfigError(f"bad --pick '{text}': expected min_cosine=F or min_top1=F with F "
                          "in [0, 1]")
    return PICK_METRICS[key], floor


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class CandidatePlan:
    """One candidate: the float passes (built once per budget) and a quantize mode."""

    name: str
    budget: Budget
    quantize: str
    float_specs: tuple[str, ...]

    @property
    def quant_spec(self) -> str | None:
        return None if self.quantize == "none" else f"quantize:mode={self.quantize}"

    @property
    def specs(self) -> list[str]:
        return [*self.float_specs, *([self.quant_spec] if self.quant_spec else [])]


def _model_kind(model: onnx.ModelProto) -> str:
    ops = {n.op_type for n in model.graph.node}
    if ops & {"Attention", "MultiHeadAttention", "GroupQueryAttention"} or (
            "Softmax" in ops and "MatMul" in ops):
        return "transformer"
    return "cnn" if "Conv" in ops else "mlp"


def _has_mask(model: onnx.ModelProto) -> bool:
    return any("mask" in i.name.lower() for i in model.graph.input)


def budget_specs(budget: Budget, model: onnx.ModelProto, available: Mapping[str, type],
                 calibrated: bool) -> tuple[list[str], str | None]:
    """The pruning passes that meet ``budget`` on ``model``, and a note when they only
    approximate it. With the budgeted ``prune`` pass (issue 8) this is that pass; until it
    is registered, uniform ratios of the width passes stand in for a MACs budget."""
    if budget.value >= 1:
        return [], None
    prune = available.get("prune")
    if prune is not None and budget.kind in {f.name for f in dataclasses.fields(prune.Config)}:
        return [f"prune:{budget.kind}={budget.value:g}"], None
    if budget.kind != "macs":
        raise ConfigError(f"a {budget.kind}= budget needs the budgeted 'prune' pass, which "
                          "this graphopt does not have; use macs=")
    importance = "activation" if calibrated else "l1"
    kind = _model_kind(model)
    keep = budget.value
    if kind == "transformer":
        # Q/K/V/O and FFN MACs are linear in the heads and neurons kept.
        r = round(1 - keep, 4)
        specs = [f"prune-heads:ratio={r}", f"prune-neurons:ratio={r},importance={importance}"]
    else:
        # A conv's MACs scale with its input and output channels: keep sqrt of the budget.
        r = round(1 - float(np.sqrt(keep)), 4)
        specs = ([f"prune-channels:ratio={r},importance={importance},scope=global"]
                 if kind == "cnn" else [f"prune-neurons:ratio={r},importance={importance}"])
    return specs, ("uniform ratios stand in for the budget (no budgeted 'prune' pass); "
                   "the MACs column is what they reached")


# Static QDQ on onnxruntime's CPU provider: with int8 activations ORT leaves some Convs
# unfused (PP-OCR det: 14 of 62, the stride-2 depthwise ones and those fed by Resize/Add)
# and the model runs slower than float (0.73x); uint8 activations fuse all 62 at the same
# fidelity (benchmarks/FRONTIER.md, PP-OCR table, rows A and B).
CPU_STATIC = "static,activations=uint8"


def plan_candidates(model: onnx.ModelProto, budgets: Sequence[Budget], modes: Sequence[str],
                    *, calibrated: bool = True, available: Mapping[str, type] | None = None,
                    provider: str = "cpu") -> tuple[list[CandidatePlan], list[str]]:
    """Every budget × quantize mode (module doc, 1), and notes on how budgets were met.
    ``static`` on the ``cpu`` provider quantizes activations to uint8 (``CPU_STATIC``)."""
    if available is None:
        from .core.registry import registered_passes

        available = registered_passes()
    lossless = [p for p in LOSSLESS if p in available]
    unpad = [UNPAD] if UNPAD in available and _has_mask(model) else []
    last = [p for p in LOSSLESS_LAST if p in available]
    plans, notes = [], []
    for budget in budgets:
        prune, note = budget_specs(budget, model, available, calibrated)
        if note and note not in notes:
            notes.append(note)
        float_specs = tuple(lossless + prune + unpad + last)
        for mode in modes:
            name = budget.label + ("" if mode == "none" else f"+{mode}")
            spec = CPU_STATIC if mode == "static" and provider == "cpu" else mode
            plans.append(CandidatePlan(name, budget, spec, float_specs))
    if "static" in modes and provider == "cpu":
        notes.append("static quantization on cpu: uint8 activations, which onnxruntime's "
                     "CPU kernels fuse into every quantized Conv (int8 ones leave some "
                     "unfused and run slower than float)")
    if not unpad and _has_mask(model):
        notes.append(f"no '{UNPAD}' pass in this graphopt: candidates run padded tokens")
    if unpad:
        notes.append(f"MACs are counted before '{UNPAD}', on the padded batch: what "
                     "unpadding saves depends on each batch's mask (see the latency)")
    return plans, notes


# --------------------------------------------------------------------------- results


@dataclass
class Candidate:
    name: str
    budget: str
    quantize: str
    passes: list[str]
    path: str | None = None
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    original_ms: float | None = None
    speedup: float | None = None
    speedup_error: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    report: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SweepResult:
    model: str
    provider: str
    metric: str
    original: dict[str, Any]
    candidates: list[Candidate]
    validation: str
    latency: str
    threads: int | None = None
    notes: list[str] = field(default_factory=list)
    pick: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen(self) -> Candidate | None:
        name = self.pick.get("chosen")
        return next((c for c in self.candidates if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["candidates"] = [c.to_dict() for c in self.candidates]
        d["title"] = f"graphopt sweep: {self.model}"
        return d


def pick_candidate(candidates: Sequence[Mapping[str, Any] | Candidate], metric: str,
                   floor: float) -> str | None:
    """Name of the fastest candidate meeting ``fidelity[metric] >= floor`` (module doc, 5)."""
    rows = [c.to_dict() if isinstance(c, Candidate) else dict(c) for c in candidates]
    ok = [c for c in rows if not c.get("error")
          and (c.get("fidelity") or {}).get(metric) is not None
          and c["fidelity"][metric] >= floor]
    if not ok:
        return None
    if not all(c.get("speedup") for c in ok):
        return max(ok, key=lambda c: (-(c.get("macs") or 0), c["fidelity"][metric]))["name"]
    fastest = max(ok, key=lambda c: c["speedup"])

    def as_fast(c) -> bool:
        errors = [c.get("speedup_error") or 0.0, fastest.get("speedup_error") or 0.0]
        spread = TIE_ERRORS * float(np.hypot(*errors))
        return c["speedup"] * (1 + spread) >= fastest["speedup"]

    return max((c for c in ok if as_fast(c)),
               key=lambda c: (c["fidelity"][metric], c["speedup"]))["name"]


# --------------------------------------------------------------------------- running


def split_feeds(calibration: list[Feed], validation: list[Feed] | None
                ) -> tuple[list[Feed], list[Feed], str]:
    """Calibration and validation feeds, and where validation came from (module doc, 3)."""
    if validation:
        return calibration, validation, f"{len(validation)} validation batches"
    if len(calibration) < 2:
        return calibration, calibration, ("the calibration batch itself (give --validation "
                                           "or more batches for held-out figures)")
    held = max(1, len(calibration) // 4)
    return (calibration[:-held], calibration[-held:],
            f"the last {held} of {len(calibration)} calibration batches, held out of "
            "calibration")


def _fidelity(original, candidate, feeds, provider, mask) -> dict[str, Any]:
    from .htmlreport import fidelity_summary
    from .runtime.validate import validate

    result = validate(original, candidate, feeds, providers=provider, mask=mask)
    heads = classifier_outputs(original)
    rows = [o.to_dict() for o in result.outputs]
    for row in rows:
        if row["name"] not in heads:
            row["top1_agreement"] = None
    summary = fidelity_summary(rows)
    if mask:
        summary["notes"] = [f"per-token outputs compared on real tokens ({mask})"]
    return summary


_HEAD_PASSTHROUGH = {"Add", "Identity", "Reshape", "Flatten", "Squeeze", "Cast"}


def classifier_outputs(model: onnx.ModelProto) -> set[str]:
    """The outputs whose top-1 agreement means something: logits (a ``Gemm``/``MatMul``/
    ``Conv`` head, through bias adds and reshapes) or probabilities (``Softmax``,
    ``LogSoftmax``). An embedding (a ``LayerNormalization`` hidden state, a ``Tanh``
    pooler) is not one: the argmax of its features is noise (module doc, 3)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    heads = set()
    for out in model.graph.output:
        node = producer.get(out.name)
        for _ in range(8):
            if node is None or node.op_type not in _HEAD_PASSTHROUGH:
                break
            node = producer.get(node.input[0]) if node.input else None
        if node is not None and node.op_type in {"Gemm", "MatMul", "Conv", "Softmax",
                                                 "LogSoftmax"}:
            heads.add(out.name)
    return heads


def _mask_input(model: onnx.ModelProto) -> str | None:
    """The attention mask the token analysis finds: per-token outputs are compared on real
    tokens, since the original's values at padded positions mean nothing."""
    from .analysis.tokens import analyze_tokens

    try:
        found = analyze_tokens(model)
    except Exception as exc:  # noqa: BLE001 - an analysis failure only loses the masking
        logger.debug("token analysis failed: %s", exc)
        return None
    return None if isinstance(found, str) else found.mask


def _latency(original, candidate, feeds, provider, threads, timing
             ) -> tuple[float, float, float | None]:
    """(candidate ms, original ms, relative error of their ratio) summed over ``feeds``."""
    from .runtime.benchmark import benchmark

    a = b = 0.0
    parts = []
    for feed in feeds:
        result = benchmark(candidate, vs=original, provider=provider, feeds=feed,
                           threads=threads, **timing)
        a += result.a.median_ms
        b += result.b.median_ms
        parts.append((result.a.median_ms, result.ratio_error))
    if any(e is None for _, e in parts) or a <= 0:
        return a, b, None
    return a, b, float(np.sqrt(sum((ms / a * e) ** 2 for ms, e in parts)))


def run_sweep(
    model: str | os.PathLike,
    calibration: list[Feed],
    out: str | os.PathLike,
    *,
    validation: list[Feed] | None = None,
    budgets: Sequence[Budget] = (Budget("macs", 1.0),),
    quantize: Sequence[str] = ("none",),
    provider: str = "cpu",
    threads: int | None = None,
    pick: tuple[str, float] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    plans: Sequence[CandidatePlan] | None = None,
    bench_batches: int = 1,
    warmup: int = 2,
    rounds: int = 10,
    min_time: float = 1.0,
    progress: Progress | None = None,
) -> SweepResult:
    """Build, measure and (with ``pick``) choose candidates; see the module doc. Writes the
    candidate models under ``out/candidates``; the caller writes sweep.json and the page.
    ``plans`` replaces the budget × quantize plans (benchmarks add rows such as int8 alone)."""
    from .analysis.cost import count_cost
    from .api import optimize
    from .errors import PassError
    from .htmlreport import kept_units
    from .ir.model import load, model_size_bytes, save
    from .runtime.providers import ProviderOptions, create_session

    original = load(model)
    calib, val, val_note = split_feeds(list(calibration), list(validation or []) or None)
    if not calib:
        raise InputSpecError("no calibration batches given")
    from .runtime.validate import check_feeds

    check_feeds(original, calib)
    check_feeds(original, val)
    if bench_batches < 1:
        raise ConfigError(f"bench_batches must be 1 or more, got {bench_batches}")
    create_session(original, provider, ProviderOptions(threads=threads), label=str(model))
    shapes = dict(input_shapes or {k: tuple(v.shape) for k, v in calib[0].items()})
    if plans is None:
        plans, notes = plan_candidates(original, budgets, quantize, provider=provider)
    else:
        plans, notes = list(plans), []
    mask = _mask_input(original)
    bench_feeds = [val[i % len(val)] for i in range(bench_batches)]
    timing = dict(warmup=warmup, rounds=rounds, min_time=min_time)
    folder = Path(out) / "candidates"
    folder.mkdir(parents=True, exist_ok=True)
    base_cost = count_cost(original, shapes)
    result = SweepResult(
        model=str(model), provider=provider, metric=pick[0] if pick else "cosine",
        original={"name": "original", "params": base_cost.params, "macs": base_cost.macs,
                  "size_bytes": model_size_bytes(original)},
        candidates=[], validation=val_note, threads=threads,
        latency=(f"A/B interleaved against the original on {provider}, "
                 f"{bench_batches} batch(es) of {_fmt_shapes(bench_feeds[0])}, median of "
                 f">= {rounds} runs"),
        notes=notes, machine={"cpus": os.cpu_count(), "load_average": _load()},
    )
    steps = len(plans) * 3
    done = 0
    built: dict[tuple[str, ...], tuple[Any, ...]] = {}

    def tick(message: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(message, done, steps)

    for plan in plans:
        start = time.perf_counter()
        cand = Candidate(plan.name, plan.budget.label, plan.quantize, plan.specs)
        result.candidates.append(cand)
        if progress:
            progress(f"building {plan.name}", done, steps)
        try:
            if plan.float_specs not in built:
                built[plan.float_specs] = _build_float(original, plan.float_specs, calib,
                                                       shapes)
            base, base_report, error, cost = built[plan.float_specs]
            cand.report = list(base_report)
            if error:
                raise _CandidateError(error)
            cand.kept = kept_units(original, base)
            model_out = base
            if plan.quant_spec:
                try:
                    model_out, qreport = optimize(base, [plan.quant_spec], calibration=calib,
                                                  input_shapes=shapes, holdout=0)
                except PassError as exc:
                    cand.report += _failed_report(exc)
                    raise _CandidateError(str(exc)) from None
                cand.report += [p.to_dict() for p in qreport.passes]
            cand.params, cand.macs = cost.params, cost.macs
            path = folder / f"{_file_name(plan.name)}.onnx"
            save(model_out, path)
            cand.path = str(path)
            cand.size_bytes = sum(f.stat().st_size for f in (  # with its external data file
                path, path.with_name(path.name + ".data")) if f.exists())
            tick(f"validating {plan.name}")
            cand.fidelity = _fidelity(original, model_out, val, provider, mask)
            tick(f"timing {plan.name} against the original")
            cand.latency_ms, cand.original_ms, cand.speedup_error = _latency(
                original, model_out, bench_feeds, provider, threads, timing)
            cand.speedup = cand.original_ms / cand.latency_ms if cand.latency_ms else None
            tick(f"done {plan.name}")
        except (_CandidateError, GraphoptError) as exc:
            cand.error = str(exc)
            logger.warning("candidate %s failed: %s", plan.name, exc)
            done = (result.candidates.index(cand) + 1) * 3
            if progress:
                progress(f"{plan.name} failed", done, steps)
        cand.seconds = time.perf_counter() - start
    timed = [c.original_ms for c in result.candidates if c.original_ms]
    if timed:
        result.original["latency_ms"] = float(np.median(timed))
    if pick:
        metric, floor = pick
        result.pick = {"floor": f"min_{metric}={floor:g}", "metric": metric, "value": floor,
                       "chosen": pick_candidate(result.candidates, metric, floor)}
    return result


class _CandidateError(Exception):
    pass


def _build_float(original, specs, calib, shapes):
    """(model, pass reports, error, cost) of a budget's float model. Cost is counted before
    ``unpad-tokens`` (and the ``LOSSLESS_LAST`` passes after it): the packed token count
    depends on each batch's mask, so MACs are those of the padded batch (quantization
    leaves them as they are too)."""
    from .analysis.cost import count_cost
    from .api import optimize
    from .errors import PassError

    tail = [s for s in specs if s == UNPAD or s.split(":")[0] in LOSSLESS_LAST]
    head = [s for s in specs if s not in tail]
    base, passes = original, []
    try:
        if head:
            # the sweep measures fidelity on its own validation: all of calib calibrates
            base, report = optimize(original, head, calibration=calib, input_shapes=shapes,
                                    holdout=0)
            passes = [p.to_dict() for p in report.passes]
        cost = count_cost(base, shapes)
        if tail:
            base, report = optimize(base, tail, calibration=calib, input_shapes=shapes,
                                    holdout=0)
            passes += [p.to_dict() for p in report.passes]
    except PassError as exc:
        return None, passes + _failed_report(exc), str(exc), None
    return base, passes, None, cost


def _failed_report(exc) -> list[dict[str, Any]]:
    report = getattr(exc, "report", None)
    return [p.to_dict() for p in report.passes] if report is not None else []


def _file_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def _fmt_shapes(feed: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, np.shape(v)))}" for k, v in feed.items())


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
