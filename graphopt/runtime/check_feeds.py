"""The inputs a lossless pass is checked on: several sizes, each one the model runs.

One generated 16x16 input misses what happens only at other sizes (a dilated pooling window
that covers padding alone at height 1; a detector that needs sides divisible by 32 does not
run at 16 at all). ``find_check_feeds`` tries, on the model before the first pass that
changes it:

1. the user's data (calibration) if any, and the inputs generated at the user's
   ``--input-shape`` (else the defaults of ``graphopt.ir.inputs``);
2. *small*: every dynamic dim (batch axes at 1) at the smallest of 1, 2, 3, S, 2S that runs,
   where S is the model's total stride (``graphopt.ir.strides``: the largest product of
   Conv/pooling strides along any path, upsampling divided out, a guess at the multiple its
   sides must be);
3. *large*: batch axes at 2 and the other dynamic dims at an odd size above small
   (2*small + 1, then 3S, 4S, 16, 32) that runs.

Static dims stay as declared. Each candidate is run once on the model; those that run are
the check feeds, with their outputs as the reference. When none runs, the pass cannot be
verified and the manager says so (``unverified``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from graphopt.ir.inputs import generate_inputs, input_specs
from graphopt.ir.strides import total_stride

logger = logging.getLogger(__name__)

_STRIDED = {"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
            "NhwcConv", "FusedConv"}
# How many candidates each search tries at most (each is one run of the model).
_SMALL_TRIES = 5
_LARGE_TRIES = 4

Feed = dict[str, np.ndarray]


def _shapes(model: onnx.ModelProto, batch: int, size: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for spec in input_specs(model):
        dims = []
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int):
                dims.append(d)
            else:
                dims.append(batch if axis == 0 and len(spec.dims) >= 2 else size)
        shapes[spec.name] = tuple(dims)
    return shapes


def _has_dynamic(model: onnx.ModelProto) -> bool:
    return any(spec.is_dynamic for spec in input_specs(model))


def describe(feed: Mapping[str, np.ndarray]) -> str:
    """``x:1x3x32x32`` style, for reports."""
    return ", ".join(f"{k}:{'x'.join(str(d) for d in np.shape(v)) or 'scalar'}"
                     for k, v in feed.items())


def find_check_feeds(model: onnx.ModelProto, run: Callable[[Feed], dict[str, np.ndarray]],
                     *, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                     calibration: Sequence[Feed] | None = None, seed: int = 0
                     ) -> tuple[list[Feed], list[dict[str, np.ndarray]], list[str]]:
    """(feeds that ran, their outputs, a line per candidate that did not run).

    ``model`` is only read for its input specs and strides (a weight-less outline will do);
    ``run`` runs the model on one feed and raises when it cannot.
    """
    feeds: list[Feed] = []
    outputs: list[dict[str, np.ndarray]] = []
    failed: list[str] = []
    seen: set[str] = set()

    def attempt(feed: Feed) -> bool:
        key = describe(feed)
        if key in seen:
            return key in {describe(f) for f in feeds}
        seen.add(key)
        try:
            out = run(feed)
        except Exception as exc:  # noqa: BLE001 - any failure means "not at this size"
            failed.append(f"{key}: {str(exc).splitlines()[0][:160] if str(exc) else exc!r}")
            return False
        feeds.append(feed)
        outputs.append(out)
        return True

    if calibration:
        attempt(dict(calibration[0]))
    try:
        attempt(generate_inputs(model, input_shapes, seed=seed))
    except Exception as exc:  # noqa: BLE001 - a spec generate_inputs cannot fill
        failed.append(f"generated inputs: {exc}")
    if not _has_dynamic(model):
        return feeds, outputs, failed
    s = total_stride(model)
    small_sizes = sorted({1, 2, 3} | ({s, 2 * s} if s > 1 else set()))[:_SMALL_TRIES]
    small = None
    for size in small_sizes:
        if attempt(generate_inputs(model, _shapes(model, 1, size), seed=seed + 1)):
            small = size
            break
    base = small or 1
    large_sizes = [2 * base + 1] + ([3 * s, 4 * s] if s > 1 else []) + [16, 32]
    tried = 0
    for size in dict.fromkeys(v for v in large_sizes if v > base):
        if tried == _LARGE_TRIES:
            break
        tried += 1
        if attempt(generate_inputs(model, _shapes(model, 2, size), seed=seed + 2)):
            break
    return feeds, outputs, failed
