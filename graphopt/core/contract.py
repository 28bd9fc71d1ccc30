"""The pass contract: what a pass is, what it gets and what it returns.

A pass (``Pass`` subclass, registered with ``graphopt.core.registry.register``):

1. has a name (the CLI/recipe spelling), one frozen config dataclass ``Config`` whose
   ``__post_init__`` rejects out-of-range values with ``ConfigError``, and ``lossless``;
2. ``run(model, ctx)`` may change ``model`` in place or return a new one, in a
   ``PassResult`` with ``modified``, counters and skipped sites (data, with reasons);
3. never half-applies: it decides everything, then rewrites.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

import numpy as np
import onnx

from graphopt.core.config import make_config


class SkipCode:
    """The codes a ``Skip`` carries: programs (and passes) test these, never the text."""

    EXCLUDED = "excluded"          # the user's exclude pattern left it out
    NOT_PRUNABLE = "not-prunable"  # the analysis refused it (the reason says why)
    TOO_SMALL = "too-small"        # at or under the pass's minimum
    UNSUPPORTED = "unsupported"    # the pass cannot handle this site (op, pattern, dtype)


SKIP_CODES = (SkipCode.EXCLUDED, SkipCode.NOT_PRUNABLE, SkipCode.TOO_SMALL,
              SkipCode.UNSUPPORTED)


@dataclass(frozen=True)
class Skip:
    """A site a pass looked at and left alone: the reason for people, and a ``code`` for
    programs (a ``SkipCode``) so nothing has to parse the text."""

    site: str
    reason: str
    code: str = SkipCode.UNSUPPORTED


@dataclass
class PassResult:
    """What a pass returns. ``plan`` is the pass's decision as data (what it chose to remove
    and why), for reports and tests; the manager keeps it in the pass's ``PassReport``."""

    model: onnx.ModelProto
    modified: bool
    counters: dict[str, int] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    plan: Any = None
    # Structured extras for the report (JSON-able): per-layer refit errors, notes.
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What passes may need besides the model: input shapes and calibration data.

    ``calibration`` is a list of feed dicts; when None, passes that need data call
    ``calibration_feeds`` which generates them from the input specs.
    """

    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    calibration: list[dict[str, np.ndarray]] | None = None
    seed: int = 0
    calibration_batches: int = 4
    shared: dict | None = None  # what two runs of one optimize share (graphopt.prune.shared)

    def sample_feeds(self, model: onnx.ModelProto, count: int = 1) -> list[dict[str, np.ndarray]]:
        """Inputs for numeric checks: the calibration data if any, else generated."""
        if self.calibration:
            return self.calibration[:count]
        from graphopt.ir.inputs import generate_inputs

        return [
            generate_inputs(model, self.input_shapes, seed=self.seed + i) for i in range(count)
        ]

    def calibration_feeds(self, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
        if self.calibration:
            return self.calibration
        from graphopt.ir.inputs import generate_inputs

        return [
            generate_inputs(model, self.input_shapes, seed=self.seed + i, ragged=True)
            for i in range(self.calibration_batches)
        ]


@dataclass(frozen=True)
class NoConfig:
    """For passes without options."""


C = TypeVar("C")


class Pass(Generic[C]):
    """Base of every pass; see the module doc for the contract. ``class P(Pass[PConfig])``
    declares the config type once: it becomes ``P.Config`` and the type of ``self.config``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    lossless: ClassVar[bool] = True
    # Which dims a lossless check should tolerate: passes that reassociate float math
    # (folding BN into a weight) are compared with this absolute/relative tolerance.
    atol: ClassVar[float] = 1e-4
    rtol: ClassVar[float] = 1e-4

    def __init__(self, config: Any = None, **options: Any):
        if config is not None and options:
            raise TypeError("give a config or keyword options, not both")
        self.config: C = (
            config if config is not None else make_config(self.Config, options, self.name)
        )

    def __init_subclass__(cls, name: str | None = None, lossless: bool | None = None,
                          **kwargs: Any) -> None:
        """``class P(Pass[PConfig], name="p", lossless=False)`` declares a pass in its class
        statement: the same as the class attributes ``name``, ``Config`` and ``lossless``."""
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
        if lossless is not None:
            cls.lossless = lossless
        for base in cls.__dict__.get("__orig_bases__", ()):
            args = get_args(base) if get_origin(base) is Pass else ()
            if args and isinstance(args[0], type):
                cls.Config = args[0]

    # What the pass needs before it runs (``graphopt.core.needs.Need`` values), checked by
    # the manager before any pass runs; ``needs()`` may make them depend on the config.
    requires: ClassVar[tuple[str, ...]] = ()

    def needs(self) -> tuple[str, ...]:
        return tuple(self.requires)

    def check(self, model: onnx.ModelProto, ctx: Context) -> None:
        """Refuse the run before any pass starts (raise a ``GraphoptError`` naming the fix)
        when this pass can never apply to ``model``, the manager's input, for reasons its
        ``requires`` cannot say: a user error is then one line, with no pass run and
        nothing rolled back. Default: accept."""

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def compare_outputs(self, feed, reference, got):
        """What the lossless check compares (a pass may leave out values it defines as
        meaningless, e.g. padded tokens); all outputs by default."""
        return reference, got

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
