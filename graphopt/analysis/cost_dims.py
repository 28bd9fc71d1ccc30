"""MACs as a function of a model's dynamic input dims: ``MACs = 12.6M·batch·seq + 98.3k·batch·seq²``.

``macs_formula(model, input_shapes)`` says how the MACs ``count_cost`` gives grow with each
dynamic dim the user did not fix:

1. The variables are the dynamic dims: one per ``dim_param`` name (``batch`` shared by
   ``input_ids`` and ``attention_mask`` is one variable), one per unnamed dynamic axis
   (``x[2]``). Dims fixed by the model or by ``input_shapes`` are constants.
2. MACs of the ops counted (Conv, Gemm, MatMul, attention) are products of dims, so with
   each variable at most squared (attention's ``seq²``) they are a polynomial
   ``Σ c_e · Π dᵢ^eᵢ`` with ``eᵢ ∈ {0, 1, 2}``. ``count_cost`` is evaluated on the grid
   ``dᵢ ∈ {1, 2, 3} · baseᵢ`` (``3^k`` points, ``k`` variables) and the coefficients solved
   exactly from that tensor-product Vandermonde system. ``baseᵢ`` is 1 for a batch axis
   (axis 0) and 32 for other dims, so stride-32 backbones divide exactly.
3. The formula is checked at one more point (every variable at 4·base): a model whose MACs
   are not such a polynomial there (a dim that changes which branch runs) gets no formula
   but a ``reason``; so do more than 3 variables (``3^k`` shape inferences) and sizes the
   model does not run at. It holds at the sizes tried and multiples of them: below 32 a
   stride-2 stack rounds (PP-OCR's detector counts 1.38M at 16×16, the formula says 1.55M).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt.ir.inputs import Shape, input_specs, resolve_shapes

MAX_VARIABLES = 3
_BASE_BATCH, _BASE_DIM = 1, 32
_VANDERMONDE = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 4.0], [1.0, 3.0, 9.0]])


@dataclass
class MacsFormula:
    """``terms``: (coefficient, {variable: exponent}), highest degree first; ``variables``:
    variable -> the input axes it stands for (``input_ids[0]``); ``reason`` when no formula
    was found (``terms`` then empty)."""

    terms: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    variables: dict[str, list[str]] = field(default_factory=dict)
    reason: str = ""

    def evaluate(self, dims: Mapping[str, int]) -> float:
        return sum(c * np.prod([dims[v] ** e for v, e in mono.items()])
                   for c, mono in self.terms)

    def text(self) -> str:
        if not self.terms:
            return ""
        parts = []
        for c, mono in self.terms:
            dims = "·".join(v if e == 1 else f"{v}²" for v, e in mono.items())
            number = _si(c)
            parts.append(f"{number}·{dims}" if dims else number)
        return " + ".join(parts)

    def to_dict(self) -> dict:
        return {"text": self.text(), "reason": self.reason or None,
                "variables": self.variables,
                "terms": [{"coefficient": c, "dims": mono} for c, mono in self.terms]}


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _variables(model: onnx.ModelProto, fixed: Mapping[str, Shape]
               ) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for spec in input_specs(model):
        if spec.name in fixed:
            continue
        for axis, dim in enumerate(spec.dims):
            if not isinstance(dim, int):  # "?" is a placeholder, not a name shared by axes
                named = isinstance(dim, str) and dim != "?"
                out.setdefault(dim if named else f"{spec.name}[{axis}]", []).append(
                    (spec.name, axis))
    return out


def _shapes_at(base: Mapping[str, Shape], variables, values: Mapping[str, int]
               ) -> dict[str, Shape]:
    shapes = {k: list(v) for k, v in base.items()}
    for var, axes in variables.items():
        for name, axis in axes:
            shapes[name][axis] = values[var]
    return {k: tuple(v) for k, v in shapes.items()}


def macs_formula(model: onnx.ModelProto, input_shapes: Mapping[str, Shape] | None = None
                 ) -> MacsFormula | None:
    """The MACs as a polynomial in the dynamic dims (see the module doc); None when the
    model has no dynamic dim left."""
    from graphopt.analysis.cost import count_cost

    fixed = dict(input_shapes or {})
    variables = _variables(model, fixed)
    if not variables:
        return None
    shown = {v: [f"{n}[{a}]" for n, a in axes] for v, axes in variables.items()}
    if len(variables) > MAX_VARIABLES:
        return MacsFormula(variables=shown, reason=(
            f"{len(variables)} dynamic dims (at most {MAX_VARIABLES} are solved for); give "
            "--input-shape for some of them"))
    names = list(variables)
    bases = {v: _BASE_BATCH if all(a == 0 for _, a in variables[v]) else _BASE_DIM
             for v in names}
    base_shapes = resolve_shapes(model, fixed)

    def macs_at(scale: Mapping[str, int]) -> int:
        values = {v: scale[v] * bases[v] for v in names}
        cost = count_cost(model, _shapes_at(base_shapes, variables, values))
        if cost.unknown:
            raise ValueError(f"shapes unknown at {values} for {cost.unknown[0]}")
        return cost.macs

    try:
        grid = list(itertools.product((1, 2, 3), repeat=len(names)))
        samples = np.array([macs_at(dict(zip(names, point))) for point in grid], np.float64)
        system = _VANDERMONDE
        for _ in names[1:]:
            system = np.kron(system, _VANDERMONDE)
        scaled = np.linalg.solve(system, samples)
        check = macs_at({v: 4 for v in names})
    except Exception as exc:  # noqa: BLE001 - shape inference fails in many ways at odd sizes
        return MacsFormula(variables=shown, reason=f"MACs could not be counted at the sizes "
                           f"tried ({exc})")
    terms = []
    for exps, c in zip(itertools.product((0, 1, 2), repeat=len(names)), scaled):
        coefficient = float(c) / float(np.prod([bases[v] ** e for v, e in zip(names, exps)]))
        if abs(c) > 1e-6 * max(1.0, float(np.abs(samples).max())):
            terms.append((coefficient, {v: e for v, e in zip(names, exps) if e}))
    terms.sort(key=lambda t: (-sum(t[1].values()), -abs(t[0])))
    formula = MacsFormula(terms, shown)
    predicted = formula.evaluate({v: 4 * bases[v] for v in names})
    if abs(predicted - check) > 1e-6 * max(1.0, abs(check)):
        return MacsFormula(variables=shown, reason=(
            f"MACs are not a polynomial of degree 2 or less in {', '.join(names)} (at 4x the "
            f"sizes tried: {check:.4g} counted, {predicted:.4g} predicted); give --input-shape"))
    return formula
