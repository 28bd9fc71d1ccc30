"""What the lossy structural passes share: the ``reconstruct`` option and the refit step.

1. ``reconstruct=auto`` (the default) is ``lstsq`` when the user gave calibration data and
   ``none`` otherwise: a refit on generated inputs would fit noise. ``none``, ``bias`` and
   ``lstsq`` are ``graphopt.prune.reconstruct``'s modes.
2. ``refit_step`` runs the refit after the cut and returns what the report shows: counters,
   skipped sites, and ``details`` with the per-layer relative errors before/after.
3. ``importance_note``: a pass that ranked units without real calibration data says so.
4. ``rows_note``: a least-squares refit with few calibration rows per input (the thinnest
   site's rows / inputs under ``FEW_ROWS``) says so in the report: such a fit matches its
   calibration much closer than new data (all-MiniLM-L6-v2 at macs=0.6, 128 sentences,
   8 rows per input: cosine 0.987 on them, 0.943 on others), and more calibration data is
   what raised held-out fidelity most in graphopt's measurements (benchmarks/RECONSTRUCT.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from graphopt.errors import ConfigError
from graphopt.core.contract import Context, Skip
from graphopt.prune.reconstruct import MODES, reconstruct

RECONSTRUCT = ("auto",) + MODES
FEW_ROWS = 10  # calibration rows per refit input under which the report says so (4.)
GUESS_NOTE = ("no calibration data given: units were ranked by weights only, which is a "
              "guess, and fidelity was not measured (give --calibration)")


def check_reconstruct(mode: str, damping: float) -> None:
    if mode not in RECONSTRUCT:
        raise ConfigError(f"reconstruct must be one of {', '.join(RECONSTRUCT)}, got '{mode}'")
    if not damping >= 0:
        raise ConfigError(f"damping must be 0 or more, got {damping}")


def resolve_mode(mode: str, ctx: Context) -> str:
    if mode == "auto":
        return "lstsq" if ctx.calibration else "none"
    return mode


def keep_original(model: onnx.ModelProto, mode: str) -> onnx.ModelProto | None:
    """A copy of the model before the cut, when the refit will need its outputs."""
    if mode == "none":
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def refit_step(original: onnx.ModelProto | None, model: onnx.ModelProto,
               outputs: Sequence[str], ctx: Context, mode: str, damping: float,
               columns: Mapping[str, np.ndarray] | None = None,
               max_levels: int | None = None, streams: bool = False,
               postnorm: bool = False, feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
               folds: Sequence[int] | None = None) -> tuple[dict, list[Skip], dict]:
    """Refit ``outputs`` (site output tensors) of ``model`` toward ``original``, on
    ``feeds`` (default: the context's calibration); ``folds``: a fold id per feed, to
    choose each site's damping by cross-validation."""
    details: dict = {"reconstruct": mode}
    if mode == "none" or original is None or not outputs:
        return {}, [], details
    feeds = ctx.calibration_feeds(original) if feeds is None else feeds
    if not ctx.calibration:
        details.setdefault("notes", []).append(
            f"reconstruct={mode} on generated inputs (no calibration data): the refit fits "
            "synthetic activations")
    fits, skipped = reconstruct(original, model, outputs, feeds, mode=mode, damping=damping,
                                target_columns=columns, max_levels=max_levels,
                                streams=streams, postnorm=postnorm, folds=folds)
    details["reconstruction"] = [f.to_dict() for f in fits]
    note = rows_note(fits) if mode == "lstsq" else None
    if note:
        details.setdefault("notes", []).append(note)
    counters = {"sites_refit": len(fits)}
    if fits:
        details["error_before_mean"] = float(np.mean([f.before for f in fits]))
        details["error_after_mean"] = float(np.mean([f.after for f in fits]))
    return counters, [Skip(f"refit {s}", r) for s, r in skipped], details


def rows_note(fits) -> str | None:
    """The report's note on a refit with few rows per input (module doc, 4), or None."""
    fitted = [f for f in fits if f.inputs > 0]
    if not fitted:
        return None
    thin = min(fitted, key=lambda f: f.rows / f.inputs)
    per = thin.rows / thin.inputs
    if per >= FEW_ROWS:
        return None
    return (f"the refit had {per:.1f} calibration rows per input at its thinnest layer "
            f"({thin.site}: {thin.rows} rows, {thin.inputs} inputs); under {FEW_ROWS} a "
            "refit fits its calibration closer than new data: more calibration inputs "
            "raise held-out fidelity most (benchmarks/RECONSTRUCT.md)")
