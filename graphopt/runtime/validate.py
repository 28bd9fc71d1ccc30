"""Numeric validation: a reference and a candidate model on the same inputs.

``validate(reference, candidate)`` runs both through ONNX Runtime on the same feeds (given,
or generated from the input specs, see ``graphopt.ir.inputs``) and compares every reference
output with the candidate output of the same name:

1. An output missing from the candidate, or with another shape or dtype, fails.
2. Float outputs pass when every element satisfies ``np.allclose`` semantics,
   ``|cand - ref| <= atol + rtol * |ref|`` (NaN equals NaN, inf equals the same inf).
   Tolerances default to ``atol``/``rtol`` and can be set per output name (``tolerances``).
3. Integer and bool outputs (ids, argmax, masks) must be equal element for element.
4. Reported per output, over all feeds: max and mean absolute error; elements outside
   tolerance; for float outputs also max relative error and cosine similarity of the
   flattened outputs; and top-1 agreement (fraction of rows whose argmax over the last axis
   agrees) for 2-D float outputs ``[batch, classes]`` and for 3-D ones named like logits
   ``[batch, seq, vocab]``.

Relative error is elementwise, ``|cand - ref| / max(|ref|, 1e-3 * max|ref|)``, where
``max|ref|`` is that output's largest magnitude on that feed: for every element above 0.1 %
of the output's scale this is the plain relative error, and references at or near zero
(ReLU outputs, masked positions) are clamped instead of blowing it up to infinity.

Cosine of two all-zero outputs is 1; of a zero and a non-zero output, 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt.errors import ConfigError, InputSpecError, ModelFormatError, check_known
from graphopt.ir.inputs import Shape, generate_inputs, input_specs, resolve_shapes
from graphopt.ir.model import ModelLike, Opened, open_for_run
from graphopt.runtime.providers import OrtProvider, create_session, resolve_ort_providers
from graphopt.runtime.session import ort_session_for

logger = logging.getLogger(__name__)

REL_FLOOR = 1e-3
_LOGIT_WORDS = ("logit", "score")

Feed = Mapping[str, np.ndarray]


@dataclass
class OutputComparison:
    """One output's comparison; ``message`` says why it failed, in words."""

    name: str
    ok: bool
    atol: float
    rtol: float
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    candidate_shape: tuple[int, ...] | None = None
    candidate_dtype: str | None = None
    exact: bool = False  # integer/bool output compared for equality
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_rel: float | None = 0.0  # None for integer outputs, where it means nothing
    cosine: float | None = None
    top1_agreement: float | None = None
    mismatched: int = 0
    elements: int = 0
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "atol": self.atol,
            "rtol": self.rtol,
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            "candidate_shape": list(self.candidate_shape)
            if self.candidate_shape is not None else None,
            "candidate_dtype": self.candidate_dtype,
            "exact": self.exact,
            "max_abs": _num(self.max_abs),
            "mean_abs": _num(self.mean_abs),
            "max_rel": _num(self.max_rel),
            "cosine": _num(self.cosine),
            "top1_agreement": _num(self.top1_agreement),
            "mismatched": self.mismatched,
            "elements": self.elements,
            "message": self.message,
        }


@dataclass
class ValidationResult:
    """Per-output comparisons; ``ok`` when every reference output passed.

    ``exit_code`` is what the CLI returns: 0 within tolerance, 1 outside.
    """

    outputs: list[OutputComparison]
    feeds: int
    input_shapes: dict[str, Shape] = field(default_factory=dict)
    atol: float = 1e-4
    rtol: float = 1e-3
    extra_outputs: list[str] = field(default_factory=list)  # only in the candidate
    mask: str | None = None  # per-token outputs compared on this mask's real tokens only

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def failed(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.ok]

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def output(self, name: str) -> OutputComparison:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "feeds": self.feeds,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "atol": self.atol,
            "rtol": self.rtol,
            "outputs": [o.to_dict() for o in self.outputs],
            "extra_outputs": list(self.extra_outputs),
            "mask": self.mask,
            "failed": [o.name for o in self.failed],
        }


def real_token_outputs(outputs: Mapping[str, np.ndarray], mask: np.ndarray,
                       names: Sequence[str] | None = None,
                       selected: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """``outputs`` with the padded tokens (``mask == 0``) of per-token outputs set to 0.

    A per-token output is one whose first two dims are the mask's ``[batch, sequence]``
    (and, when ``names`` is given, one of ``names``); ``selected`` maps outputs computed
    from one token (a pooler reading token 0) to that token's index, and their rows where
    it is padding are set to 0; other outputs are returned as they are. Comparing two
    models through this compares only the tokens users consume.
    """
    mask = np.asarray(mask)
    out = {}
    for name, value in outputs.items():
        value = np.asarray(value)
        if (names is None or name in names) and mask.ndim == 2 and value.ndim >= 2 and \
                value.shape[:2] == mask.shape:
            keep = (mask != 0).reshape(mask.shape + (1,) * (value.ndim - 2))
            value = np.where(keep, value, np.zeros((), value.dtype))
        k = (selected or {}).get(name)
        if k is not None and mask.ndim == 2 and value.ndim >= 1 and \
                value.shape[0] == mask.shape[0] and -mask.shape[1] <= k < mask.shape[1]:
            keep = (mask[:, k] != 0).reshape((-1,) + (1,) * (value.ndim - 1))
            value = np.where(keep, value, np.zeros((), value.dtype))
        out[name] = value
    return out


def _num(value: float | None) -> float | str | None:
    """JSON-safe float: non-finite values become ``"inf"``, ``"-inf"`` or ``"nan"``."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


# --------------------------------------------------------------------------- accumulation


class _Accumulator:
    """Running statistics for one output over several feeds (no stored tensors)."""

    def __init__(self, name: str, atol: float, rtol: float):
        self.row = OutputComparison(name=name, ok=True, atol=atol, rtol=rtol)
        self.sum_abs = 0.0
        self.dot = 0.0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.top1_hits = 0
        self.top1_rows = 0

    def fail(self, message: str) -> None:
        if self.row.ok:
            self.row.ok = False
            self.row.message = message

    def add(self, ref: np.ndarray, cand: np.ndarray | None) -> None:
        row = self.row
        if row.shape is None:
            row.shape, row.dtype = tuple(ref.shape), str(ref.dtype)
            row.exact = not _is_float(ref.dtype)
        if cand is None:
            self.fail("missing in the candidate")
            return
        if row.candidate_shape is None:
            row.candidate_shape, row.candidate_dtype = tuple(cand.shape), str(cand.dtype)
        if ref.shape != cand.shape:
            self.fail(f"shape {_fmt(cand.shape)} in the candidate, {_fmt(ref.shape)} in the "
                      "reference")
            return
        if _is_float(ref.dtype) != _is_float(cand.dtype) or (
            not _is_float(ref.dtype) and ref.dtype != cand.dtype
        ):
            self.fail(f"dtype {cand.dtype} in the candidate, {ref.dtype} in the reference")
            return
        if ref.dtype != cand.dtype:
            # Float widths differ: compared by value, but the interface changed.
            self.fail(f"dtype {cand.dtype} in the candidate, {ref.dtype} in the reference")
        row.elements += ref.size
        if ref.size == 0:
            return
        if row.exact:
            self._add_exact(ref, cand)
        else:
            self._add_float(ref, cand)

    def _add_exact(self, ref: np.ndarray, cand: np.ndarray) -> None:
        row = self.row
        unequal = int(np.count_nonzero(ref != cand))
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        row.max_abs = max(row.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        row.mismatched += unequal

    def _add_float(self, ref: np.ndarray, cand: np.ndarray) -> None:
        row = self.row
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        close = np.isclose(c, r, rtol=row.rtol, atol=row.atol, equal_nan=True)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(c - r)
        same = (c == r) | (np.isnan(c) & np.isnan(r))
        diff[same] = 0.0
        diff[np.isnan(diff)] = np.inf
        finite_ref = np.abs(r[np.isfinite(r)])
        scale = float(finite_ref.max()) if finite_ref.size else 0.0
        with np.errstate(invalid="ignore", over="ignore"):
            rel = diff / np.maximum(np.abs(r), max(REL_FLOOR * scale, 1e-30))
        rel[same] = 0.0
        row.max_abs = max(row.max_abs, float(diff.max()))
        row.max_rel = max(row.max_rel, float(np.nanmax(rel)))
        self.sum_abs += float(diff.sum())
        row.mismatched += int(ref.size - np.count_nonzero(close))
        with np.errstate(invalid="ignore", over="ignore"):
            self.dot += float(np.dot(r.ravel(), c.ravel()))
            self.ref_sq += float(np.dot(r.ravel(), r.ravel()))
            self.cand_sq += float(np.dot(c.ravel(), c.ravel()))
        if _wants_top1(row.name, ref.shape):
            hits = np.argmax(r, axis=-1) == np.argmax(c, axis=-1)
            self.top1_hits += int(np.count_nonzero(hits))
            self.top1_rows += hits.size

    def finish(self) -> OutputComparison:
        row = self.row
        if row.mismatched and row.exact:
            self.fail(f"{row.mismatched} of {row.elements} elements differ (integer output, "
                      "compared exactly)")
        elif row.mismatched:
            self.fail(f"{row.mismatched} of {row.elements} elements outside "
                      f"atol={row.atol:g}, rtol={row.rtol:g} (max abs error {row.max_abs:.3g})")
        if row.elements:
            row.mean_abs = self.sum_abs / row.elements
        if row.exact:
            row.max_rel = None
        if not row.exact and row.elements and row.candidate_shape == row.shape:
            row.cosine = _cosine(self.dot, self.ref_sq, self.cand_sq)
        if self.top1_rows:
            row.top1_agreement = self.top1_hits / self.top1_rows
        return row


def _cosine(dot: float, ref_sq: float, cand_sq: float) -> float:
    if not all(math.isfinite(v) for v in (dot, ref_sq, cand_sq)):
        return float("nan")
    if ref_sq == 0.0 and cand_sq == 0.0:
        return 1.0
    if ref_sq == 0.0 or cand_sq == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(ref_sq * cand_sq)))


def _is_float(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.floating))


def _wants_top1(name: str, shape: tuple[int, ...]) -> bool:
    if not shape or shape[-1] < 2:
        return False
    if len(shape) == 2:
        return True
    return len(shape) == 3 and any(w in name.lower() for w in _LOGIT_WORDS)


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --------------------------------------------------------------------------- running


def _differences(a, b, only_a: str, only_b: str) -> list[str]:
    """Phrases for the names only ``a`` or only ``b`` has: ``only_a``/``only_b`` format the
    sorted names in ``{}``; empty when both have the same names."""
    parts = []
    for fmt, names in ((only_a, set(a) - set(b)), (only_b, set(b) - set(a))):
        if names:
            parts.append(fmt.format(", ".join(sorted(names))))
    return parts


def check_same_inputs(a: onnx.ModelProto, b: onnx.ModelProto,
                      a_label: str = "reference", b_label: str = "candidate") -> None:
    """Both models take the same input names, else ``InputSpecError`` naming the difference."""
    names_a = [s.name for s in input_specs(a)]
    names_b = [s.name for s in input_specs(b)]
    if set(names_a) == set(names_b):
        return
    parts = _differences(names_a, names_b, f"only the {a_label} has {{}}",
                         f"only the {b_label} has {{}}")
    raise InputSpecError(
        f"the models take different inputs: {'; '.join(parts)}; compare models with the "
        "same input names"
    )


def check_feeds(model: onnx.ModelProto, feeds: Sequence[Feed]) -> None:
    """Every feed has exactly the model's input names, else ``InputSpecError``."""
    names = {s.name for s in input_specs(model)}
    for i, feed in enumerate(feeds):
        detail = _differences(names, feed, "lacks {}", "has {} which the model does not take")
        if detail:
            raise InputSpecError(
                f"input set {i} {' and '.join(detail)} (model inputs: "
                f"{', '.join(sorted(names)) or 'none'})"
            )


def _session(model, providers: Sequence[OrtProvider] | str, label: str):
    if isinstance(providers, str):
        return create_session(model, providers, label=label)[0]
    try:
        return ort_session_for(model, resolve_ort_providers(providers))
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ModelFormatError(f"onnxruntime cannot load the {label}: {first}") from exc


def _run(session, feed: Feed, label: str) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, dict(feed))
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise InputSpecError(
            f"onnxruntime failed to run the {label} on the inputs: {first} (check the input "
            "shapes and dtypes)"
        ) from exc
    return {n: np.asarray(v) for n, v in zip(names, values)}


def validate(
    reference: ModelLike | Opened,
    candidate: ModelLike | Opened,
    feeds: Sequence[Feed] | Feed | None = None,
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    count: int = 2,
    seed: int = 0,
    providers: Sequence[OrtProvider] | str = ("CPUExecutionProvider",),
    mask: str | None = None,
    selected: Mapping[str, int] | None = None,
) -> ValidationResult:
    """Compare ``candidate`` with ``reference`` output by output (see the module doc).

    ``feeds``: feed dicts (e.g. from ``graphopt.ir.inputs.load_inputs``), or None to generate
    ``count`` of them from the reference's input specs and ``input_shapes`` (seeds
    ``seed``, ``seed + 1``, ...). ``tolerances`` maps output names to ``(atol, rtol)``.
    ``providers``: ORT provider names (short names ``cpu``/``cuda`` work too); a single
    string such as ``"cuda"`` or ``"auto"`` goes through provider detection.
    ``mask``: an attention-mask input; per-token outputs (``[batch, sequence, ...]``) are
    then compared on real tokens only (``real_token_outputs``), and generated feeds get
    ragged masks; ``selected`` (see ``real_token_outputs``) leaves out rows of outputs
    that read one token where that token is padding.
    """
    if atol < 0 or rtol < 0:
        raise ConfigError(f"atol and rtol must be 0 or more, got atol={atol}, rtol={rtol}")
    if count < 1:
        raise ConfigError(f"count must be 1 or more, got {count}")
    # A model file over 2 GB stays on disk (its outline here, onnxruntime reads the file).
    ref, cand = open_for_run(reference), open_for_run(candidate)
    (ref_model, ref_label, ref_run), (cand_model, cand_label, cand_run) = (
        (o.model, o.label, o.runnable) for o in (ref, cand))
    check_same_inputs(ref_model, cand_model)
    ref_outputs = [o.name for o in ref_model.graph.output]
    tolerances = dict(tolerances or {})
    check_known(tolerances, ref_outputs, "tolerance given for {unknown}, which the reference "
                "does not output (outputs: {known})")
    for name, tol in tolerances.items():
        if len(tol) != 2 or tol[0] < 0 or tol[1] < 0:
            raise ConfigError(f"tolerance for {name} must be (atol, rtol) >= 0, got {tol}")

    if feeds is None:
        feed_list: list[Feed] = [
            generate_inputs(ref_model, input_shapes, seed=seed + i, ragged=bool(mask))
            for i in range(count)
        ]
        shapes = resolve_shapes(ref_model, input_shapes)
    else:
        feed_list = [feeds] if isinstance(feeds, Mapping) else list(feeds)
        if not feed_list:
            raise InputSpecError("no input sets given; pass at least one feed dict")
        check_feeds(ref_model, feed_list)
        shapes = {k: tuple(np.shape(v)) for k, v in feed_list[0].items()}
    if mask and mask not in {s.name for s in input_specs(ref_model)}:
        raise ConfigError(f"--mask {mask}: the reference has no input named so (inputs: "
                          f"{', '.join(s.name for s in input_specs(ref_model))})")

    ref_session = _session(ref_run, providers, f"reference ({ref_label})")
    cand_session = _session(cand_run, providers, f"candidate ({cand_label})")
    accs = {
        name: _Accumulator(name, *tolerances.get(name, (atol, rtol))) for name in ref_outputs
    }
    cand_names: list[str] = []
    for i, feed in enumerate(feed_list):
        expected = _run(ref_session, feed, "reference")
        got = _run(cand_session, feed, "candidate")
        cand_names = list(got)
        if mask:
            expected = real_token_outputs(expected, feed[mask], selected=selected)
            got = real_token_outputs(got, feed[mask], selected=selected)
        for name, acc in accs.items():
            acc.add(expected[name], got.get(name))
        logger.debug("validated input set %d of %d", i + 1, len(feed_list))
    outputs = [acc.finish() for acc in accs.values()]
    for row in outputs:
        if not row.ok:
            logger.info("output %s failed: %s", row.name, row.message)
    return ValidationResult(
        outputs=outputs,
        feeds=len(feed_list),
        input_shapes=dict(shapes),
        atol=atol,
        rtol=rtol,
        extra_outputs=[n for n in cand_names if n not in accs],
        mask=mask,
    )
