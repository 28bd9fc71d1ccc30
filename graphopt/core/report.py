"""What a run reports: one ``PassReport`` per pass, gathered in a ``Report``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from graphopt.core.contract import Skip


def si_number(n: Any, digits: int = 2, *, missing: str = "-", fractions: bool = False) -> str:
    """``n`` for people: 1.23G, 4.50M, 12.00k; under 1000 a whole number (with ``fractions``
    a non-whole one keeps ``digits``); ``missing`` for None. The CLI and HTML reports."""
    if n is None:
        return missing
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return f"{n:.{digits}f}" if fractions and n != int(n) else f"{n:.0f}"


@dataclass
class PassReport:
    name: str
    config: dict[str, Any]
    lossless: bool
    # "changed", "unchanged", "rolled back", "not run", or "unverified": a lossless pass
    # changed the model but nothing ran the model before it, so its outputs were not checked
    status: str
    counters: dict[str, int] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    # MatMul/Conv/attention ops whose MACs could not be counted after the pass, beyond those
    # of the input model (shapes that depend on the data, e.g. unpad-tokens' packed token
    # count): macs_after leaves them out, so it is not a measure of the cut
    macs_uncounted: int = 0
    max_abs_diff: float | None = None
    plan: Any = field(default=None, repr=False)  # the pass's PassResult.plan (not serialized)
    checked_at: list[str] = field(default_factory=list)  # input sizes the check ran at
    unverified: str | None = None  # why the outputs were not checked
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "plan"}
        d["config"] = dict(self.config)
        d["counters"] = dict(self.counters)
        d["skipped"] = [dataclasses.asdict(s) for s in self.skipped]
        return d


@dataclass
class Report:
    passes: list[PassReport] = field(default_factory=list)
    validation: Any = None  # graphopt.runtime.validate.ValidationResult when asked for
    metadata: dict[str, Any] = field(default_factory=dict)
    # graphopt.analysis.cost.Cost of the model before the first pass and after the last,
    # counted by the manager (once per change).
    cost_before: Any = None
    cost_after: Any = None
    # Whether an unverified pass leaves the run ok (the CLI's --allow-unverified).
    allow_unverified: bool = False

    @property
    def ok(self) -> bool:
        return all(p.status != "rolled back" for p in self.passes) and (
            self.allow_unverified or not self.unverified)

    @property
    def unverified(self) -> list[PassReport]:
        return [p for p in self.passes if p.status == "unverified"]

    @property
    def failed(self) -> list[PassReport]:
        return [p for p in self.passes if p.status == "rolled back"]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "passes": [p.to_dict() for p in self.passes],
                               "unverified": [p.name for p in self.unverified]}
        out.update(self.metadata)
        if self.validation is not None:
            out["validation"] = self.validation.to_dict()
        return out


def macs_after(macs: int | None, uncounted: int | None, missing: str = "-") -> str:
    """A pass's MACs after it, or ``?`` where it left ops whose shapes depend on the data:
    their MACs are not in ``macs``, so the number alone would read as a cut."""
    return f"? ({uncounted} ops not sized)" if uncounted else si_number(macs, missing=missing)
