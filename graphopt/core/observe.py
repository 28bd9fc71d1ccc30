"""Watching a pass manager run: a public hook for benchmarks, tests and progress displays.

An observer is a callable taking one ``Event``; ``PassManager(..., observers=[fn])`` calls it
at the start and at the end of each phase, in order, so it may time phases or sample memory
without patching the manager. Phases (``PHASES``):

1. ``pass``: one pass, from its start to its verdict (``end`` carries the status);
2. ``run``: the pass's own ``run``;
3. ``reference``: onnxruntime outputs of the model before a lossless pass;
4. ``finalize``: cleanup, toposort and shape re-inference of the result;
5. ``checker``: ``onnx.checker`` on the result;
6. ``session``: an onnxruntime session opened on a model (the reference or the result);
7. ``compare``: the result run and compared with the reference;
8. ``snapshot``: a rollback copy written to disk (large models);
9. ``restore``: the model put back after a failed pass;
10. ``cost``: params and MACs counted.
An observer that raises stops the run like any error: observers should not raise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

PHASES = ("pass", "run", "reference", "finalize", "checker", "session", "compare",
          "snapshot", "restore", "cost")


@dataclass(frozen=True)
class Event:
    """``stage`` is "start" or "end"; ``seconds`` (end only) is the phase's wall time;
    ``status`` (end of a ``pass`` only) is the pass's status."""

    phase: str
    stage: str
    pass_name: str | None = None
    seconds: float | None = None
    status: str | None = None


Observer = Callable[[Event], None]


class Observers:
    """The manager's observers and the ``phase`` context that reports to them."""

    def __init__(self, observers: Sequence[Observer] = ()):
        self.observers = list(observers)

    def emit(self, event: Event) -> None:
        for observer in self.observers:
            observer(event)

    @contextmanager
    def phase(self, phase: str, pass_name: str | None = None) -> Iterator[None]:
        if not self.observers:
            yield
            return
        self.emit(Event(phase, "start", pass_name))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.emit(Event(phase, "end", pass_name, time.perf_counter() - start))
