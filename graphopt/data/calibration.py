"""Activation capture through onnxruntime, with bounded memory.

Intermediate tensors are exposed as extra graph outputs of a temporary copy of the model;
each calibration feed is run once and every captured tensor goes to a reducer that keeps
running statistics, so memory holds one batch of activations, never the whole data set.

1. ``capture(model, feeds, names, reducer)`` calls ``reducer(name, array)`` per feed and
   captured tensor, in feed order.
2. ``ChannelStats`` is the common reducer: per-channel count, mean |x|, mean x, mean x², and
   the fraction of zeros (APoZ), over every axis but the channel axis.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt.errors import InputSpecError

logger = logging.getLogger(__name__)


def _session_with_outputs(model: onnx.ModelProto, names: Sequence[str], providers):
    """A session computing ``names`` (the nodes they need only, the large weights shared
    with ``model``'s bytes: ``graphopt.data.segments``); ``model`` is left as it was."""
    from graphopt.data.segments import segment_session

    return segment_session(model, names, providers)


def capture(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    names: Sequence[str],
    reducer: Callable[[str, np.ndarray], None],
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    batch_outputs: int = 64,
) -> int:
    """Run ``feeds`` through ``model`` and hand each tensor in ``names`` to ``reducer``.

    Tensors are captured at most ``batch_outputs`` at a time (one session per chunk), so a
    model with thousands of candidate tensors does not hold all of them per feed.
    Returns the number of feeds run.
    """
    names = list(dict.fromkeys(names))
    feeds = list(feeds)
    if not feeds:
        raise InputSpecError("no calibration inputs were given")
    for start in range(0, max(len(names), 1), batch_outputs):
        chunk = names[start:start + batch_outputs]
        try:
            session = _session_with_outputs(model, chunk, providers)
        except Exception as exc:  # noqa: BLE001
            raise InputSpecError(f"cannot build a capture session: {exc}") from exc
        wanted = {i.name for i in session.get_inputs()}
        for feed in feeds:
            missing = wanted - set(feed)
            if missing:
                raise InputSpecError(f"calibration inputs lack {sorted(missing)}")
            values = session.run(chunk, {k: v for k, v in feed.items() if k in wanted})
            for name, value in zip(chunk, values):
                reducer(name, value)
    return len(feeds)


@dataclass
class ChannelStats:
    """Running per-channel statistics of captured tensors, keyed by tensor name.

    ``axis`` maps a tensor name to its channel axis (default 1 for 4-D conv maps, -1
    otherwise). Memory per tensor is O(channels).
    """

    axis: Mapping[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    abs_sum: dict[str, np.ndarray] = field(default_factory=dict)
    sum: dict[str, np.ndarray] = field(default_factory=dict)
    sq_sum: dict[str, np.ndarray] = field(default_factory=dict)
    zeros: dict[str, np.ndarray] = field(default_factory=dict)

    def channel_axis(self, name: str, ndim: int) -> int:
        if name in self.axis:
            return self.axis[name] % ndim
        return 1 if ndim == 4 else ndim - 1

    def __call__(self, name: str, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float64)
        if value.ndim == 0:
            value = value.reshape(1)
        axis = self.channel_axis(name, value.ndim)
        flat = np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])
        n = flat.shape[0]
        if name not in self.count:
            c = flat.shape[1]
            self.count[name] = 0
            self.abs_sum[name] = np.zeros(c)
            self.sum[name] = np.zeros(c)
            self.sq_sum[name] = np.zeros(c)
            self.zeros[name] = np.zeros(c)
        self.count[name] += n
        self.abs_sum[name] += np.abs(flat).sum(0)
        self.sum[name] += flat.sum(0)
        self.sq_sum[name] += (flat * flat).sum(0)
        self.zeros[name] += (flat == 0).sum(0)

    def mean_abs(self, name: str) -> np.ndarray:
        return self.abs_sum[name] / max(self.count[name], 1)

    def mean(self, name: str) -> np.ndarray:
        return self.sum[name] / max(self.count[name], 1)

    def rms(self, name: str) -> np.ndarray:
        """‖x‖ per channel normalized by count (the Wanda activation norm)."""
        return np.sqrt(self.sq_sum[name] / max(self.count[name], 1))

    def std(self, name: str) -> np.ndarray:
        mean = self.mean(name)
        return np.sqrt(np.maximum(self.sq_sum[name] / max(self.count[name], 1) - mean**2, 0.0))

    def apoz(self, name: str) -> np.ndarray:
        """Average percentage of zeros per channel (high = unimportant after ReLU)."""
        return self.zeros[name] / max(self.count[name], 1)
