"""What a pass needs before it can run, declared as data and checked by the manager.

A pass lists its needs in ``requires`` (a tuple of ``Need`` values; override ``needs()``
when they depend on the config). ``PassManager.run`` checks every pass's needs against the
input model and context before any pass runs: an unmet need is one error line naming what
to give (``ConfigError``/``InputSpecError``/``UnsupportedModelError``, exit 2), with no pass
run and nothing written. What cannot be said as data stays in ``Pass.check``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from graphopt.errors import ConfigError, InputSpecError, UnsupportedModelError

if TYPE_CHECKING:
    from graphopt.core.contract import Context, Pass


class Need:
    """The needs a pass may declare."""

    CALIBRATION = "calibration"          # real data (--calibration), not generated inputs
    CONCRETE_SHAPES = "concrete-shapes"  # every input dim known (model or --input-shape)
    FLOAT_MODEL = "float-model"          # nothing quantized yet


NEEDS = (Need.CALIBRATION, Need.CONCRETE_SHAPES, Need.FLOAT_MODEL)


def check_needs(p: Pass, model: onnx.ModelProto, ctx: Context) -> None:
    """Raise the error of ``p``'s first need that ``model``/``ctx`` do not meet."""
    for need in p.needs():
        if need == Need.CALIBRATION:
            if not ctx.calibration:
                raise ConfigError(f"pass '{p.name}' needs calibration data (give "
                                  "--calibration DIR)")
        elif need == Need.CONCRETE_SHAPES:
            open_dims = _open_dims(model, ctx)
            if open_dims:
                raise InputSpecError(
                    f"pass '{p.name}' needs concrete input shapes: {', '.join(open_dims)} "
                    "unknown (give --input-shape NAME=DIMS)")
        elif need == Need.FLOAT_MODEL:
            from graphopt.analysis.precision import quantized_ops

            found = quantized_ops(model)
            if found:
                what = ", ".join(f"{n} {op}" for op, n in sorted(found.items()))
                raise UnsupportedModelError(
                    f"pass '{p.name}': the model is already quantized ({what}); quantize "
                    "the float model it came from")
        else:
            raise ValueError(f"pass '{p.name}' declares an unknown need {need!r}")


def _open_dims(model: onnx.ModelProto, ctx: Context) -> list[str]:
    """``input[axis]`` for every input dim neither the model nor ``ctx.input_shapes`` fixes."""
    from graphopt.ir.inputs import input_specs

    given = dict(ctx.input_shapes or {})
    out = []
    for spec in input_specs(model):
        if spec.name in given:
            continue
        out += [f"{spec.name}[{k}]" for k, d in enumerate(spec.dims) if not isinstance(d, int)]
    return out
