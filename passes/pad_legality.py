"""When folding an explicit Pad into a Conv or pooling op is exact, for every input size.

``Pad(b, e, value v) -> Op(pads b0, e0)`` becomes ``Op(pads b0 + b, e0 + e)``. Along each
spatial axis both forms see the same padded length ``n + b0 + b + e + e0`` and the same
window starts (in the input's coordinates a window starts at ``j*s - b0 - b`` either way),
so the two can differ only in

1. how many windows there are: onnxruntime's ceil_mode rule drops a last window that
   starts past ``n + pad_head``, and ``pad_head``/``n`` differ between the two forms
   (``output_count`` is onnxruntime's formula, checked against it for every small case);
2. what a window holds where it covers the explicit padding: for ``MaxPool`` the explicit
   value ``v`` takes part in the max, the folded padding never does, so a window that holds
   explicit padding and no input element gives ``v`` before and the lowest float after;
   ``AveragePool`` with ``count_include_pad=1`` and ``LpPool`` add the folded zeros exactly
   as they added the explicit zeros (and the divisor counts padding in both forms).

``axis_blocker`` checks 1 and 2 for every input length the axis may take: the one static
length when it is known from the model's inputs, else every length from 1 up to a bound
past which the windows repeat (beyond ``kernel + pads`` elements only ``n mod stride``
changes which windows exist at the end), so no dynamic size, however small, is missed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a pooling/Conv op reading a Pad."""

    kernel: int
    stride: int
    dilation: int
    own: tuple[int, int]       # the op's own pads (begin, end)
    explicit: tuple[int, int]  # the Pad's pads on this axis (begin, end)


def output_count(n: int, kernel: int, stride: int, dilation: int, begin: int, end: int,
                 ceil_mode: bool) -> int:
    """Windows onnxruntime's pooling makes over ``n`` elements padded by ``begin``/``end``."""
    span = n + begin + end - (dilation * (kernel - 1) + 1)
    if ceil_mode:
        out = math.ceil(span / stride) + 1
        if (out - 1) * stride >= n + begin:
            out -= 1
    else:
        out = int(span / stride) + 1  # C division truncates toward zero
    return max(out, 0)


def _lengths(axis: Axis, static: int | None) -> range | tuple[int, ...]:
    if static is not None:
        return (static,)
    reach = axis.dilation * (axis.kernel - 1) + 1
    pads = sum(axis.own) + sum(axis.explicit)
    return range(1, reach + pads + 2 * axis.stride + 3)


def axis_blocker(axis: Axis, op: str, ceil_mode: bool, static: int | None) -> str | None:
    """Why folding the explicit pads of ``axis`` into ``op`` is not exact, or None.

    ``op`` is ``"Conv"``, ``"MaxPool"``, ``"AveragePool"`` (count_include_pad=1) or
    ``"LpPool"``; the pad value is assumed already checked for the op.
    """
    b, e = axis.explicit
    b0, e0 = axis.own
    for n in _lengths(axis, static):
        before = output_count(n + b + e, axis.kernel, axis.stride, axis.dilation, b0, e0,
                              ceil_mode and op != "Conv")
        after = output_count(n, axis.kernel, axis.stride, axis.dilation, b0 + b, e0 + e,
                             ceil_mode and op != "Conv")
        if before == 0:
            continue  # the model does not run at this length (no window fits)
        if before != after:
            return (f"at input length {n} the op makes {before} windows before the fold and "
                    f"{after} after (ceil_mode counts the padding differently)")
        if op != "MaxPool":
            continue
        for j in range(before):
            start = j * axis.stride - b0 - b
            cells = [start + t * axis.dilation for t in range(axis.kernel)]
            if any(0 <= c < n for c in cells):
                continue
            if any(-b <= c < 0 or n <= c < n + e for c in cells):
                return (f"at input length {n} window {j} (kernel {axis.kernel}, dilation "
                        f"{axis.dilation}, stride {axis.stride}) covers only padding: it "
                        "gives the pad value before the fold and the lowest float after")
    return None
